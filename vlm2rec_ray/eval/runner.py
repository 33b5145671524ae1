"""One evaluation run from an :class:`~vlm2rec_ray.config.EvalJobConfig`: read, evaluate, write.

Reads the dataset's train/test splits and the run's item and sequence embedding snapshots, computes Task 1,
modality dropout, geometry and Task 2, writes ``<output_uri>/eval.json`` and (optionally) the HTML/PNG
report. ``vlm2rec evaluate`` and ``jobs/evaluate.py`` both call :func:`run_evaluation`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vlm2rec_ray import storage

if TYPE_CHECKING:
    import pyarrow as pa

    from vlm2rec_ray.config import EvalJobConfig

__all__ = ["read_embedding_table", "run_evaluation"]


def read_embedding_table(uri: str, dt: str | None = None, *, endpoint: str | None = None) -> pa.Table:
    """An embedding snapshot as one table: ``uri`` itself if it is a Parquet file, else the snapshot ``dt``
    (default: the latest) under ``uri`` through :func:`vlm2rec_ray.embed.snapshot.read_embeddings` (the embed
    job's manifest; a ``dt=`` partition of plain Parquet files written by another tool; errors tables and hidden
    files skipped).

    Raises:
        FileNotFoundError: nothing there, or no such ``dt``.
    """
    from vlm2rec_ray.embed.snapshot import read_embeddings

    if not uri.endswith(".parquet"):
        return read_embeddings(uri, dt, endpoint=endpoint)
    try:
        return storage.read_parquet(uri, endpoint=endpoint)
    except storage.StorageError as e:
        raise FileNotFoundError(f"no embeddings at {uri}: {e}; run `vlm2rec embed` first or fix the URI") from e


def _log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def run_evaluation(cfg: EvalJobConfig, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate one run and write ``eval.json`` (+ report) to ``cfg.output_uri``.

    Args:
        cfg: the job config.
        progress: optional callback receiving one-line status messages.

    Returns:
        The result dict written to ``eval.json``: ``name``, ``config``, ``task1``, ``dropout``,
        ``geometry``, ``task2``, ``timings_s``, ``report`` (URIs).
    """
    from vlm2rec_ray.data.catalog import read_split
    from vlm2rec_ray.eval.diagnostics import geometry_table, modality_dropout
    from vlm2rec_ray.eval.report import load_training_metrics, write_report
    from vlm2rec_ray.eval.task1 import align_task1_inputs, evaluate_task1
    from vlm2rec_ray.eval.task2 import Task2Settings, run_task2

    endpoint = storage.endpoint_url(cfg.storage.endpoint_url)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    test = read_split(cfg.dataset_uri, "test", endpoint=endpoint)
    items = read_embedding_table(cfg.item_embeddings_uri, cfg.dt, endpoint=endpoint)
    seqs = read_embedding_table(cfg.sequence_embeddings_uri, cfg.dt, endpoint=endpoint)
    timings["read"] = time.perf_counter() - t0
    _log(progress, f"read {items.num_rows} item and {seqs.num_rows} sequence embeddings, {test.num_rows} test users")

    result: dict[str, Any] = {"name": cfg.name, "config": cfg.model_dump(mode="json")}
    t0 = time.perf_counter()
    inputs = align_task1_inputs(seqs, items, test)
    result["task1"] = evaluate_task1(seqs, items, test, num_negatives=cfg.num_negatives, seeds=cfg.seeds,
                                     ks=cfg.ks, full_ranking=cfg.full_ranking, inputs=inputs)
    timings["task1"] = time.perf_counter() - t0
    _log(progress, f"task 1: {json.dumps({k: round(v, 4) for k, v in result['task1']['sampled'].items()})}")
    if cfg.dropout:
        t0 = time.perf_counter()
        result["dropout"] = modality_dropout(seqs, items, test, num_negatives=cfg.num_negatives, seeds=cfg.seeds,
                                             ks=cfg.ks, inputs=inputs)
        timings["dropout"] = time.perf_counter() - t0
    if cfg.geometry:
        t0 = time.perf_counter()
        result["geometry"] = geometry_table(seqs, items, test, max_users=cfg.geometry_max_users,
                                            max_items=cfg.geometry_max_items, inputs=inputs)
        timings["geometry"] = time.perf_counter() - t0
    if cfg.task2.enabled:
        t0 = time.perf_counter()
        t2 = cfg.task2
        settings = Task2Settings(dim=t2.dim, max_len=t2.max_len, num_blocks=t2.num_blocks, num_heads=t2.num_heads,
                                 dropout=t2.dropout, epochs=t2.epochs, batch_size=t2.batch_size, lr=t2.lr, seed=t2.seed,
                                 num_threads=t2.num_threads)
        train = read_split(cfg.dataset_uri, "train", endpoint=endpoint)
        result["task2"] = run_task2(train, test, items, models=t2.models, embedding_column=t2.embedding_column,
                                    settings=settings, num_negatives=cfg.num_negatives, seeds=cfg.seeds, ks=cfg.ks,
                                    frequency_edges=t2.frequency_edges)
        timings["task2"] = time.perf_counter() - t0
        _log(progress, f"task 2: {len(result['task2'])} models trained in {timings['task2']:.1f}s")
    result["timings_s"] = {k: round(v, 3) for k, v in timings.items()}

    history: list[dict[str, Any]] = []
    if cfg.training_metrics_uri:
        try:
            history = load_training_metrics(cfg.training_metrics_uri, endpoint=endpoint)
        except FileNotFoundError as e:
            result["training_metrics_error"] = str(e)
            _log(progress, f"warning: {e}")
    if cfg.report:
        result["report"] = write_report(cfg.output_uri, [result], {cfg.name: history},
                                        title=f"VLM2Rec evaluation: {cfg.name}", endpoint=endpoint)
    storage.write_text(storage.join(cfg.output_uri, "eval.json"), json.dumps(result, indent=2), endpoint=endpoint)
    return result
