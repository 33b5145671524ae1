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

KEY_COLUMN = {"items": "item_id", "sequences": "user_id"}
EMBEDDING_COLUMNS = ("emb_text", "emb_image", "emb_fused")
EMBEDDED_AT_TYPE = pa.timestamp("us", tz="UTC")

# Image reasons (data/images.py, incl. empty_title) plus the embed job's: a null/blank item_id (user_id), a
# sequence without history items, a history item not in the catalog, the model raised on the row.
ERROR_REASONS = (*IMAGE_REASONS, "empty_item_id", "empty_history", "unknown_item", "encode_error")


def embedding_type(dim: int) -> pa.DataType:
    """``fixed_size_list<element: float32 not null>[dim]`` (the child is named as Parquet round-trips it)."""
    if dim < 1:
        raise ValueError(f"embedding dim must be >= 1, got {dim}")
    return pa.list_(pa.field("element", pa.float32(), nullable=False), dim)


def _list(t: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("element", t))  # named as Parquet names it: staged rows read back unchanged


HISTORY_TYPE = _list(pa.string())


def _key_fields(kind: str, nullable: bool) -> list[pa.Field]:
    if kind not in KEY_COLUMN:
        raise ValueError(f"unknown embedding kind {kind!r}; expected one of {tuple(KEY_COLUMN)}")
    history = [pa.field("history", HISTORY_TYPE, nullable=nullable)] if kind == "sequences" else []
    return [pa.field(KEY_COLUMN[kind], pa.string(), nullable=nullable), *history]


def output_schema(kind: str, dim: int) -> pa.Schema:
    """The exact schema of ``kind``'s (``items`` / ``sequences``) embedding files for embedding size ``dim``."""
    return pa.schema([*_key_fields(kind, False),
                      *(pa.field(c, embedding_type(dim), nullable=False) for c in EMBEDDING_COLUMNS),
                      *(pa.field(c, pa.string(), nullable=False) for c in ("content_hash", "model_id", "model_version")),
                      pa.field("embedded_at", EMBEDDED_AT_TYPE, nullable=False)])


def errors_schema(kind: str) -> pa.Schema:
    """The errors table's schema (sequences: ``item_id`` is the history item that failed, None for row reasons)."""
    return pa.schema([*_key_fields(kind, True), *([pa.field("item_id", pa.string())] if kind == "sequences" else []),
                      pa.field("title", pa.string()), pa.field("image_uri", pa.string()),
                      pa.field("reason", pa.string(), nullable=False), pa.field("detail", pa.string()),
                      pa.field("model_version", pa.string(), nullable=False),
                      pa.field("failed_at", EMBEDDED_AT_TYPE, nullable=False)])


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


# --- the row contract between the stages --------------------------------------------------------------------
#
# Every stage of the pipeline (prepare, model, carry-over, the incremental scan) hands on rows of this one
# schema, built by column name with :func:`rows`; a stage fills the columns it knows and the rest are null.
#   status  "encode" (prepared for the model) | "encoded" | "carried" | "failed" (an errors-table row)
#           in the incremental scan: "new" | "changed" | "unchanged" | "failed"
#   change  the scan's verdict carried into pass 2 ("new" | "changed"; "unchanged" for carried rows; "" else)
#   title, image_uri   items: the item's (the scan keeps them for pass 2); failed rows: the failing item's
OK_STATUSES = ("encoded", "carried")

_ROW_COLUMNS: tuple[tuple[str, pa.DataType | None], ...] = (
    ("key", pa.string()), ("history", HISTORY_TYPE),
    ("titles", HISTORY_TYPE), ("pixels", _list(pa.binary())),  # pixels: raw RGB, row-major (H, W, 3)
    ("widths", _list(pa.int32())), ("heights", _list(pa.int32())),
    ("text_key", pa.string()), ("image_key", pa.string()),
    ("emb_text", None), ("emb_image", None), ("emb_fused", None), ("embedded_at", EMBEDDED_AT_TYPE),
    ("texts_encoded", pa.int32()), ("images_encoded", pa.int32()),  # forwards the row caused (0: reused)
    ("content_hash", pa.string()), ("status", pa.string()), ("change", pa.string()), ("in_prev", pa.bool_()),
    ("reason", pa.string()), ("detail", pa.string()), ("title", pa.string()), ("image_uri", pa.string()),
    ("failed_item_id", pa.string()),  # sequences: the history item that failed
)


def row_schema(dim: int) -> pa.Schema:
    """The schema of the rows every stage hands on (embedding columns of size ``dim``)."""
    return pa.schema([(name, typ or embedding_type(dim)) for name, typ in _ROW_COLUMNS])


def rows(dim: int, num_rows: int, **columns: object) -> pa.Table:
    """A table of :func:`row_schema` from columns given by name (lists or Arrow arrays, cast to the contract's
    types); every other column is null.

    Raises:
        KeyError: a column the contract does not have.
    """
    schema = row_schema(dim)
    unknown = set(columns) - set(schema.names)
    if unknown:
        raise KeyError(f"columns {sorted(unknown)} are not in the row contract (embed/schema.py)")
    arrays = []
    for f in schema:
        v = columns.get(f.name)
        if v is None:
            arrays.append(pa.nulls(num_rows, f.type))
        elif isinstance(v, (pa.Array, pa.ChunkedArray)):
            arrays.append(v if v.type == f.type else v.cast(f.type))
        else:
            arrays.append(pa.array(v, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _as_schema(batch: pa.Table, schema: pa.Schema, **columns: pa.Array | pa.ChunkedArray) -> pa.Table:
    """``schema``'s columns: ``columns`` by name, the rest from ``batch``."""
    arrays = [columns[f.name] if f.name in columns else batch.column(f.name) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def output_table(batch: pa.Table, *, kind: str, dim: int, model_id: str, model_version: str) -> pa.Table:
    """Rows with an embedding (status ``encoded`` / ``carried``) as the exact output schema."""
    if batch.column("emb_fused").null_count or batch.column("content_hash").null_count:
        raise AssertionError("an ok row has no embedding or content hash")
    n = batch.num_rows
    return _as_schema(batch, output_schema(kind, dim), **{KEY_COLUMN[kind]: batch.column("key")},
                      model_id=pa.array([model_id] * n, pa.string()),
                      model_version=pa.array([model_version] * n, pa.string()))


def errors_table(batch: pa.Table, *, kind: str, model_version: str, failed_at: object) -> pa.Table:
    """Failed rows as the errors table (sequences: ``item_id`` is the history item that failed)."""
    n = batch.num_rows
    extra = {"item_id": batch.column("failed_item_id")} if kind == "sequences" else {}
    return _as_schema(batch, errors_schema(kind), **{KEY_COLUMN[kind]: batch.column("key")}, **extra,
                      model_version=pa.array([model_version] * n, pa.string()),
                      failed_at=pa.array([failed_at] * n, EMBEDDED_AT_TYPE))


__all__ = ["EMBEDDED_AT_TYPE", "EMBEDDING_COLUMNS", "ERROR_REASONS", "HISTORY_TYPE", "KEY_COLUMN", "OK_STATUSES",
           "embedding_type", "errors_schema", "errors_table", "fixed_size_list", "output_schema", "output_table",
           "row_schema", "rows", "schema_to_json"]
