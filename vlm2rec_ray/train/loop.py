"""The per-worker training loop (runs inside every Ray Train worker) and the one-step function.

One step reads like this (:func:`train_step`)::

    out = engine(seq_titles, seq_images, item_titles, item_images)   # embeddings z_t, z_v, e_t, e_v
    candidates = all_gather_full_grad(e, local_first=True)            # other workers' targets as negatives
    loss = objective(z_t, z_v, e_t_all, e_v_all, neg_mask)            # duplicate targets masked
    engine.backward(loss.total); engine.step()

:func:`train_loop_per_worker` rebuilds the config from the dict Ray passes, builds the DeepSpeed engine
(:func:`build_engine`), restores the latest checkpoint if there is one, reads the item table once
(:class:`~vlm2rec_ray.train.data.ItemTable`: the images of the rows it streams), then runs ``train.epochs``
epochs of exactly ``steps_per_epoch`` optimizer steps on every worker (collectives need equal step counts). It
logs every ``train.log_every`` steps (loss parts, mean penalty, alpha, beta, margins, samples/s, lr; averaged
over workers; the time shares waiting for data, computing and checkpointing: ``data_wait_frac``,
``compute_frac``, ``report_frac``): one console line from rank 0 (:func:`format_progress`; every key with
``VLM2REC_VERBOSE=1``) and a row of ``metrics.jsonl``. It runs the gradient-alignment diagnostic every
``train.diag_every`` steps, checkpoints (and hands Ray Train the metrics) every ``train.checkpoint_every`` steps
and at each epoch end, and finally checks that ranks agree and every trainable tensor changed, and exports the
model (:mod:`vlm2rec_ray.train.export`).

Resuming mid-epoch restores the engine (weights, optimizer, scheduler) and the step count exactly, and runs
only the steps left in that epoch; the rows of a resumed epoch are drawn afresh from the stream (Ray Data's
dynamic split does not replay an order), so the same number of rows is seen, not the identical ones.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import random
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from vlm2rec_ray.objectives import build_neg_mask, gather_with_grad
from vlm2rec_ray.train.data import ItemTable, TrainBatch, to_train_batch
from vlm2rec_ray.train.gather import all_gather_full_grad
from vlm2rec_ray.train.module import TrainModule

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from torch import nn

    from vlm2rec_ray.config import TrainJobConfig
    from vlm2rec_ray.objectives import LossOutput

log = logging.getLogger(__name__)

__all__ = ["build_engine", "build_optimizer", "build_train_module", "compute_loss", "format_progress",
           "gradient_alignment_step", "quiet_worker_output", "train_loop_per_worker", "train_step"]


# ------------------------------------------------------------------------------------------------ one step


def compute_loss(out: Any, batch: TrainBatch, objective: nn.Module, *, gather: bool = True) -> LossOutput:
    """Apply the objective to one batch's embeddings.

    Candidates are this worker's items (its B targets first, then sampled negatives) followed, when
    ``gather`` and distributed, by every other worker's items (:func:`all_gather_full_grad`: local first, so row
    i's positive stays candidate i). Candidates that are the same catalog item as row i's target are never
    its negatives.
    """
    e_t, e_v, ids = out.e_t, out.e_v, batch.item_ids.to(out.e_t.device)
    if gather:
        # Exact gradients for the other workers' candidates (see train/gather.py for why not gather_with_grad).
        e_t = all_gather_full_grad(e_t, local_first=True)  # (N_all, d)
        e_v = all_gather_full_grad(e_v, local_first=True)
        ids = gather_with_grad(ids, local_first=True)  # integer ids: no graph
    neg_mask = build_neg_mask(batch.target_ids.to(ids.device), ids)  # (B, N_all)
    return objective(out.z_t, out.z_v, e_t, e_v, neg_mask)


def train_step(engine: DeepSpeedEngine, batch: TrainBatch, objective: nn.Module, *,
               gather: bool = True) -> dict[str, float]:
    """One micro-batch: forward, objective, backward, and ``engine.step()`` (which applies the optimizer on
    gradient-accumulation boundaries only).

    Returns:
        The objective's metrics as floats: loss, loss_wpcl, loss_crtr, penalty_mean, margin_text,
        margin_image, image_weaker_frac, alpha, beta.
    """
    out = engine(batch.seq_titles, batch.seq_images, batch.item_titles, batch.item_images)
    loss = compute_loss(out, batch, objective, gather=gather)
    engine.backward(loss.total)
    engine.step()
    return loss.metrics()


def gradient_alignment_step(module: nn.Module, batch: TrainBatch, objective: nn.Module, *,
                            zero3: bool = False) -> dict[str, float]:
    """The paper's gradient-alignment diagnostic on one batch, without touching the module's gradients.

    ``g_T`` / ``g_V`` are the gradients of the loss through the text / image embeddings only
    (:func:`vlm2rec_ray.eval.metrics.modality_path_losses`); we report cos(g_total, g_T), cos(g_total, g_V),
    cos(g_T, g_V) and the norms, w.r.t. the trainable backbone parameters of this worker's batch
    (in-batch candidates only). Under ZeRO-3 (``zero3=True``) the parameters are partitioned, so the gradients
    are taken w.r.t. the four embedding matrices instead (keys then carry ``space=embeddings``).

    Args:
        module: the :class:`TrainModule` (``engine.module`` under DeepSpeed).
        batch: one micro-batch.
        objective: the training objective (its alpha/beta are held constant).
        zero3: the parameters are ZeRO-3 partitioned.
    """
    from vlm2rec_ray.eval.metrics import gradient_alignment, modality_path_losses

    with torch.set_grad_enabled(not zero3):
        out = module(batch.seq_titles, batch.seq_images, batch.item_titles, batch.item_images)
    neg_mask = build_neg_mask(batch.target_ids.to(out.e_t.device), batch.item_ids.to(out.e_t.device))
    with torch.no_grad():  # alpha, beta (and tau) held constant: only the backbone is probed
        constants = objective.loss_kwargs(out.e_t.float(), detach=True)

    def loss_fn(z_t: torch.Tensor, z_v: torch.Tensor, e_t: torch.Tensor, e_v: torch.Tensor) -> torch.Tensor:
        z_t, z_v, e_t, e_v = (x.float() for x in (z_t, z_v, e_t, e_v))
        return objective.loss_fn(z_t, z_v, e_t, e_v, neg_mask=neg_mask, **constants).total

    if zero3:
        # Partitioned parameters cannot be differentiated outside the engine's backward: use the embeddings.
        leaves = [x.detach().requires_grad_(True) for x in (out.z_t, out.z_v, out.e_t, out.e_v)]
        total, text, image = modality_path_losses(loss_fn, *leaves)
        result = gradient_alignment(total, text, image, leaves)
        result["space_embeddings"] = 1.0
    else:
        params = [p for n, p in module.named_parameters() if p.requires_grad and n.startswith("encoder.")]
        total, text, image = modality_path_losses(loss_fn, out.z_t, out.z_v, out.e_t, out.e_v)
        result = gradient_alignment(total, text, image, params)
    return {f"grad_align/{k}": v for k, v in result.items()}


# ------------------------------------------------------------------------------------------------ the engine


def _prepare_process(cfg: TrainJobConfig, device: torch.device) -> None:
    seed = cfg.train.seed
    random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if not cfg.train.cpu_shm_allreduce:
            # import_module, not `import deepspeed.comm.torch as m`: the latter yields the torch package itself.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    else:
        torch.cuda.set_device(device)


def build_train_module(cfg: TrainJobConfig, device: torch.device, *,
                       zero3_config: dict[str, Any] | None = None) -> TrainModule:
    """The trainable :class:`TrainModule`: load the backbone, apply LoRA / MoDA or unfreeze for full fine-tuning,
    optionally unfreeze the vision tower, enable gradient checkpointing and build the objective.

    Args:
        cfg: the train job config.
        device: where the module goes.
        zero3_config: a ZeRO-3 DeepSpeed config: the backbone is then partitioned at load time
            (``HfDeepSpeedConfig``); None loads it whole (stages 0-2, and single-process training).
    """
    from vlm2rec_ray.model.backbone import load_backbone
    from vlm2rec_ray.model.encoder import VLM2RecEncoder
    from vlm2rec_ray.model.lora import apply_adapters
    from vlm2rec_ray.objectives import build_objective

    hf_ds = None
    if zero3_config is not None:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(zero3_config)  # must stay alive during from_pretrained (a weakref is kept)
    load_dtype = "fp32" if cfg.precision == "fp32" else cfg.precision
    backbone, processor = load_backbone(cfg.model.name, device=str(device), dtype=load_dtype,
                                        endpoint=cfg.storage.endpoint_url,
                                        attn_implementation=cfg.model.attn_implementation,
                                        min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    del hf_ds
    from vlm2rec_ray.train.export import _unset_zero3_init

    _unset_zero3_init()
    if cfg.uses_lora:
        backbone = apply_adapters(backbone, cfg.lora)
    else:
        for name, p in backbone.named_parameters():
            p.requires_grad_(cfg.train.full_finetune and not _is_vision(name))
    if cfg.train.train_vision:
        for name, p in backbone.named_parameters():
            if _is_vision(name):
                p.requires_grad_(True)
    encoder = VLM2RecEncoder(backbone, processor, max_history=cfg.model.max_history)
    if cfg.train.gradient_checkpointing:
        encoder.enable_gradient_checkpointing()
    module = TrainModule(encoder, build_objective(cfg.objective), fusion=cfg.model.fusion).to(device)
    module.train()
    return module


def build_optimizer(cfg: TrainJobConfig, module: nn.Module
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """AdamW over the trainable parameters, with a linear warm-up over ``train.warmup_steps`` when set."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = cfg.train.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)) if warmup else None
    return optimizer, scheduler


def build_engine(cfg: TrainJobConfig, ds_config: dict[str, Any], device: torch.device
                 ) -> tuple[DeepSpeedEngine, TrainModule]:
    """:func:`build_train_module` (ZeRO-3: partitioned at load time) and :func:`build_optimizer`, wrapped in a
    DeepSpeed engine."""
    import deepspeed

    _prepare_process(cfg, device)
    # Attach deepspeed.comm to the process group Ray Train created (ZeRO-3's zero.Init inside from_pretrained
    # needs the world size before deepspeed.initialize runs).
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)
    module = build_train_module(cfg, device, zero3_config=ds_config if cfg.train.zero_stage == 3 else None)
    optimizer, scheduler = build_optimizer(cfg, module)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine, module


def _is_vision(name: str) -> bool:
    return name.startswith("visual.") or ".visual." in name


# ------------------------------------------------------------------------------------------------ the loop


class _Window:
    """Running means of the per-micro-batch metrics between two log steps."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.n = 0
        self.steps = 0
        self.data_s = 0.0  # time spent waiting for the next batch (input-bound when large)
        self.compute_s = 0.0  # time in train_step (forward, objective, backward, optimizer)
        self.report_s = 0.0  # time in checkpoints (saving, ray.train.report: a handoff to the controller)
        self.t0 = time.perf_counter()

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] += v
        self.n += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.n) for k, v in self.sums.items()}


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over all workers (same keys on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def _gather_floats(x: list[float], device: torch.device) -> list[list[float]]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [x]
    t = torch.tensor(x, dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def _probe_embeddings(engine: DeepSpeedEngine, batch: TrainBatch) -> dict[str, torch.Tensor]:
    module = engine.module
    was_training = module.training
    module.eval()  # no LoRA dropout: the export is compared with the deterministic model
    with torch.no_grad():
        out = module(batch.seq_titles, batch.seq_images, batch.item_titles, batch.item_images)
    module.train(was_training)
    return {k: getattr(out, k).detach().float().cpu() for k in ("z_t", "z_v", "e_t", "e_v")}


def _maybe_inject_failure(cfg: TrainJobConfig, step: int, rank: int, world: int) -> None:
    """Testing aid (``train.inject_failure_at_step``): the last rank exits hard once, after that step."""
    from vlm2rec_ray import storage

    if cfg.train.inject_failure_at_step != step or rank != world - 1:
        return
    marker = storage.join(cfg.resolved_storage_path, cfg.run_name, ".failure_injected")
    if storage.exists(marker, endpoint=cfg.storage.endpoint_url):
        return
    storage.write_text(marker, f"step {step}\n", endpoint=cfg.storage.endpoint_url)
    log.warning("injected failure: rank %d exits after step %d", rank, step)
    os._exit(1)


def quiet_worker_output() -> None:
    """The default console of a training worker: our progress lines, warnings and errors only.

    Silences Ray Train's per-report "Reporting training result ..." INFO line (its logger is named after the file,
    ``logging.getLogger(__file__)`` in ray/train/v2/_internal/execution/context.py), its per-rank "Checkpoint
    successfully created at ..." line (``execution/storage.py``) and library FutureWarnings and DeprecationWarnings
    (transformers, torch.distributed). ``run["verbose"]`` (``VLM2REC_VERBOSE=1``) keeps them.
    """
    import warnings

    from ray.train.v2._internal.execution import context as train_context
    from ray.train.v2._internal.execution import storage as train_storage

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger(train_storage.__name__).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def format_progress(row: dict[str, Any], total: int) -> str:
    """One console line per logging interval: step, epoch, loss (and its parts), samples/s, data wait."""
    parts = [f"step {row['step']}/{total}", f"epoch {row['epoch']:.2f}", f"loss {row['loss']:.4f}"]
    if "loss_crtr" in row and "loss_wpcl" in row:
        parts[-1] += f" (wpcl {row['loss_wpcl']:.4f}, crtr {row['loss_crtr']:.4f})"
    parts += [f"{row['samples_per_s']:.1f} samples/s", f"data_wait {row['data_wait_frac']:.2f}",
              f"report {row.get('report_frac', 0.0):.2f}", f"lr {row['lr']:.2e}"]
    if "grad_align/cos_total_image" in row:
        parts.append(f"cos(g,g_V) {row['grad_align/cos_total_image']:.3f}")
    return "  ".join(parts)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config = {"job": TrainJobConfig dump, "run": {"steps_per_epoch", "items", ...}}``."""
    import ray.train
    import ray.train.torch

    from vlm2rec_ray import storage
    from vlm2rec_ray.config import TrainJobConfig
    from vlm2rec_ray.train import export
    from vlm2rec_ray.train.checkpoint import TrainState, restore_from_ray, save_and_report
    from vlm2rec_ray.train.deepspeed_config import build_deepspeed_config

    cfg = TrainJobConfig.model_validate(config["job"])
    run = config["run"]
    verbose = bool(run.get("verbose"))
    if not verbose:
        quiet_worker_output()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    t = cfg.train
    lora_only = cfg.uses_lora and not t.train_vision
    engine, module = build_engine(cfg, build_deepspeed_config(cfg), device)
    objective = module.objective
    gather = cfg.objective.gather_negatives and world > 1

    restored = restore_from_ray(engine, trainable_only=lora_only)
    if restored is None:
        state, history = TrainState(), []
        state.initial_fingerprints = export.fingerprints(module)
    else:
        state, history = restored
        if rank == 0:
            log.info("resumed at step %d (epoch %d, resumes %s)", state.global_step, state.epoch, state.resumes)
    spe = int(run["steps_per_epoch"])
    total = spe * t.epochs if t.max_steps is None else min(spe * t.epochs, t.max_steps)
    rows_per_step = t.per_device_batch_size * t.grad_accum * world
    shard = ray.train.get_dataset_shard("train")
    items = ItemTable.from_refs(run["items"])  # the preprocessed images, read once per worker
    negatives = cfg.objective.num_sampled_negatives
    neg_rng = random.Random(t.seed * 7919 + rank + 104729 * len(state.resumes))
    metrics_uri = storage.join(cfg.output_uri, "metrics.jsonl")

    def write_history() -> None:
        if rank == 0:
            storage.write_text(metrics_uri, "".join(_json_line(r) for r in history), endpoint=cfg.storage.endpoint_url)

    def checkpoint(metrics: dict[str, Any]) -> None:
        write_history()
        save_and_report(engine, state, history, metrics, rank=rank, world_size=world, trainable_only=lora_only)

    window = _Window()
    pending_diag: dict[str, float] = {}
    if state.step_in_epoch >= spe:
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
    while state.epoch < t.epochs and state.global_step < total:
        epoch = state.epoch
        seed = t.seed + 1000 * epoch + len(state.resumes)
        buffer = max(cfg.data.shuffle_buffer_rows, t.per_device_batch_size) if cfg.data.shuffle_buffer_rows else None
        it = shard.iter_batches(batch_size=t.per_device_batch_size, batch_format="pyarrow", drop_last=True,
                                local_shuffle_buffer_size=buffer, local_shuffle_seed=seed if buffer else None)
        micro = 0
        t_wait = time.perf_counter()
        for arrow_batch in it:
            batch = to_train_batch(arrow_batch, items, num_negatives=negatives, rng=neg_rng)
            if objective.item_level:  # CMSA (SDA stage 1): the rows' items only, sequences not encoded
                batch = dataclasses.replace(batch, seq_titles=[], seq_images=[])
            window.data_s += time.perf_counter() - t_wait
            if micro % t.grad_accum == 0 and t.diag_every and (state.global_step + 1) % t.diag_every == 0:
                pending_diag = gradient_alignment_step(engine.module, batch, objective,
                                                       zero3=engine.zero_optimization_stage() == 3)
            t_step = time.perf_counter()
            window.add(train_step(engine, batch, objective, gather=gather))
            window.compute_s += time.perf_counter() - t_step
            micro += 1
            if micro % t.grad_accum:
                t_wait = time.perf_counter()
                continue
            state.global_step += 1
            state.step_in_epoch += 1
            state.samples_seen += rows_per_step
            window.steps += 1
            end_of_epoch = state.step_in_epoch >= spe
            done = state.global_step >= total
            row: dict[str, Any] | None = None
            if state.global_step % t.log_every == 0 or end_of_epoch or done:
                elapsed = time.perf_counter() - window.t0
                values = _mean_over_ranks(window.means(), device)
                row = {"step": state.global_step, "epoch": epoch + state.step_in_epoch / spe,
                       **values, "lr": float(engine.get_lr()[0]),
                       "samples_per_s": window.steps * rows_per_step / elapsed if elapsed > 0 else math.nan,
                       "data_wait_frac": window.data_s / elapsed if elapsed > 0 else math.nan,
                       "compute_frac": window.compute_s / elapsed if elapsed > 0 else math.nan,
                       "report_frac": window.report_s / elapsed if elapsed > 0 else math.nan}
                window = _Window()
            if pending_diag:
                diag = _mean_over_ranks(pending_diag, device)
                pending_diag = {}
                if row is None:
                    history.append({"step": state.global_step, **diag})
                else:
                    row.update(diag)
            if row is not None:
                history.append(row)
                if rank == 0 and verbose:
                    log.info("%s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
                elif rank == 0:
                    log.info("%s", format_progress(row, total))
            # Ray Train gets the metrics with each checkpoint only; the rows in between go to the console and to
            # metrics.jsonl (written at each checkpoint). Ray Train V2 keeps one pending result per worker and its
            # controller takes it every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s), so ray.train.report every
            # log_every fast steps blocks the worker: in the demo that was 60-70% of the wall time (report_frac),
            # capping training at log_every x rows_per_step samples per 2 s.
            t_report = time.perf_counter()
            if done:
                pass  # the final checkpoint follows the export below, carrying the run's final metrics
            elif state.global_step % t.checkpoint_every == 0 or (end_of_epoch and t.checkpoint_at_epoch_end):
                checkpoint(row or {"step": state.global_step})
            window.report_s += time.perf_counter() - t_report
            _maybe_inject_failure(cfg, state.global_step, rank, world)
            t_wait = time.perf_counter()  # not before: report/checkpoint time is not time waiting for data
            if end_of_epoch or done:
                break
        if state.step_in_epoch < spe and state.global_step < total:
            raise RuntimeError(f"worker {rank} got only {micro} micro-batches in epoch {epoch}, expected "
                               f"{spe * t.grad_accum}; the dataset shards are uneven")
        if state.step_in_epoch >= spe:
            state.epoch, state.step_in_epoch = epoch + 1, 0

    final = _finish(cfg, engine, module, state, history, shard=ray.train.get_dataset_shard("probe"), items=items,
                    rank=rank, device=device)
    # The last checkpoint holds the final state and metrics (Ray's Result.metrics); a re-run after completion
    # restores it, runs no step, and exports again.
    checkpoint(final)


def _finish(cfg: TrainJobConfig, engine: DeepSpeedEngine, module: TrainModule, state: Any,
            history: list[dict[str, Any]], *, shard: Any, items: ItemTable, rank: int,
            device: torch.device) -> dict[str, Any]:
    """After the last step: rank agreement, changed-parameter check, export. All ranks call this."""
    from vlm2rec_ray.train import export

    probe_batch = to_train_batch(next(iter(shard.iter_batches(batch_size=cfg.train.per_device_batch_size,
                                                               batch_format="pyarrow"))), items)
    probe = _probe_embeddings(engine, probe_batch)
    now = export.fingerprints(module)
    unchanged = sorted(n for n, fp in state.initial_fingerprints.items() if now.get(n) == fp)
    flat = [v for k in sorted(now) for v in now[k]]
    per_rank_params = _gather_floats(flat, device)
    per_rank_probe = _gather_floats(torch.cat([probe[k].reshape(-1) for k in sorted(probe)]).tolist(), device)
    param_diff = max(abs(a - b) for r in per_rank_params for a, b in zip(r, per_rank_params[0], strict=True))
    probe_diff = max(abs(a - b) for r in per_rank_probe for a, b in zip(r, per_rank_probe[0], strict=True))
    trained = export.gather_trainable(module, rank=rank)
    final: dict[str, Any] = {
        "step": state.global_step, "done": True, "samples_seen": state.samples_seen,
        "resumes": list(state.resumes),
        "trainable_tensors": len(now), "trainable_tensors_unchanged": len(unchanged),
        "unchanged_examples": unchanged[:5],
        "rank_param_max_abs_diff": param_diff, "rank_probe_max_abs_diff": probe_diff,
        "last_metrics": next((r for r in reversed(history) if "loss" in r), {}),
    }
    if rank == 0:
        info = export.export_trained_model(cfg, trained, probe=(probe_batch, probe) if cfg.train.verify_export else None)
        final.update({k: v for k, v in info.items() if k != "files"})
        final["export_files"] = info["files"]
    return final


def _json_line(row: dict[str, Any]) -> str:
    import json

    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}) + "\n"
