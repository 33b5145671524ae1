"""Object storage: one small API over local paths and ``s3://`` URIs.

Everything in the project that reads or writes files goes through here, so a job is endpoint-agnostic:
the S3 endpoint comes from an explicit ``endpoint_url`` (config) or the standard ``AWS_ENDPOINT_URL``
environment variable, credentials from boto3's standard chain (env, profile, instance role). Nothing in
this module ever logs a credential.

- boto3 clients use adaptive retries and bounded connect/read timeouts, and are cached per process.
- :func:`pyarrow_filesystem` returns a ``pyarrow.fs`` filesystem plus path for Parquet I/O (Ray Data).
- Local paths may be confined to a root: :func:`resolve_local` rejects anything escaping it (``..``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import pyarrow
    import pyarrow.fs

S3_SCHEME = "s3://"
_CLIENTS: dict[tuple[str | None, int, float], Any] = {}
_CLIENTS_LOCK = threading.Lock()
_RETRIES = [0]  # boto3 retry attempts of read_bytes in this process (see retry_attempts)
_RETRIES_LOCK = threading.Lock()


class StorageError(RuntimeError):
    """A storage operation failed; ``reason`` is a short machine-readable code (missing, denied, ...)."""

    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}" if self.key else f"{S3_SCHEME}{self.bucket}"


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith(S3_SCHEME)


def parse_s3(uri: str) -> S3Location:
    """Split ``s3://bucket/key`` into bucket and key; raises ``ValueError`` on anything else."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}; expected s3://<bucket>/<key>")
    rest = uri[len(S3_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if len(bucket) < 3:
        raise ValueError(f"invalid S3 bucket in {uri!r}: bucket names have 3-63 characters")
    return S3Location(bucket=bucket, key=key)


def join(base: str, *parts: str) -> str:
    """Join URI/path parts with ``/`` (works for s3:// and local paths)."""
    out = str(base)
    for part in parts:
        part = str(part)
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def resolve_local(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """Resolve a local path; with ``root``, relative paths are taken under it and may not escape it.

    Raises:
        ValueError: the path contains ``..`` that leaves ``root``, or is absolute outside ``root``.
    """
    p = Path(str(path).removeprefix("file://"))
    if root is None:
        return p.expanduser().resolve()
    root_p = Path(root).expanduser().resolve()
    full = (p if p.is_absolute() else root_p / p).resolve()
    if full != root_p and root_p not in full.parents:
        raise ValueError(
            f"path {str(path)!r} resolves to {str(full)!r}, outside the allowed root {str(root_p)!r}; "
            "use a path inside the root (no '..')"
        )
    return full


def endpoint_url(explicit: str | None = None) -> str | None:
    """The S3 endpoint: explicit config value, else ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, else AWS."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint: str | None = None, max_attempts: int = 8, timeout_s: float = 30.0) -> Any:
    """A cached boto3 S3 client with adaptive retries and bounded timeouts."""
    import boto3
    from botocore.config import Config

    ep = endpoint_url(endpoint)
    cache_key = (ep, max_attempts, timeout_s)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(cache_key)
        if client is None:
            cfg = Config(
                retries={"max_attempts": max_attempts, "mode": "adaptive"},
                connect_timeout=min(timeout_s, 10.0),
                read_timeout=timeout_s,
                max_pool_connections=32,
            )
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            client = boto3.session.Session().client("s3", endpoint_url=ep, config=cfg, region_name=region)
            _CLIENTS[cache_key] = client
    return client


def _s3_error(uri: str, exc: Exception) -> StorageError:
    code = ""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code", ""))
    if code in {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}:
        return StorageError(f"object not found: {uri} ({code})", reason="missing")
    if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return StorageError(f"access denied to {uri} ({code}); check the credentials for this bucket", "denied")
    return StorageError(f"S3 request for {uri} failed: {type(exc).__name__}: {exc}", reason="io_error")


def retry_attempts() -> int:
    """S3 retry attempts (``ResponseMetadata.RetryAttempts``: 5xx, throttling, dropped connections) made by
    :func:`read_bytes` in this process so far, failed reads included. Callers take the difference around a
    piece of work (the embed pipeline does, per fetch batch, and reports the total as ``storage_retries``)."""
    return _RETRIES[0]


def _count_retries(meta: Any) -> None:
    n = int((meta or {}).get("RetryAttempts") or 0) if isinstance(meta, dict) else 0
    if n:
        with _RETRIES_LOCK:
            _RETRIES[0] += n


def read_bytes(uri: str, *, endpoint: str | None = None, root: str | None = None, max_bytes: int | None = None) -> bytes:
    """Read a whole object or file (S3 retries are counted, see :func:`retry_attempts`).

    Raises:
        StorageError: with reason ``missing``, ``denied``, ``too_large`` or ``io_error``.
    """
    if is_s3(uri):
        loc = parse_s3(uri)
        client = s3_client(endpoint)
        if not loc.key or loc.key.endswith("/"):
            raise StorageError(f"{uri} names a bucket or prefix, not an object", reason="missing")
        try:
            # One GET: the size check uses the response's Content-Length before the body is read.
            resp = client.get_object(Bucket=loc.bucket, Key=loc.key)
            _count_retries(resp.get("ResponseMetadata"))
            size = int(resp.get("ContentLength", -1))
            if max_bytes is not None and size > max_bytes:
                resp["Body"].close()
                raise StorageError(f"{uri} is {size} bytes, over the cap of {max_bytes}", "too_large")
            data = resp["Body"].read() if max_bytes is None else resp["Body"].read(max_bytes + 1)
        except StorageError:
            raise
        except Exception as e:
            resp_ = getattr(e, "response", None)
            _count_retries(resp_.get("ResponseMetadata") if isinstance(resp_, dict) else None)
            raise _s3_error(uri, e) from e
        if max_bytes is not None and len(data) > max_bytes:
            raise StorageError(f"{uri} is over the cap of {max_bytes} bytes", "too_large")
        return data
    path = resolve_local(uri, root)
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise StorageError(f"{uri} is {size} bytes, over the cap of {max_bytes}", "too_large")
        return path.read_bytes()
    except FileNotFoundError as e:
        raise StorageError(f"file not found: {path}", reason="missing") from e
    except PermissionError as e:
        raise StorageError(f"permission denied: {path}", reason="denied") from e
    except IsADirectoryError as e:
        raise StorageError(f"expected a file, got a directory: {path}", reason="missing") from e


@contextlib.contextmanager
def open_read(uri: str, *, endpoint: str | None = None) -> Iterator[BinaryIO]:
    """Stream an object or file (for inputs too large to hold in memory, e.g. review dumps).

    Raises:
        StorageError: with reason ``missing``, ``denied`` or ``io_error``.
    """
    if is_s3(uri):
        loc = parse_s3(uri)
        try:
            body = s3_client(endpoint).get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
        except Exception as e:
            raise _s3_error(uri, e) from e
        try:
            yield body
        finally:
            body.close()
        return
    path = resolve_local(uri)
    try:
        f = path.open("rb")
    except FileNotFoundError as e:
        raise StorageError(f"file not found: {path}", reason="missing") from e
    except PermissionError as e:
        raise StorageError(f"permission denied: {path}", reason="denied") from e
    with f:
        yield f


def write_bytes(uri: str, data: bytes, *, endpoint: str | None = None) -> None:
    """Write an object or file (local writes go through a temp file + rename, so they are atomic)."""
    if is_s3(uri):
        loc = parse_s3(uri)
        try:
            s3_client(endpoint).put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        except Exception as e:
            raise _s3_error(uri, e) from e
        return
    path = resolve_local(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def exists(uri: str, *, endpoint: str | None = None) -> bool:
    if is_s3(uri):
        loc = parse_s3(uri)
        client = s3_client(endpoint)
        try:
            if not loc.key:
                client.head_bucket(Bucket=loc.bucket)
                return True
            client.head_object(Bucket=loc.bucket, Key=loc.key)
            return True
        except Exception as e:
            err = _s3_error(uri, e)
            if err.reason == "missing" and not loc.key:
                return False
            if err.reason == "missing":
                # A "directory" prefix exists if anything lives under it.
                resp = client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key.rstrip("/") + "/", MaxKeys=1)
                return resp.get("KeyCount", 0) > 0
            raise err from e
    return resolve_local(uri).exists()


def list_uris(prefix: str, *, endpoint: str | None = None, suffix: str = "") -> list[str]:
    """All files/objects under a prefix (recursive), sorted, optionally filtered by suffix."""
    if is_s3(prefix):
        loc = parse_s3(prefix)
        key_prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        out: list[str] = []
        try:
            pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=key_prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith(suffix) and not obj["Key"].endswith("/"):
                        out.append(f"{S3_SCHEME}{loc.bucket}/{obj['Key']}")
        except Exception as e:
            raise _s3_error(prefix, e) from e
        return sorted(out)
    root = resolve_local(prefix)
    if root.is_file():
        return [str(root)] if str(root).endswith(suffix) else []
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and str(p).endswith(suffix))


def delete(uri: str, *, endpoint: str | None = None) -> bool:
    """Delete one object or file; returns whether it existed."""
    if is_s3(uri):
        if not exists(uri, endpoint=endpoint):
            return False
        loc = parse_s3(uri)
        try:
            s3_client(endpoint).delete_object(Bucket=loc.bucket, Key=loc.key)
        except Exception as e:
            raise _s3_error(uri, e) from e
        return True
    path = resolve_local(uri)
    if path.is_file():
        path.unlink()
        return True
    return False


def delete_prefix(prefix: str, *, endpoint: str | None = None) -> int:
    """Delete everything under a prefix; returns how many objects/files were removed."""
    if is_s3(prefix):
        loc = parse_s3(prefix)
        client = s3_client(endpoint)
        uris = list_uris(prefix, endpoint=endpoint)
        for i in range(0, len(uris), 1000):
            chunk = [{"Key": parse_s3(u).key} for u in uris[i : i + 1000]]
            client.delete_objects(Bucket=loc.bucket, Delete={"Objects": chunk, "Quiet": True})
        return len(uris)
    import shutil

    root = resolve_local(prefix)
    if not root.exists():
        return 0
    n = sum(1 for p in root.rglob("*") if p.is_file())
    shutil.rmtree(root)
    return n


def download_prefix(prefix: str, local_dir: str | os.PathLike[str], *, endpoint: str | None = None) -> Path:
    """Copy every object under an s3:// prefix into ``local_dir`` (keeping relative paths); skips files
    already present with the same size, so a cache directory can be reused across runs."""
    loc = parse_s3(prefix)
    base_key = loc.key.rstrip("/") + "/" if loc.key else ""
    dest = Path(local_dir)
    dest.mkdir(parents=True, exist_ok=True)
    client = s3_client(endpoint)
    uris = list_uris(prefix, endpoint=endpoint)
    if not uris:
        raise StorageError(f"nothing found under {prefix}; check the URI and the endpoint", reason="missing")
    for uri in uris:
        key = parse_s3(uri).key
        rel = key[len(base_key) :]
        target = resolve_local(rel, dest)
        head = client.head_object(Bucket=loc.bucket, Key=key)
        if target.exists() and target.stat().st_size == int(head["ContentLength"]):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        client.download_file(loc.bucket, key, str(tmp))
        os.replace(tmp, target)
    return dest


def upload_dir(local_dir: str | os.PathLike[str], prefix: str, *, endpoint: str | None = None) -> int:
    """Upload a local directory tree under a prefix (s3:// or local); returns the number of files."""
    src = Path(local_dir)
    files = [p for p in sorted(src.rglob("*")) if p.is_file()]
    if is_s3(prefix):
        loc = parse_s3(prefix)
        client = s3_client(endpoint)
        for p in files:
            key = join(loc.key, p.relative_to(src).as_posix()) if loc.key else p.relative_to(src).as_posix()
            client.upload_file(str(p), loc.bucket, key)
        return len(files)
    import shutil

    dest = resolve_local(prefix)
    for p in files:
        target = dest / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)
    return len(files)


def pyarrow_filesystem(uri: str, *, endpoint: str | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and the path within it, for Parquet reads/writes (also what Ray Data takes).

    The S3 filesystem uses the same endpoint rule as boto3 and pyarrow's standard credential chain.
    """
    import pyarrow.fs as pafs

    if is_s3(uri):
        loc = parse_s3(uri)
        ep = endpoint_url(endpoint)
        kwargs: dict[str, Any] = {
            "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=8),
            "connect_timeout": 10,
            "request_timeout": 60,
        }
        if ep:
            scheme, _, hostport = ep.partition("://")
            kwargs["endpoint_override"] = hostport.rstrip("/")
            kwargs["scheme"] = scheme
        return pafs.S3FileSystem(**kwargs), f"{loc.bucket}/{loc.key}".rstrip("/")
    path = resolve_local(uri)
    return pafs.LocalFileSystem(), str(path)


def read_text(uri: str, *, endpoint: str | None = None) -> str:
    return read_bytes(uri, endpoint=endpoint).decode("utf-8")


def write_text(uri: str, text: str, *, endpoint: str | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), endpoint=endpoint)


def read_parquet(uri: str, *, endpoint: str | None = None, columns: list[str] | None = None) -> pyarrow.Table:
    """Read a Parquet file (or a directory/prefix of Parquet files) from a local path or s3://.

    Raises:
        StorageError: reason ``missing`` when nothing is there.
    """
    import pyarrow.parquet as pq

    fs, path = pyarrow_filesystem(uri, endpoint=endpoint)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except FileNotFoundError as e:
        raise StorageError(f"no Parquet data at {uri}; check the path and the endpoint", reason="missing") from e
    except OSError as e:
        msg = str(e)
        if "NoSuchKey" in msg or "does not exist" in msg.lower() or "Path does not exist" in msg:
            raise StorageError(f"no Parquet data at {uri}; check the path and the endpoint", "missing") from e
        raise StorageError(f"reading Parquet {uri} failed: {redact(msg)}", reason="io_error") from e


def write_parquet(table: pyarrow.Table, uri: str, *, endpoint: str | None = None) -> None:
    """Write one Parquet file; local writes go through a temp file + rename, so readers never see half."""
    import pyarrow.parquet as pq

    if is_s3(uri):
        fs, path = pyarrow_filesystem(uri, endpoint=endpoint)
        pq.write_table(table, path, filesystem=fs)
        return
    path = resolve_local(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    pq.write_table(table, str(tmp))
    os.replace(tmp, path)


def redact(text: str) -> str:
    """Remove any AWS secret/session token present in the environment from ``text`` (for logs)."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        val = os.environ.get(var)
        if val and len(val) >= 4:
            text = text.replace(val, "***")
    return text
