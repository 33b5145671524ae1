"""vlm2rec_ray.embed.sink.EncodeTimeline: first/last batch stamps and the steady rate, merged across tasks."""

from __future__ import annotations

import datetime as dt
import pickle

import pyarrow as pa
import pytest

from vlm2rec_ray.embed.schema import EMBEDDED_AT_TYPE
from vlm2rec_ray.embed.sink import EncodeTimeline

T0 = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)


def _rows(stamps: list[tuple[str, float | None]]) -> pa.Table:
    return pa.table({"status": pa.array([s for s, _ in stamps], pa.string()),
                     "embedded_at": pa.array([None if t is None else T0 + dt.timedelta(seconds=t) for _, t in stamps],
                                             EMBEDDED_AT_TYPE)})


def test_timeline_of_one_task() -> None:
    # batch 1 done at t=10 (2 rows), batch 2 at t=12 (2 rows); a carried row with an old stamp; a failed row
    tl = EncodeTimeline.merge([EncodeTimeline.of(_rows([("encoded", 10.0), ("encoded", 10.0), ("carried", -86400.0),
                                                        ("failed", None)])),
                               EncodeTimeline.of(_rows([("encoded", 12.0), ("encoded", 12.0)]))])
    assert tl is not None
    assert tl.first_us == int((T0.timestamp() + 10) * 1e6) and tl.last_us == int((T0.timestamp() + 12) * 1e6)
    assert (tl.rows, tl.rows_at_first) == (4, 2)
    assert tl.steady_rows_per_s() == pytest.approx(2 / 2.0)  # the 2 rows after the first batch, over 2 s


def test_timelines_merge_across_write_tasks_like_one() -> None:
    first = _rows([("encoded", 5.0), ("encoded", 7.0)])
    second = _rows([("encoded", 5.0), ("encoded", 9.0), ("encoded", 9.0)])
    whole = EncodeTimeline.of(pa.concat_tables([first, second]))
    parts = [EncodeTimeline.of(first), EncodeTimeline.of(second), None]  # a task that encoded nothing: None
    merged = EncodeTimeline.merge(pickle.loads(pickle.dumps(p)) for p in parts)  # as Ray returns them
    assert merged == whole
    assert merged is not None and (merged.rows, merged.rows_at_first) == (5, 2)
    assert merged.steady_rows_per_s() == pytest.approx(3 / 4.0)


def test_no_rate_without_two_batches() -> None:
    assert EncodeTimeline.merge([]) is None
    assert EncodeTimeline.of(_rows([("carried", 1.0), ("failed", None)])) is None  # nothing encoded in this run
    tl = EncodeTimeline.merge([None, EncodeTimeline.of(_rows([("encoded", 3.0), ("encoded", 3.0)]))])
    assert tl is not None and tl.steady_rows_per_s() is None  # one batch
