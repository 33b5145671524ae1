"""Object storage: one small API over local paths and object stores, a backend per URI scheme.

Everything that reads or writes files goes through here: :func:`~vlm2rec_ray.storage.base.backend` picks the
backend of a URI's scheme (``base.BACKENDS``) and the functions below are written once over its primitives.
``endpoint`` overrides the store's endpoint (S3: ``storage.endpoint_url``, else ``AWS_ENDPOINT_URL``);
credentials come from the SDKs' standard chains and are never logged.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from vlm2rec_ray.storage.base import Backend, StorageError, backend, is_remote, join, scheme, storage_errors
from vlm2rec_ray.storage.local import resolve_local
from vlm2rec_ray.storage.s3 import endpoint_url, s3_client

if TYPE_CHECKING:
    import pyarrow
    import pyarrow.fs
    import pyarrow.parquet


def read_bytes(uri: str, *, endpoint: str | None = None, max_bytes: int | None = None) -> bytes:
    """A whole object or file. Raises :class:`StorageError` (``missing``, ``denied``, ``too_large``, ``io_error``)."""
    return backend(uri, endpoint).read(uri, max_bytes)


def read_text(uri: str, *, endpoint: str | None = None) -> str:
    return read_bytes(uri, endpoint=endpoint).decode("utf-8")


def write_bytes(uri: str, data: bytes, *, endpoint: str | None = None) -> None:
    """Write an object or file; readers see the old content or the new, never a part."""
    backend(uri, endpoint).write(uri, data)


def write_text(uri: str, text: str, *, endpoint: str | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), endpoint=endpoint)


def open_read(uri: str, *, endpoint: str | None = None) -> contextlib.AbstractContextManager[BinaryIO]:
    """``with open_read(uri) as f``: stream an object or file (inputs too large to hold in memory)."""
    return backend(uri, endpoint).open(uri)


def exists(uri: str, *, endpoint: str | None = None) -> bool:
    """An object or file, or a prefix/directory holding anything, is at ``uri``."""
    return backend(uri, endpoint).exists(uri)


def list_uris(prefix: str, *, endpoint: str | None = None, suffix: str = "") -> list[str]:
    """All objects/files under a prefix (recursive), sorted, optionally filtered by suffix."""
    return [u for u in backend(prefix, endpoint).list(prefix) if u.endswith(suffix)]


def delete(uri: str, *, endpoint: str | None = None) -> bool:
    """Delete one object or file; returns whether it existed."""
    b = backend(uri, endpoint)
    found = b.exists(uri)
    if found:
        b.delete(uri)
    return found


def delete_prefix(prefix: str, *, endpoint: str | None = None) -> int:
    """Delete everything under a prefix; returns how many objects/files were removed."""
    return backend(prefix, endpoint).delete_prefix(prefix)


def put_file(path: str | os.PathLike[str], uri: str, *, endpoint: str | None = None) -> int:
    """Copy a local file to ``uri`` (it appears only complete); returns its size. Raises :class:`StorageError`."""
    backend(uri, endpoint).upload(str(path), uri)
    return os.path.getsize(path)


def download_prefix(prefix: str, local_dir: str | os.PathLike[str], *, endpoint: str | None = None) -> Path:
    """Copy every object under ``prefix`` into ``local_dir`` (keeping relative paths), skipping files already there
    with the same size, so a cache directory is reused across runs.

    Raises:
        StorageError: nothing under ``prefix`` (``missing``), or a copy failed.
    """
    b = backend(prefix, endpoint)
    objects = b.list(prefix)
    if not objects:
        raise StorageError(f"nothing found under {prefix}; check the URI and the endpoint", reason="missing")
    base, dest = b.absolute(prefix).rstrip("/") + "/", Path(local_dir)
    for uri, size in objects.items():
        target = resolve_local(uri[len(base):], dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.stat().st_size != size:
            b.download(uri, str(target.with_name(f".{target.name}.part")))
            os.replace(target.with_name(f".{target.name}.part"), target)
    return dest


def upload_dir(local_dir: str | os.PathLike[str], prefix: str, *, endpoint: str | None = None) -> int:
    """Upload a local directory tree under a prefix (any store); returns the number of files."""
    files = [p for p in sorted(Path(local_dir).rglob("*")) if p.is_file()]
    for p in files:
        put_file(p, join(prefix, p.relative_to(local_dir).as_posix()), endpoint=endpoint)
    return len(files)


def pyarrow_filesystem(uri: str, *, endpoint: str | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem of ``uri``'s store and the path in it (what pyarrow, Ray Data and Ray Train take)."""
    return backend(uri, endpoint).filesystem(uri)


def absolute(uri: str) -> str:
    """``uri`` as it means the same on every node and in every working directory (local paths resolved)."""
    return backend(uri).absolute(uri)


def check_uri(uri: str) -> None:
    """Raise ``ValueError`` when no backend handles ``uri`` or it is malformed (an S3 URI without a bucket)."""
    backend(uri).check(uri)


def is_under(uri: str, root: str) -> bool:
    """``uri`` lies under ``root`` (same store; local paths compared resolved: ``..`` and symlinks cannot escape)."""
    return scheme(uri) == scheme(root) and backend(uri).contains(absolute(root), absolute(uri))


def read_parquet(uri: str, *, endpoint: str | None = None, columns: list[str] | None = None) -> pyarrow.Table:
    """A Parquet file, or a directory/prefix of them (hive partitions included). Raises :class:`StorageError`."""
    import pyarrow.parquet as pq

    fs, path = pyarrow_filesystem(uri, endpoint=endpoint)
    with storage_errors(uri):
        return pq.read_table(path, filesystem=fs, columns=columns)


@contextlib.contextmanager
def open_parquet(uri: str, *, endpoint: str | None = None) -> Iterator[pyarrow.parquet.ParquetFile]:
    """One Parquet file, to read by row group or column (``iter_batches``). Raises :class:`StorageError`."""
    import pyarrow.parquet as pq

    fs, path = pyarrow_filesystem(uri, endpoint=endpoint)
    with storage_errors(uri), fs.open_input_file(path) as f:
        yield pq.ParquetFile(f)


def write_parquet(table: pyarrow.Table, uri: str, *, endpoint: str | None = None) -> None:
    """Write one Parquet file (built in a local temporary dir, then :func:`put_file`): never seen half written."""
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="vlm2rec-spool-") as spool:
        pq.write_table(table, f"{spool}/table.parquet")
        put_file(f"{spool}/table.parquet", uri, endpoint=endpoint)


def redact(text: str) -> str:
    """Remove any AWS secret/session token present in the environment from ``text`` (for logs)."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        val = os.environ.get(var)
        if val and len(val) >= 4:
            text = text.replace(val, "***")
    return text


__all__ = ["Backend", "StorageError", "absolute", "backend", "check_uri", "delete", "delete_prefix",
           "download_prefix", "endpoint_url", "exists", "is_remote", "is_under", "join", "list_uris",
           "open_parquet", "open_read", "put_file", "pyarrow_filesystem", "read_bytes", "read_parquet", "read_text",
           "redact", "resolve_local", "s3_client", "scheme", "upload_dir", "write_bytes",
           "write_parquet", "write_text"]
