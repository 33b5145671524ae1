"""Content hashes and key lookups for nightly incremental embedding.

``content_hash`` is the sha256 of the encoder fingerprint (model, image bounds, fusion, history length,
prompts: a new checkpoint or prompt re-embeds everything) and the row's titles and image digests, so an
unchanged item keeps its hash from night to night. Runs compare hashes through :class:`KeyIndex`, sorted
``uint64`` keys in Ray's object store read zero-copy by every task on a node; ids whose 64-bit keys collide
(about 3e-6 for 10M items) are left out of an index, so those rows are simply re-encoded.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vlm2rec_ray.config import EmbedJobConfig

HASH_SCHEME = "vlm2rec-content/1"
_SEP = "\x1f"  # unit separator: cannot occur in a cleaned title


def encoder_fingerprint(cfg: EmbedJobConfig, kind: str) -> str:
    """sha256 hex of everything besides the row's inputs that determines its embedding."""
    from vlm2rec_ray.model import prompts

    m = cfg.model
    payload = {"scheme": HASH_SCHEME, "kind": kind, "model_id": m.name, "model_version": cfg.model_version,
               "dtype": m.dtype, "min_pixels": m.min_pixels, "max_pixels": m.max_pixels, "fusion": m.fusion,
               "max_history": m.max_history if kind == "sequences" else 1, "max_title_chars": cfg.max_title_chars,
               "prompts": [prompts.TEXT_SEQUENCE_INSTRUCTION, prompts.IMAGE_SEQUENCE_INSTRUCTION,
                           prompts.INTERLEAVED_SEQUENCE_INSTRUCTION]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def image_digest(data: bytes) -> str:
    """sha256 hex of an image's bytes (identical bytes -> identical embedding)."""
    return hashlib.sha256(data).hexdigest()


def content_hash(fingerprint: str, titles: Sequence[str], digests: Sequence[str]) -> str:
    """The row's content hash: fingerprint, raw titles and image digests (in history order)."""
    h = hashlib.sha256(fingerprint.encode())
    for title, digest in zip(titles, digests, strict=True):
        h.update(b"\x00t" + title.encode("utf-8", "surrogatepass") + b"\x00i" + digest.encode())
    return h.hexdigest()


def text_key(cleaned_titles: Sequence[str]) -> str:
    """Cache key of a text prompt: identical cleaned titles give identical P_T embeddings."""
    return hashlib.sha256(_SEP.join(cleaned_titles).encode("utf-8", "surrogatepass")).hexdigest()


def image_key(digests: Sequence[str]) -> str:
    """Cache key of an image prompt: identical image bytes give identical P_V embeddings."""
    return hashlib.sha256(_SEP.join(digests).encode()).hexdigest()


def id_keys(ids: Iterable[str | None]) -> np.ndarray:
    """``uint64`` keys of string ids (blake2b-64); ``None`` maps to 0, which no index ever holds."""
    out = [0 if i is None else int.from_bytes(hashlib.blake2b(i.encode("utf-8", "surrogatepass"),
                                                              digest_size=8).digest(), "little") or 1
           for i in ids]
    return np.asarray(out, dtype=np.uint64)


def hash_keys(hashes: Iterable[str | None]) -> np.ndarray:
    """``uint64`` keys of hex content hashes (their first 64 bits); ``None`` maps to 0."""
    return np.asarray([0 if h is None else int(h[:16], 16) for h in hashes], dtype=np.uint64)


@dataclass(frozen=True)
class KeyIndex:
    """A sorted map ``id key -> content-hash key`` (both ``uint64``), built once, read zero-copy everywhere."""

    keys: np.ndarray  # (N,) uint64, sorted, unique
    values: np.ndarray  # (N,) uint64
    collisions: int = 0  # id keys dropped because two different ids shared them

    @classmethod
    def build(cls, ids: Sequence[str | None] | np.ndarray, hashes: Sequence[str | None] | np.ndarray) -> KeyIndex:
        """From ids and content hashes (strings, or already-computed ``uint64`` keys)."""
        k = ids if isinstance(ids, np.ndarray) else id_keys(ids)
        v = hashes if isinstance(hashes, np.ndarray) else hash_keys(hashes)
        order = np.argsort(k[k != 0], kind="stable")
        k, v = k[k != 0][order], v[k != 0][order]
        dup = np.zeros(len(k), dtype=bool)  # keys two different ids share: left out (those rows are re-encoded)
        if len(k) > 1:
            dup[1:] |= k[1:] == k[:-1]
            dup[:-1] |= k[1:] == k[:-1]
        return cls(np.ascontiguousarray(k[~dup]), np.ascontiguousarray(v[~dup]), len(np.unique(k[dup])))

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(found, values)`` for ``uint64`` id keys; ``values`` is 0 where not found."""
        if len(self.keys) == 0 or len(query) == 0:
            return np.zeros(len(query), dtype=bool), np.zeros(len(query), dtype=np.uint64)
        pos = np.searchsorted(self.keys, query)
        pos_c = np.minimum(pos, len(self.keys) - 1)
        found = (self.keys[pos_c] == query) & (query != 0)
        return found, np.where(found, self.values[pos_c], np.uint64(0))


def classify(index: KeyIndex | None, ids: Sequence[str | None], hashes: Sequence[str | None]) -> tuple[list[str], np.ndarray]:
    """Per row ``new`` / ``changed`` / ``unchanged`` against the previous snapshot's index, plus ``in_prev``.

    A row without a hash (it failed) gets ``""``; ``in_prev`` still says whether its id was in the index.
    """
    q = id_keys(ids)
    found, prev = index.lookup(q) if index is not None else (np.zeros(len(q), bool), np.zeros(len(q), np.uint64))
    return ["" if h is None else "new" if not f else "unchanged" if p == c else "changed"
            for f, p, c, h in zip(found, prev, hash_keys(hashes), hashes, strict=True)], found


def build_index_from_files(files: Sequence[str], key: str, *, endpoint: str | None) -> KeyIndex:
    """A :class:`KeyIndex` of Parquet files' ``key`` and ``content_hash`` columns, streamed by row group (run it
    in a Ray task: the arrays go to the object store)."""
    from vlm2rec_ray import storage

    ks, vs = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
    for f in files:
        with storage.open_parquet(f, endpoint=endpoint) as pf:
            for batch in pf.iter_batches(columns=[key, "content_hash"], batch_size=65_536):
                ks.append(id_keys(batch.column(key).to_pylist()))
                vs.append(hash_keys(batch.column("content_hash").to_pylist()))
    return KeyIndex.build(np.concatenate(ks), np.concatenate(vs))


def resolve_ref(holder: list[Any] | None) -> Any:
    """``ray.get`` of an ``[ObjectRef]`` passed through ``fn_kwargs`` (wrapped in a list so Ray Data does not
    try to resolve it), cached per worker process so each task reads the shared copy once; a plain value (tests
    call the UDFs without Ray) as it is."""
    ref = holder[0] if holder else None
    return _get(ref) if hasattr(ref, "hex") else ref


@functools.lru_cache(maxsize=8)
def _get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


__all__ = ["HASH_SCHEME", "KeyIndex", "build_index_from_files", "classify", "content_hash", "encoder_fingerprint",
           "hash_keys", "id_keys", "image_digest", "image_key", "resolve_ref", "text_key"]
