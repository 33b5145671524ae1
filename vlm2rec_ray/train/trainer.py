"""Driver side of ``vlm2rec train``: data preparation, the Ray Train ``TorchTrainer``, and the run's outputs.

::

    cfg = load_config(TrainJobConfig, "jobs/configs/train_tiny.yaml", ["train.zero_stage=3"])
    summary = run_training(cfg)         # prepares rows, fits, exports, writes README.md + train_summary.json

:func:`build_trainer` maps the config onto Ray Train: ``ScalingConfig`` (workers, GPU or CPU, CPUs/GPUs per
worker), ``TorchConfig`` (NCCL on GPU, gloo on CPU), ``RunConfig`` (storage on a shared dir or s3://, the run
name, ``FailureConfig(max_failures)``, ``CheckpointConfig(num_to_keep)``) and ``DataConfig`` (only the train
set is split across workers; the small probe set goes whole to every worker).

Resuming: Ray Train V2 keeps a snapshot of the run's checkpoints under ``storage_path/run_name``; a second
``fit()`` with the same storage path and name hands the latest checkpoint to the workers, so re-running the
same command continues the step count. Worker failures restart the worker group from the latest checkpoint
up to ``max_failures`` times.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vlm2rec_ray import storage
from vlm2rec_ray.runtime import connect_ray, verbose

if TYPE_CHECKING:
    import ray.data
    from ray.train.torch import TorchTrainer

    from vlm2rec_ray.config import TrainJobConfig

__all__ = ["PROBE_ROWS", "build_trainer", "connect_ray", "run_training"]

PROBE_ROWS = 4  # rows of the export-check / rank-agreement probe batch


def _storage(cfg: TrainJobConfig) -> tuple[str, Any]:
    """Ray's ``(storage_path, storage_filesystem)``: an explicit S3 endpoint needs its own pyarrow filesystem."""
    path = cfg.resolved_storage_path
    if storage.is_remote(path) and cfg.storage.endpoint_url:
        fs, stripped = storage.pyarrow_filesystem(path, endpoint=cfg.storage.endpoint_url)
        return stripped, fs
    return path, None


def build_trainer(cfg: TrainJobConfig, datasets: dict[str, ray.data.Dataset] | None = None,
                  run_info: dict[str, Any] | None = None, *,
                  train_loop: Callable[[dict[str, Any]], None] | None = None) -> TorchTrainer:
    """The ``TorchTrainer`` for ``cfg`` (see module doc); ``run_info`` travels to the workers as ``config["run"]``.
    ``train_loop`` replaces :func:`~vlm2rec_ray.train.loop.train_loop_per_worker` (benchmarks/train_feed.py)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vlm2rec_ray.train.loop import train_loop_per_worker

    cfg = cfg.with_absolute_paths()  # workers run in another working directory
    s = cfg.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    storage_path, filesystem = _storage(cfg)
    run_config = RunConfig(
        name=cfg.run_name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
    )
    return TorchTrainer(
        train_loop or train_loop_per_worker,
        # exclude_unset: the worker rebuilds exactly the settings given (validators read model_fields_set)
        train_loop_config={"job": cfg.model_dump(mode="json", exclude_unset=True), "run": dict(run_info or {})},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=run_config,
        datasets=datasets or {},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def run_training(cfg: TrainJobConfig, *, progress: Callable[[str], None] = print,
                 ray_address: str | None = None) -> dict[str, Any]:
    """Prepare the data, train, export; write ``README.md`` and ``train_summary.json`` (last) to ``output_uri``.

    Ray: joins ``ray_address`` / ``RAY_ADDRESS`` when given, else starts a private local instance
    (:func:`connect_ray`).

    Returns:
        The run summary (also in ``train_summary.json``).

    Raises:
        ValueError: no usable training rows, or fewer rows than one step needs.
        ray.train.TrainingFailedError: training failed more than ``max_failures`` times.
    """
    from vlm2rec_ray.config import config_hash
    from vlm2rec_ray.train.data import (
        build_train_dataset,
        ensure_item_table,
        prepare_training_rows,
        steps_per_epoch,
    )
    from vlm2rec_ray.train.export import write_model_card

    started = time.time()
    cfg = cfg.with_absolute_paths()
    connect_ray(ray_address)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    endpoint = cfg.storage.endpoint_url
    prepared = prepare_training_rows(cfg)
    counts = prepared.counts
    progress(f"training rows: {counts['rows']} from {counts['users']} users "
             f"(dropped {counts['dropped_rows']} rows, {counts['dropped_history_items']} history items)")
    if prepared.errors.num_rows:
        storage.write_parquet(prepared.errors, storage.join(cfg.output_uri, "data_errors.parquet"), endpoint=endpoint)
    spe = steps_per_epoch(prepared.rows.num_rows, cfg)
    # The item table (each image fetched and decoded once) stays in the object store; the workers read its blocks.
    item_refs = ensure_item_table(prepared, cfg)
    probe = dataclasses.replace(prepared, rows=prepared.rows.slice(0, min(PROBE_ROWS, prepared.rows.num_rows)))
    datasets = {"train": build_train_dataset(prepared, cfg), "probe": build_train_dataset(probe, cfg)}
    run_info = {"steps_per_epoch": spe, "num_rows": prepared.rows.num_rows, "items": item_refs, "verbose": verbose()}
    progress(f"{cfg.scaling.num_workers} workers x {cfg.train.per_device_batch_size} rows x "
             f"{cfg.train.grad_accum} accumulation: {spe} steps per epoch, {cfg.train.epochs} epochs; "
             f"checkpoints in {cfg.resolved_storage_path}/{cfg.run_name}")
    result = build_trainer(cfg, datasets, run_info).fit()
    final = dict(result.metrics or {})
    summary: dict[str, Any] = {
        "run_name": cfg.run_name,
        "output_uri": cfg.output_uri,
        "base_model": cfg.model.name,
        "objective": cfg.objective.variant,
        "config_hash": config_hash(cfg),
        "config": cfg.model_dump(mode="json"),
        "steps_per_epoch": spe,
        "global_step": final.get("step"),
        "samples_seen": final.get("samples_seen"),
        "resumes": final.get("resumes", []),
        "data": counts,
        "final_metrics": final.get("last_metrics", {}),
        "trainable_tensors": final.get("trainable_tensors"),
        "trainable_tensors_unchanged": final.get("trainable_tensors_unchanged"),
        "unchanged_examples": final.get("unchanged_examples", []),
        "rank_param_max_abs_diff": final.get("rank_param_max_abs_diff"),
        "rank_probe_max_abs_diff": final.get("rank_probe_max_abs_diff"),
        "export_max_abs_diff": final.get("export_max_abs_diff"),
        "export_dtype": final.get("export_dtype"),
        "export_files": final.get("export_files"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "wall_s": round(time.time() - started, 1),
    }
    write_model_card(cfg, summary, endpoint=endpoint)
    storage.write_text(storage.join(cfg.output_uri, "train_summary.json"),
                       json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n", endpoint=endpoint)
    progress(f"trained {summary['global_step']} steps; model at {cfg.output_uri} (train_summary.json, README.md)")
    return summary
