"""The storage backend interface and the registry that picks a backend by URI scheme.

A backend is one store (a local filesystem, S3, GCS, Azure Blob): a small class with the primitives below, every
other operation (:mod:`vlm2rec_ray.storage`) is built on them once. A new store is one new module with a
:class:`Backend` subclass, named in :data:`BACKENDS` by its scheme.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, ClassVar

if TYPE_CHECKING:
    import pyarrow.fs

# URI scheme -> "module:Class" of its backend; a path without a scheme (or file://) is local.
BACKENDS: dict[str, str] = {
    "": "vlm2rec_ray.storage.local:LocalBackend",
    "s3": "vlm2rec_ray.storage.s3:S3Backend",
}
_INSTANCES: dict[tuple[str, str | None], Backend] = {}
_LOCK = threading.Lock()


class StorageError(RuntimeError):
    """A storage operation failed; ``reason`` is a short machine-readable code (missing, denied, too_large, ...)."""

    def __init__(self, message: str, reason: str = "io_error") -> None:
        super().__init__(message)
        self.reason = reason


class Backend:
    """One store. URIs handed to a backend are absolute in its scheme (``s3://bucket/key``; a local path).

    Every method raises :class:`StorageError` (reason ``missing``, ``denied``, ``too_large`` or ``io_error``)
    for a failed operation and ``ValueError`` for a malformed URI. Writes are all-or-nothing: a reader never
    sees half an object. ``endpoint`` is the store's endpoint override (None: the SDK's default).
    """

    scheme: ClassVar[str] = ""

    def __init__(self, endpoint: str | None = None) -> None:
        self.endpoint = endpoint

    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The whole object; ``too_large`` (without reading it) when it has more than ``max_bytes`` bytes."""
        raise NotImplementedError

    def open(self, uri: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A stream over the object, for inputs too large to hold in memory."""
        raise NotImplementedError

    def write(self, uri: str, data: bytes) -> None:
        raise NotImplementedError

    def upload(self, path: str, uri: str) -> None:
        """Copy the local file ``path`` to ``uri`` (large files in parts, side by side)."""
        raise NotImplementedError

    def download(self, uri: str, path: str) -> None:
        """Copy the object to the local file ``path``."""
        raise NotImplementedError

    def exists(self, uri: str) -> bool:
        """An object, or a prefix/directory holding anything, is at ``uri``."""
        raise NotImplementedError

    def list(self, prefix: str) -> dict[str, int]:
        """``{uri: size in bytes}`` of every object under ``prefix`` (recursive), sorted by URI."""
        raise NotImplementedError

    def delete(self, uris: list[str]) -> None:
        """Delete these objects (missing ones are fine)."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under ``prefix``; returns how many objects were removed."""
        uris = self.list(prefix)
        self.delete(list(uris))
        return len(uris)

    def filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """A pyarrow filesystem for the store (what pyarrow and Ray Data read through) and ``uri``'s path in it."""
        raise NotImplementedError

    def check(self, uri: str) -> None:
        """Raise ``ValueError`` when ``uri`` is malformed for this store."""

    def absolute(self, uri: str) -> str:
        """``uri`` as it means the same on every node (local paths resolved; remote URIs unchanged)."""
        return uri

    def contains(self, root: str, uri: str) -> bool:
        """``uri`` lies under ``root`` (both of this store; ``..`` can never escape)."""
        r = root.rstrip("/")
        return uri == r or uri.startswith(r + "/")


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
        inst = _INSTANCES.get((name, endpoint))
        if inst is None:
            target = BACKENDS.get(name)
            if target is None:
                raise ValueError(f"no storage backend for {str(uri)!r} (scheme {name!r}); supported: a local path, "
                                 + ", ".join(f"{s}://" for s in sorted(BACKENDS) if s))
            module, _, cls = target.partition(":")
            inst = _INSTANCES[(name, endpoint)] = getattr(importlib.import_module(module), cls)(endpoint)
    return inst


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """``uri`` names an object store (any scheme but a local path or ``file://``)."""
    return scheme(uri) != ""


def join(base: str, *parts: str) -> str:
    """Join URI/path parts with ``/`` (works for every scheme and local paths)."""
    out = str(base)
    for part in parts:
        if str(part):
            out = out.rstrip("/") + "/" + str(part).lstrip("/")
    return out


def resolve_local(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """Resolve a local path; with ``root``, relative paths are taken under it and may not escape it.

    Raises:
        ValueError: the path resolves outside ``root`` (``..``, a symlink, an absolute path elsewhere).
    """
    p = Path(str(path).removeprefix("file://")).expanduser()
    if root is None:
        return p.resolve()
    root_p = Path(str(root).removeprefix("file://")).expanduser().resolve()
    full = (p if p.is_absolute() else root_p / p).resolve()
    if full != root_p and root_p not in full.parents:
        raise ValueError(f"path {str(path)!r} resolves to {str(full)!r}, outside the allowed root {str(root_p)!r}; "
                         "use a path inside the root (no '..')")
    return full


@contextlib.contextmanager
def local_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Local file errors as :class:`StorageError`: ``missing`` (no such file, or a directory) or ``denied``."""
    try:
        yield
    except FileNotFoundError as e:
        raise StorageError(f"file not found: {path}", reason="missing") from e
    except PermissionError as e:
        raise StorageError(f"permission denied: {path}", reason="denied") from e
    except IsADirectoryError as e:
        raise StorageError(f"expected a file, got a directory: {path}", reason="missing") from e


__all__ = ["BACKENDS", "Backend", "StorageError", "backend", "is_remote", "join", "local_errors", "resolve_local",
           "scheme"]
