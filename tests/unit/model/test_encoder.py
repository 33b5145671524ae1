"""VLM2RecEncoder on the tiny Qwen2.5-VL: batching, truncation, LoRA targets, checkpointing, and overfitting."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2rec_ray.config import LoraConfig, ObjectiveConfig
from vlm2rec_ray.model.backbone import load_backbone
from vlm2rec_ray.model.encoder import VLM2RecEncoder, fuse
from vlm2rec_ray.model.lora import apply_lora, lora_module_names, trainable_parameter_names
from vlm2rec_ray.objectives import build_objective

WORDS = "red green blue yellow black white shirt lamp mug bag hat watch book toy chair table".split()


def _image(rng: np.random.Generator, h: int, w: int | None = None) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (h, w or h, 3), dtype=np.uint8))


@pytest.fixture
def encoder(tiny_backbone_dir: Path) -> VLM2RecEncoder:
    model, processor = load_backbone(str(tiny_backbone_dir))
    return VLM2RecEncoder(model, processor)


@pytest.fixture
def histories() -> tuple[list[list[str]], list[list[Image.Image]]]:
    """Three users with 3, 1 and 2 items, images of different sizes -> different prompt lengths."""
    rng = np.random.default_rng(0)
    titles = [["red shirt", "blue mug", "wooden lamp"], ["green hat"], ["black chair", "glass table for the kitchen"]]
    images = [[_image(rng, 56), _image(rng, 80, 120), _image(rng, 112)], [_image(rng, 200)],
              [_image(rng, 56), _image(rng, 60, 90)]]
    return titles, images


def test_shapes_and_attributes(encoder: VLM2RecEncoder, histories) -> None:
    titles, images = histories
    assert encoder.hidden_size == 64 and encoder.device.type == "cpu"
    with torch.inference_mode():
        z_t, z_v = encoder.encode_sequences(titles, images)
        e_t, e_v = encoder.encode_items(["a mug", "a lamp"], images[2])
        z_i = encoder.encode_interleaved(titles, images)
    assert z_t.shape == z_v.shape == z_i.shape == (3, 64) and e_t.shape == e_v.shape == (2, 64)
    assert torch.isfinite(torch.cat([z_t, z_v, e_t, e_v, z_i])).all()
    torch.testing.assert_close(fuse(z_t, z_v), z_t + z_v)
    with pytest.raises(ValueError, match="cannot fuse"):
        fuse(z_t, e_t)


def test_batched_equals_single(encoder: VLM2RecEncoder, histories) -> None:
    """Left padding: every row of a mixed-length batch equals the same input encoded alone (1e-5)."""
    titles, images = histories
    assert encoder.processor.tokenizer.padding_side == "left"
    with torch.inference_mode():
        batched = [*encoder.encode_sequences(titles, images), encoder.encode_interleaved(titles, images)]
        items = encoder.encode_items([t[0] for t in titles], [v[0] for v in images])
        for i in range(3):
            single = [*encoder.encode_sequences([titles[i]], [images[i]]),
                      encoder.encode_interleaved([titles[i]], [images[i]])]
            for b, s in zip(batched, single, strict=True):
                torch.testing.assert_close(b[i], s[0], atol=1e-5, rtol=0)
            one = encoder.encode_items([titles[i][0]], [images[i][0]])
            for b, s in zip(items, one, strict=True):
                torch.testing.assert_close(b[i], s[0], atol=1e-5, rtol=0)


def test_item_is_a_one_item_sequence(encoder: VLM2RecEncoder, histories) -> None:
    _, images = histories
    with torch.inference_mode():
        e_t, e_v = encoder.encode_items(["red shirt", "green hat"], [images[0][0], images[1][0]])
        z_t, z_v = encoder.encode_sequences([["red shirt"], ["green hat"]], [[images[0][0]], [images[1][0]]])
    torch.testing.assert_close(e_t, z_t)
    torch.testing.assert_close(e_v, z_v)


def test_history_truncated_to_last_n(tiny_backbone_dir: Path) -> None:
    rng = np.random.default_rng(1)
    titles = [f"{WORDS[i]} {WORDS[(i + 5) % 16]}" for i in range(12)]
    images = [_image(rng, 56) for _ in range(12)]
    model, processor = load_backbone(str(tiny_backbone_dir))
    enc = VLM2RecEncoder(model, processor)  # default max_history = 10
    assert enc.max_history == 10
    with torch.inference_mode():
        full = enc.encode_sequences([titles], [images])
        last10 = enc.encode_sequences([titles[-10:]], [images[-10:]])
        first10 = enc.encode_sequences([titles[:10]], [images[:10]])
        for a, b, c in zip(full, last10, first10, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
            assert (a - c).abs().max() > 1e-4
        short = VLM2RecEncoder(model, processor, max_history=3)
        torch.testing.assert_close(short.encode_text_sequences([titles]), enc.encode_text_sequences([titles[-3:]]))
        torch.testing.assert_close(short.encode_interleaved([titles], [images]),
                                   enc.encode_interleaved([titles[-3:]], [images[-3:]]))
    # The rendered prompt of a 12-item history lists 0) .. 9) only.
    seen: list[str] = []
    real = processor.__class__.__call__

    def spy(self, *args, **kwargs):
        seen.extend(kwargs["text"])
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(processor.__class__, "__call__", spy)
        with torch.inference_mode():
            enc.encode_text_sequences([titles])
    assert "9) " in seen[0] and "10) " not in seen[0] and seen[0].index(titles[2]) > 0 and titles[1] not in seen[0]


def test_errors(encoder: VLM2RecEncoder, histories) -> None:
    titles, images = histories
    with pytest.raises(ValueError, match=r"history 0 has 3 titles but 2 images"):
        encoder.encode_sequences([titles[0]], [images[0][:2]])
    with pytest.raises(ValueError, match=r"titles\[0\] is an empty history"):
        encoder.encode_text_sequences([[]])
    with pytest.raises(ValueError, match=r"got 1 title histories but 2 image histories"):
        encoder.encode_sequences(titles[:1], images[:2])
    with pytest.raises(ValueError, match=r"2 titles but 1 images"):
        encoder.encode_items(["a", "b"], [images[0][0]])
    with pytest.raises(ValueError, match="max_history must be >= 1"):
        VLM2RecEncoder(encoder.backbone, encoder.processor, max_history=0)


def test_lora_wraps_only_language_model_attention(tiny_backbone_dir: Path, histories) -> None:
    model, processor = load_backbone(str(tiny_backbone_dir))
    enc_base = VLM2RecEncoder(model, processor)
    titles, images = histories
    with torch.inference_mode():
        before = enc_base.encode_sequences(titles, images)
    peft_model = apply_lora(model, LoraConfig())  # paper defaults r=16, alpha=32, dropout 0.2
    wrapped = lora_module_names(peft_model)
    assert len(wrapped) == 2 * 4  # 2 decoder layers x {q,k,v,o}
    pattern = re.compile(r"base_model\.model\.language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj")
    assert all(pattern.fullmatch(n) for n in wrapped), wrapped
    assert not any("visual" in n for n in wrapped)
    names = trainable_parameter_names(peft_model)
    assert len(names) == 16 and all(re.search(r"\.lora_(A|B)\.default\.weight$", n) for n in names)
    # lora_B starts at zero: the wrapped model embeds exactly like the base model (pixel_values pass through).
    enc = VLM2RecEncoder(peft_model, processor)
    peft_model.eval()
    with torch.inference_mode():
        after = enc.encode_sequences(titles, images)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"matches no nn\.Linear"):
        apply_lora(load_backbone(str(tiny_backbone_dir))[0], LoraConfig(target_modules=r".*nothing_here$"))
    with pytest.raises(ValueError, match=r"lora\.enabled=false"):
        apply_lora(model, LoraConfig(enabled=False))


def _grads_of_one_step(tiny_backbone_dir: Path, histories, checkpointing: bool) -> tuple[dict, int]:
    torch.manual_seed(0)
    model, processor = load_backbone(str(tiny_backbone_dir))
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero B so every LoRA tensor gets a gradient
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    enc = VLM2RecEncoder(peft_model, processor)
    if checkpointing:
        enc.enable_gradient_checkpointing()
    peft_model.train()
    # transformers checkpoints each decoder layer's forward (the layer's own hooks stay outside), and torch's
    # non-reentrant recompute stops as soon as the last saved tensor is rebuilt: count entries into a submodule.
    mlp = peft_model.base_model.model.language_model.layers[0].mlp
    calls = []
    handle = mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    titles, images = histories
    z_t, z_v = enc.encode_sequences(titles, images)
    e_t, e_v = enc.encode_items([t[-1] for t in titles], [v[-1] for v in images])
    obj = build_objective(ObjectiveConfig(variant="vlm2rec"))
    obj(z_t, z_v, e_t, e_v).total.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return grads, len(calls)


def test_gradient_checkpointing_same_gradients(tiny_backbone_dir: Path, histories) -> None:
    plain, plain_calls = _grads_of_one_step(tiny_backbone_dir, histories, checkpointing=False)
    ckpt, ckpt_calls = _grads_of_one_step(tiny_backbone_dir, histories, checkpointing=True)
    assert plain_calls == 4 and ckpt_calls == 8  # 4 forwards; checkpointing re-runs each layer in backward
    assert plain.keys() == ckpt.keys() and len(plain) == 16
    for name in plain:
        assert plain[name].abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-4)


def test_overfit_16_sequences(tiny_backbone_dir: Path) -> None:
    """Tiny backbone + LoRA + encoder + the VLM2Rec objective drive the loss down on 16 synthetic sequences on
    CPU; every LoRA tensor and both penalty parameters change."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, processor = load_backbone(str(tiny_backbone_dir))
    peft_model = apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0))
    enc = VLM2RecEncoder(peft_model, processor)
    n_items = 24
    titles = [f"{WORDS[i % 8]} {WORDS[8 + (i // 3) % 8]} {i}" for i in range(n_items)]
    images = [_image(rng, 56) for _ in range(n_items)]
    rows = [(list(rng.choice(n_items, size=int(rng.integers(1, 4)), replace=False)), u) for u in range(16)]
    seq_titles = [[titles[i] for i in h] for h, _ in rows]
    seq_images = [[images[i] for i in h] for h, _ in rows]
    item_titles, item_images = [titles[t] for _, t in rows], [images[t] for _, t in rows]

    objective = build_objective(ObjectiveConfig(variant="vlm2rec", tau_wpcl=0.1, tau_crtr=0.1, lam=0.5))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    start = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    alpha0, beta0 = objective.alpha.item(), objective.beta.item()
    opt = torch.optim.AdamW([*trainable, *objective.parameters()], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        out = objective(*enc(seq_titles, seq_images, item_titles, item_images))
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.4 * losses[0], losses
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), start[name]), f"Parameter {name} has not changed."
    assert objective.alpha.item() != alpha0 and objective.beta.item() != beta0
    assert objective.beta.item() >= 0.05


def test_right_padding_still_reads_the_last_real_token(encoder: VLM2RecEncoder, histories) -> None:
    titles, images = histories
    with torch.inference_mode():
        left = encoder.encode_sequences(titles, images)
        encoder.processor.tokenizer.padding_side = "right"  # someone reconfigured the shared processor
        right = encoder.encode_sequences(titles, images)
    for a, b in zip(left, right, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_bf16_backbone_on_cpu(tiny_backbone_dir: Path, histories) -> None:
    """Floating inputs (pixel_values) follow the backbone's dtype; the objective up-casts to fp32."""
    model, processor = load_backbone(str(tiny_backbone_dir), dtype="bf16")
    enc = VLM2RecEncoder(model, processor)
    titles, images = histories
    with torch.inference_mode():
        z_t, z_v = enc.encode_sequences(titles, images)
        e_t, e_v = enc.encode_items([t[0] for t in titles], [v[0] for v in images])
        out = build_objective(ObjectiveConfig())(z_t, z_v, e_t, e_v)
    assert z_t.dtype == z_v.dtype == torch.bfloat16
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_batched_equals_single_and_backward(tiny_backbone_dir: Path, histories) -> None:
    model, processor = load_backbone(str(tiny_backbone_dir), device="cuda")  # bf16 by default on GPU
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    enc = VLM2RecEncoder(peft_model, processor)
    assert enc.device.type == "cuda" and enc.dtype == torch.bfloat16
    titles, images = histories
    with torch.inference_mode():
        batched = enc.encode_sequences(titles, images)
        for i in range(3):
            single = enc.encode_sequences([titles[i]], [images[i]])
            for b, s in zip(batched, single, strict=True):
                cos = torch.nn.functional.cosine_similarity(b[i].float(), s[0].float(), dim=0)
                assert cos > 0.999, f"row {i}: cosine {cos.item()} between batched and single"
    enc.enable_gradient_checkpointing()
    peft_model.train()
    z_t, z_v = enc.encode_sequences(titles, images)
    e_t, e_v = enc.encode_items([t[0] for t in titles], [v[0] for v in images])
    out = build_objective(ObjectiveConfig()).cuda()(z_t, z_v, e_t, e_v)
    out.total.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
