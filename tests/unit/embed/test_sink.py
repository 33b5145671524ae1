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
    tl = EncodeTimeline()
    # batch 1 done at t=10 (2 rows), batch 2 at t=12 (2 rows); a carried row with an old stamp; a failed row
    tl.add(_rows([("encoded", 10.0), ("encoded", 10.0), ("carried", -86400.0), ("failed", None)]))
    tl.add(_rows([("encoded", 12.0), ("encoded", 12.0)]))
    assert tl.first_us == int((T0.timestamp() + 10) * 1e6) and tl.last_us == int((T0.timestamp() + 12) * 1e6)
    assert (tl.rows, tl.rows_at_first) == (4, 2)
    assert tl.steady_rows_per_s() == pytest.approx(2 / 2.0)  # the 2 rows after the first batch, over 2 s


def test_timelines_merge_across_write_tasks_like_one() -> None:
    a, b, whole = EncodeTimeline(), EncodeTimeline(), EncodeTimeline()
    first = _rows([("encoded", 5.0), ("encoded", 7.0)])
    second = _rows([("encoded", 5.0), ("encoded", 9.0), ("encoded", 9.0)])
    a.add(first)
    b.add(second)
    whole.add(first)
    whole.add(second)
    merged = EncodeTimeline()
    for part in (pickle.loads(pickle.dumps(a)), pickle.loads(pickle.dumps(b)), EncodeTimeline()):  # as Ray returns them
        merged.merge(part)
    assert vars(merged) == vars(whole)
    assert (merged.rows, merged.rows_at_first) == (5, 2)
    assert merged.steady_rows_per_s() == pytest.approx(3 / 4.0)


def test_no_rate_without_two_batches() -> None:
    tl = EncodeTimeline()
    assert tl.steady_rows_per_s() is None and tl.first_us is None
    tl.add(_rows([("carried", 1.0), ("failed", None)]))  # nothing encoded in this run
    assert tl.first_us is None
    tl.add(_rows([("encoded", 3.0), ("encoded", 3.0)]))
    assert tl.steady_rows_per_s() is None  # one batch
