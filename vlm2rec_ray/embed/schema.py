"""The Parquet schemas of embedding snapshots and their errors tables (the contract warehouses read).

Item embeddings (``<output_uri>/items/dt=<dt>/run=<run_id>/part-*.parquet``)::

    item_id        string not null
    emb_text       fixed_size_list<element: float not null>[d] not null   e_T: the item through P_T (index 0)
    emb_image      fixed_size_list<element: float not null>[d] not null   e_V: the item through P_V (index 0)
    emb_fused      fixed_size_list<element: float not null>[d] not null   e_T + e_V (external fusion, paper 2.3)
    content_hash   string not null        sha256 hex of (encoder fingerprint, title, image bytes)
    model_id       string not null        the backbone reference (hub id, dir or s3:// prefix)
    model_version  string not null        the configured weights version
    embedded_at    timestamp[us, UTC] not null   when this row's embedding was computed (kept on carry-over)

Sequence embeddings (``<output_uri>/sequences/...``) replace ``item_id`` by ``user_id`` and ``history``
(``list<string>``: the item ids actually encoded, chronological, the last ``max_history``).

Errors tables (``run=<run_id>/_errors/part-*.parquet``, ignored by pyarrow's dataset discovery because of
the leading underscore) hold one row per failed input row with a ``reason`` from :data:`ERROR_REASONS`.
"""

from __future__ import annotations

import pyarrow as pa

from vlm2rec_ray.data.images import REASONS as IMAGE_REASONS

KINDS = ("items", "sequences")
KEY_COLUMN = {"items": "item_id", "sequences": "user_id"}
EMBEDDING_COLUMNS = ("emb_text", "emb_image", "emb_fused")
ITEM_COLUMNS = ("item_id", *EMBEDDING_COLUMNS, "content_hash", "model_id", "model_version", "embedded_at")
SEQUENCE_COLUMNS = ("user_id", "history", *EMBEDDING_COLUMNS, "content_hash", "model_id", "model_version",
                    "embedded_at")
EMBEDDED_AT_TYPE = pa.timestamp("us", tz="UTC")

# Image reasons (data/images.py, incl. empty_title) plus row-level ones of the embed job.
ERROR_REASONS = (
    *IMAGE_REASONS,
    "empty_item_id",  # null/blank item_id (items) or user_id (sequences)
    "empty_history",  # a sequence row with no history items
    "unknown_item",  # a history item that is not in the catalog
    "encode_error",  # the model raised on this row (message in detail)
)


def embedding_type(dim: int) -> pa.DataType:
    """``fixed_size_list<element: float32 not null>[dim]`` (the child is named as Parquet round-trips it)."""
    if dim < 1:
        raise ValueError(f"embedding dim must be >= 1, got {dim}")
    return pa.list_(pa.field("element", pa.float32(), nullable=False), dim)


def _tail(dim: int) -> list[pa.Field]:
    emb = embedding_type(dim)
    return [
        *(pa.field(c, emb, nullable=False) for c in EMBEDDING_COLUMNS),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("embedded_at", EMBEDDED_AT_TYPE, nullable=False),
    ]


HISTORY_TYPE = pa.list_(pa.field("element", pa.string()))


def item_schema(dim: int) -> pa.Schema:
    """The exact schema of item embedding files for embedding size ``dim``."""
    return pa.schema([pa.field("item_id", pa.string(), nullable=False), *_tail(dim)])


def sequence_schema(dim: int) -> pa.Schema:
    """The exact schema of sequence embedding files for embedding size ``dim``."""
    return pa.schema([pa.field("user_id", pa.string(), nullable=False),
                      pa.field("history", HISTORY_TYPE, nullable=False), *_tail(dim)])


def output_schema(kind: str, dim: int) -> pa.Schema:
    if kind not in KINDS:
        raise ValueError(f"unknown embedding kind {kind!r}; expected one of {KINDS}")
    return item_schema(dim) if kind == "items" else sequence_schema(dim)


ITEM_ERRORS_SCHEMA = pa.schema([
    pa.field("item_id", pa.string()),
    pa.field("title", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("failed_at", EMBEDDED_AT_TYPE, nullable=False),
])

SEQUENCE_ERRORS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),
    pa.field("history", HISTORY_TYPE),
    pa.field("item_id", pa.string()),  # the history item that failed (None for row-level reasons)
    pa.field("title", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("failed_at", EMBEDDED_AT_TYPE, nullable=False),
])


def errors_schema(kind: str) -> pa.Schema:
    if kind not in KINDS:
        raise ValueError(f"unknown embedding kind {kind!r}; expected one of {KINDS}")
    return ITEM_ERRORS_SCHEMA if kind == "items" else SEQUENCE_ERRORS_SCHEMA


def schema_to_json(schema: pa.Schema) -> list[dict[str, object]]:
    """``[{"name", "type", "nullable"}]`` for the manifest (readable without pyarrow)."""
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


def fixed_size_list(matrix: object, dim: int) -> pa.FixedSizeListArray:
    """A ``[N, dim]`` float array as ``fixed_size_list<float32, dim>`` (no copy for contiguous float32)."""
    import numpy as np

    arr = np.ascontiguousarray(matrix, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"expected a [N, {dim}] embedding matrix, got shape {arr.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1), pa.float32()), type=embedding_type(dim))


__all__ = [
    "EMBEDDED_AT_TYPE",
    "EMBEDDING_COLUMNS",
    "ERROR_REASONS",
    "HISTORY_TYPE",
    "ITEM_COLUMNS",
    "ITEM_ERRORS_SCHEMA",
    "KEY_COLUMN",
    "KINDS",
    "SEQUENCE_COLUMNS",
    "SEQUENCE_ERRORS_SCHEMA",
    "embedding_type",
    "errors_schema",
    "fixed_size_list",
    "item_schema",
    "output_schema",
    "schema_to_json",
    "sequence_schema",
]
