"""Export the trained model in Hugging Face format, and the helpers that read weights out of ZeRO.

Layout written to ``output_uri`` (local dir or s3:// prefix)::

    config.json, model.safetensors, processor files   merged weights: load_backbone(output_uri) works
    adapter/                                           LoRA runs: PEFT adapter + processor
                                                       (load_backbone(base) + load_lora_adapter(m, adapter/))
    moda_config.json, moda.safetensors                 MoDA runs, instead of merging (model/moda.py): the
                                                       weights above are the base's; load_backbone re-applies
    README.md                                          model card (written by the driver, see write_model_card)
    metrics.jsonl, train_summary.json, data_errors.parquet

How: every rank takes part in gathering the trainable tensors (under ZeRO-3 they are partitioned; gathered a
chunk at a time so a full fine-tune never needs the whole model on one GPU), rank 0 loads the base model on CPU
through the same :func:`~vlm2rec_ray.model.backbone.load_backbone` path, re-applies LoRA, copies the trained
tensors in by name (every one must match), saves the adapter, merges (``merge_and_unload``) and saves the
merged model with the processor. With ``train.verify_export`` rank 0 reloads the saved files with
``load_backbone``, embeds a probe batch and compares it with the in-training model's embeddings of that batch; the max |diff| goes in the summary
and the model card (fp32 runs agree to ~1e-6; bf16 runs to bf16 rounding).

Memory: rank 0 holds one CPU copy of the model in the training precision (plus the gathered trainable
tensors: small for LoRA).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlm2rec_ray.train.module import BACKBONE_PREFIX

if TYPE_CHECKING:
    from vlm2rec_ray.config import TrainJobConfig

__all__ = [
    "build_cpu_model",
    "fingerprints",
    "gather_trainable",
    "iter_gathered",
    "publish_dir",
    "save_export",
    "write_model_card",
]

_GATHER_NUMEL = 50_000_000  # elements gathered at once under ZeRO-3 (~100 MB in bf16)


def _is_partitioned(p: Tensor) -> bool:
    return hasattr(p, "ds_id")  # a ZeRO-3 parameter


def iter_gathered(named: list[tuple[str, nn.Parameter]], *, max_numel: int = _GATHER_NUMEL
                  ) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, full tensor)`` for each parameter; ZeRO-3 ones are all-gathered a chunk at a time.

    Every rank must iterate the same list to the end (the gathers are collectives). A yielded tensor is only
    valid until the next item: copy what you keep.
    """
    chunk: list[tuple[str, nn.Parameter]] = []
    size = 0

    def flush() -> Iterator[tuple[str, Tensor]]:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=None):
            for n, p in chunk:
                yield n, p.data

    for name, p in named:
        if not _is_partitioned(p):
            yield name, p.data
            continue
        chunk.append((name, p))
        size += int(getattr(p, "ds_numel", p.numel()))
        if size >= max_numel:
            yield from flush()
            chunk, size = [], 0
    if chunk:
        yield from flush()


def trainable_named(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def fingerprints(module: nn.Module) -> dict[str, list[float]]:
    """``{name: [sum, sum of squares]}`` (float64) of every trainable tensor; all ranks must call this."""
    out = {}
    for name, t in iter_gathered(trainable_named(module)):
        x = t.detach().double()
        out[name] = [float(x.sum()), float((x * x).sum())]
    return out


def gather_trainable(module: nn.Module, *, rank: int) -> dict[str, Tensor]:
    """CPU copies of the trainable backbone tensors on rank 0 (``{}`` elsewhere), named as in the backbone."""
    out: dict[str, Tensor] = {}
    for name, t in iter_gathered(trainable_named(module)):
        if rank == 0 and name.startswith(BACKBONE_PREFIX):
            out[name[len(BACKBONE_PREFIX):]] = t.detach().to("cpu", copy=True)
    return out


def _export_dtype(cfg: TrainJobConfig) -> str:
    return {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]


def build_cpu_model(cfg: TrainJobConfig, trained: dict[str, Tensor]) -> tuple[nn.Module, Any]:
    """The trained backbone rebuilt on CPU: base weights from ``model.name``, LoRA re-applied, trained tensors
    copied in by name.

    Raises:
        RuntimeError: a trained tensor has no counterpart (name or shape) in the rebuilt model.
    """
    from vlm2rec_ray.model.backbone import load_backbone
    from vlm2rec_ray.model.lora import apply_adapters

    _unset_zero3_init()
    backbone, processor = load_backbone(cfg.model.name, device="cpu", dtype=_export_dtype(cfg),
                                        endpoint=cfg.storage.endpoint_url,
                                        min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    if cfg.uses_lora:
        backbone = apply_adapters(backbone, cfg.lora)
    params = dict(backbone.named_parameters())
    missing = [n for n in trained if n not in params]
    if missing:
        raise RuntimeError(f"{len(missing)} trained tensors have no counterpart in the rebuilt model, e.g. "
                           f"{missing[:3]}; the export must rebuild the model exactly as training did")
    with torch.no_grad():
        for name, value in trained.items():
            if params[name].shape != value.shape:
                raise RuntimeError(f"trained tensor {name} has shape {tuple(value.shape)} but the rebuilt model "
                                   f"expects {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))
    backbone.eval()
    return backbone, processor


def _unset_zero3_init() -> None:
    """Make sure no HfDeepSpeedConfig is alive, so from_pretrained loads whole (not ZeRO-3 partitioned) weights."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:  # pragma: no cover - older transformers
        return
    unset_hf_deepspeed_config()


def save_export(cfg: TrainJobConfig, backbone: nn.Module, processor: Any, local_dir: str | Path) -> dict[str, Any]:
    """Write adapter (LoRA runs) and merged weights + processor into ``local_dir``; returns the merged model.
    MoDA runs write the base weights with ``moda_config.json`` + ``moda.safetensors`` beside them instead
    (:mod:`vlm2rec_ray.model.moda`: the merged weights differ per modality; ``load_backbone`` re-applies them)."""
    out = Path(local_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    model = backbone
    if cfg.uses_lora and cfg.lora.kind == "moda":
        from vlm2rec_ray.model.moda import save_moda, strip_moda

        save_moda(backbone, out)
        strip_moda(backbone)
        files["moda"] = "."
    elif cfg.uses_lora:
        adapter = out / "adapter"
        backbone.save_pretrained(adapter)
        processor.save_pretrained(adapter)
        files["adapter"] = "adapter"
        model = backbone.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    files["merged"] = "."
    return {"model": model, "files": files}


def publish_dir(local_dir: str | Path, output_uri: str, *, endpoint: str | None = None) -> None:
    """Copy an export directory to ``output_uri`` (any store), replacing older weight files (checkpoints kept)."""
    from vlm2rec_ray import storage

    base = storage.absolute(output_uri).rstrip("/")
    for old in storage.list_uris(output_uri, endpoint=endpoint, suffix=".safetensors"):
        if "/checkpoints/" not in old[len(base):]:
            storage.delete(old, endpoint=endpoint)
    storage.upload_dir(local_dir, output_uri, endpoint=endpoint)


def export_trained_model(cfg: TrainJobConfig, trained: dict[str, Tensor], *,
                         probe: tuple[Any, dict[str, Tensor]] | None = None) -> dict[str, Any]:
    """Rank 0: rebuild, verify against the probe, save and publish to ``cfg.output_uri``.

    Args:
        cfg: the job config.
        trained: trainable backbone tensors from :func:`gather_trainable`.
        probe: ``(TrainBatch, {"z_t","z_v","e_t","e_v": in-training embeddings})`` to compare against.

    Returns:
        ``{"files": ..., "export_max_abs_diff": float | None, "export_dtype": str}``.
    """
    from vlm2rec_ray.model.encoder import VLM2RecEncoder
    from vlm2rec_ray.train.module import TrainModule

    backbone, processor = build_cpu_model(cfg, trained)
    info: dict[str, Any] = {"export_dtype": _export_dtype(cfg), "export_max_abs_diff": None}
    with tempfile.TemporaryDirectory(prefix="vlm2rec-export-") as tmp:
        saved = save_export(cfg, backbone, processor, tmp)
        info["files"] = saved["files"]
        if probe is not None:
            # Reload the saved files through the production loader: this checks the artifact, not the object.
            from vlm2rec_ray.model.backbone import load_backbone

            del saved["model"], backbone
            reloaded, reloaded_processor = load_backbone(tmp, device="cpu", dtype=_export_dtype(cfg),
                                                         min_pixels=cfg.model.min_pixels,
                                                         max_pixels=cfg.model.max_pixels)
            batch, expected = probe
            encoder = VLM2RecEncoder(reloaded, reloaded_processor, max_history=cfg.model.max_history)
            module = TrainModule(encoder, None, fusion=cfg.model.fusion).eval()
            with torch.inference_mode():
                got = module(batch.seq_titles, batch.seq_images, batch.item_titles, batch.item_images)
            info["export_max_abs_diff"] = max(
                float((getattr(got, k).float() - expected[k].float()).abs().max()) for k in ("z_t", "z_v", "e_t", "e_v"))
        publish_dir(tmp, cfg.output_uri, endpoint=cfg.storage.endpoint_url)
    return info


def write_model_card(cfg: TrainJobConfig, summary: dict[str, Any], *, endpoint: str | None = None) -> str:
    """Write ``README.md`` (a Hugging Face model card) to ``cfg.output_uri``; returns its URI."""
    from vlm2rec_ray import storage
    from vlm2rec_ray.config import config_hash

    t, o, lo = cfg.train, cfg.objective, cfg.lora
    final = summary.get("final_metrics", {})
    counts = summary.get("data", {})
    kind = "LoRA" if lo.kind == "lora" else f"MoDA ({lo.num_experts} experts routed by modality)"
    mode = (f"{kind} (r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout}, targets `{lo.target_modules}`)"
            if cfg.uses_lora else "full fine-tuning of the language model")
    if t.train_vision:
        mode += " + vision tower trained"

    def fmt(x: Any) -> str:
        return f"{x:.6g}" if isinstance(x, float) else str(x)

    metric_rows = "\n".join(f"| {k} | {fmt(v)} |" for k, v in sorted(final.items()))
    load = (f"""```python
from vlm2rec_ray.model.backbone import load_backbone
from vlm2rec_ray.model.encoder import VLM2RecEncoder

model, processor = load_backbone("{cfg.output_uri}")          # merged weights
encoder = VLM2RecEncoder(model, processor, max_history={cfg.model.max_history})
```""" + ("" if not cfg.uses_lora or lo.kind == "moda" else f"""
Or the adapter on the base model:
```python
from vlm2rec_ray.model.lora import load_lora_adapter
base, processor = load_backbone("{cfg.model.name}")
model = load_lora_adapter(base, "{cfg.output_uri.rstrip('/')}/adapter")
```"""))
    card = f"""---
library_name: transformers
base_model: {cfg.model.name}
tags: [vlm2rec, recommendation, embeddings, multimodal, {o.variant}]
---

# VLM2Rec embedder: {cfg.run_name}

A recommendation embedder fine-tuned from `{cfg.model.name}` with the VLM2Rec recipe (arXiv 2603.17450):
last-token embeddings of text (P_T) and image (P_V) prompts, fused by element-wise sum.

## Training

| setting | value |
|---|---|
| objective | `{o.variant}` (tau_wpcl={o.tau_wpcl}, tau_crtr={o.tau_crtr}, lambda={o.lam}, alpha_init={o.alpha_init}, beta_init={o.beta_init}, learnable penalty={o.learnable_penalty}, beta_min={o.beta_min}) |
| fusion | {cfg.model.fusion} |
| trainable | {mode} |
| optimizer | AdamW lr={t.lr}, weight_decay={t.weight_decay}, warmup_steps={t.warmup_steps}, grad_clip={t.grad_clip} |
| batch | {t.per_device_batch_size} per worker x {cfg.scaling.num_workers} workers x {t.grad_accum} accumulation |
| epochs / steps | {t.epochs} / {summary.get('global_step')} (max_steps={t.max_steps}) |
| engine | DeepSpeed ZeRO-{t.zero_stage}, precision {cfg.precision}, offload optimizer={t.offload_optimizer}, params={t.offload_params}, gradient checkpointing={t.gradient_checkpointing} |
| in-batch negatives | gathered across workers={o.gather_negatives}, sampled catalog negatives={o.num_sampled_negatives}, duplicate targets masked |
| resumed from steps | {summary.get('resumes') or 'none'} |
| config hash | {config_hash(cfg)} |

## Data

Dataset `{cfg.data.dataset_uri}`, split `{cfg.data.split}`: {counts.get('rows')} rows from {counts.get('users')} users
(few-shot users: {cfg.data.few_shot_users or 'all'}; max rows: {cfg.data.max_rows or 'all'}).
Dropped: {counts.get('dropped_rows', 0)} rows and {counts.get('dropped_history_items', 0)} history items
(reasons {json.dumps(counts.get('error_reasons', {}))}; listed in `data_errors.parquet`).

## Metrics (last logged window, averaged over workers)

| metric | value |
|---|---|
{metric_rows}

Export check: max |embedding difference| between this export and the in-training model on a probe batch =
{summary.get('export_max_abs_diff')} ({summary.get('export_dtype')}).
Per-step history: `metrics.jsonl` (plotted by `vlm2rec evaluate` with `training_metrics_uri`).

## Use

{load}
"""
    uri = storage.join(cfg.output_uri, "README.md")
    storage.write_text(uri, card, endpoint=endpoint)
    return uri
