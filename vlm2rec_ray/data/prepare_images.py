"""Copy catalog images (http(s), s3:// or local) into object storage (``vlm2rec prepare images``).

Each image is fetched with :func:`~vlm2rec_ray.data.images.fetch_image_bytes` (byte cap, timeouts),
retried with exponential backoff and jitter when the failure is transient (``io_error``: 5xx, resets,
timeouts; a 404 is not retried), checked to decode as an image, and written to
``<dest>/<item_id>.<ext>``. Work runs on a bounded thread pool; objects already present at the
destination are skipped, so an interrupted run resumes where it stopped. Every failure is kept with its
reason (``missing``, ``corrupt``, ...) and counted: nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vlm2rec_ray import storage
from vlm2rec_ray.data.catalog import CATALOG_FILE, read_catalog, resolve_image_uri
from vlm2rec_ray.data.images import decode_image, fetch_image_bytes

log = logging.getLogger(__name__)

IMAGE_ERRORS_FILE = "image_errors.parquet"
IMAGE_ERRORS_SCHEMA = pa.schema([("item_id", pa.string()), ("image_uri", pa.string()), ("reason", pa.string())])
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_EXT = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpg", b"GIF8": "gif", b"BM": "bmp", b"II*\x00": "tif", b"MM\x00*": "tif"}
_RETRYABLE = {"io_error"}


@dataclass
class CopyResult:
    """``uris``: item_id -> file name under the destination; ``failures``: item_id -> reason."""

    uris: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)  # copied, already_present, retries, <reasons>

    def summary(self) -> dict[str, Any]:
        return {"ok": len(self.uris), "failed": len(self.failures), "counts": dict(sorted(self.counts.items()))}


def safe_name(item_id: str) -> str:
    """A file-name stem for an item id: itself if safe, else a sanitised form plus a short hash."""
    clean = _SAFE.sub("_", item_id)
    if clean == item_id and not item_id.startswith(".") and item_id:
        return item_id
    return f"{clean.lstrip('.')[:80]}-{hashlib.sha1(item_id.encode()).hexdigest()[:10]}"


def _extension(data: bytes) -> str:
    for magic, ext in _EXT.items():
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"


def _copy_one(
    item_id: str, uri: str, dest: str, *, endpoint: str | None, retries: int, max_bytes: int, backoff_s: float,
    timeout_s: float,
) -> tuple[str, str | None, str | None, int]:
    """(item_id, file name or None, reason or None, retries used)."""
    attempt = 0
    while True:
        # allowed_roots=None: copying a public dump's images by hand, any URL (the jobs restrict theirs)
        data, reason = fetch_image_bytes(uri, endpoint=endpoint, max_bytes=max_bytes, timeout_s=timeout_s,
                                         allowed_roots=None)
        if reason not in _RETRYABLE or attempt >= retries:
            break
        attempt += 1
        time.sleep(backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random()))
    if data is None:
        return item_id, None, reason, attempt
    _, reason = decode_image(data, min_pixels=1, max_pixels=1 << 40)
    if reason is not None:
        return item_id, None, reason, attempt
    name = f"{safe_name(item_id)}.{_extension(data)}"
    try:
        storage.write_bytes(storage.join(dest, name), data, endpoint=endpoint)
    except storage.StorageError as e:
        return item_id, None, e.reason if e.reason in ("denied", "io_error") else "io_error", attempt
    return item_id, name, None, attempt


def copy_images(
    items: Iterable[tuple[str, str]],
    dest: str,
    *,
    endpoint: str | None = None,
    concurrency: int = 16,
    retries: int = 3,
    max_bytes: int = 20_000_000,
    backoff_s: float = 0.2,
    timeout_s: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> CopyResult:
    """Copy ``(item_id, source_uri)`` images to ``dest`` (local dir or s3:// prefix).

    Args:
        concurrency: worker threads (bounded; at most ``4 * concurrency`` images are in flight).
        retries: extra attempts for transient failures, with exponential backoff from ``backoff_s``.
        progress: called as ``progress(done, total)`` after each image.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    pending = list(items)
    result = CopyResult()
    present = {}
    for uri in storage.list_uris(dest, endpoint=endpoint):
        name = uri.rsplit("/", 1)[-1]
        present[name.rsplit(".", 1)[0]] = name
    todo = []
    for item_id, uri in pending:
        stem = safe_name(item_id)
        if stem in present:
            result.uris[item_id] = present[stem]
            result.counts["already_present"] += 1
        else:
            todo.append((item_id, uri))
    total, done = len(pending), len(pending) - len(todo)
    window = 4 * concurrency
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="copy-images") as pool:
        for start in range(0, len(todo), window):
            futures = [
                pool.submit(_copy_one, item_id, uri, dest, endpoint=endpoint, retries=retries, max_bytes=max_bytes,
                            backoff_s=backoff_s, timeout_s=timeout_s)
                for item_id, uri in todo[start : start + window]
            ]
            for fut in futures:
                item_id, name, reason, used = fut.result()
                result.counts["retries"] += used
                if name is None:
                    result.failures[item_id] = reason or "io_error"
                    result.counts[reason or "io_error"] += 1
                else:
                    result.uris[item_id] = name
                    result.counts["copied"] += 1
                done += 1
                if progress is not None:
                    progress(done, total)
            log.info("images: %d/%d done, counts %s", done, total, dict(result.counts))
    return result


def prepare_images(
    dataset_uri: str,
    *,
    endpoint: str | None = None,
    concurrency: int = 16,
    retries: int = 3,
    max_bytes: int = 20_000_000,
    timeout_s: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Copy a prepared dataset's remote images into ``<dataset>/images/`` and point the catalog at them.

    Images already under the dataset (relative ``image_uri``) are left alone. Items whose image fails keep
    their original ``image_uri`` and are listed with the reason in ``image_errors.parquet``.

    Returns:
        :meth:`CopyResult.summary` plus ``skipped_local`` and ``errors_uri``.
    """
    catalog_uri = storage.join(dataset_uri, CATALOG_FILE)
    catalog = read_catalog(catalog_uri, endpoint=endpoint)
    ids = catalog.column("item_id").to_pylist()
    uris = catalog.column("image_uri").to_pylist()
    remote = [(i, resolve_image_uri(u, catalog_uri)) for i, u in zip(ids, uris, strict=True)
              if u and ("://" in u or u.startswith("/"))]
    result = copy_images(remote, storage.join(dataset_uri, "images"), endpoint=endpoint, concurrency=concurrency,
                         retries=retries, max_bytes=max_bytes, timeout_s=timeout_s, progress=progress)
    new_uris = [f"images/{result.uris[i]}" if i in result.uris else u for i, u in zip(ids, uris, strict=True)]
    catalog = catalog.set_column(catalog.schema.get_field_index("image_uri"), "image_uri", pa.array(new_uris, pa.string()))
    storage.write_parquet(catalog, catalog_uri, endpoint=endpoint)
    src = dict(remote)
    errors = pa.table(
        {"item_id": list(result.failures), "image_uri": [src[i] for i in result.failures],
         "reason": list(result.failures.values())},
        schema=IMAGE_ERRORS_SCHEMA,
    )
    errors_uri = storage.join(dataset_uri, IMAGE_ERRORS_FILE)
    storage.write_parquet(errors, errors_uri, endpoint=endpoint)
    return {**result.summary(), "skipped_local": len(ids) - len(remote), "errors_uri": errors_uri}
