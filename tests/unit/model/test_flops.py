"""vlm2rec_ray.model.flops (counted FLOPs, peaks, MFU) and the benchmark backbone shapes of model.tiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2rec_ray.model import flops
from vlm2rec_ray.model.backbone import load_backbone
from vlm2rec_ray.model.encoder import VLM2RecEncoder
from vlm2rec_ray.model.tiny import SHAPES, build_tiny_tokenizer, tiny_config


def test_count_flops_counts_a_matmul_as_two_flops_per_multiply_add() -> None:
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        assert flops.count_flops(lambda: lin(x)) == 2 * 5 * 64 * 32


def test_encoder_flops_scale_with_the_batch_and_exceed_the_parameter_bound(tiny_backbone_dir: Path) -> None:
    net, proc = load_backbone(str(tiny_backbone_dir), device="cpu")
    enc = VLM2RecEncoder(net, proc)
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (84, 84, 3), dtype=np.uint8))
    with torch.inference_mode():
        one = flops.count_flops(lambda: enc.encode_items(["red mug"], [im]))
        four = flops.count_flops(lambda: enc.encode_items(["red mug"] * 4, [im] * 4))
    assert one > 0
    assert four == 4 * one  # same-shaped items: FLOPs add up per item
    # Lower bound: every text token passes every non-embedding text weight once (2 FLOPs per weight).
    text_params = sum(p.numel() for n, p in net.language_model.named_parameters() if "embed_tokens" not in n)
    assert one > 2 * text_params


def test_peak_flops_knows_the_common_gpus_and_says_none_otherwise() -> None:
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert flops.peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert flops.peak_flops("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB", "fp16") == pytest.approx(312e12)
    assert flops.peak_flops("NVIDIA L4", "bf16") == pytest.approx(121e12)
    assert flops.peak_flops("cpu", "bf16") is None
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", "float32") is None


def test_mfu_is_achieved_over_peak() -> None:
    assert flops.mfu(1e9, 400.0, 1e12) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="positive"):
        flops.mfu(1e9, 1.0, 0.0)


@pytest.mark.parametrize(("shape", "total_m", "vision_m"), [("tiny", 0.1866, 0.0836), ("small", 17.33, 4.508),
                                                             ("3b", 3444.4, 668.7)])
def test_backbone_shapes_have_the_intended_sizes(shape: str, total_m: float, vision_m: float) -> None:
    """Built on the meta device (no memory): ``3b`` is Qwen2.5-VL-3B layer for layer (its vision tower is the
    real one's 669M parameters; text 2.78B without the embedding, which uses the tiny vocabulary)."""
    from transformers import Qwen2_5_VLModel

    config = tiny_config(build_tiny_tokenizer(0), shape)
    with torch.device("meta"):
        model = Qwen2_5_VLModel(config)
    total = sum(p.numel() for p in model.parameters()) / 1e6
    vision = sum(p.numel() for p in model.visual.parameters()) / 1e6
    assert total == pytest.approx(total_m, rel=1e-3)
    assert vision == pytest.approx(vision_m, rel=1e-3)
    text, _ = SHAPES[shape]
    assert model.config.text_config.num_hidden_layers == text["num_hidden_layers"]


def test_unknown_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backbone shape 'huge'"):
        tiny_config(build_tiny_tokenizer(0), "huge")
