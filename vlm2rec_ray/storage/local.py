"""Local paths (and ``file://`` URIs): pyarrow's LocalFileSystem, with writes to a temporary name beside the
target renamed into place (atomic: a reader never sees a partial file)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vlm2rec_ray.storage.base import Backend, storage_errors

if TYPE_CHECKING:
    import pyarrow.fs


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


class LocalBackend(Backend):
    """A POSIX filesystem (also what a shared mount, NFS or FSx, looks like to every node)."""

    def filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(resolve_local(uri))

    def absolute(self, uri: str) -> str:
        return str(resolve_local(uri))

    def contains(self, root: str, uri: str) -> bool:
        return resolve_local(uri).is_relative_to(resolve_local(root))  # resolved: no '..' or symlink escapes

    def write(self, uri: str, data: bytes) -> None:
        self._replace(uri, lambda tmp: tmp.write_bytes(data))

    def upload(self, path: str, uri: str) -> None:
        self._replace(uri, lambda tmp: shutil.copyfile(path, tmp), what=f"{path} -> {uri}")

    @staticmethod
    def _replace(uri: str, fill: Callable[[Path], object], what: str | None = None) -> None:
        """``fill`` a temporary file beside the target (same directory: ``os.replace`` is atomic), then rename
        it into place; errors name ``what`` (default ``uri``)."""
        dest = resolve_local(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with storage_errors(what or uri):
                fill(tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
