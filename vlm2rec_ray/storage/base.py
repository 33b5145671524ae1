"""The storage backend interface, written once over pyarrow's filesystems, and the registry of backends by scheme.

A backend is one store (a local filesystem, S3, GCS, Azure Blob). Every primitive below works through the store's
pyarrow filesystem, so a new store is one module with a :class:`Backend` subclass that builds that filesystem
(:meth:`Backend.filesystem`), named in :data:`BACKENDS` under its scheme; where the store's own SDK does better, the
subclass overrides a primitive (S3: reads, writes and uploads through boto3, whose retries are counted).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO, ClassVar

if TYPE_CHECKING:
    import pyarrow.fs

# URI scheme -> "module:Class" of its backend; a path without a scheme (or file://) is local.
BACKENDS: dict[str, str] = {"": "vlm2rec_ray.storage.local:LocalBackend", "s3": "vlm2rec_ray.storage.s3:S3Backend"}
_INSTANCES: dict[tuple[str, str | None], Backend] = {}
_LOCK = threading.Lock()
_COPY_BYTES = 8 << 20


class StorageError(RuntimeError):
    """A storage operation failed; ``reason`` is a short machine-readable code (missing, denied, too_large, ...)."""

    def __init__(self, message: str, reason: str = "io_error") -> None:
        super().__init__(message)
        self.reason = reason


# What the stores' errors say when an object is missing or access is denied (pyarrow's message text; the error
# codes of boto3's ClientError, also shown in s3transfer's messages as "(Code)").
_MISSING = ("NoSuchKey", "NoSuchBucket", "does not exist", "NOT_FOUND", "(404)", "(NotFound)")
_DENIED = ("AccessDenied", "ACCESS_DENIED", "(403)", "InvalidAccessKeyId", "SignatureDoesNotMatch")


@contextlib.contextmanager
def storage_errors(uri: str, catch: type[Exception] = OSError) -> Iterator[None]:
    """The OS's, pyarrow's (``OSError``) and, with ``catch=Exception``, boto3's errors as :class:`StorageError`
    with a reason (``missing``, ``denied``, ``io_error``)."""
    try:
        yield
    except StorageError:
        raise
    except catch as e:
        resp = getattr(e, "response", None)
        text = f"({resp.get('Error', {}).get('Code', '')}) {e}" if isinstance(resp, dict) else str(e)
        if isinstance(e, FileNotFoundError | IsADirectoryError) or any(s in text for s in _MISSING):
            raise StorageError(f"file not found: {uri}; check the path (and the endpoint of an object store)",
                               reason="missing") from e
        if isinstance(e, PermissionError) or any(s in text for s in _DENIED):
            raise StorageError(f"access denied to {uri}; check the credentials", reason="denied") from e
        raise StorageError(f"storage request for {uri} failed: {type(e).__name__}: {e}", reason="io_error") from e


class Backend:
    """One store. Its URIs are ``<scheme>://...`` (:attr:`prefix`) or, for the local backend, paths.

    Primitives raise :class:`StorageError` (reason ``missing``, ``denied``, ``too_large`` or ``io_error``), and
    ``ValueError`` for a malformed URI; writes are all or nothing (a reader never sees half an object).
    ``endpoint`` is the store's endpoint override (None: the SDK's default).
    """

    prefix: ClassVar[str] = ""  # what the store's URIs start with, e.g. "s3://"

    def __init__(self, endpoint: str | None = None) -> None:
        self.endpoint = endpoint

    def filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """The store's pyarrow filesystem (what pyarrow and Ray Data read through) and ``uri``'s path in it."""
        raise NotImplementedError

    def check(self, uri: str) -> None:
        """Raise ``ValueError`` when ``uri`` is malformed for this store."""

    def absolute(self, uri: str) -> str:
        """``uri`` as it means the same on every node (local paths resolved; remote URIs unchanged)."""
        return uri

    def contains(self, root: str, uri: str) -> bool:
        """``uri`` lies under ``root`` (both absolute, of this store)."""
        r = root.rstrip("/")
        return uri == r or uri.startswith(r + "/")

    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The whole object; ``too_large`` (without reading it) when it has more than ``max_bytes`` bytes."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(uri)
        with storage_errors(uri):
            info = fs.get_file_info(path)
            if info.type != pafs.FileType.File:
                raise StorageError(f"{uri} is not a file or object", reason="missing")
            if max_bytes is not None and info.size > max_bytes:
                raise StorageError(f"{uri} is {info.size} bytes, over the cap of {max_bytes}", "too_large")
            with fs.open_input_stream(path) as f:
                return f.read()

    @contextlib.contextmanager
    def open(self, uri: str) -> Iterator[BinaryIO]:
        """A stream over the object (inputs too large to hold in memory)."""
        fs, path = self.filesystem(uri)
        with storage_errors(uri), fs.open_input_stream(path) as f:
            yield f  # type: ignore[misc]

    def write(self, uri: str, data: bytes) -> None:
        fs, path = self.filesystem(uri)
        with storage_errors(uri), fs.open_output_stream(path) as f:
            f.write(data)

    def upload(self, path: str, uri: str) -> None:
        """Copy the local file ``path`` to ``uri``."""
        fs, dest = self.filesystem(uri)
        with storage_errors(uri), open(path, "rb") as src, fs.open_output_stream(dest) as dst:
            shutil.copyfileobj(src, dst, _COPY_BYTES)  # type: ignore[misc]

    def download(self, uri: str, path: str) -> None:
        fs, src_path = self.filesystem(uri)
        with storage_errors(uri), fs.open_input_stream(src_path) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_BYTES)  # type: ignore[misc]

    def exists(self, uri: str) -> bool:
        """An object, or a prefix/directory holding anything, is at ``uri``."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(uri)
        with storage_errors(uri):
            return fs.get_file_info(path).type != pafs.FileType.NotFound

    def list(self, prefix: str) -> dict[str, int]:
        """``{uri: size in bytes}`` of every object under ``prefix`` (recursive), sorted by URI."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(prefix)
        with storage_errors(prefix):
            top = fs.get_file_info(path)
            infos = [top] if top.type == pafs.FileType.File else fs.get_file_info(
                pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return dict(sorted((self.prefix + i.path, i.size) for i in infos if i.type == pafs.FileType.File))

    def delete(self, uri: str) -> None:
        """Delete one object."""
        fs, path = self.filesystem(uri)
        with storage_errors(uri):
            fs.delete_file(path)

    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under ``prefix`` (nothing there is fine); returns how many objects it removed."""
        import pyarrow.fs as pafs

        n, (fs, path) = len(self.list(prefix)), self.filesystem(prefix)
        with storage_errors(prefix):
            kind = fs.get_file_info(path).type
            if kind == pafs.FileType.Directory:
                fs.delete_dir(path)
            elif kind == pafs.FileType.File:
                fs.delete_file(path)
        return n


def scheme(uri: str | os.PathLike[str]) -> str:
    """``s3`` for ``s3://b/k``; ``""`` for a local path or ``file://`` URI."""
    head, sep, _ = str(uri).partition("://")
    return "" if not sep or head == "file" else head.lower()


def backend(uri: str | os.PathLike[str], endpoint: str | None = None) -> Backend:
    """The backend of ``uri``'s scheme (one instance per scheme and endpoint, per process).

    Raises:
        ValueError: no backend handles the scheme.
    """
    name = scheme(uri)
    with _LOCK:
        if (name, endpoint) not in _INSTANCES:
            if name not in BACKENDS:
                raise ValueError(f"no storage backend for {str(uri)!r} (scheme {name!r}); supported: a local path, "
                                 + ", ".join(f"{s}://" for s in sorted(BACKENDS) if s))
            module, _, cls = BACKENDS[name].partition(":")
            _INSTANCES[(name, endpoint)] = getattr(importlib.import_module(module), cls)(endpoint)
        return _INSTANCES[(name, endpoint)]


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """``uri`` names an object store (any scheme but a local path or ``file://``)."""
    return scheme(uri) != ""


def join(base: str, *parts: str) -> str:
    """Join URI/path parts with ``/`` (every scheme, and local paths)."""
    out = str(base)
    for part in parts:
        if str(part):
            out = out.rstrip("/") + "/" + str(part).lstrip("/")
    return out
