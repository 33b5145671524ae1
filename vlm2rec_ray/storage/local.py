"""Local paths (and ``file://`` URIs): writes go to a temporary name beside the target and are renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from vlm2rec_ray.storage.base import Backend, StorageError, local_errors, resolve_local

if TYPE_CHECKING:
    import pyarrow.fs


def temp_beside(dest: Path) -> Path:
    """A temporary name next to ``dest`` (its directory created): same directory, so ``os.replace`` onto ``dest``
    is atomic and readers never see a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")


class LocalBackend(Backend):
    """A POSIX filesystem (also what a shared mount such as NFS or FSx looks like to every node)."""

    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        path = resolve_local(uri)
        with local_errors(path):
            size = path.stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise StorageError(f"{uri} is {size} bytes, over the cap of {max_bytes}", "too_large")
            return path.read_bytes()

    @contextlib.contextmanager
    def open(self, uri: str) -> Iterator[BinaryIO]:
        path = resolve_local(uri)
        with local_errors(path):
            f = path.open("rb")
        with f:
            yield f

    def write(self, uri: str, data: bytes) -> None:
        path = resolve_local(uri)
        tmp = temp_beside(path)
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def upload(self, path: str, uri: str) -> None:
        dest = resolve_local(uri)
        tmp = temp_beside(dest)
        try:
            with local_errors(path):
                shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def download(self, uri: str, path: str) -> None:
        self.upload(str(resolve_local(uri)), path)

    def exists(self, uri: str) -> bool:
        return resolve_local(uri).exists()

    def list(self, prefix: str) -> dict[str, int]:
        root = resolve_local(prefix)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        return {str(p): p.stat().st_size for p in files}

    def delete(self, uris: list[str]) -> None:
        for u in uris:
            resolve_local(u).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        n = len(self.list(prefix)) if self.exists(prefix) else 0
        root = resolve_local(prefix)
        if root.is_dir():
            shutil.rmtree(root)
        elif root.exists():
            root.unlink()
        return n

    def filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(resolve_local(uri))

    def absolute(self, uri: str) -> str:
        return str(resolve_local(uri))

    def contains(self, root: str, uri: str) -> bool:
        try:
            resolve_local(uri, root)
        except ValueError:
            return False
        return True
