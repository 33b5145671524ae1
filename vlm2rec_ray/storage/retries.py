"""S3 retries as a run-level metric: counted per process, exported as a Ray metric, summed per job on demand.

Counted in the process that makes them: botocore's retries (5xx, throttling, dropped connections, timeouts) of
the clients of :func:`~vlm2rec_ray.storage.s3.s3_client` (image GETs, model downloads, uploads, manifests), via
the ``request-created`` hook :func:`count_retry`. Not counted: pyarrow's S3 client (Ray Data's reads, listings,
deletes, Ray Train checkpoints: no hook). Each process keeps its total and adds to the Ray ``Counter``
``vlm2rec_storage_retries`` (tag ``JobId``; Prometheus ``ray_vlm2rec_storage_retries_total``).
:func:`job_retries` is a lower bound: workers ship their increments to the node's agent as deltas every
``metrics_report_interval_ms``, and a report that does not arrive is lost (a worker that exits right after its
retries; a busy node: a loaded 2-core CI box got 5 of a run's 12 retries, a quiet one 12 of 12).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

METRIC = "vlm2rec_storage_retries"
_TOTAL = [0]
_COUNTER: list[tuple[Any, str]] = []  # (the Ray Counter, this process's job id), once connected to Ray
_LOCK = threading.Lock()


def count_retry(request: Any, **_: Any) -> None:
    """botocore ``request-created`` hook: botocore builds a request per attempt; ``context['retries']['attempt']``
    (also sent as the ``amz-sdk-request`` header) is 2 or more for a retry."""
    if (((getattr(request, "context", None) or {}).get("retries") or {}).get("attempt") or 1) < 2:
        return
    ray = sys.modules.get("ray")
    with _LOCK:
        _TOTAL[0] += 1
        if not _COUNTER and ray is not None and ray.is_initialized():
            from ray.util.metrics import Counter

            _COUNTER.append((Counter(METRIC, description="S3 retries of vlm2rec's boto3 clients", tag_keys=("JobId",)),
                             ray.get_runtime_context().get_job_id()))
    if _COUNTER:
        _COUNTER[0][0].inc(1, tags={"JobId": _COUNTER[0][1]})


def local_retries() -> int:
    """Retries counted in this process so far."""
    return _TOTAL[0]


def job_retries() -> dict[str, int] | None:
    """This Ray job's retries so far by process (Ray worker id; this process, exact, under ``""``), as each other
    process last exported them (``None`` when Ray is not running here or no metrics endpoint answers)."""
    from vlm2rec_ray.runtime import job_metric

    others = job_metric(METRIC) if "ray" in sys.modules else None
    return None if others is None else {**others, "": local_retries()}


def retries_since(start: dict[str, int] | None, now: dict[str, int] | None = None) -> int | None:
    """Retries between two :func:`job_retries` snapshots (``now`` default: a new one), process by process: with
    ``RAY_enable_open_telemetry=0`` Ray drops a dead worker's series 120 s after its last report, so job totals
    can shrink; a series gone since ``start`` subtracts nothing."""
    now = job_retries() if now is None else now
    if now is None or start is None:
        return None
    return sum(max(0, n - start.get(k, 0)) for k, n in now.items())


__all__ = ["METRIC", "count_retry", "job_retries", "local_retries", "retries_since"]
