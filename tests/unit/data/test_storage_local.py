"""The storage layer on local paths (the local backend): read/write/list/exists/delete, root confinement, Parquet helpers."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from vlm2rec_ray import storage


def test_write_read_list_exists_delete(tmp_path: Path) -> None:
    base = str(tmp_path / "d")
    storage.write_bytes(storage.join(base, "a/x.bin"), b"123")
    storage.write_text(storage.join(base, "b.txt"), "hé")
    assert storage.read_bytes(f"{base}/a/x.bin") == b"123"
    assert storage.read_bytes(f"file://{base}/a/x.bin") == b"123"
    assert storage.read_text(f"{base}/b.txt") == "hé"
    assert storage.list_uris(base) == [str(tmp_path / "d/a/x.bin"), str(tmp_path / "d/b.txt")]
    assert storage.list_uris(base, suffix=".txt") == [str(tmp_path / "d/b.txt")]
    assert storage.list_uris(str(tmp_path / "missing")) == []
    assert storage.exists(f"{base}/a") and not storage.exists(f"{base}/nope")
    with storage.open_read(f"{base}/a/x.bin") as f:
        assert f.read() == b"123"
    assert storage.delete(f"{base}/b.txt") and not storage.delete(f"{base}/b.txt")
    assert storage.delete_prefix(base) == 1 and not (tmp_path / "d").exists()
    assert not list(tmp_path.rglob(".*tmp-*"))  # atomic writes leave no temp files


def test_errors_carry_reasons(tmp_path: Path) -> None:
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes(str(tmp_path / "nope"))
    assert e.value.reason == "missing"
    (tmp_path / "big").write_bytes(b"x" * 100)
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes(str(tmp_path / "big"), max_bytes=10)
    assert e.value.reason == "too_large"
    with pytest.raises(storage.StorageError) as e, storage.open_read(str(tmp_path / "nope")):
        pass
    assert e.value.reason == "missing"


def test_local_paths_cannot_escape_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_text("s")
    assert storage.resolve_local("sub/f", root) == root / "sub" / "f"
    for bad in ("../secret", "sub/../../secret", str(tmp_path / "secret")):
        with pytest.raises(ValueError, match="outside the allowed root"):
            storage.resolve_local(bad, root)
    assert storage.is_under(str(root / "sub" / "f"), str(root)) and not storage.is_under(str(tmp_path / "secret"), str(root))
    (root / "link").symlink_to(tmp_path / "secret")
    assert not storage.is_under(str(root / "link"), str(root))  # compared resolved: a symlink cannot escape


def test_parquet_round_trip_and_missing(tmp_path: Path) -> None:
    t = pa.table({"a": [1, 2, 3]})
    storage.write_parquet(t, str(tmp_path / "x" / "t.parquet"))
    assert storage.read_parquet(str(tmp_path / "x" / "t.parquet")).equals(t)
    with pytest.raises(storage.StorageError) as e:
        storage.read_parquet(str(tmp_path / "none.parquet"))
    assert e.value.reason == "missing"


def test_s3_uri_parsing_and_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlm2rec_ray.storage.s3 import split

    assert split("s3://bkt/a/b.png") == ("bkt", "a/b.png")
    with pytest.raises(ValueError, match="bucket"):
        storage.check_uri("s3://x/y")
    with pytest.raises(ValueError, match="not an s3"):
        split("/local")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert storage.endpoint_url() == "http://127.0.0.1:1"
    assert storage.endpoint_url("http://explicit:9") == "http://explicit:9"
    assert storage.join("s3://b/p/", "/x", "y.png") == "s3://b/p/x/y.png"


def test_redact_removes_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    assert "very-secret-value" not in storage.redact("error: key very-secret-value rejected")
