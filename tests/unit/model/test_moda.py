"""MoDA's adapter update (model/moda.py) against hand-worked values; one expert is plain LoRA."""

from __future__ import annotations

import pytest
import torch

from vlm2rec_ray.model.moda import moda_delta


def test_two_samples_two_experts_hand_worked() -> None:
    """Expert 0 copies coordinate 0, expert 1 coordinate 1 (rank 1 each), scaling 2: x = [3, 4] with gate
    [1, 0] -> [6, 0]; with gate [0.25, 0.75] -> [2 * 0.25 * 3, 2 * 0.75 * 4] = [1.5, 6]."""
    A = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (E=2, r/E=1, d_in=2)
    B = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]])  # (E=2, d_out=2, r/E=1)
    x = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    gate = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    assert torch.allclose(moda_delta(x, A, B, gate, 2.0), torch.tensor([[6.0, 0.0], [1.5, 6.0]]))


def test_one_expert_is_plain_lora_and_token_dims_pass_through() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g)  # (N, T, d_in)
    A = torch.randn(1, 4, 8, generator=g)  # r = 4
    B = torch.randn(1, 6, 4, generator=g)
    out = moda_delta(x, A, B, torch.ones(3, 1), 0.5)
    lora = 0.5 * (x @ A[0].T @ B[0].T)  # the PEFT LoRA update: scaling * B A x
    assert out.shape == (3, 5, 6) and torch.allclose(out, lora, atol=1e-5)


def test_gate_mixes_experts_linearly() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, generator=g)
    A, B = torch.randn(4, 2, 7, generator=g), torch.randn(4, 3, 2, generator=g)
    gate = torch.softmax(torch.randn(2, 4, generator=g), dim=1)
    expected = sum(gate[:, e:e + 1] * (x @ A[e].T @ B[e].T) for e in range(4)) * 1.5
    assert torch.allclose(moda_delta(x, A, B, gate, 1.5), expected, atol=1e-5)


def test_shape_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"A \[E, r/E, d_in\]"):
        moda_delta(torch.zeros(2, 3), torch.zeros(2, 1, 3), torch.zeros(3, 4, 1), torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match=r"gate must be \[N, E\] = \[2, 2\]"):
        moda_delta(torch.zeros(2, 3), torch.zeros(2, 1, 3), torch.zeros(2, 4, 1), torch.zeros(2, 3), 1.0)


def _layer(e: int = 4, r: int = 8, seed: int = 0) -> torch.nn.Module:
    from vlm2rec_ray.model.moda import MoDALinear

    torch.manual_seed(seed)
    layer = MoDALinear(torch.nn.Linear(6, 5), r=r, alpha=16, num_experts=e)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at 0 (no update); give it something to route
        layer.modality_embedding.weight.normal_()
    return layer


def test_layer_routes_by_modality_and_refuses_no_modality() -> None:
    from vlm2rec_ray.model.moda import IMAGE, TEXT, modality

    layer = _layer()
    x = torch.randn(3, 2, 6)
    with modality(TEXT):
        y_text = layer(x)
    with modality(IMAGE):
        y_image = layer(x)
    base = layer.base(x)
    assert not torch.allclose(y_text, y_image) and not torch.allclose(y_text, base)
    gate = layer.expert_weights(TEXT)
    expected = base + moda_delta(x, layer.lora_A, layer.lora_B, gate.expand(3, -1), layer.scaling)
    assert torch.allclose(y_text, expected, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"outside `with vlm2rec_ray\.model\.moda\.modality"):
        layer(x)
    with pytest.raises(ValueError, match="r divisible by num_experts"):
        _layer(e=3, r=8)


def test_per_modality_lora_weights_reproduce_the_layer() -> None:
    """The export's rule: under modality m the layer is a rank-r LoRA with A' = [A_e], B' = [w_e B_e]."""
    from vlm2rec_ray.model.moda import IMAGE, TEXT, lora_weights_for, modality

    layer = _layer()
    x = torch.randn(4, 6)
    for m in (TEXT, IMAGE):
        a, b = lora_weights_for(layer, m)
        assert a.shape == (8, 6) and b.shape == (5, 8)
        with modality(m), torch.no_grad():
            assert torch.allclose(layer(x), layer.base(x) + layer.scaling * x @ a.T @ b.T, atol=1e-5)


def test_apply_moda_on_the_tiny_backbone(tiny_backbone_dir) -> None:
    """Only the adapters and gates train; at init (B = 0) the encoder equals the base model; activation
    checkpointing recomputes each layer under the modality its forward had (same gradients as without)."""
    from PIL import Image

    from vlm2rec_ray.model.backbone import load_backbone
    from vlm2rec_ray.model.encoder import VLM2RecEncoder
    from vlm2rec_ray.model.moda import MoDALinear, apply_moda

    titles = [["red mug", "blue lamp"], ["green hat"]]
    images = [[Image.new("RGB", (56, 56), (200, 10, 10)), Image.new("RGB", (56, 56), (10, 10, 200))],
              [Image.new("RGB", (56, 56), (10, 200, 10))]]

    def build(checkpointing: bool) -> VLM2RecEncoder:
        model, processor = load_backbone(str(tiny_backbone_dir))
        torch.manual_seed(0)
        names = apply_moda(model, target_modules=r".*language_model.*\.(q_proj|v_proj)$", r=4, alpha=8,
                           num_experts=2)
        assert len(names) == 4 and all(isinstance(model.get_submodule(n), MoDALinear) for n in names)
        trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"lora_A", "lora_B", "weight"}  # weight: the modality embedding and the gate
        enc = VLM2RecEncoder(model, processor)
        if checkpointing:
            enc.enable_gradient_checkpointing()
        return enc

    base_model, processor = load_backbone(str(tiny_backbone_dir))
    with torch.no_grad():
        ref = VLM2RecEncoder(base_model, processor).encode_sequences(titles, images)
        got = build(False).encode_sequences(titles, images)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ref, got, strict=True))

    grads = []
    for checkpointing in (False, True):
        enc = build(checkpointing)
        enc.train()
        with torch.no_grad():
            for mod in enc.modules():
                if isinstance(mod, MoDALinear):
                    mod.lora_B.normal_(std=0.1)
        z_t, z_v = enc.encode_sequences(titles, images)
        (z_t.sum() + 2 * z_v.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-5) for k in grads[0])


def test_checkpoint_context_replays_on_every_recomputation() -> None:
    """A checkpointed MoDA layer backpropagated twice over one graph (``autograd.grad(retain_graph=True)``
    then ``backward``, as the gradient-alignment probe does) recomputes under the original modality both times."""
    from torch.utils.checkpoint import checkpoint

    from vlm2rec_ray.model.moda import IMAGE, MoDALinear, checkpoint_context, current_modality, modality

    torch.manual_seed(0)
    layer = MoDALinear(torch.nn.Linear(3, 2), r=2, alpha=2, num_experts=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3)
    with modality(IMAGE):
        ref = torch.autograd.grad(layer(x).square().sum(), layer.lora_A)[0]
        y = checkpoint(layer, x, use_reentrant=False, context_fn=checkpoint_context)
    loss = y.square().sum()
    first = torch.autograd.grad(loss, layer.lora_A, retain_graph=True)[0]
    loss.backward()
    assert current_modality() is None
    assert torch.allclose(first, ref) and torch.allclose(layer.lora_A.grad, ref)


def test_moda_config_validation() -> None:
    from vlm2rec_ray.config import ConfigError, TrainJobConfig, load_config

    with pytest.raises(ConfigError, match="divisible by num_experts"):
        load_config(TrainJobConfig, None, ["data.dataset_uri=/tmp/d", "output_uri=/tmp/o", "lora.kind=moda", "lora.r=12",
                                    "lora.num_experts=8"])
    with pytest.raises(ConfigError, match="fusion=internal"):
        load_config(TrainJobConfig, None, ["data.dataset_uri=/tmp/d", "output_uri=/tmp/o", "lora.kind=moda",
                                    "model.fusion=internal", "objective.variant=sft"])


def test_moda_export_reloads_through_load_backbone(tiny_backbone_dir, tmp_path) -> None:
    """A MoDA run's export (base weights + moda_config.json + moda.safetensors) reloads through load_backbone
    and embeds exactly as the in-training model; an item-level batch encodes items only."""
    from PIL import Image

    from vlm2rec_ray.config import TrainJobConfig, load_config
    from vlm2rec_ray.model.backbone import load_backbone
    from vlm2rec_ray.model.encoder import VLM2RecEncoder
    from vlm2rec_ray.model.moda import MoDALinear
    from vlm2rec_ray.train.export import build_cpu_model, save_export
    from vlm2rec_ray.train.loop import build_train_module
    from vlm2rec_ray.train.module import BACKBONE_PREFIX, TrainModule

    cfg = load_config(TrainJobConfig, None, [f"model.name={tiny_backbone_dir}", "data.dataset_uri=/tmp/d",
                                      f"output_uri={tmp_path / 'o'}", "lora.kind=moda", "lora.r=4",
                                      "lora.num_experts=2", "lora.dropout=0", "objective.variant=cmsa",
                                      "train.precision=fp32"])
    module = build_train_module(cfg, torch.device("cpu"))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert "objective.temperature.rho" in trainable and any(n.endswith("lora_B") for n in trainable)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, MoDALinear):
                mod.lora_B.normal_(std=0.1)
    module.eval()
    titles, images = ["red mug", "blue lamp"], [Image.new("RGB", (56, 56), c) for c in ((200, 0, 0), (0, 0, 200))]
    with torch.no_grad():
        out = module([], [], titles, images)
        assert out.z_t.shape == (0, out.e_t.shape[1])
        trained = {n[len(BACKBONE_PREFIX):]: p.detach().clone() for n, p in module.named_parameters()
                   if p.requires_grad and n.startswith(BACKBONE_PREFIX)}
    backbone, processor = build_cpu_model(cfg, trained)
    saved = save_export(cfg, backbone, processor, tmp_path / "export")
    assert saved["files"] == {"moda": ".", "merged": "."}
    assert (tmp_path / "export" / "moda_config.json").exists() and not (tmp_path / "export" / "adapter").exists()
    reloaded, proc = load_backbone(str(tmp_path / "export"), device="cpu", dtype="fp32")
    assert sum(isinstance(m, MoDALinear) for m in reloaded.modules()) == 8  # q/k/v/o x 2 layers
    with torch.no_grad():
        e_t, e_v = TrainModule(VLM2RecEncoder(reloaded, proc), None)([], [], titles, images)[2:]
    assert torch.allclose(e_t, out.e_t, atol=1e-5) and torch.allclose(e_v, out.e_v, atol=1e-5)
    base, _ = load_backbone(str(tiny_backbone_dir), device="cpu", dtype="fp32")
    with torch.no_grad():
        e_base = VLM2RecEncoder(base, proc).encode_text_items(titles)
    assert not torch.allclose(e_base, e_t, atol=1e-4)  # the adapters matter
