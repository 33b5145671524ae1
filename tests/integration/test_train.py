"""`vlm2rec train` end to end on 2 CPU Ray Train workers with the tiny Qwen2.5-VL and DeepSpeed.

Two runs on 16 rows of the synthetic dataset, 8 rows per worker: one optimizer step per epoch sees all 16
rows (in-batch negatives gathered across the workers), 12 epochs = 12 steps. A random-init backbone learns
slowly, so full-batch steps at lr 1e-2 keep the loss curve readable in 12 steps:

- ZeRO-2, local output, through ``jobs/train.py``: a worker is killed after step 6 with ``max_failures=0``, so
  the run stops (an interrupted run); re-running the same command resumes from the step-4 checkpoint and
  finishes at step 12.
- ZeRO-3, output and checkpoints on S3 (moto): a worker is killed after step 6 and FailureConfig
  (``max_failures=1``) restarts the group from the step-4 checkpoint; the export on S3 loads with
  ``load_backbone`` and the merged weights embed like base + adapter.

Both check: the loss goes down, every LoRA tensor (and alpha/beta) changed, ranks hold identical weights and
embeddings, the exported model reproduces the in-training embeddings within 1e-4, and metrics.jsonl has
the keys the eval report plots.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from vlm2rec_ray import storage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 12


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlm2rec_ray.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(str(out), num_items=60, num_users=40, image_size=32, seed=0)
    return out


def _overrides(model: Path, data: Path, output: str, run_name: str, stage: int) -> list[str]:
    return [f"model.name={model}", f"data.dataset_uri={data}", f"output_uri={output}", f"run_name={run_name}",
            f"train.zero_stage={stage}", "data.max_rows=16", "train.per_device_batch_size=8", "train.epochs=12",
            "train.lr=0.01", "lora.dropout=0.0", "train.log_every=2", "train.checkpoint_every=4",
            "train.diag_every=4", "train.checkpoint_at_epoch_end=false", "train.inject_failure_at_step=6"]


def _metrics(uri: str, endpoint: str | None = None) -> list[dict[str, Any]]:
    from vlm2rec_ray.eval.report import load_training_metrics

    return load_training_metrics(uri, endpoint=endpoint)


def _check_run(summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    assert summary["global_step"] == TOTAL_STEPS and summary["steps_per_epoch"] == 1
    assert summary["resumes"] == [4], summary["resumes"]  # restored once, from the step-4 checkpoint
    # every LoRA tensor (8 modules x A/B) and the penalty's alpha/beta changed; ranks agree bit for bit
    assert summary["trainable_tensors"] == 18 and summary["trainable_tensors_unchanged"] == 0
    assert summary["rank_param_max_abs_diff"] == 0.0 and summary["rank_probe_max_abs_diff"] < 1e-6
    assert summary["export_max_abs_diff"] is not None and summary["export_max_abs_diff"] < 1e-4
    losses = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in losses]
    assert steps == list(range(1, TOTAL_STEPS + 1)), steps  # every step ends an epoch; no gap, no repeat
    first, last = (losses[0]["loss"] + losses[1]["loss"]) / 2, (losses[-2]["loss"] + losses[-1]["loss"]) / 2
    assert last < first - 0.3, [round(r["loss"], 3) for r in losses]
    for key in ("loss_wpcl", "loss_crtr", "penalty_mean", "alpha", "beta", "margin_text", "margin_image",
                "samples_per_s"):
        assert all(key in r for r in losses), key
    diag = [r for r in rows if "grad_align/cos_total_text" in r]
    assert [r["step"] for r in diag] == [4, 8, 12] and all("grad_align/cos_total_image" in r for r in diag)


def test_zero2_interrupted_then_resumed(ray_local: Any, tiny_backbone_dir: Path, synthetic_dir: Path,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ray.train import TrainingFailedError

    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "z2"
    argv = ["--config", str(REPO / "jobs" / "configs" / "train_tiny.yaml"),
            *_overrides(tiny_backbone_dir, synthetic_dir, str(out), "z2", 2), "max_failures=0"]
    with pytest.raises(TrainingFailedError):
        job.main(argv)  # rank 1 dies after step 6 and no restart is allowed
    assert not (out / "train_summary.json").exists()
    assert job.main(argv) == 0  # the same command again: resumes from the latest checkpoint
    summary = json.loads((out / "train_summary.json").read_text())
    rows = _metrics(str(out))
    _check_run(summary, rows)
    print(f"ZeRO-2: loss {[round(r['loss'], 3) for r in rows if 'loss' in r]}, resumes {summary['resumes']}, "
          f"export max diff {summary['export_max_abs_diff']:.2e}, wall {summary['wall_s']} s")
    from vlm2rec_ray.model.backbone import load_backbone

    model, _ = load_backbone(str(out), device="cpu")  # the merged export loads through the production path
    assert model.config.model_type == "qwen2_5_vl"
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "README.md").exists()
    assert "resumed from steps | [4]" in (out / "README.md").read_text()
    assert "\"global_step\": 12" in capsys.readouterr().out


def test_zero3_s3_worker_failure_recovered(ray_local: Any, tiny_backbone_dir: Path, synthetic_dir: Path,
                                           moto_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    import torch

    from vlm2rec_ray.config import TrainJobConfig, load_config
    from vlm2rec_ray.model.backbone import load_backbone
    from vlm2rec_ray.model.encoder import VLM2RecEncoder
    from vlm2rec_ray.model.lora import load_lora_adapter
    from vlm2rec_ray.train.data import load_item_table, prepare_training_rows, to_train_batch
    from vlm2rec_ray.train.trainer import run_training

    out = f"s3://{s3_bucket}/models/z3"
    cfg = load_config(TrainJobConfig, REPO / "jobs" / "configs" / "train_tiny.yaml",
                      [*_overrides(tiny_backbone_dir, synthetic_dir, out, "z3", 3), "max_failures=1",
                       f"storage.endpoint_url={moto_endpoint}"])
    summary = run_training(cfg)
    assert summary["checkpoint"].startswith(f"{s3_bucket}/models/z3/checkpoints/z3/")
    rows = _metrics(out, moto_endpoint)
    _check_run(summary, rows)
    print(f"ZeRO-3 on S3: loss {[round(r['loss'], 3) for r in rows if 'loss' in r]}, resumes {summary['resumes']}, "
          f"export max diff {summary['export_max_abs_diff']:.2e}, wall {summary['wall_s']} s")
    assert json.loads(storage.read_text(f"{out}/train_summary.json", endpoint=moto_endpoint))["global_step"] == 12

    # The S3 export: merged weights through load_backbone(s3://...) == base + adapter, on real training rows.
    merged, processor = load_backbone(out, device="cpu", endpoint=moto_endpoint, cache_dir=tmp_path / "cache",
                                      min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    adapter_dir = storage.download_prefix(f"{out}/adapter", tmp_path / "adapter", endpoint=moto_endpoint)
    base, _ = load_backbone(str(tiny_backbone_dir), device="cpu")
    with_adapter = load_lora_adapter(base, str(adapter_dir)).eval()
    cfg_local = load_config(TrainJobConfig, REPO / "jobs" / "configs" / "train_tiny.yaml",
                            [f"model.name={tiny_backbone_dir}", f"data.dataset_uri={synthetic_dir}",
                             "output_uri=unused", "data.check_images=false", "data.max_rows=4"])
    prepared = prepare_training_rows(cfg_local)
    batch = to_train_batch(prepared.rows, load_item_table(prepared, cfg_local))
    with torch.inference_mode():
        a = VLM2RecEncoder(merged, processor)(batch.seq_titles, batch.seq_images, batch.item_titles, batch.item_images)
        b = VLM2RecEncoder(with_adapter, processor)(batch.seq_titles, batch.seq_images, batch.item_titles,
                                                    batch.item_images)
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    assert diff < 1e-4, diff
    print(f"S3 export: merged vs base + adapter max diff {diff:.2e}")
    base_out = None
    with torch.inference_mode():
        base0, _ = load_backbone(str(tiny_backbone_dir), device="cpu")
        base_out = VLM2RecEncoder(base0, processor)(batch.seq_titles, batch.seq_images, batch.item_titles,
                                                    batch.item_images)
    assert max(float((x - y).abs().max()) for x, y in zip(a, base_out, strict=True)) > 1e-3  # it did train
    card = storage.read_text(f"{out}/README.md", endpoint=moto_endpoint)
    assert "DeepSpeed ZeRO-3" in card and "base_model:" in card


def test_zero3_moda_resumed_exported_and_embedded(ray_local: Any, tiny_backbone_dir: Path, synthetic_dir: Path,
                                                  tmp_path: Path) -> None:
    """MoDA adapters (lora.kind=moda, SDA) under 2-worker ZeRO-3 with WPCL + CRTR (VLM2Rec_MoDA): a worker is
    killed after step 6 and the group restarts from the step-4 checkpoint; the export (base weights + MoDA
    adapters) reproduces the in-training embeddings, and `embed items` runs from it with the adapters routed
    per pass (its item embeddings equal the encoder's over the export)."""
    import numpy as np
    import torch

    from vlm2rec_ray.config import EmbedJobConfig, TrainJobConfig, load_config
    from vlm2rec_ray.data.catalog import read_catalog
    from vlm2rec_ray.data.images import decode_image
    from vlm2rec_ray.embed import read_embeddings, run_embed_items
    from vlm2rec_ray.model.backbone import load_backbone
    from vlm2rec_ray.model.encoder import VLM2RecEncoder
    from vlm2rec_ray.model.moda import MoDALinear
    from vlm2rec_ray.train.trainer import run_training

    out = tmp_path / "moda"
    cfg = load_config(TrainJobConfig, REPO / "jobs" / "configs" / "train_tiny.yaml",
                      [*_overrides(tiny_backbone_dir, synthetic_dir, str(out), "moda", 3), "max_failures=1",
                       "lora.kind=moda", "lora.r=8", "lora.num_experts=4"])
    summary = run_training(cfg)
    assert summary["global_step"] == TOTAL_STEPS and summary["resumes"] == [4], summary["resumes"]
    # 8 MoDA layers x (A, B, modality table, gate) + alpha, beta; all changed, ranks identical
    assert summary["trainable_tensors"] == 34 and summary["trainable_tensors_unchanged"] == 0
    assert summary["rank_param_max_abs_diff"] == 0.0
    assert summary["export_max_abs_diff"] is not None and summary["export_max_abs_diff"] < 1e-4
    losses = [r["loss"] for r in _metrics(str(out)) if "loss" in r]
    assert (losses[-2] + losses[-1]) / 2 < (losses[0] + losses[1]) / 2 - 0.3, losses
    assert (out / "moda_config.json").exists() and (out / "moda.safetensors").exists()
    assert not (out / "adapter").exists() and "MoDA (4 experts" in (out / "README.md").read_text()
    print(f"ZeRO-3 MoDA: loss {[round(x, 3) for x in losses]}, resumes {summary['resumes']}, export max diff "
          f"{summary['export_max_abs_diff']:.2e}")

    ecfg = load_config(EmbedJobConfig, REPO / "jobs" / "configs" / "embed_items.yaml",
                       [f"model.name={out}", "model_version=moda-test", f"dataset_uri={synthetic_dir}",
                        f"output_uri={tmp_path / 'emb'}", "dt=2026-12-01", "progress=false", "batch_size=8"])
    result = run_embed_items(ecfg)
    catalog = read_catalog(str(synthetic_dir))
    assert result["ok"] == catalog.num_rows and result["failed"] == 0, result
    table = read_embeddings(str(tmp_path / "emb" / "items")).sort_by("item_id")
    model, processor = load_backbone(str(out), device="cpu", min_pixels=3136, max_pixels=3136)
    assert sum(isinstance(m, MoDALinear) for m in model.modules()) == 8
    first = catalog.sort_by("item_id").slice(0, 4)
    images = [decode_image((synthetic_dir / u).read_bytes(), min_pixels=3136, max_pixels=3136)[0]
              for u in first.column("image_uri").to_pylist()]  # as the embed job decodes them
    with torch.inference_mode():
        e_t, e_v = VLM2RecEncoder(model, processor).encode_items(first.column("title").to_pylist(), images)
    got_t = np.stack(table.column("emb_text").to_pylist()[:4])
    got_v = np.stack(table.column("emb_image").to_pylist()[:4])
    assert np.abs(got_t - e_t.numpy()).max() < 1e-4 and np.abs(got_v - e_v.numpy()).max() < 1e-4
