"""Ray Data sinks of the embed job: the snapshot sink (embeddings + errors) and the scan staging sink.

:class:`SnapshotSink` receives sink rows (:func:`~vlm2rec_ray.embed.predictor.sink_row_schema`) and, in each
write task, streams the ``encoded``/``carried`` rows into ``run=<id>/part-<task>.parquet`` with the exact
output schema and the ``failed`` rows into ``run=<id>/_errors/part-<task>.parquet``. Each task returns
its files and counts; :meth:`on_write_complete` (on the driver) adds them up, so the run's summary needs no
second pass over the data. File names derive from the write task's index, so a retried task overwrites its
own files instead of duplicating rows. Local files are written under a temporary name and renamed; an S3
file is written to a local spool file and uploaded when complete (one PUT, or a multipart upload), so the
object appears only whole.

S3 retries: the sinks add up the ``storage_retries`` column of their rows (what the stages upstream
counted, ``stats`` rows included, which carry nothing else) and the retries of their own uploads, and
return the sum as the ``storage_retries`` count.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import BlockAccessor

from vlm2rec_ray import storage
from vlm2rec_ray.embed.preprocess import STATS_STATUS
from vlm2rec_ray.embed.reader import RETRIES_COLUMN, retries_in
from vlm2rec_ray.embed.schema import (
    EMBEDDED_AT_TYPE,
    KEY_COLUMN,
    errors_schema,
    output_schema,
)

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext
    from ray.data.datasource.datasink import WriteResult


class _PartWriter:
    """One Parquet file written incrementally (opened on the first rows). Locally it is written under a
    temporary name next to its destination and renamed; for S3 it is written to a local spool file
    (``tempfile.gettempdir()``) that :func:`~vlm2rec_ray.storage.put_file` uploads on :meth:`close`.
    ``retries`` counts the S3 retries of that upload (only: not of whatever produced the rows)."""

    def __init__(self, uri: str, schema: pa.Schema, endpoint: str | None) -> None:
        self.uri, self.schema, self.endpoint = uri, schema, endpoint
        self.rows = 0
        self.retries = 0
        self._writer: Any = None
        self._tmp = ""

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        import pyarrow.parquet as pq

        if self._writer is None:
            if storage.is_s3(self.uri):
                self._tmp = storage.new_spool_path(".parquet")
            else:
                self._tmp = str(storage.temp_beside(storage.resolve_local(self.uri)))
            self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._writer.write_table(table.cast(self.schema))
        self.rows += table.num_rows

    def close(self) -> int:
        """Finish the file and publish it; returns its size in bytes (0 when nothing was written).

        Raises:
            StorageError: the S3 upload failed.
        """
        if self._writer is None:
            return 0
        self._writer.close()
        if not storage.is_s3(self.uri):
            size = os.path.getsize(self._tmp)
            os.replace(self._tmp, storage.resolve_local(self.uri))
            return size
        before = storage.retry_attempts()
        try:
            return storage.put_file(self._tmp, self.uri, endpoint=self.endpoint)
        finally:
            self.retries += storage.retry_attempts() - before
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)


def _const(value: str, n: int) -> pa.Array:
    return pa.array([value] * n, pa.string())


class SnapshotSink(Datasink):
    """Write sink rows of one run as its data files and errors table; count everything.

    Args:
        kind: ``items`` or ``sequences``.
        run_uri: ``.../dt=<dt>/run=<run_id>`` (data files go here).
        errors_uri: ``.../run=<run_id>/_errors``.
        dim: embedding size d.
        model_id, model_version: written into every data row / errors row.
        endpoint: S3 endpoint (passed explicitly: workers may predate the driver's environment).
        rows_per_file: rows Ray Data gathers per write task (one data file per task).
    """

    def __init__(self, *, kind: str, run_uri: str, errors_uri: str, dim: int, model_id: str, model_version: str,
                 endpoint: str | None, rows_per_file: int) -> None:
        self.kind, self.run_uri, self.errors_uri, self.dim = kind, run_uri, errors_uri, dim
        self.model_id, self.model_version, self.endpoint = model_id, model_version, endpoint
        self.rows_per_file = rows_per_file
        self.result: dict[str, Any] | None = None

    def get_name(self) -> str:
        return "EmbeddingSnapshot"

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_file

    def _data_table(self, t: pa.Table) -> pa.Table:
        schema = output_schema(self.kind, self.dim)
        n = t.num_rows
        cols: dict[str, Any] = {
            KEY_COLUMN[self.kind]: t.column("key"),
            "history": t.column("history"),
            "emb_text": t.column("emb_text"),
            "emb_image": t.column("emb_image"),
            "emb_fused": t.column("emb_fused"),
            "content_hash": t.column("content_hash"),
            "model_id": _const(self.model_id, n),
            "model_version": _const(self.model_version, n),
            "embedded_at": t.column("embedded_at"),
        }
        return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)

    def _errors_table(self, t: pa.Table, now: Any) -> pa.Table:
        schema = errors_schema(self.kind)
        n = t.num_rows
        cols: dict[str, Any] = {
            "history": t.column("history"),
            "item_id": t.column("failed_item_id"),  # sequences: the history item that failed
            KEY_COLUMN[self.kind]: t.column("key"),  # items: the item itself (overrides the line above)
            "title": t.column("title"),
            "image_uri": t.column("image_uri"),
            "reason": t.column("reason"),
            "detail": t.column("detail"),
            "model_version": _const(self.model_version, n),
            "failed_at": pa.array([now] * n, EMBEDDED_AT_TYPE),
        }
        return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)

    def write(self, blocks: Iterable[Any], ctx: TaskContext) -> dict[str, Any]:
        import datetime as _dt

        name = f"part-{ctx.task_idx:05d}.parquet"
        data = _PartWriter(storage.join(self.run_uri, name), output_schema(self.kind, self.dim), self.endpoint)
        errs = _PartWriter(storage.join(self.errors_uri, name), errors_schema(self.kind), self.endpoint)
        counts: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        timeline = EncodeTimeline()
        now = _dt.datetime.now(_dt.timezone.utc)
        try:
            for block in blocks:
                t = BlockAccessor.for_block(block).to_arrow()
                counts["storage_retries"] += retries_in(t)
                if t.num_rows and "status" in t.column_names:
                    t = t.filter(pc.invert(pc.fill_null(pc.equal(t.column("status"), STATS_STATUS), False)))
                if t.num_rows == 0:
                    continue
                status = t.column("status")
                ok_mask = pc.is_in(status, value_set=pa.array(["encoded", "carried"]))
                ok = t.filter(ok_mask)
                bad = t.filter(pc.equal(status, "failed"))
                if ok.num_rows + bad.num_rows != t.num_rows:
                    raise AssertionError(f"sink got rows with unknown status: {pc.unique(status).to_pylist()}")
                if ok.num_rows and (ok.column("emb_fused").null_count or ok.column("content_hash").null_count):
                    raise AssertionError("an ok row has no embedding or content hash")
                data.write(self._data_table(ok))
                errs.write(self._errors_table(bad, now))
                counts["rows"] += t.num_rows
                counts["ok"] += ok.num_rows  # "encoded" + "carried"; "failed" comes from the status counts below
                for k, v in zip(*_value_counts(status), strict=True):
                    counts[k] += v
                for k, v in zip(*_value_counts(ok.column("change")), strict=True):
                    if k:
                        counts[k] += v
                counts["in_prev"] += int(pc.sum(pc.cast(t.column("in_prev"), pa.int64())).as_py() or 0)
                counts["texts_encoded"] += int(pc.sum(t.column("texts_encoded")).as_py() or 0)
                counts["images_encoded"] += int(pc.sum(t.column("images_encoded")).as_py() or 0)
                timeline.add(t)
                for k, v in zip(*_value_counts(bad.column("reason")), strict=True):
                    reasons[k or "unknown"] += v
            files = []
            for w, kind in ((data, "data"), (errs, "errors")):
                size = w.close()
                if w.rows:
                    files.append({"kind": kind, "uri": w.uri, "rows": w.rows, "bytes": size})
        except BaseException:
            data.abort()
            errs.abort()
            raise
        counts["storage_retries"] += data.retries + errs.retries
        return {"files": files, "counts": dict(counts), "reasons": dict(reasons), "timeline": timeline}

    def on_write_complete(self, write_result: WriteResult) -> None:
        counts: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        files: list[dict[str, Any]] = []
        timeline = EncodeTimeline()
        for r in write_result.write_returns:
            if not r:
                continue
            counts.update(r["counts"])
            reasons.update(r["reasons"])
            files += r["files"]
            timeline.merge(r["timeline"])
        self.result = {"counts": dict(counts), "reasons": dict(reasons),
                       "files": sorted(files, key=lambda f: (f["kind"], f["uri"])), "timeline": timeline}


class EncodeTimeline:
    """When the model stage finished its batches, from the ``embedded_at`` stamps of the rows encoded in this
    run (the actor stamps a batch when it finishes it; carried rows keep older stamps and are left out):
    the first and last stamp and how many rows bear the first. Merges across write tasks in O(1)."""

    def __init__(self) -> None:
        self.first_us: int | None = None  # microseconds since the epoch (UTC)
        self.last_us: int | None = None
        self.rows = 0  # encoded rows seen
        self.rows_at_first = 0  # of which stamped with first_us (the first batch)

    def add(self, rows: pa.Table) -> None:
        """Take the ``status == "encoded"`` rows of a block of sink rows."""
        enc = rows.filter(pc.equal(rows.column("status"), "encoded"))
        if enc.num_rows:
            us = pc.cast(enc.column("embedded_at"), pa.int64())
            lo, hi = int(pc.min(us).as_py()), int(pc.max(us).as_py())
            at_lo = int(pc.sum(pc.cast(pc.equal(us, lo), pa.int64())).as_py())
            self._merge(lo, hi, enc.num_rows, at_lo)

    def merge(self, other: EncodeTimeline) -> None:
        if other.first_us is not None and other.last_us is not None:
            self._merge(other.first_us, other.last_us, other.rows, other.rows_at_first)

    def _merge(self, first: int, last: int, rows: int, at_first: int) -> None:
        if self.first_us is None or first < self.first_us:
            self.first_us, self.rows_at_first = first, at_first
        elif first == self.first_us:
            self.rows_at_first += at_first
        self.last_us = last if self.last_us is None else max(self.last_us, last)
        self.rows += rows

    def steady_rows_per_s(self) -> float | None:
        """Encoded rows after the first batch / time from the first batch to the last (None: one batch)."""
        if self.first_us is None or self.last_us is None or self.last_us <= self.first_us:
            return None
        return (self.rows - self.rows_at_first) / ((self.last_us - self.first_us) / 1e6)


def _value_counts(arr: Any) -> tuple[list[Any], list[int]]:
    vc = pc.value_counts(arr)
    if len(vc) == 0:
        return [], []
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


# Staged scan rows by what pass 2 does with them: each group is read by one branch, unfiltered.
SCAN_GROUPS = {"encode": ("new", "changed"), "failed": ("failed",), "unchanged": ("unchanged",)}


class ScanSink(Datasink):
    """Stage the scan rows of an incremental run (pass 1) as Parquet, one file per group of
    :data:`SCAN_GROUPS` per write task (``<uri>/<group>/part-*.parquet``), and count them by status.

    ``schema`` is the scan rows' schema; its ``storage_retries`` column is added up, not staged.
    """

    def __init__(self, *, uri: str, endpoint: str | None, schema: pa.Schema) -> None:
        self.uri, self.endpoint = uri, endpoint
        self.schema = pa.schema([f for f in schema if f.name != RETRIES_COLUMN])
        self.result: dict[str, Any] | None = None

    def get_name(self) -> str:
        return "EmbeddingScan"

    @property
    def min_rows_per_write(self) -> int | None:
        return 200_000

    def write(self, blocks: Iterable[Any], ctx: TaskContext) -> dict[str, Any]:
        name = f"part-{ctx.task_idx:05d}.parquet"
        writers = {g: _PartWriter(storage.join(self.uri, g, name), self.schema, self.endpoint) for g in SCAN_GROUPS}
        counts: Counter[str] = Counter()
        try:
            for block in blocks:
                t = BlockAccessor.for_block(block).to_arrow()
                counts["storage_retries"] += retries_in(t)
                if RETRIES_COLUMN in t.column_names:
                    t = t.drop_columns([RETRIES_COLUMN])
                status = t.column("status")
                routed = 0
                for g, statuses in SCAN_GROUPS.items():
                    part = t.filter(pc.is_in(status, value_set=pa.array(statuses, pa.string())))
                    writers[g].write(part)
                    routed += part.num_rows
                if routed != t.num_rows:
                    raise AssertionError(f"scan rows with unknown status: {pc.unique(status).to_pylist()}")
                for k, v in zip(*_value_counts(status), strict=True):
                    counts[k] += v
                counts["in_prev"] += int(pc.sum(pc.cast(t.column("in_prev"), pa.int64())).as_py() or 0)
                counts["rows"] += t.num_rows
            for w in writers.values():
                w.close()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        counts["storage_retries"] += sum(w.retries for w in writers.values())
        return {"files": {g: [w.uri] if w.rows else [] for g, w in writers.items()}, "counts": dict(counts)}

    def on_write_complete(self, write_result: WriteResult) -> None:
        counts: Counter[str] = Counter()
        files: dict[str, list[str]] = {g: [] for g in SCAN_GROUPS}
        for r in write_result.write_returns:
            if r:
                counts.update(r["counts"])
                for g, fs in r["files"].items():
                    files[g] += fs
        self.result = {"counts": dict(counts), "files": {g: sorted(fs) for g, fs in files.items()}}


__all__ = ["SCAN_GROUPS", "ScanSink", "SnapshotSink"]
