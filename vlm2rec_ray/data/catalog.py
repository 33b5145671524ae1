"""Read and write prepared datasets: catalog, interactions, leave-one-out splits and stats.

Readers accept a local path or an ``s3://`` URI (endpoint from the argument or ``AWS_ENDPOINT_URL``), in
Parquet or JSON lines (``.jsonl``/``.json``, optionally ``.gz``). Every table is cast to its schema in
:mod:`vlm2rec_ray.data.schemas` and validated; a bad file raises ``ValueError`` naming the column, the row
and the value. Rows that are usable but incomplete (empty title, no image) are kept and counted: the embed
pipeline routes them to its errors table with a reason.

Layout of a prepared dataset (local dir or s3:// prefix)::

    catalog.parquet  interactions.parquet  splits/{train,valid,test}.parquet  images/...  stats.json
"""

from __future__ import annotations

import gzip
import json
import logging
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.json as pajson

from vlm2rec_ray import storage
from vlm2rec_ray.data.schemas import (
    CATALOG_REQUIRED,
    CATALOG_SCHEMA,
    INTERACTIONS_SCHEMA,
    SPLIT_SCHEMA,
    SPLITS,
    conform_catalog,
    conform_interactions,
    conform_split,
    validate_catalog,
    validate_interactions,
    validate_split,
)

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.parquet"
INTERACTIONS_FILE = "interactions.parquet"
STATS_FILE = "stats.json"
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")


def _is_json(uri: str) -> bool:
    return uri.lower().endswith(JSON_SUFFIXES)


def _locate_json_error(data: bytes, uri: str, schema: pa.Schema, err: Exception) -> ValueError:
    """pyarrow's JSON error names no value; re-scan in Python to name the row, column and value."""
    for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return ValueError(f"{uri} line {i + 1}: not valid JSON ({e.msg}): {line[:120]!r}")
        if not isinstance(obj, dict):
            return ValueError(f"{uri} line {i + 1}: expected a JSON object, got {type(obj).__name__}")
        for f in schema:
            v = obj.get(f.name)
            if v is None:
                continue
            want_str = pa.types.is_string(f.type)
            if (want_str and not isinstance(v, str)) or (
                pa.types.is_integer(f.type) and (isinstance(v, bool) or not isinstance(v, int))
            ):
                want = "string" if want_str else str(f.type)
                return ValueError(
                    f"{uri} row {i}: column {f.name!r} expected {want}, got {type(v).__name__} value {v!r}"
                )
    return ValueError(f"{uri}: could not read JSON lines: {err}")


def _read_json_lines(uri: str, schema: pa.Schema, required: tuple[str, ...], endpoint: str | None) -> pa.Table:
    data = storage.read_bytes(uri, endpoint=endpoint)
    if uri.lower().endswith(".gz"):
        data = gzip.decompress(data)
    if not data.strip():
        return schema.empty_table()
    opts = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        table = pajson.read_json(pa.BufferReader(data), parse_options=opts)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise _locate_json_error(data, uri, schema, e) from e
    # The explicit schema fills absent keys with nulls; a required key absent from every line is missing.
    absent = [c for c in required if table.column(c).null_count == table.num_rows]
    if absent:
        raise ValueError(
            f"{uri} is missing required column(s) {absent} (absent or null in all {table.num_rows} rows); "
            f"expected keys {schema.names}"
        )
    return table


def _read_table(uri: str, schema: pa.Schema, required: tuple[str, ...], endpoint: str | None) -> pa.Table:
    if _is_json(uri):
        return _read_json_lines(uri, schema, required, endpoint)
    try:
        return storage.read_parquet(uri, endpoint=endpoint)
    except storage.StorageError as e:
        if e.reason == "missing":
            raise FileNotFoundError(f"{uri} not found: {e}") from e
        raise


def _table_uri(uri: str, default_file: str, endpoint: str | None) -> str:
    """Accept a dataset directory/prefix for ``uri`` and pick its standard file."""
    if uri.lower().endswith((".parquet", *JSON_SUFFIXES)):
        return uri
    candidate = storage.join(uri, default_file)
    return candidate if storage.exists(candidate, endpoint=endpoint) else uri


def read_catalog(uri: str, *, endpoint: str | None = None) -> pa.Table:
    """Read and validate a catalog (Parquet or JSON lines, local or s3://; a dataset dir picks
    ``catalog.parquet``).

    Returns:
        A table with exactly :data:`CATALOG_SCHEMA` (optional columns filled with nulls).

    Raises:
        ValueError: missing column, wrong type, null/duplicate ``item_id``; the message names column, row
            and value.
        FileNotFoundError: nothing at ``uri``.
    """
    uri = _table_uri(uri, CATALOG_FILE, endpoint)
    table = conform_catalog(_read_table(uri, CATALOG_SCHEMA, CATALOG_REQUIRED, endpoint))
    report = validate_catalog(table)
    report.raise_if_errors()
    if report.warnings:
        log.warning("catalog %s: %d rows kept with problems %s", uri, table.num_rows, dict(report.counts))
    return table


def read_interactions(uri: str, *, endpoint: str | None = None, catalog: pa.Table | None = None) -> pa.Table:
    """Read and validate interactions; with ``catalog``, interactions on items not in it are an error
    that counts them and names the first rows (never silently dropped).

    Returns:
        A table with exactly :data:`INTERACTIONS_SCHEMA`.
    """
    uri = _table_uri(uri, INTERACTIONS_FILE, endpoint)
    table = conform_interactions(_read_table(uri, INTERACTIONS_SCHEMA, tuple(INTERACTIONS_SCHEMA.names), endpoint))
    known = set(catalog.column("item_id").to_pylist()) if catalog is not None else None
    validate_interactions(table, known).raise_if_errors()
    return table


def read_split(dataset_uri: str, split: str, *, endpoint: str | None = None) -> pa.Table:
    """Read ``<dataset>/splits/<split>.parquet`` (``split`` in train/valid/test) with :data:`SPLIT_SCHEMA`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    uri = storage.join(dataset_uri, "splits", f"{split}.parquet")
    table = conform_split(_read_table(uri, SPLIT_SCHEMA, tuple(SPLIT_SCHEMA.names), endpoint))
    validate_split(table).raise_if_errors()
    return table


def read_stats(dataset_uri: str, *, endpoint: str | None = None) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(dataset_uri, STATS_FILE), endpoint=endpoint))


def catalog_dir(catalog_uri: str) -> str:
    """The directory or prefix a catalog file lies in (the catalog itself when it is a dataset dir or prefix)."""
    c = catalog_uri.rstrip("/")
    tail = c.rsplit("/", 1)[-1]
    if tail.lower().endswith((".parquet", *JSON_SUFFIXES)):
        return c.rsplit("/", 1)[0] if "/" in c else "."
    return c


def resolve_image_uri(image_uri: str, catalog_uri: str) -> str:
    """Make a catalog's ``image_uri`` absolute.

    URIs with a scheme (``s3://``, ``file://``, ``http(s)://``) and absolute paths are returned unchanged; a relative path is
    taken relative to the directory holding the catalog file (``catalog_uri`` may be that file or the
    dataset directory/prefix). ``..`` segments are kept, so :func:`~vlm2rec_ray.data.images.fetch_image_bytes`
    can report the row as ``outside_root`` instead of reading outside the dataset.
    """
    u = image_uri.strip()
    if "://" in u or u.startswith("/"):
        return u
    base = catalog_dir(catalog_uri)
    if storage.is_remote(base):
        return storage.join(base, u)
    return posixpath.join(str(storage.resolve_local(base)), u)


def write_prepared(
    out_uri: str,
    *,
    catalog: pa.Table,
    interactions: pa.Table,
    splits: dict[str, pa.Table],
    stats: dict[str, Any],
    endpoint: str | None = None,
) -> None:
    """Write a prepared dataset (validated first, so a bad table is never published). ``stats.json`` is
    written last: a reader that finds it knows the other files are complete."""
    catalog = conform_catalog(catalog)
    validate_catalog(catalog).raise_if_errors()
    interactions = conform_interactions(interactions)
    validate_interactions(interactions, set(catalog.column("item_id").to_pylist())).raise_if_errors()
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise ValueError(f"splits {missing} missing; expected {list(SPLITS)}")
    stats_uri = storage.join(out_uri, STATS_FILE)
    # On overwrite, remove the completion marker first so a reader never mixes old and new files.
    storage.delete(stats_uri, endpoint=endpoint)
    storage.write_parquet(catalog, storage.join(out_uri, CATALOG_FILE), endpoint=endpoint)
    storage.write_parquet(interactions, storage.join(out_uri, INTERACTIONS_FILE), endpoint=endpoint)
    for name in SPLITS:
        table = conform_split(splits[name])
        validate_split(table).raise_if_errors()
        storage.write_parquet(table, storage.join(out_uri, "splits", f"{name}.parquet"), endpoint=endpoint)
    storage.write_text(stats_uri, json.dumps(stats, indent=2, sort_keys=True) + "\n", endpoint=endpoint)
