"""How the embed pipeline hands rows to its sinks (``stages.write``), on a real local Ray: small blocks are
coalesced by tasks of their own (a fraction of a CPU, not fused into the write), so the write task gets blocks
of about ``_MIN_WRITE_BLOCK_BYTES``, and a model actor plus fetch tasks holding all but a fraction of the CPUs
do not stall them.
"""

from __future__ import annotations

from typing import Any

import pytest

from vlm2rec_ray.embed import stages as pipeline

pytestmark = pytest.mark.integration


def _probe_sink(min_rows: int) -> Any:
    from ray.data import Datasink

    class Probe(Datasink):
        """Records, per write task, its Ray task name and the rows of each block it was given."""

        def __init__(self) -> None:
            self.result: list[dict[str, Any]] = []

        @property
        def min_rows_per_write(self) -> int:
            return min_rows

        def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
            import ray

            return {"task": ray.get_runtime_context().get_task_name(), "blocks": [b.num_rows for b in blocks]}

        def on_write_complete(self, write_result: Any) -> None:
            self.result = [r for r in write_result.write_returns if r]

    return Probe()


def _blocks(ray: Any, n: int, rows: int) -> Any:
    """A dataset of ``n`` blocks of ``rows`` rows, made in the driver (no read tasks, which want a whole CPU)."""
    import pyarrow as pa

    return ray.data.from_arrow([pa.table({"id": list(range(i * rows, (i + 1) * rows))}) for i in range(n)])


def test_small_blocks_are_coalesced_by_their_own_tasks_before_the_write(ray_local: Any) -> None:
    ds = _blocks(ray_local, 60, 10)
    sink = _probe_sink(min_rows=10_000)  # one write task for everything, as a file's worth does
    per_block = 100
    pipeline.write(ds, sink, row_bytes=pipeline.MIN_WRITE_BLOCK_BYTES // per_block)
    assert len(sink.result) == 1
    [write] = sink.result
    assert write["task"] == "Write", f"the coalescing was fused into the write task: {write['task']}"
    assert sorted(write["blocks"]) == [per_block] * 6


def test_coalescing_runs_while_other_work_holds_all_but_a_fraction_of_a_cpu(ray_local: Any) -> None:
    """Tasks hold 1.75 of the test cluster's 2 CPUs, as a model actor (1) and fetch tasks (0.5 each, with gaps)
    do: the coalescing and write tasks (a quarter CPU each) still run and finish, where Ray Data's
    ``repartition`` tasks (one CPU each) waited for the holders."""
    import time

    @ray_local.remote
    def hold(seconds: float) -> None:
        time.sleep(seconds)

    ds = _blocks(ray_local, 30, 10)  # before the holders: from_arrow runs a 1-CPU metadata task per table
    holders = [hold.options(num_cpus=1).remote(60), hold.options(num_cpus=0.75).remote(60)]
    try:
        deadline = time.monotonic() + 30
        while ray_local.available_resources().get("CPU", 0) > 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ray_local.available_resources().get("CPU", 0) <= 0.3, "the holders did not start"
        sink = _probe_sink(min_rows=10_000)
        started = time.monotonic()
        pipeline.write(ds, sink, row_bytes=pipeline.MIN_WRITE_BLOCK_BYTES // 100)
        assert time.monotonic() - started < 45  # before the holders let go of the CPUs (60 s)
        assert sum(sum(w["blocks"]) for w in sink.result) == 300
    finally:
        for h in holders:
            ray_local.cancel(h, force=True)


def test_coalescing_stops_at_one_write_tasks_rows(ray_local: Any) -> None:
    """With a small ``rows_per_file`` the coalesced blocks are one write task's rows, not ~1 MiB: rows are not
    held back from a write task that could already run."""
    sink = _probe_sink(min_rows=25)
    pipeline.write(_blocks(ray_local, 60, 10), sink, row_bytes=pipeline.MIN_WRITE_BLOCK_BYTES // 100)
    blocks = [n for w in sink.result for n in w["blocks"]]
    assert sum(blocks) == 600
    assert all(25 <= n < 50 for n in blocks), blocks  # whole 10-row inputs bundled up to >= 25 rows
    assert all(len(w["blocks"]) == 1 for w in sink.result)  # one block is a write task's worth
