"""The storage layer (the S3 backend) and the dataset readers against a real S3 HTTP endpoint (moto_server on 127.0.0.1), with a
planted missing object and a planted corrupt image reported by reason, never raised."""

from __future__ import annotations

import logging

import pyarrow as pa
import pytest
from PIL import Image

from vlm2rec_ray import storage
from vlm2rec_ray.data.catalog import (
    read_catalog,
    read_interactions,
    read_split,
    resolve_image_uri,
    write_prepared,
)
from vlm2rec_ray.data.images import decode_image, encode_image, fetch_image_bytes, load_image

pytestmark = pytest.mark.integration


def test_bytes_list_exists_delete(moto_endpoint: str, s3_bucket: str) -> None:
    base = f"s3://{s3_bucket}/data"
    storage.write_bytes(f"{base}/a/1.bin", b"one", endpoint=moto_endpoint)
    storage.write_text(f"{base}/a/2.txt", "two")  # endpoint from AWS_ENDPOINT_URL
    assert storage.read_bytes(f"{base}/a/1.bin") == b"one"
    assert storage.read_text(f"{base}/a/2.txt", endpoint=moto_endpoint) == "two"
    assert storage.list_uris(base) == [f"{base}/a/1.bin", f"{base}/a/2.txt"]
    assert storage.list_uris(base, suffix=".txt") == [f"{base}/a/2.txt"]
    assert storage.exists(f"{base}/a/1.bin") and storage.exists(f"{base}/a") and storage.exists(f"s3://{s3_bucket}")
    assert not storage.exists(f"{base}/zzz") and not storage.exists("s3://no-such-bucket-here")
    with storage.open_read(f"{base}/a/1.bin") as f:
        assert f.read() == b"one"
    assert storage.delete(f"{base}/a/1.bin")
    assert storage.delete_prefix(base) == 1
    assert storage.list_uris(base) == []


def test_errors_have_reasons(moto_endpoint: str, s3_bucket: str) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/big.bin", b"x" * 1000)
    cases = {f"s3://{s3_bucket}/missing.bin": ("missing", None), f"s3://{s3_bucket}/big.bin": ("too_large", 100),
             "s3://no-such-bucket-xyz/k": ("missing", None), f"s3://{s3_bucket}/dir/": ("missing", None)}
    for uri, (reason, cap) in cases.items():
        with pytest.raises(storage.StorageError) as e:
            storage.read_bytes(uri, max_bytes=cap)
        assert e.value.reason == reason, uri
    with pytest.raises(storage.StorageError) as e, storage.open_read(f"s3://{s3_bucket}/missing.bin"):
        pass
    assert e.value.reason == "missing"


def test_parquet_through_pyarrow_filesystem(moto_endpoint: str, s3_bucket: str) -> None:
    t = pa.table({"a": list(range(100)), "b": [str(i) for i in range(100)]})
    uri = f"s3://{s3_bucket}/tables/t.parquet"
    storage.write_parquet(t, uri, endpoint=moto_endpoint)
    assert storage.read_parquet(uri, endpoint=moto_endpoint).equals(t)
    assert storage.read_parquet(uri, columns=["b"]).column_names == ["b"]
    with pytest.raises(storage.StorageError) as e:
        storage.read_parquet(f"s3://{s3_bucket}/tables/none.parquet")
    assert e.value.reason == "missing"


def test_dataset_on_s3_with_planted_missing_and_corrupt_images(moto_endpoint: str, s3_bucket: str) -> None:
    ds = f"s3://{s3_bucket}/ds"
    good = encode_image(Image.new("RGB", (80, 60), (200, 10, 10)), "JPEG")
    storage.write_bytes(f"{ds}/images/good.jpg", good)
    storage.write_bytes(f"{ds}/images/corrupt.jpg", good[: len(good) // 3])  # planted: truncated JPEG
    storage.write_bytes(f"{ds}/images/text.jpg", b"<html>not an image</html>")
    storage.write_bytes(f"{ds}/images/empty.jpg", b"")
    # images/missing.jpg is planted by never being written
    ids = ["good", "corrupt", "text", "empty", "missing", "escape"]
    uris = [f"images/{i}.jpg" for i in ids[:-1]] + ["../other/x.jpg"]
    catalog = pa.table({"item_id": ids, "title": [f"t {i}" for i in ids], "image_uri": uris})
    inter = pa.table({"user_id": ["u"] * 3, "item_id": ["good", "text", "corrupt"], "timestamp": [1, 2, 3]})
    split = pa.table({"user_id": ["u"], "history": [["good"]], "target": ["text"]})
    write_prepared(ds, catalog=catalog, interactions=inter, splits=dict.fromkeys(("train", "valid", "test"), split),
                   stats={"users": 1})
    cat = read_catalog(ds)
    assert cat.num_rows == 6 and read_interactions(ds, catalog=cat).num_rows == 3
    assert read_split(ds, "valid").num_rows == 1
    reasons = {}
    for row in cat.to_pylist():
        uri = resolve_image_uri(row["image_uri"], f"{ds}/catalog.parquet")
        im, reason = load_image(uri, min_pixels=28 * 28, max_pixels=56 * 56, allowed_roots=[ds])
        reasons[row["item_id"]] = reason
        if reason is None:
            assert im.mode == "RGB" and im.size[0] * im.size[1] <= 56 * 56
    assert reasons == {"good": None, "corrupt": "corrupt", "text": "not_image", "empty": "empty",
                       "missing": "missing", "escape": "outside_root"}
    assert fetch_image_bytes(f"{ds}/images/good.jpg", max_bytes=10) == (None, "too_large")
    assert fetch_image_bytes(f"{ds}/images/good.jpg", allowed_roots=[f"s3://{s3_bucket}/elsewhere"]) == (
        None, "outside_root")
    data, _ = fetch_image_bytes(f"{ds}/images/good.jpg")
    assert decode_image(data, min_pixels=1, max_pixels=10**6)[0].size == (80, 60)


def test_unreachable_endpoint_is_io_error_not_a_crash(s3_bucket: str) -> None:
    storage.s3._CLIENTS.clear()
    try:
        data, reason = fetch_image_bytes(f"s3://{s3_bucket}/x.jpg", endpoint="http://127.0.0.1:9")
    finally:
        storage.s3._CLIENTS.clear()
    assert (data, reason) == (None, "io_error")


def test_credentials_never_logged(moto_endpoint: str, s3_bucket: str, caplog: pytest.LogCaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "SECRETxyz0123456789abcdef"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage.s3._CLIENTS.clear()
    caplog.set_level(logging.DEBUG, logger="vlm2rec_ray")
    try:
        storage.write_bytes(f"s3://{s3_bucket}/c.bin", b"1")
        with pytest.raises(storage.StorageError) as e:
            storage.read_bytes(f"s3://{s3_bucket}/nothing.bin")
        fetch_image_bytes(f"s3://{s3_bucket}/nothing.jpg")
    finally:
        storage.s3._CLIENTS.clear()
    assert secret not in str(e.value) and secret not in caplog.text
