"""One DeepSpeed rank in-process (gloo, world size 1): full fine-tuning with the vision tower trained, then the
Hugging Face export reproduces the in-training embeddings (the LoRA path runs in the 2-worker integration tests)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from vlm2rec_ray.config import TrainJobConfig, load_config
from vlm2rec_ray.train.data import ItemTable, pack_image, to_train_batch

pytestmark = pytest.mark.integration  # DeepSpeed in-process


def _batch(rows: int = 4, history: int = 2, size: int = 56):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    words = "red green blue lamp mug shirt chair watch".split()
    items: dict[str, list] = {k: [] for k in ("item_index", "title", "image", "width", "height", "reason")}
    cols: dict[str, list] = {k: [] for k in ("user_id", "target_index", "target_title", "history_indices",
                                             "history_titles")}
    for b in range(rows):
        indices = [b * (history + 1) + h for h in range(history + 1)]
        titles = [" ".join(rng.choice(words, size=3)) + f" {b}{h}" for h in range(history + 1)]
        for i, title in zip(indices, titles, strict=True):
            data, w, h = pack_image(Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)))
            for k, v in (("item_index", i), ("title", title), ("image", data), ("width", w), ("height", h),
                         ("reason", None)):
                items[k].append(v)
        cols["user_id"].append(f"u{b}")
        cols["target_index"].append(indices[-1])
        cols["target_title"].append(titles[-1])
        cols["history_indices"].append(indices[:-1])
        cols["history_titles"].append(titles[:-1])
    return to_train_batch(pa.table(cols), ItemTable([pa.table(items)]))


@pytest.fixture(scope="module")
def process_group():  # type: ignore[no-untyped-def]
    """One gloo group for the whole module: DeepSpeed caches its groups, so they must outlive every engine."""
    import os

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_full_finetune_with_vision_exports_identical_embeddings(process_group: None, tiny_backbone_dir: Path,
                                                                tmp_path: Path) -> None:
    from vlm2rec_ray.model.backbone import load_backbone
    from vlm2rec_ray.train import export
    from vlm2rec_ray.train.deepspeed_config import build_deepspeed_config
    from vlm2rec_ray.train.loop import _probe_embeddings, build_engine, train_step

    cfg = load_config(TrainJobConfig, None, [
        f"model.name={tiny_backbone_dir}", "model.min_pixels=3136", "model.max_pixels=3136",
        "data.dataset_uri=unused", f"output_uri={tmp_path / 'out'}", "scaling.num_workers=1",
        "train.per_device_batch_size=4", "train.full_finetune=true", "lora.enabled=false", "train.train_vision=true",
        "train.zero_stage=2", "train.lr=1e-3", "train.cpu_shm_allreduce=false", "objective.variant=sft"])
    assert not cfg.uses_lora
    engine, module = build_engine(cfg, build_deepspeed_config(cfg), torch.device("cpu"))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any(".visual." in n for n in trainable) and any("language_model" in n for n in trainable)
    assert not any("lora_" in n for n in trainable)
    before = export.fingerprints(module)
    batch = _batch()
    losses = [train_step(engine, batch, module.objective, gather=False)["loss"] for _ in range(3)]
    assert np.isfinite(losses).all()
    after = export.fingerprints(module)
    changed = [n for n in before if before[n] != after[n]]
    assert len(changed) > 0.9 * len(before), sorted(set(before) - set(changed))[:5]

    probe = _probe_embeddings(engine, batch)
    info = export.export_trained_model(cfg, export.gather_trainable(module, rank=0), probe=(batch, probe))
    assert info["export_max_abs_diff"] < 1e-4, info
    assert info["files"] == {"merged": "."} and not (tmp_path / "out" / "adapter").exists()
    model, _ = load_backbone(str(tmp_path / "out"), device="cpu")
    assert model.config.model_type == "qwen2_5_vl"


@pytest.mark.parametrize(("overrides", "tol"), [
    (["train.precision=bf16", "train.zero_stage=1"], 5e-2),  # bf16 on CPU: export agrees to bf16 rounding
    (["train.zero_stage=2", "train.offload_optimizer=true", "train.grad_accum=2"], 1e-4),
])
def test_lora_bf16_and_offload(process_group: None, tiny_backbone_dir: Path, tmp_path: Path,
                               overrides: list[str], tol: float) -> None:
    from vlm2rec_ray.train import export
    from vlm2rec_ray.train.deepspeed_config import build_deepspeed_config
    from vlm2rec_ray.train.loop import _probe_embeddings, build_engine, train_step

    cfg = load_config(TrainJobConfig, None, [
        f"model.name={tiny_backbone_dir}", "model.min_pixels=3136", "model.max_pixels=3136",
        "data.dataset_uri=unused", f"output_uri={tmp_path / 'out'}", "scaling.num_workers=1",
        "train.per_device_batch_size=4", "train.lr=1e-2", "train.cpu_shm_allreduce=false", *overrides])
    ds = build_deepspeed_config(cfg)
    engine, module = build_engine(cfg, ds, torch.device("cpu"))
    before = export.fingerprints(module)
    batch = _batch()
    for _ in range(2 * cfg.train.grad_accum):
        assert np.isfinite(train_step(engine, batch, module.objective, gather=False)["loss"])
    assert engine.global_steps == 2
    after = export.fingerprints(module)
    assert all(before[n] != after[n] for n in before), [n for n in before if before[n] == after[n]]
    probe = _probe_embeddings(engine, batch)
    info = export.export_trained_model(cfg, export.gather_trainable(module, rank=0), probe=(batch, probe))
    assert info["export_dtype"] == cfg.precision and info["export_max_abs_diff"] < tol, info
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    print(f"{overrides}: export max diff {info['export_max_abs_diff']:.2e}")


def test_sda_cmsa_moda_zero2_trains_items_and_exports(process_group: None, tiny_backbone_dir: Path,
                                                      tmp_path: Path) -> None:
    """The SDA baseline's settings (objective cmsa, lora.kind moda) under DeepSpeed ZeRO-2: item-level batches
    (the loop drops the sequences) train every expert, gate and CMSA's tau; the export is the base weights plus
    the MoDA files and reproduces the in-training embeddings."""
    import dataclasses

    from vlm2rec_ray.eval.baselines import baseline_overrides
    from vlm2rec_ray.train import export
    from vlm2rec_ray.train.deepspeed_config import build_deepspeed_config
    from vlm2rec_ray.train.loop import _probe_embeddings, build_engine, train_step

    cfg = load_config(TrainJobConfig, None, [
        f"model.name={tiny_backbone_dir}", "model.min_pixels=3136", "model.max_pixels=3136",
        "data.dataset_uri=unused", f"output_uri={tmp_path / 'out'}", "scaling.num_workers=1",
        "train.per_device_batch_size=4", "train.lr=1e-2", "train.cpu_shm_allreduce=false", "train.zero_stage=2",
        "lora.r=8", "lora.dropout=0", *baseline_overrides("SDA"), "lora.num_experts=4"])
    engine, module = build_engine(cfg, build_deepspeed_config(cfg), torch.device("cpu"))
    assert module.objective.item_level
    before = export.fingerprints(module)
    batch = _batch()
    items = dataclasses.replace(batch, seq_titles=[], seq_images=[])
    losses = [train_step(engine, items, module.objective, gather=False)["loss"] for _ in range(3)]
    assert all(np.isfinite(losses)) and engine.global_steps == 3
    after = export.fingerprints(module)
    assert "objective.temperature.rho" in after and all(before[n] != after[n] for n in before), \
        [n for n in before if before[n] == after[n]]
    probe = _probe_embeddings(engine, batch)
    info = export.export_trained_model(cfg, export.gather_trainable(module, rank=0), probe=(batch, probe))
    assert info["files"] == {"moda": ".", "merged": "."} and info["export_max_abs_diff"] < 1e-4, info
    assert (tmp_path / "out" / "moda_config.json").exists()
    print(f"SDA (cmsa + moda) ZeRO-2: losses {[round(x, 4) for x in losses]}, export max diff "
          f"{info['export_max_abs_diff']:.2e}")
