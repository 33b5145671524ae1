"""Object storage: one small API over local paths and ``s3://`` URIs.

Everything in the project that reads or writes files goes through here, so a job is endpoint-agnostic:
the S3 endpoint comes from an explicit ``endpoint_url`` (config) or the standard ``AWS_ENDPOINT_URL``
environment variable, credentials from boto3's standard chain (env, profile, instance role). Nothing in
this module ever logs a credential.

- boto3 clients use adaptive retries and bounded connect/read timeouts, and are cached per process. Every
  retry any of them makes is counted (:func:`retry_attempts`), whatever the call (GET, PUT, HEAD, list,
  multipart, s3transfer's downloads/uploads).
- Parquet goes through those clients too, so its retries are counted as well: :func:`open_input_file` is a
  seekable file over ranged GETs that ``pyarrow.parquet.ParquetFile`` reads, :func:`put_file` uploads a
  local (spool) file in one PUT or a multipart upload; :func:`read_parquet` / :func:`write_parquet` use them.
- :func:`pyarrow_filesystem` returns a ``pyarrow.fs`` filesystem plus path for callers that need one (Ray
  Train's storage, directory reads); pyarrow's own S3 client retries invisibly, so the embed job avoids it.
- Local paths may be confined to a root: :func:`resolve_local` rejects anything escaping it (``..``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import pyarrow
    import pyarrow.fs

S3_SCHEME = "s3://"
_CLIENTS: dict[tuple[str | None, int, float], Any] = {}
_CLIENTS_LOCK = threading.Lock()
_RETRIES = [0]  # retry attempts of this module's boto3 clients in this process (see retry_attempts)
_RETRIES_LOCK = threading.Lock()
MIN_PART_BYTES = 5 << 20  # S3's smallest multipart part (all but the last)
PART_BYTES = 16 << 20  # put_file: one PUT up to this size, else multipart parts of this size
UPLOAD_THREADS = 4  # put_file: parts in flight at once (memory: at most this many parts)
READ_BLOCK_BYTES = 1 << 20  # open_input_file: the least a ranged GET fetches (a small object: all of it)
_BODY_ATTEMPTS = 3  # ranged GETs whose body breaks off mid-stream are sent again (each counted as a retry)


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
            client.meta.events.register("request-created.s3", _count_retry, unique_id="vlm2rec-count-retries")
            _CLIENTS[cache_key] = client
    return client


def _count_retry(request: Any, **_: Any) -> None:
    """botocore builds a new request for every attempt of a call; ``context['retries']['attempt']`` (what it
    also sends as the ``amz-sdk-request`` header) is 2 or more for a retry."""
    attempt = ((getattr(request, "context", None) or {}).get("retries") or {}).get("attempt") or 1
    if attempt > 1:
        _add_retries(1)


def _add_retries(n: int) -> None:
    with _RETRIES_LOCK:
        _RETRIES[0] += n


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
    """S3 retries made in this process so far by the boto3 clients of :func:`s3_client`: every attempt after
    the first of any call (5xx, throttling, dropped connections, timeouts; what ``ResponseMetadata.
    RetryAttempts`` reports per call, calls that failed in the end included), plus ranged GETs of
    :func:`open_input_file` sent again because their body broke off. Callers take the difference around a
    piece of work; the embed job adds up those of its driver, tasks and actors as ``storage_retries``."""
    return _RETRIES[0]


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
            size = int(resp.get("ContentLength", -1))
            if max_bytes is not None and size > max_bytes:
                resp["Body"].close()
                raise StorageError(f"{uri} is {size} bytes, over the cap of {max_bytes}", "too_large")
            data = resp["Body"].read() if max_bytes is None else resp["Body"].read(max_bytes + 1)
        except StorageError:
            raise
        except Exception as e:
            raise _s3_error(uri, e) from e
        if max_bytes is not None and len(data) > max_bytes:
            raise StorageError(f"{uri} is over the cap of {max_bytes} bytes", "too_large")
        return data
    path = resolve_local(uri, root)
    with _local_errors(path):
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise StorageError(f"{uri} is {size} bytes, over the cap of {max_bytes}", "too_large")
        return path.read_bytes()


@contextlib.contextmanager
def _local_errors(path: Path) -> Iterator[None]:
    """Local file errors as :class:`StorageError`: ``missing`` (no such file, or a directory) or ``denied``."""
    try:
        yield
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
    with _local_errors(path):
        f = path.open("rb")
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
    tmp = temp_beside(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def temp_beside(dest: Path) -> Path:
    """A temporary name next to ``dest`` (its directory created), to write to and then ``os.replace`` onto
    ``dest``: same directory, so the rename is atomic and readers never see a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")


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


class _RangedS3Object(io.RawIOBase):
    """A seekable, read-only view of one S3 object for ``pyarrow.PythonFile``: a read outside the last fetched
    range is one ranged GET of at least ``block`` bytes (an object up to ``block`` bytes is fetched whole),
    made with this module's client, so its retries are counted. ``If-Match`` pins the version seen at open:
    an object replaced while it is read fails the read instead of mixing two versions."""

    def __init__(self, uri: str, client: Any, loc: S3Location, size: int, etag: str | None, block: int) -> None:
        super().__init__()
        self.uri, self._client, self._loc = uri, client, loc
        self.size, self._etag, self._block = size, etag, max(1, block)
        self._pos = 0
        self._buf = b""
        self._buf_start = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset} in {self.uri}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError(f"read from closed file {self.uri}")
        start = self._pos
        end = self.size if size is None or size < 0 else min(self.size, start + size)
        if end <= start:
            return b""
        if not (self._buf_start <= start and end <= self._buf_start + len(self._buf)):
            if self.size <= self._block:
                lo, hi = 0, self.size
            else:
                lo, hi = start, max(end, min(self.size, start + self._block))
            self._buf, self._buf_start = self._get(lo, hi), lo
        self._pos = end
        return self._buf[start - self._buf_start:end - self._buf_start]

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._buf = b""
        super().close()

    def _get(self, lo: int, hi: int) -> bytes:
        from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        kwargs: dict[str, Any] = {"Bucket": self._loc.bucket, "Key": self._loc.key, "Range": f"bytes={lo}-{hi - 1}"}
        if self._etag:
            kwargs["IfMatch"] = self._etag
        for attempt in range(1, _BODY_ATTEMPTS + 1):
            try:
                resp = self._client.get_object(**kwargs)
            except Exception as e:
                raise _s3_error(self.uri, e) from e
            try:
                data = resp["Body"].read()
            except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError) as e:
                if attempt == _BODY_ATTEMPTS:
                    raise StorageError(f"reading bytes {lo}-{hi - 1} of {self.uri} failed {attempt} times: {e}",
                                       reason="io_error") from e
                _add_retries(1)  # botocore does not resend a request whose body broke off; we do
                continue
            if len(data) != hi - lo:
                raise StorageError(f"{self.uri}: asked for bytes {lo}-{hi - 1}, got {len(data)} bytes (the object "
                                   "changed while it was read?)", reason="io_error")
            return data
        raise AssertionError("unreachable")


def open_input_file(uri: str, *, endpoint: str | None = None, block_size: int = READ_BLOCK_BYTES) -> pyarrow.NativeFile:
    """A random-access file over an object or local file, for ``pyarrow.parquet.ParquetFile`` (use it as a
    context manager). On S3 it is a ``pyarrow.PythonFile`` over ranged GETs of this module's client (one HEAD
    at open; reads fetch at least ``block_size`` bytes), so their retries are counted, see
    :func:`retry_attempts`; locally a ``pyarrow.OSFile``.

    Raises:
        StorageError: reason ``missing`` (nothing there, or a bucket/prefix/directory), ``denied`` or
            ``io_error``; later reads raise ``StorageError`` too.
    """
    import pyarrow as pa

    if is_s3(uri):
        loc = parse_s3(uri)
        if not loc.key or loc.key.endswith("/"):
            raise StorageError(f"{uri} names a bucket or prefix, not an object", reason="missing")
        client = s3_client(endpoint)
        try:
            head = client.head_object(Bucket=loc.bucket, Key=loc.key)
        except Exception as e:
            raise _s3_error(uri, e) from e
        obj = _RangedS3Object(uri, client, loc, int(head["ContentLength"]), head.get("ETag"), block_size)
        return pa.PythonFile(obj, mode="r")
    path = resolve_local(uri)
    if path.is_dir():
        raise StorageError(f"expected a file, got a directory: {path}", reason="missing")
    try:
        with _local_errors(path):
            return pa.OSFile(str(path), "rb")
    except OSError as e:
        raise StorageError(f"opening {path} failed: {e}", reason="io_error") from e


def put_file(path: str | os.PathLike[str], uri: str, *, endpoint: str | None = None, part_size: int = PART_BYTES,
             threads: int = UPLOAD_THREADS) -> int:
    """Copy a local file to ``uri``; returns its size in bytes. On S3 one PUT when it is at most ``part_size``
    bytes, else a multipart upload of ``part_size`` parts, ``threads`` of them in flight at once (each part is
    read from the file when its upload starts, so at most ``threads * part_size`` bytes are in memory), aborted
    if anything fails; all with this module's client (retries counted). Locally a copy under a temporary
    name, then a rename. Either way the destination appears only complete.

    Raises:
        ValueError: ``part_size`` below S3's 5 MiB minimum, or ``threads`` < 1.
        StorageError: the upload failed (reason ``denied``, ``missing`` for a missing bucket, ``io_error``).
    """
    if part_size < MIN_PART_BYTES:
        raise ValueError(f"part_size={part_size} is below S3's minimum part size {MIN_PART_BYTES} (5 MiB)")
    if threads < 1:
        raise ValueError(f"threads={threads} must be at least 1")
    size = os.path.getsize(path)
    if not is_s3(uri):
        dest = resolve_local(uri)
        tmp = temp_beside(dest)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return size
    loc = parse_s3(uri)
    client = s3_client(endpoint)
    if size <= part_size:
        try:
            with open(path, "rb") as fh:  # botocore rewinds the file for a retry
                client.put_object(Bucket=loc.bucket, Key=loc.key, Body=fh)
        except Exception as e:
            raise _s3_error(uri, e) from e
        return size
    try:
        upload_id = client.create_multipart_upload(Bucket=loc.bucket, Key=loc.key)["UploadId"]
    except Exception as e:
        raise _s3_error(uri, e) from e
    try:
        with open(path, "rb") as fh:

            failed = threading.Event()

            def upload(n: int) -> dict[str, Any] | None:  # part n (1-based), read where it lies (pread: no offset)
                if failed.is_set():
                    return None  # a part failed: start no more (its error surfaces first, in part order)
                try:
                    chunk = os.pread(fh.fileno(), part_size, (n - 1) * part_size)
                    resp = client.upload_part(Bucket=loc.bucket, Key=loc.key, UploadId=upload_id, PartNumber=n,
                                              Body=chunk)
                except BaseException:
                    failed.set()
                    raise
                return {"ETag": resp["ETag"], "PartNumber": n}

            count = -(-size // part_size)
            pool = ThreadPoolExecutor(max_workers=min(threads, count), thread_name_prefix="vlm2rec-upload")
            try:
                futures = [pool.submit(upload, n) for n in range(1, count + 1)]
                parts = [f.result() for f in futures]  # the first failure raises here
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        client.complete_multipart_upload(Bucket=loc.bucket, Key=loc.key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
    except BaseException as e:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=loc.bucket, Key=loc.key, UploadId=upload_id)
        if isinstance(e, Exception):
            raise _s3_error(uri, e) from e
        raise
    return size


def new_spool_path(suffix: str = "") -> str:
    """A new, empty temporary local file (under ``tempfile.gettempdir()``) for the caller to fill and remove:
    where an S3 write is built before :func:`put_file` uploads it (see also :func:`spool_file`)."""
    fd, name = tempfile.mkstemp(prefix="vlm2rec-spool-", suffix=suffix)
    os.close(fd)
    return name


@contextlib.contextmanager
def spool_file(suffix: str = "") -> Iterator[str]:
    """A path for a temporary local file (under ``tempfile.gettempdir()``), removed on exit: where an S3
    write is built before :func:`put_file` uploads it."""
    name = new_spool_path(suffix)
    try:
        yield name
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def read_parquet(uri: str, *, endpoint: str | None = None, columns: list[str] | None = None) -> pyarrow.Table:
    """Read a Parquet file (or a directory/prefix of Parquet files) from a local path or s3://.

    A single file or object is read through :func:`open_input_file` (S3 retries counted); a directory or
    prefix goes through pyarrow's dataset discovery (hive partitions included) and its own S3 client.

    Raises:
        StorageError: reason ``missing`` when nothing is there, ``io_error`` when reading failed.
    """
    import pyarrow.parquet as pq

    missing = StorageError(f"no Parquet data at {uri}; check the path and the endpoint", reason="missing")
    local_dir = not is_s3(uri) and resolve_local(uri).is_dir()
    if not local_dir:
        try:
            with open_input_file(uri, endpoint=endpoint) as f:
                return pq.ParquetFile(f).read(columns=columns)
        except StorageError as e:
            if e.reason != "missing":
                raise
            if not is_s3(uri) or not exists(uri, endpoint=endpoint):
                raise missing from e
        except OSError as e:
            raise StorageError(f"reading Parquet {uri} failed: {redact(str(e))}", reason="io_error") from e
    fs, path = pyarrow_filesystem(uri, endpoint=endpoint)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except FileNotFoundError as e:
        raise missing from e
    except OSError as e:
        msg = str(e)
        if "NoSuchKey" in msg or "does not exist" in msg.lower() or "Path does not exist" in msg:
            raise missing from e
        raise StorageError(f"reading Parquet {uri} failed: {redact(msg)}", reason="io_error") from e


def write_parquet(table: pyarrow.Table, uri: str, *, endpoint: str | None = None) -> None:
    """Write one Parquet file; readers never see half of it: locally a temp file + rename, on S3 a local
    spool file uploaded with :func:`put_file` (retries counted).

    Raises:
        StorageError: the S3 upload failed.
    """
    import pyarrow.parquet as pq

    if is_s3(uri):
        with spool_file(".parquet") as spool:
            pq.write_table(table, spool)
            put_file(spool, uri, endpoint=endpoint)
        return
    path = resolve_local(uri)
    tmp = temp_beside(path)
    pq.write_table(table, str(tmp))
    os.replace(tmp, path)


def redact(text: str) -> str:
    """Remove any AWS secret/session token present in the environment from ``text`` (for logs)."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        val = os.environ.get(var)
        if val and len(val) >= 4:
            text = text.replace(val, "***")
    return text
