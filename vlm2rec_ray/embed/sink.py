"""The Ray Data sink of the embed job: rows of the row contract routed by status into Parquet files, counted.

Each write task streams each :class:`Route`'s rows (a snapshot's data and errors tables; the incremental
scan's staging) into ``<route.uri>/part-<task>.parquet`` (spooled locally, copied when complete: it appears only
whole; a retried task overwrites its own file) and returns its files and counts, added up on the driver.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from vlm2rec_ray import storage

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext
    from ray.data.datasource.datasink import WriteResult


@dataclass(frozen=True)
class Route:
    """Rows whose status is in ``statuses`` go to ``<uri>/part-<task>.parquet`` as ``to_file(rows)``."""

    uri: str
    statuses: tuple[str, ...]
    schema: pa.Schema
    to_file: Callable[[pa.Table], pa.Table] | None = None


def coalesced(batch: pa.Table) -> pa.Table:
    """Identity (the stage before the sink): Ray Data hands it ``batch_size`` rows bundled from small blocks, and it
    returns them as one block. Here, not in ``stages``, so its tasks import only this light module."""
    return batch


def _value_counts(arr: Any) -> Iterable[tuple[Any, int]]:
    vc = pc.value_counts(arr)
    return zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True) if len(vc) else ()


class RowSink(Datasink):
    """Write rows by :class:`Route` and count them: rows, per ``status``, per ``change`` of rows that did not fail,
    ``in_prev``, ``texts_encoded`` / ``images_encoded``, failure reasons and the encode timeline.

    Args:
        routes: name -> :class:`Route` (every status a row can have must be routed).
        endpoint: the store's endpoint (passed explicitly: workers may predate the driver's environment).
        rows_per_file: rows Ray Data gathers per write task (one file per route per task).
    """

    def __init__(self, *, routes: dict[str, Route], endpoint: str | None, rows_per_file: int, name: str) -> None:
        self.routes, self.endpoint, self.rows_per_file, self.name = routes, endpoint, rows_per_file, name
        self.result: dict[str, Any] = {"counts": {}, "reasons": {}, "timeline": None,
                                       "files": {k: [] for k in routes}}  # until a write completes

    def get_name(self) -> str:
        return self.name

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_file

    def write(self, blocks: Iterable[Any], ctx: TaskContext) -> dict[str, Any]:
        name = f"part-{ctx.task_idx:05d}.parquet"
        counts: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        rows = dict.fromkeys(self.routes, 0)
        stamps: list[EncodeTimeline | None] = []
        with tempfile.TemporaryDirectory(prefix="vlm2rec-part-") as spool, contextlib.ExitStack() as stack:
            writers = {k: stack.enter_context(pq.ParquetWriter(os.path.join(spool, k), r.schema, compression="zstd"))
                       for k, r in self.routes.items()}
            for block in blocks:
                t = BlockAccessor.for_block(block).to_arrow()
                for key, route in self.routes.items():
                    part = t.filter(pc.is_in(t.column("status"), value_set=pa.array(route.statuses, pa.string())))
                    if part.num_rows:
                        part = route.to_file(part) if route.to_file else part
                        writers[key].write_table(part if part.schema.equals(route.schema) else part.cast(route.schema))
                        rows[key] += part.num_rows
                if sum(rows.values()) != counts["rows"] + t.num_rows:
                    raise AssertionError(f"rows with unrouted status: {pc.unique(t.column('status')).to_pylist()}")
                counts["rows"] += t.num_rows
                counts.update(dict(_value_counts(t.column("status"))))
                not_failed = pc.not_equal(t.column("status"), "failed")
                counts.update({k: v for k, v in _value_counts(t.filter(not_failed).column("change")) if k})
                reasons.update({k or "unknown": v for k, v in _value_counts(t.filter(pc.invert(not_failed))
                                                                              .column("reason"))})
                for c in ("in_prev", "texts_encoded", "images_encoded"):
                    counts[c] += int(pc.sum(pc.cast(t.column(c), pa.int64())).as_py() or 0)
                stamps.append(EncodeTimeline.of(t))
            files: dict[str, list[dict[str, Any]]] = {k: [] for k in self.routes}
            for k, w in writers.items():  # each file spooled locally, copied to its store complete (appears whole)
                w.close()
                if rows[k]:
                    uri = storage.join(self.routes[k].uri, name)
                    size = storage.put_file(os.path.join(spool, k), uri, endpoint=self.endpoint)
                    files[k].append({"uri": uri, "rows": rows[k], "bytes": size})
        return {"files": files, "counts": dict(counts), "reasons": dict(reasons),
                "timeline": EncodeTimeline.merge(stamps)}

    def on_write_complete(self, write_result: WriteResult) -> None:
        results = [r for r in write_result.write_returns if r]
        files = {k: sorted((f for r in results for f in r["files"][k]), key=lambda f: f["uri"])
                 for k in self.routes}
        self.result = {"counts": dict(sum((Counter(r["counts"]) for r in results), Counter())),
                       "reasons": dict(sum((Counter(r["reasons"]) for r in results), Counter())),
                       "timeline": EncodeTimeline.merge(r["timeline"] for r in results), "files": files}


class EncodeTimeline(NamedTuple):
    """When the model stage finished its batches, from the ``embedded_at`` stamps of the rows encoded in this
    run (the actor stamps a batch when it finishes it; carried rows keep older stamps and are left out):
    the first and last stamp (microseconds since the epoch, UTC), the encoded rows, how many bear the first."""

    first_us: int
    last_us: int
    rows: int
    rows_at_first: int

    @staticmethod
    def of(rows: pa.Table) -> EncodeTimeline | None:
        """The timeline of a block's ``status == "encoded"`` rows (None: none)."""
        enc = rows.filter(pc.equal(rows.column("status"), "encoded"))
        if not enc.num_rows:
            return None
        us = pc.cast(enc.column("embedded_at"), pa.int64())
        lo = int(pc.min(us).as_py())
        return EncodeTimeline(lo, int(pc.max(us).as_py()), enc.num_rows,
                              int(pc.sum(pc.cast(pc.equal(us, lo), pa.int64())).as_py()))

    @staticmethod
    def merge(parts: Iterable[EncodeTimeline | None]) -> EncodeTimeline | None:
        """One timeline of several (blocks, write tasks), as if taken over all their rows at once."""
        ps = [p for p in parts if p is not None]
        if not ps:
            return None
        first = min(p.first_us for p in ps)
        return EncodeTimeline(first, max(p.last_us for p in ps), sum(p.rows for p in ps),
                              sum(p.rows_at_first for p in ps if p.first_us == first))

    def steady_rows_per_s(self) -> float | None:
        """Encoded rows after the first batch / time from the first batch to the last (None: one batch)."""
        span = (self.last_us - self.first_us) / 1e6
        return (self.rows - self.rows_at_first) / span if span > 0 else None


__all__ = ["EncodeTimeline", "Route", "RowSink", "coalesced"]
