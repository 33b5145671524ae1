"""Content hashes and key lookups for nightly incremental embedding.

``content_hash`` is the sha256 (hex) of the encoder fingerprint and the row's inputs: for an item its title
and the sha256 of its image bytes; for a sequence the titles and image digests of the history items that
are encoded. The fingerprint covers the model (``model_id``, ``model_version``), the image size bounds, the
fusion mode, the history length and the prompt instructions, so a new checkpoint or prompt re-embeds
everything while an unchanged item keeps its hash from night to night.

Incremental runs compare hashes through :class:`KeyIndex`: two sorted ``uint64`` arrays (64-bit keys of the
ids and of the content hashes) that live in Ray's object store, so every CPU task on a node reads the same
zero-copy copy and the driver never holds the previous snapshot. Lookups are ``np.searchsorted``:
``O(B log N)`` per batch, no hash table rebuilt per task. Ids whose 64-bit keys collide (probability about
N^2 / 2^65, i.e. 3e-6 for 10M items) are left out of an index, so those rows are simply re-encoded.
"""

from __future__ import annotations

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

    payload = {
        "scheme": HASH_SCHEME,
        "kind": kind,
        "model_id": cfg.model.name,
        "model_version": cfg.model_version,
        "dtype": cfg.model.dtype,
        "min_pixels": cfg.model.min_pixels,
        "max_pixels": cfg.model.max_pixels,
        "fusion": cfg.model.fusion,
        "max_history": cfg.model.max_history if kind == "sequences" else 1,
        "max_title_chars": cfg.max_title_chars,
        "prompts": [prompts.TEXT_SEQUENCE_INSTRUCTION, prompts.IMAGE_SEQUENCE_INSTRUCTION,
                    prompts.INTERLEAVED_SEQUENCE_INSTRUCTION],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def image_digest(data: bytes) -> str:
    """sha256 hex of an image's bytes (identical bytes -> identical embedding)."""
    return hashlib.sha256(data).hexdigest()


def content_hash(fingerprint: str, titles: Sequence[str], digests: Sequence[str]) -> str:
    """The row's content hash: fingerprint, raw titles and image digests (in history order)."""
    h = hashlib.sha256(fingerprint.encode())
    for title, digest in zip(titles, digests, strict=True):
        h.update(b"\x00t")
        h.update(title.encode("utf-8", "surrogatepass"))
        h.update(b"\x00i")
        h.update(digest.encode())
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
        keep = k != 0
        k, v = k[keep], v[keep]
        order = np.argsort(k, kind="stable")
        k, v = k[order], v[order]
        if len(k) > 1:
            dup = np.zeros(len(k), dtype=bool)
            same = k[1:] == k[:-1]
            dup[1:] |= same
            dup[:-1] |= same
            collisions = len(np.unique(k[dup])) if dup.any() else 0
            k, v = k[~dup], v[~dup]
        else:
            collisions = 0
        return cls(np.ascontiguousarray(k), np.ascontiguousarray(v), collisions)

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
    if index is None:
        found = np.zeros(len(q), dtype=bool)
        prev = np.zeros(len(q), dtype=np.uint64)
    else:
        found, prev = index.lookup(q)
    cur = hash_keys(hashes)
    out = []
    for f, p, c, h in zip(found, prev, cur, hashes, strict=True):
        if h is None:
            out.append("")
        elif not f:
            out.append("new")
        else:
            out.append("unchanged" if p == c else "changed")
    return out, found


def read_key_columns(files: Sequence[str], key: str, *, endpoint: str | None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(id keys, hash keys, rows)`` of Parquet files' ``key`` and ``content_hash`` columns, streamed by row
    group (only those two columns are read).

    Raises:
        StorageError: a file is missing or unreadable.
    """
    from vlm2rec_ray import storage

    ks: list[np.ndarray] = []
    vs: list[np.ndarray] = []
    rows = 0
    for f in files:
        with storage.open_parquet(f, endpoint=endpoint) as pf:
            for batch in pf.iter_batches(columns=[key, "content_hash"], batch_size=65_536):
                rows += batch.num_rows
                ks.append(id_keys(batch.column(key).to_pylist()))
                vs.append(hash_keys(batch.column("content_hash").to_pylist()))
    if not ks:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), 0
    return np.concatenate(ks), np.concatenate(vs), rows


def build_index_from_files(files: Sequence[str], key: str, *, endpoint: str | None) -> KeyIndex:
    """A :class:`KeyIndex` of Parquet files (run this in a Ray task: the arrays go to the object store)."""
    k, v, _ = read_key_columns(files, key, endpoint=endpoint)
    return KeyIndex.build(k, v)


_RESOLVED: dict[str, Any] = {}


def resolve_ref(holder: list[Any] | None) -> Any:
    """``ray.get`` of an ``[ObjectRef]`` passed through ``fn_kwargs`` (wrapped in a list so Ray Data does not
    try to resolve it), cached per worker process so each task reads the shared copy once."""
    if not holder:
        return None
    ref = holder[0]
    if not hasattr(ref, "hex"):
        return ref  # a plain value (tests call the UDFs without Ray)
    key = ref.hex()
    if key not in _RESOLVED:
        import ray

        if len(_RESOLVED) > 8:
            _RESOLVED.clear()
        _RESOLVED[key] = ray.get(ref)
    return _RESOLVED[key]


__all__ = [
    "HASH_SCHEME",
    "KeyIndex",
    "build_index_from_files",
    "classify",
    "content_hash",
    "encoder_fingerprint",
    "hash_keys",
    "id_keys",
    "image_digest",
    "image_key",
    "read_key_columns",
    "resolve_ref",
    "text_key",
]
