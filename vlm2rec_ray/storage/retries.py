"""S3 retries as a run-level metric: counted per process, exported as a Ray metric, summed per job on demand.

Counted in the process that makes them: botocore's retries (5xx, throttling, dropped connections, timeouts) of
the clients of :func:`~vlm2rec_ray.storage.s3.s3_client` (image GETs, model downloads, uploads, manifests), via
the ``request-created`` hook :func:`count_retry`. Not counted: pyarrow's S3 client (Ray Data's reads, listings,
deletes, Ray Train checkpoints: no hook). Each process keeps its total and adds to the Ray ``Counter``
``vlm2rec_storage_retries`` (tag ``JobId``; Prometheus ``ray_vlm2rec_storage_retries_total``).
:func:`job_retries` is a lower bound: workers export every ``metrics_report_interval_ms``, and a worker's
last increments can be lost when it exits right after them (2 of ~100 in a test on a loaded 2-core box).
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


def job_retries() -> int | None:
    """This Ray job's retries so far: this process's exact count plus every other process's last exported one
    (``None`` when Ray is not running here or no metrics endpoint answers)."""
    from vlm2rec_ray.runtime import job_metric

    others = job_metric(METRIC) if "ray" in sys.modules else None
    return None if others is None else others + local_retries()


__all__ = ["METRIC", "count_retry", "job_retries", "local_retries"]
