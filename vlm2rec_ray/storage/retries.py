"""S3 retries as a run-level metric: counted per process, exported as a Ray metric, summed per job on demand.

Every boto3 client of :mod:`vlm2rec_ray.storage.s3` calls :func:`count_retry` for each request it builds;
an attempt after the first of a call (5xx, throttling, a dropped connection, a timeout) adds one. The count
goes to a process-local total and, inside a Ray process, to the Ray ``Counter`` ``vlm2rec_storage_retries``
tagged with the job id (dashboards and Prometheus read it as ``ray_vlm2rec_storage_retries_total``).

:func:`job_retries` adds up the job's counter across the cluster (this process exactly; other processes as
last exported to their node's metrics agent, every ``metrics_report_interval_ms``, 10 s by default), so a
run's figure is the difference around it and approximate by design: the last interval of other workers may be
missing, and a concurrent run of the same job would add in. Not counted: pyarrow's own S3 client (Ray Data's
Parquet/JSON reads, ``storage.read_parquet``, Ray Train checkpoints), whose retries have no hook.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

METRIC = "vlm2rec_storage_retries"
_TOTAL = [0]
_LOCK = threading.Lock()
_COUNTER: dict[str, Any] = {}


def count_retry(request: Any, **_: Any) -> None:
    """botocore ``request-created`` hook: botocore builds a request per attempt; ``context['retries']['attempt']``
    (also sent as the ``amz-sdk-request`` header) is 2 or more for a retry."""
    attempt = ((getattr(request, "context", None) or {}).get("retries") or {}).get("attempt") or 1
    if attempt > 1:
        add(1)


def add(n: int) -> None:
    with _LOCK:
        _TOTAL[0] += n
    counter = _ray_counter()
    if counter is not None:
        counter[0].inc(n, tags={"JobId": counter[1]})


def local_retries() -> int:
    """Retries counted in this process so far."""
    return _TOTAL[0]


def _ray_counter() -> tuple[Any, str] | None:
    """``(Counter, job id)`` when this process is connected to Ray, created once."""
    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized():
        return None
    with _LOCK:
        if "c" not in _COUNTER:
            from ray.util.metrics import Counter

            _COUNTER["c"] = (Counter(METRIC, description="S3 retries of vlm2rec's boto3 clients", tag_keys=("JobId",)),
                             ray.get_runtime_context().get_job_id())
    return _COUNTER["c"]


def job_retries(timeout_s: float = 5.0) -> int | None:
    """This Ray job's retries so far: this process's count plus every other process's last exported count of the
    job, read from each node's metrics endpoint. ``None`` when Ray is not running here or no endpoint answers."""
    import urllib.request

    if "ray" not in sys.modules:
        return None
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    job, me = ctx.get_job_id(), ctx.get_worker_id()
    total, answered = local_retries(), False
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        try:
            with urllib.request.urlopen(f"http://{node['NodeManagerAddress']}:{port}/metrics", timeout=timeout_s) as r:
                text = r.read().decode()
        except OSError:
            continue
        answered = True
        for family in text_string_to_metric_families(text):
            if family.name.removesuffix("_total") == f"ray_{METRIC}":
                total += sum(int(s.value) for s in family.samples if s.name.endswith("_total")
                             and s.labels.get("JobId") == job and s.labels.get("WorkerId") != me)
    return total if answered else None


__all__ = ["METRIC", "add", "count_retry", "job_retries", "local_retries"]
