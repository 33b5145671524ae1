"""The Ray Data graph of an embed run: read -> prepare (CPU tasks) -> model (actors) -> coalesce -> sink.

An incremental run's pass 1 *scans* every row (fetch + hash; no decode, no model) and stages it by what pass 2
does with it: new and changed rows go through the model, failed rows straight to the errors table, and the
previous snapshot's unchanged rows are carried over (filtered in CPU tasks against an index in the object
store); deleted items are not carried. The driver never holds rows, only per-write-task counts and file names.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from functools import partial
from typing import Any

import ray
import ray.data

from vlm2rec_ray.embed import incremental, inputs, preprocess
from vlm2rec_ray.embed.plan import RunPlan, row_bytes
from vlm2rec_ray.embed.predictor import EmbedPredictor
from vlm2rec_ray.embed.schema import (
    KEY_COLUMN,
    OK_STATUSES,
    errors_schema,
    errors_table,
    output_schema,
    output_table,
    row_schema,
)
from vlm2rec_ray.embed.sink import Route, RowSink, coalesced

WRITE_CPUS = 0.25  # write and coalescing tasks are I/O bound; keep CPUs for fetch/decode and the model actors
MIN_WRITE_BLOCK_BYTES = 1 << 20  # rows reach the sinks in blocks of at least this size (see write)
COALESCE_TASKS = 2  # tasks that coalesce small blocks for the sinks at once, at least (see write)
SCAN_ROW_BYTES = 300  # a staged scan row: key, hashes, status, title and URI
SCAN_GROUPS = {"encode": ("new", "changed"), "failed": ("failed",), "unchanged": ("unchanged",)}
PREPARE = {"items": preprocess.prepare_items, "sequences": preprocess.prepare_sequences}


def snapshot_sink(plan: RunPlan) -> RowSink:
    """The run's data files (``encoded``/``carried`` rows, output schema) and errors table (``failed`` rows)."""
    c, run, kind = plan.cfg, plan.run, plan.kind
    failed_at = _dt.datetime.now(_dt.timezone.utc)
    return RowSink(name="EmbeddingSnapshot", endpoint=plan.endpoint, rows_per_file=plan.rows_per_file, routes={
        "data": Route(run.uri, OK_STATUSES, output_schema(kind, plan.dim), partial(
            output_table, kind=kind, dim=plan.dim, model_id=c.model.name, model_version=c.model_version)),
        "errors": Route(run.errors_uri, ("failed",), errors_schema(kind),
                        partial(errors_table, kind=kind, model_version=c.model_version, failed_at=failed_at))})


def write(ds: ray.data.Dataset, sink: Any, *, row_bytes: int, tasks: int = COALESCE_TASKS) -> None:
    """Write ``ds`` through ``sink`` in blocks of at least :data:`MIN_WRITE_BLOCK_BYTES` (at most one write
    task's rows). A write task starts once it has a file's worth of rows; until then blocks under Ray's 100 KB
    inline limit would wait in the driver's memory, coalesced they wait in the object store (which spills).
    Not Ray Data's ``repartition`` (2.60: one task per block, no combining, a whole CPU each, queued behind
    the model); ``max(tasks, COALESCE_TASKS)`` coalescing tasks (a run: one per model actor, their output rate)
    at the write tasks' CPU share, a bounded pool Ray Data does not fuse into the write
    (tests/integration/test_embed_write.py checks both).
    """
    rows = max(1, MIN_WRITE_BLOCK_BYTES // max(1, row_bytes))
    if sink.min_rows_per_write:  # never hold rows back for more than one write task's worth (a small rows_per_file)
        rows = min(rows, int(sink.min_rows_per_write))
    (ds.map_batches(coalesced, batch_size=rows, batch_format="pyarrow", num_cpus=WRITE_CPUS,
                    compute=ray.data.TaskPoolStrategy(size=max(tasks, COALESCE_TASKS)))
     .write_datasink(sink, ray_remote_args={"num_cpus": WRITE_CPUS}))


def _input_rows(plan: RunPlan) -> ray.data.Dataset:
    ds = inputs.read_rows(plan.files, plan.fmt, endpoint=plan.endpoint,
                          columns=list(inputs.REQUIRED[plan.kind]) if plan.fmt == "parquet" else None,
                          include_paths=plan.kind == "items" and len(plan.files) > 1)
    ds = ds.map_batches(preprocess.conform_batch, fn_kwargs={"kind": plan.kind}, batch_format="pyarrow",
                        batch_size=None)
    # A catalog is often one file with one row group, i.e. one block: split it (streaming, no shuffle) so
    # that preprocess_concurrency fetch tasks run side by side.
    return ds.repartition(target_num_rows_per_block=plan.cfg.preprocess_batch_size)


def _prepare(plan: RunPlan, ds: ray.data.Dataset, fn: Callable[..., Any], **kwargs: Any) -> ray.data.Dataset:
    return ds.map_batches(fn, fn_kwargs=kwargs, batch_size=plan.cfg.preprocess_batch_size, batch_format="pyarrow",
                          num_cpus=plan.cfg.preprocess_cpus,
                          compute=ray.data.TaskPoolStrategy(size=plan.cfg.preprocess_concurrency))


def _model(plan: RunPlan, ds: ray.data.Dataset) -> ray.data.Dataset:
    return ds.map_batches(
        EmbedPredictor,
        fn_constructor_kwargs={"config": plan.cfg.model_dump(mode="json"), "dim": plan.dim, "gpus": plan.gpus,
                               "torch_threads": plan.torch_threads, "deterministic": plan.deterministic,
                               "run_id": plan.run.run_id},
        batch_size=plan.cfg.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=plan.cfg.num_actors),
        num_cpus=plan.cfg.cpus_per_actor, **({"num_gpus": plan.gpus} if plan.gpus > 0 else {}))


def run_full(plan: RunPlan, sink: RowSink) -> None:
    """read -> prepare (CPU tasks) -> EmbedPredictor (actors) -> the sink."""
    rows = _prepare(plan, _input_rows(plan), PREPARE[plan.kind], opts=plan.opts("encode"))
    write(_model(plan, rows), sink, row_bytes=row_bytes(plan.dim), tasks=plan.cfg.num_actors)


def run_incremental(plan: RunPlan, sink: RowSink, say: Callable[[str], None]) -> dict[str, Any]:
    """Pass 1 (scan + classify, staged) and pass 2 (encode new/changed, errors, carry unchanged); returns the
    scan sink's result."""
    index = ray.remote(num_cpus=0.25)(incremental.build_index_from_files)
    prev, prev_ref = plan.previous, None
    if prev is not None:
        prev_ref = index.remote(prev["_files"], KEY_COLUMN[plan.kind], endpoint=plan.endpoint)
        say(f"previous snapshot: dt={prev['dt']} run {prev['run_id']} ({prev.get('num_rows', 0)} rows)")
    schema = row_schema(plan.dim)
    scan_sink = RowSink(name="EmbeddingScan", endpoint=plan.endpoint, rows_per_file=200_000, routes={
        g: Route(plan.run.staging(g), statuses, schema) for g, statuses in SCAN_GROUPS.items()})
    scan_ds = _prepare(plan, _input_rows(plan), PREPARE[plan.kind],
                       opts=plan.opts("scan", prev_index=[prev_ref] if prev_ref is not None else None))
    write(scan_ds, scan_sink, row_bytes=SCAN_ROW_BYTES, tasks=plan.cfg.num_actors)
    scan = scan_sink.result
    say("scan: " + ", ".join(f"{k}={scan['counts'].get(k, 0)}" for k in ("new", "changed", "unchanged", "failed")))

    staged = {g: [f["uri"] for f in fs] for g, fs in scan["files"].items()}
    branches: list[ray.data.Dataset] = []
    if staged["encode"]:
        rows = inputs.read_rows(staged["encode"], "parquet", endpoint=plan.endpoint)
        branches.append(_model(plan, _prepare(plan, rows, preprocess.prepare_from_scan, opts=plan.opts("encode"),
                                              kind=plan.kind)))
    if staged["failed"]:  # already rows of the contract: straight to the errors table
        branches.append(inputs.read_rows(staged["failed"], "parquet", endpoint=plan.endpoint))
    if staged["unchanged"] and plan.carry:
        assert prev is not None
        unchanged_ref = index.remote(staged["unchanged"], "key", endpoint=plan.endpoint)
        carry = inputs.read_rows(prev["_files"], "parquet", endpoint=plan.endpoint)
        branches.append(carry.map_batches(preprocess.carry_filter, fn_kwargs={"opts": {"unchanged": [unchanged_ref]},
                                                                              "dim": plan.dim},
                                          batch_format="pyarrow", batch_size=None, num_cpus=0.25))
    if branches:
        ds = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
        write(ds, sink, row_bytes=row_bytes(plan.dim), tasks=plan.cfg.num_actors)
    return scan


__all__ = ["run_full", "run_incremental", "snapshot_sink", "write"]
