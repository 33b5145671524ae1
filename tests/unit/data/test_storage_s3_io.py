"""The storage layer's S3 backend against the moto server (``moto_endpoint``), also behind the fault proxy:
uploads through boto3's ``upload_file`` (one PUT, or a multipart upload with a small part size), the retry
counter (every retry of our boto3 clients counted once), aborted uploads, and Parquet through pyarrow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from tests.faults import FaultPlan, FaultProxy
from vlm2rec_ray import storage
from vlm2rec_ray.storage import retries, s3

MIB = 1 << 20


def _table(rows: int) -> pa.Table:
    return pa.table({"id": [f"i{i:06d}" for i in range(rows)], "x": list(range(rows)),
                     "blob": [os.urandom(64) for _ in range(rows)]})


def test_uploads_through_faults_every_retry_counted(moto_endpoint: str, s3_bucket: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "PART_BYTES", 5 * MIB)  # 11 MiB: a multipart upload of three parts
    payload = os.urandom(11 * MIB + 17)
    src = tmp_path / "big.bin"
    src.write_bytes(payload)
    (tmp_path / "small.bin").write_bytes(b"x" * 1000)
    plan = FaultPlan(error_rate=0.25, drop_rate=0.1, slow_rate=0.0, seed=2)
    with FaultProxy(moto_endpoint, plan) as proxy:
        before = retries.local_retries()
        assert storage.put_file(src, f"s3://{s3_bucket}/up/big.bin", endpoint=proxy.url) == len(payload)
        storage.put_file(tmp_path / "small.bin", f"s3://{s3_bucket}/up/one.bin", endpoint=proxy.url)  # one PUT
        for i in range(10):
            storage.write_bytes(f"s3://{s3_bucket}/up/{i}.txt", b"%d" % i, endpoint=proxy.url)
        counted = retries.local_retries() - before
    faults = plan.counts["error"] + plan.counts["drop"]
    print(f"\nfault proxy: {plan.counts}; retries counted {counted}")
    assert faults >= 3, plan.counts  # the faults really happened
    assert counted == faults  # each injected fault cost one retry of our boto3 client, and each was counted
    assert storage.read_bytes(f"s3://{s3_bucket}/up/big.bin", endpoint=moto_endpoint) == payload
    assert storage.read_bytes(f"s3://{s3_bucket}/up/one.bin", endpoint=moto_endpoint) == b"x" * 1000
    assert not storage.s3_client(moto_endpoint).list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_run_retries_are_summed_process_by_process() -> None:
    """A run's figure is the sum of each process's growth since the start snapshot: a process that appears
    counts from 0, and one whose series Ray dropped (a worker dead for 120 s) subtracts nothing."""
    start = {"": 4, "w-old": 7, "w-live": 2}
    now = {"": 9, "w-live": 5, "w-new": 3}  # w-old's series is gone: it would take 7 off a difference of totals
    assert retries.retries_since(start, now) == (9 - 4) + (5 - 2) + 3
    assert retries.retries_since(start, start) == 0
    assert retries.retries_since(None, now) is None  # no start snapshot (Ray was not running): no figure


def test_a_failed_multipart_upload_is_aborted(moto_endpoint: str, s3_bucket: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "PART_BYTES", 5 * MIB)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MIB))
    client = storage.s3_client(moto_endpoint)
    real = client.upload_part

    def second_fails(**kw: Any) -> Any:
        if kw["PartNumber"] == 2:
            raise ConnectionError("part 2 lost")
        return real(**kw)

    monkeypatch.setattr(client, "upload_part", second_fails)
    uri = f"s3://{s3_bucket}/up/failed-part.bin"
    with pytest.raises(storage.StorageError, match="part 2 lost") as e:
        storage.put_file(src, uri, endpoint=moto_endpoint)
    monkeypatch.undo()
    assert e.value.reason == "io_error"
    assert not storage.exists(uri, endpoint=moto_endpoint)  # nothing half-written is visible
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")  # and no parts left behind


def test_errors_have_reasons(moto_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    for fn in (lambda: storage.read_bytes(f"s3://{s3_bucket}/nope", endpoint=moto_endpoint),
               lambda: storage.put_file(tmp_path / "f", "s3://no-such-bucket-x/k", endpoint=moto_endpoint),
               lambda: storage.read_parquet(f"s3://{s3_bucket}/none.parquet", endpoint=moto_endpoint)):
        with pytest.raises(storage.StorageError) as e:
            fn()
        assert e.value.reason == "missing", e.value
    storage.write_bytes(f"s3://{s3_bucket}/big", b"x" * 100, endpoint=moto_endpoint)
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes(f"s3://{s3_bucket}/big", endpoint=moto_endpoint, max_bytes=10)
    assert e.value.reason == "too_large"


def test_the_same_operations_on_every_backend(moto_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    t = _table(500)
    for base in (f"s3://{s3_bucket}/pq", str(tmp_path / "pq")):
        storage.write_parquet(t, f"{base}/a.parquet", endpoint=moto_endpoint)
        storage.write_parquet(t.slice(0, 10), f"{base}/sub/b.parquet", endpoint=moto_endpoint)
        assert storage.read_parquet(f"{base}/a.parquet", endpoint=moto_endpoint).equals(t)
        assert storage.read_parquet(f"{base}/a.parquet", columns=["x"], endpoint=moto_endpoint).column_names == ["x"]
        assert storage.read_parquet(base, endpoint=moto_endpoint).num_rows == 510  # a directory / prefix
        with storage.open_parquet(f"{base}/a.parquet", endpoint=moto_endpoint) as pf:
            assert sum(b.num_rows for b in pf.iter_batches(columns=["id"])) == 500
        assert [u.rsplit("/", 2)[-2:] for u in storage.list_uris(base, endpoint=moto_endpoint)] == [
            ["pq", "a.parquet"], ["sub", "b.parquet"]]
        assert storage.exists(f"{base}/sub", endpoint=moto_endpoint)
        got = storage.download_prefix(base, tmp_path / "dl" / storage.scheme(base), endpoint=moto_endpoint)
        assert (got / "sub" / "b.parquet").stat().st_size > 0
        assert storage.delete_prefix(base, endpoint=moto_endpoint) == 2
        assert not storage.exists(base, endpoint=moto_endpoint) and storage.list_uris(base, endpoint=moto_endpoint) == []
    assert not list(tmp_path.rglob(".*tmp-*"))  # local writes leave no temp files


def test_backends_by_scheme() -> None:
    from vlm2rec_ray.storage.local import LocalBackend

    assert isinstance(storage.backend("/x/y"), LocalBackend) and isinstance(storage.backend("file:///x"), LocalBackend)
    assert isinstance(storage.backend("s3://bkt/k"), s3.S3Backend)
    assert storage.backend("s3://bkt/k", "http://a") is not storage.backend("s3://bkt/k", "http://b")
    with pytest.raises(ValueError, match=r"no storage backend for 'gs://b/k' \(scheme 'gs'\); supported: a local "
                                         r"path, s3://"):
        storage.backend("gs://b/k")
    assert storage.is_under("s3://bkt/img/a.png", "s3://bkt/img/") and not storage.is_under("s3://bkt/imgx", "s3://bkt/img")
    assert not storage.is_under("s3://bkt/img/a.png", "/bkt/img") and not storage.is_under("/tmp/a", "s3://bkt")
