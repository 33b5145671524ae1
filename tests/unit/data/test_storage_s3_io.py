"""storage.py's counted S3 I/O against the moto server (``moto_endpoint``), also behind the fault proxy: the
ranged reader (``open_input_file``), the spool upload (``put_file``, multipart with a small part size) and the
retry counter (``retry_attempts``), which must account for every injected fault exactly once."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.faults import FaultPlan, FaultProxy
from vlm2rec_ray import storage

MIB = 1 << 20


def _faults(seed: int) -> FaultPlan:
    return FaultPlan(error_rate=0.25, drop_rate=0.1, slow_rate=0.0, seed=seed)


def _table(rows: int) -> pa.Table:
    return pa.table({"id": [f"i{i:06d}" for i in range(rows)], "x": list(range(rows)),
                     "blob": [os.urandom(64) for _ in range(rows)]})


def test_ranged_reader_reads_and_seeks(moto_endpoint: str, s3_bucket: str) -> None:
    data = os.urandom(3 * MIB + 123)
    uri = f"s3://{s3_bucket}/blob.bin"
    storage.write_bytes(uri, data, endpoint=moto_endpoint)
    with storage.open_input_file(uri, endpoint=moto_endpoint, block_size=256 * 1024) as f:
        assert f.size() == len(data) and f.seekable()
        assert f.read(10) == data[:10] and f.tell() == 10
        assert f.read_at(1000, len(data) - 500) == data[-500:]  # clipped at the end
        f.seek(2 * MIB)
        assert f.read(MIB) == data[2 * MIB:3 * MIB]  # larger than a block: fetched exactly
        f.seek(-5, 2)
        assert f.read() == data[-5:] and f.read(10) == b""
        f.seek(7)
        assert f.read(300_000) == data[7:300_007]  # crosses the block fetched before
    small = f"s3://{s3_bucket}/small.bin"
    storage.write_bytes(small, b"0123456789", endpoint=moto_endpoint)
    with storage.open_input_file(small, endpoint=moto_endpoint) as f:
        assert f.read_at(3, 4) == b"456"
        f.seek(0)
        assert f.read() == b"0123456789"
    for bad in (f"s3://{s3_bucket}/nope.bin", f"s3://{s3_bucket}/dir/"):
        with pytest.raises(storage.StorageError) as e:
            storage.open_input_file(bad, endpoint=moto_endpoint)
        assert e.value.reason == "missing"


def test_ranged_reader_parquet_retries_counted(moto_endpoint: str, s3_bucket: str) -> None:
    t = _table(20_000)
    uri = f"s3://{s3_bucket}/t.parquet"
    storage.write_parquet(t, uri, endpoint=moto_endpoint)
    plan = _faults(seed=5)
    with FaultProxy(moto_endpoint, plan) as proxy:
        before = storage.retry_attempts()
        for _ in range(3):
            with storage.open_input_file(uri, endpoint=proxy.url, block_size=64 * 1024) as f:
                pf = pq.ParquetFile(f)
                assert pf.read(columns=["id", "x"]).equals(t.select(["id", "x"]))
                assert pf.read_row_group(0).equals(t.slice(0, pf.metadata.row_group(0).num_rows))
        retries = storage.retry_attempts() - before
    faults = plan.counts["error"] + plan.counts["drop"]
    print(f"\nfault proxy: {plan.counts}; retries counted {retries}")
    assert faults >= 3, plan.counts  # the faults really happened
    assert retries == faults  # each injected fault cost exactly one (counted) retry


def test_put_file_multipart_with_faults(moto_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    payload = os.urandom(11 * MIB + 17)  # 5 MiB parts: three parts, the last one short
    src = tmp_path / "big.bin"
    src.write_bytes(payload)
    plan = _faults(seed=2)
    with FaultProxy(moto_endpoint, plan) as proxy:
        before = storage.retry_attempts()
        size = storage.put_file(src, f"s3://{s3_bucket}/up/big.bin", endpoint=proxy.url, part_size=5 * MIB)
        storage.put_file(src, f"s3://{s3_bucket}/up/one.bin", endpoint=proxy.url)  # one PUT
        retries = storage.retry_attempts() - before
    print(f"\nfault proxy: {plan.counts}; retries counted {retries}")
    assert size == len(payload)
    assert storage.read_bytes(f"s3://{s3_bucket}/up/big.bin", endpoint=moto_endpoint) == payload
    assert storage.read_bytes(f"s3://{s3_bucket}/up/one.bin", endpoint=moto_endpoint) == payload
    assert retries == plan.counts["error"] + plan.counts["drop"]
    client = storage.s3_client(moto_endpoint)
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    with pytest.raises(ValueError, match="below S3's minimum part size"):
        storage.put_file(src, f"s3://{s3_bucket}/up/x.bin", endpoint=moto_endpoint, part_size=MIB)


def test_put_file_uploads_parts_side_by_side_with_bounded_memory(moto_endpoint: str, s3_bucket: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    payload = os.urandom(4 * 5 * MIB + 99)  # five parts of 5 MiB, the last one short
    src = tmp_path / "big.bin"
    src.write_bytes(payload)
    client = storage.s3_client(moto_endpoint)
    real = client.upload_part
    lock = threading.Lock()
    state = {"now": 0, "most": 0, "sizes": []}

    def watched(**kw: Any) -> Any:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["sizes"].append(len(kw["Body"]))
        time.sleep(0.2)  # long enough for the other threads to start theirs
        try:
            return real(**kw)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(client, "upload_part", watched)
    uri = f"s3://{s3_bucket}/up/parallel.bin"
    assert storage.put_file(src, uri, endpoint=moto_endpoint, part_size=5 * MIB, threads=3) == len(payload)
    monkeypatch.undo()
    assert storage.read_bytes(uri, endpoint=moto_endpoint) == payload  # parts in order
    assert state["most"] == 3  # three parts in flight, never more
    assert sorted(state["sizes"]) == [99] + [5 * MIB] * 4  # each call held one part, nothing more
    with pytest.raises(ValueError, match="threads=0 must be at least 1"):
        storage.put_file(src, uri, endpoint=moto_endpoint, threads=0)


def test_put_file_stops_at_the_first_failed_part(moto_endpoint: str, s3_bucket: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(6 * 5 * MIB))
    client = storage.s3_client(moto_endpoint)
    real = client.upload_part
    tried: list[int] = []

    def second_fails(**kw: Any) -> Any:
        tried.append(kw["PartNumber"])
        if kw["PartNumber"] == 2:
            raise ConnectionError("part 2 lost")
        return real(**kw)

    monkeypatch.setattr(client, "upload_part", second_fails)
    uri = f"s3://{s3_bucket}/up/failed-part.bin"
    with pytest.raises(storage.StorageError, match="part 2 lost"):
        storage.put_file(src, uri, endpoint=moto_endpoint, part_size=5 * MIB, threads=1)
    monkeypatch.undo()
    assert tried == [1, 2]  # the parts after the failure were cancelled, not uploaded
    assert not storage.exists(uri, endpoint=moto_endpoint)
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_put_file_aborts_a_failed_multipart_upload(moto_endpoint: str, s3_bucket: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(6 * MIB))
    client = storage.s3_client(moto_endpoint)

    def broken(**_: Any) -> None:
        raise ConnectionError("network gone")

    monkeypatch.setattr(client, "complete_multipart_upload", broken)
    uri = f"s3://{s3_bucket}/up/broken.bin"
    with pytest.raises(storage.StorageError, match="network gone"):
        storage.put_file(src, uri, endpoint=moto_endpoint, part_size=5 * MIB)
    monkeypatch.undo()
    assert not storage.exists(uri, endpoint=moto_endpoint)  # nothing half-written is visible
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")  # and no parts left behind


def test_parquet_helpers_on_s3_and_local(moto_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    t = _table(500)
    for base in (f"s3://{s3_bucket}/pq", str(tmp_path / "pq")):
        storage.write_parquet(t, f"{base}/a.parquet", endpoint=moto_endpoint)
        storage.write_parquet(t.slice(0, 10), f"{base}/b.parquet", endpoint=moto_endpoint)
        assert storage.read_parquet(f"{base}/a.parquet", endpoint=moto_endpoint).equals(t)
        assert storage.read_parquet(f"{base}/a.parquet", columns=["x"], endpoint=moto_endpoint).column_names == ["x"]
        assert storage.read_parquet(base, endpoint=moto_endpoint).num_rows == 510  # a directory / prefix
        with pytest.raises(storage.StorageError) as e:
            storage.read_parquet(f"{base}/none.parquet", endpoint=moto_endpoint)
        assert e.value.reason == "missing"
        src = tmp_path / "src.bin"
        src.write_bytes(b"abc")
        assert storage.put_file(src, f"{base}/copy.bin", endpoint=moto_endpoint) == 3
        assert storage.read_bytes(f"{base}/copy.bin", endpoint=moto_endpoint) == b"abc"
    assert not list(tmp_path.rglob(".*tmp-*"))  # local writes leave no temp files
    with pytest.raises(storage.StorageError) as e:
        storage.open_input_file(str(tmp_path / "pq"))
    assert e.value.reason == "missing"
