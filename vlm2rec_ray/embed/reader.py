"""Ray Data inputs of the embed job that count their S3 retries in-band.

``ray.data.read_parquet`` / ``read_json`` read through pyarrow's S3 client, whose retries nobody can see.
:func:`read_files` reads the same files with :mod:`vlm2rec_ray.storage`'s boto3 client instead
(:func:`~vlm2rec_ray.storage.open_input_file`, ranged GETs) and reports the retries of each read in a
``storage_retries`` int32 column: the read's retry count on the first row it yields, 0 on every other row.
The stages downstream keep that column (or add it up into their own, see ``preprocess``) and the snapshot
sink sums it, so the run's ``storage_retries`` covers its reads too.

Pieces are planned on the driver: one per non-empty Parquet row group (footers read there, retries counted
by the driver), one per JSON file. ``ray.data.from_items`` makes one block per piece and a ``map_batches``
task reads it (column projection, at most :data:`READ_BATCH_ROWS` rows per yielded table).
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from vlm2rec_ray import storage

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

RETRIES_COLUMN = "storage_retries"
READ_BATCH_ROWS = 8192  # rows per table a read yields (a snapshot row is ~3 x 4 x d bytes)
_FOOTER_THREADS = 16


def with_retries(table: pa.Table, retries: int) -> pa.Table:
    """``table`` with a ``storage_retries`` int32 column holding ``retries`` on the first row, 0 elsewhere
    (an existing column of that name is replaced)."""
    n = table.num_rows
    col = pa.array([retries] + [0] * (n - 1) if n else [], pa.int32())
    if RETRIES_COLUMN in table.column_names:
        return table.set_column(table.column_names.index(RETRIES_COLUMN), RETRIES_COLUMN, col)
    return table.append_column(RETRIES_COLUMN, col)


def retries_in(table: pa.Table) -> int:
    """The sum of ``table``'s ``storage_retries`` column (0 without one)."""
    if RETRIES_COLUMN not in table.column_names or table.num_rows == 0:
        return 0
    return int(pc.sum(table.column(RETRIES_COLUMN)).as_py() or 0)


def parquet_pieces(files: list[str], *, endpoint: str | None) -> list[dict[str, Any]]:
    """``[{"uri", "row_group", "rows"}]`` for every row group with rows, in file order (reads the footers).

    Raises:
        StorageError: a file is missing or unreadable.
    """
    import pyarrow.parquet as pq

    def one(f: str) -> list[dict[str, Any]]:
        with storage.open_input_file(f, endpoint=endpoint) as fh:
            md = pq.ParquetFile(fh).metadata
        return [{"uri": f, "row_group": i, "rows": md.row_group(i).num_rows} for i in range(md.num_row_groups)
                if md.row_group(i).num_rows > 0]

    if len(files) <= 1:
        per_file = [one(f) for f in files]
    else:
        with ThreadPoolExecutor(min(_FOOTER_THREADS, len(files)), thread_name_prefix="vlm2rec-footer") as pool:
            per_file = list(pool.map(one, files))
    return [p for ps in per_file for p in ps]


def parquet_schema(uri: str, *, endpoint: str | None, columns: list[str] | None = None) -> pa.Schema:
    """The Arrow schema of a Parquet file (only ``columns`` when given)."""
    import pyarrow.parquet as pq

    with storage.open_input_file(uri, endpoint=endpoint) as fh:
        schema = pq.ParquetFile(fh).schema_arrow
    return pa.schema([schema.field(c) for c in columns]) if columns else schema


def _parquet_tables(uri: str, row_group: int, endpoint: str | None, columns: list[str] | None) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    with storage.open_input_file(uri, endpoint=endpoint) as fh:
        pf = pq.ParquetFile(fh)
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[row_group], columns=columns):
            yield pa.Table.from_batches([batch])


def _json_tables(uri: str, endpoint: str | None) -> Iterator[pa.Table]:
    table = read_json_file(uri, endpoint=endpoint)
    if table is not None:
        yield table


def read_json_file(uri: str, *, endpoint: str | None) -> pa.Table | None:
    """One JSON file (JSON lines, or one array/object; ``.gz`` decompressed) as a table with inferred types,
    like ``ray.data.read_json``; ``None`` for a blank file."""
    import pyarrow.json as pajson

    data = storage.read_bytes(uri, endpoint=endpoint)
    if uri.lower().endswith(".gz"):
        data = gzip.decompress(data)
    if not data.strip():
        return None
    try:  # one block as large as the file: no record straddles two blocks
        return pajson.read_json(pa.BufferReader(data), read_options=pajson.ReadOptions(
            block_size=min(max(len(data) + 1, 1 << 20), (1 << 31) - 1)))
    except pa.ArrowInvalid:
        parsed = json.loads(data)
        return pa.Table.from_pylist(parsed if isinstance(parsed, list) else [parsed])


def read_pieces(batch: pa.Table, *, fmt: str, endpoint: str | None, columns: list[str] | None,
                include_paths: bool) -> Iterator[pa.Table]:
    """``map_batches`` UDF over piece rows (``uri``, ``row_group``): yields the pieces' rows, plus ``path``
    (the file's URI) with ``include_paths``, plus ``storage_retries``.

    A yielded table is held back until the next one is read, so the last one also carries the retries of
    everything read after it. A piece yields nothing only if it is a JSON file without rows; retries of its
    one GET have no row to ride on and are logged instead.
    """
    for uri, row_group in zip(batch.column("uri").to_pylist(), batch.column("row_group").to_pylist(), strict=True):
        tables = (_parquet_tables(uri, int(row_group), endpoint, columns) if fmt == "parquet"
                  else _json_tables(uri, endpoint))
        pending: pa.Table | None = None
        retries = 0
        while True:
            before = storage.retry_attempts()  # only our own reads: downstream stages run between yields
            try:
                table = next(tables)
            except StopIteration:
                retries += storage.retry_attempts() - before
                break
            retries += storage.retry_attempts() - before
            if pending is not None:
                yield with_retries(pending, retries)
                retries = 0
            pending = table.append_column("path", pa.array([uri] * table.num_rows, pa.string())) if include_paths \
                else table
        if pending is not None:
            yield with_retries(pending, retries)
        elif retries:
            log.warning("%s has no rows; the %d S3 retries of reading it are not in storage_retries", uri, retries)


def read_files(files: list[str], fmt: str, *, endpoint: str | None, columns: list[str] | None = None,
               include_paths: bool = False) -> ray.data.Dataset:
    """A dataset of the rows of Parquet (``fmt='parquet'``, projected to ``columns``) or JSON files, with a
    ``storage_retries`` column (and ``path`` with ``include_paths``); see the module doc.

    Raises:
        StorageError: a Parquet file is missing or unreadable (its footer is read here).
        ValueError: no files.
    """
    import ray.data

    if not files:
        raise ValueError("read_files needs at least one file")
    if fmt == "parquet":
        pieces = [{"uri": p["uri"], "row_group": p["row_group"]} for p in parquet_pieces(files, endpoint=endpoint)]
        if not pieces:  # only empty files: their schema, no rows
            schema = parquet_schema(files[0], endpoint=endpoint, columns=columns)
            if include_paths:
                schema = schema.append(pa.field("path", pa.string()))
            return ray.data.from_arrow(with_retries(schema.empty_table(), 0))
    else:
        pieces = [{"uri": f, "row_group": -1} for f in files]
    return ray.data.from_items(pieces, override_num_blocks=len(pieces)).map_batches(
        read_pieces, fn_kwargs={"fmt": fmt, "endpoint": endpoint, "columns": columns, "include_paths": include_paths},
        batch_size=1, batch_format="pyarrow")


__all__ = [
    "READ_BATCH_ROWS",
    "RETRIES_COLUMN",
    "parquet_pieces",
    "parquet_schema",
    "read_files",
    "read_json_file",
    "read_pieces",
    "retries_in",
    "with_retries",
]
