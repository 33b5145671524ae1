"""Object storage under injected faults (500/503, slow responses, dropped connections) on loopback."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.faults import FaultPlan, FaultProxy
from vlm2rec_ray import storage

pytestmark = pytest.mark.integration


def test_reads_and_writes_survive_faults(moto_endpoint: str, s3_bucket: str) -> None:
    payloads = {f"s3://{s3_bucket}/obj/{i:03d}.bin": bytes([i % 251]) * (100 + i) for i in range(40)}
    for uri, data in payloads.items():
        storage.write_bytes(uri, data, endpoint=moto_endpoint)
    plan = FaultPlan(error_rate=0.15, drop_rate=0.05, slow_rate=0.05, slow_s=0.2, seed=1)
    with FaultProxy(moto_endpoint, plan) as proxy:
        storage.s3._CLIENTS.clear()  # a client bound to the proxy endpoint
        for uri, data in payloads.items():
            assert storage.read_bytes(uri, endpoint=proxy.url) == data
        storage.write_bytes(f"s3://{s3_bucket}/obj/new.bin", b"x" * 1000, endpoint=proxy.url)
        listed = storage.list_uris(f"s3://{s3_bucket}/obj", endpoint=proxy.url)
        # pyarrow's own S3 client (used for Parquet) through the same faults
        fs, path = storage.pyarrow_filesystem(f"s3://{s3_bucket}/tbl/t.parquet", endpoint=proxy.url)
        table = pa.table({"a": list(range(1000))})
        pq.write_table(table, path, filesystem=fs)
        assert pq.read_table(path, filesystem=fs).equals(table)
    storage.s3._CLIENTS.clear()
    assert len(listed) == 41
    assert storage.read_bytes(f"s3://{s3_bucket}/obj/new.bin", endpoint=moto_endpoint) == b"x" * 1000
    injected = plan.counts["error"] + plan.counts["drop"]
    assert injected >= 5, plan.counts  # the faults really happened, and every operation still succeeded
