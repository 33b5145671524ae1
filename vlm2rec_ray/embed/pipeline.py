"""The embed job: a streaming Ray Data pipeline from a catalog (or user histories) to a Parquet snapshot.

A run goes through the rooms in order: :mod:`.plan` decides on the driver what to read and where to write (a
:class:`RunPlan` over a :class:`~.snapshot.SnapshotRun`); :mod:`.inputs` checks the input (the census reads the
id column only: a duplicate id fails before any image is fetched); :mod:`.stages` streams it (read, fetch/decode
tasks, model actors, the sink; full or incremental); :mod:`.publish` checks that every input row is in the
output or the errors table, writes the manifest last and returns the summary, or marks the run failed.

Memory is flat in the catalog size but for one output file's rows in the object store (``rows_per_file``).
S3 retries are a Ray metric; the summary's ``storage_retries`` is the job's count over the run (approximate).

    summary = run_embed_items(load_config(EmbedJobConfig, "jobs/configs/embed_items.yaml"))
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
import ray.data

from vlm2rec_ray import storage
from vlm2rec_ray.config import EmbedJobConfig
from vlm2rec_ray.embed import iceberg, inputs, publish, stages
from vlm2rec_ray.embed.plan import RunPlan, plan_run
from vlm2rec_ray.embed.publish import EmbedFailureError, format_summary
from vlm2rec_ray.embed.schema import KEY_COLUMN
from vlm2rec_ray.runtime import connect_ray, returning_freed_memory
from vlm2rec_ray.storage.retries import job_retries

TRIM_EVERY_S = 5.0  # the driver returns freed heap pages to the OS this often during a run
# Ray Data retries reads whose error matches DataContext.retried_io_errors (10 attempts; the pyarrow filesystem it
# pickles to its tasks keeps only pyarrow's default retries): add 5xx answers without a body (HEAD), which
# pyarrow reports as UNKNOWN and Ray's defaults leave out.
RETRIED_IO_ERRORS = ("AWS Error UNKNOWN (HTTP status 5",)
# Ray Data's DataSourceV2 Parquet reader (2.60's default) starts FooterReader actors, new worker processes, for
# every read; on the 2-core box they competed with the model actor's start-up (first batch 8.3-12.6 s vs 6.0-7.5 s
# with V1, benchmarks/RESULTS.md). V1 reads the footers of a catalog's few files where the read is planned.
USE_DATASOURCE_V2 = False


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a bad input's own error (ValueError, FileNotFoundError, PermissionError, StorageError) from inside
    Ray's wrappers; the run sets ``raise_original_map_exception``, so Ray Data keeps a UDF's error as the cause."""
    try:
        yield
    except BaseException as e:
        cur: BaseException | None = e
        for _ in range(10):
            if cur is not None and not type(cur).__module__.startswith("ray.") and isinstance(
                    cur, (ValueError, FileNotFoundError, PermissionError, storage.StorageError)):
                if cur is e:
                    raise
                raise cur from e
            cur = cur and (getattr(cur, "cause", None) or cur.__cause__)
        raise


def _run(cfg: EmbedJobConfig, kind: str, progress: Callable[[str], None] | None) -> dict[str, Any]:
    say = progress or (lambda _m: None)
    started, started_epoch = time.perf_counter(), time.time()  # wall clock: to compare with the rows' embedded_at
    plan = plan_run(cfg.with_absolute_paths(), kind)  # inputs and model checked before Ray starts: in seconds
    if plan.cfg.output_format == "iceberg":  # the same stages; the commit differs (embed/iceberg.py)
        iceberg.prepare(plan)
    connect_ray()
    plan.retries_at_start = job_retries()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.raise_original_map_exception, ctx.retried_io_errors, ctx.use_datasource_v2
    ctx.enable_progress_bars, ctx.raise_original_map_exception = plan.cfg.progress, True
    ctx.retried_io_errors, ctx.use_datasource_v2 = [*ctx.retried_io_errors, *RETRIED_IO_ERRORS], USE_DATASOURCE_V2
    try:
        say(f"embed {kind}: {plan.source_uri} -> {plan.run.partition} (run {plan.run.run_id}, d={plan.dim}, "
            f"{plan.cfg.num_actors} actor(s) x {plan.gpus:g} GPU)")
        census = _census(plan)
        sink, scan = (iceberg.snapshot_sink(plan) if plan.table is not None else stages.snapshot_sink(plan)), None
        try:  # the executor's freed native allocations go back to the OS as the run goes (driver RSS stays flat)
            with user_errors(), returning_freed_memory(TRIM_EVERY_S):
                scan = stages.run_incremental(plan, sink, say) if plan.cfg.incremental else stages.run_full(plan, sink)
        except BaseException as e:
            try:  # best effort: mark the run failed (the next publish removes it) and drop its staging
                plan.run.fail({"error": f"{type(e).__name__}: {e}"[:2000]})
            except Exception as e2:  # the original error matters more
                logging.getLogger(__name__).warning("could not mark run %s failed: %s", plan.run.run_id, e2)
            if plan.table is not None:
                iceberg.abort(plan)
            raise
        say(f"input: {census['rows']} rows in {len(plan.files)} file(s)")
        return (iceberg.finish if plan.table is not None else publish.finish)(plan, census, sink.result, scan,
                                                                              started, started_epoch)
    finally:
        ctx.enable_progress_bars, ctx.raise_original_map_exception, ctx.retried_io_errors, ctx.use_datasource_v2 = saved


def _census(plan: RunPlan) -> dict[str, Any]:
    """Run the census (and, for sequences, build the catalog lookup) in Ray tasks; refuse duplicate ids."""
    ref = ray.remote(num_cpus=0.25)(inputs.census).remote(plan.files, plan.fmt, plan.kind, plan.endpoint)
    if plan.kind == "sequences":
        plan.catalog_ref = ray.remote(num_cpus=0.25)(inputs.catalog_lookup).remote(plan.catalog_files, plan.endpoint)
    with user_errors():
        census = ray.get(ref)
    if census["duplicates"]:
        key = KEY_COLUMN[plan.kind]
        raise ValueError(f"{plan.source_uri} has {census['duplicates']} duplicate {key} value(s), e.g. "
                         f"{census['duplicate_examples']}; each row needs a unique {key} (deduplicate the input); "
                         "nothing was embedded")
    return census


def run_embed_items(cfg: EmbedJobConfig, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Embed the catalog into ``<output_uri>/items/dt=<dt>/`` and publish the snapshot; returns the summary.

    Raises:
        EmbedFailureError: the failure share exceeded ``max_failure_fraction`` or counts did not add up
            (nothing published; failed rows are in the run's errors table).
        ValueError / FileNotFoundError: bad input (duplicate ids, missing columns, nothing at the URI).
    """
    return _run(cfg, "items", progress)


def run_embed_sequences(cfg: EmbedJobConfig, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Embed each user's last ``model.max_history`` items of ``<dataset_uri>/splits/<split>.parquet`` through
    P_T and P_V into ``<output_uri>/sequences/dt=<dt>/``; returns the summary (see :func:`run_embed_items`)."""
    return _run(cfg, "sequences", progress)


__all__ = ["EmbedFailureError", "format_summary", "run_embed_items", "run_embed_sequences", "user_errors"]
