"""Arrow schemas of the prepared dataset, and validation that names the offending column, row and value.

A prepared dataset (see ``.agents/CONTRACTS.md``) is ``catalog.parquet``, ``interactions.parquet`` and
``splits/{train,valid,test}.parquet``. The validators here never drop a row: they return a
:class:`ValidationReport` that lists every problem with its column, row and value and counts what a
pipeline later routes to an errors table (empty titles, missing image URIs, interactions on unknown items).
``conform_*`` cast a table to the exact schema (e.g. JSONL ``int`` timestamps to ``int64``) or raise a
``ValueError`` that says which column, row and value could not be cast and how to fix it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string()),
        pa.field("title", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("description", pa.string()),
        pa.field("category", pa.string()),
    ]
)
CATALOG_REQUIRED = ("item_id", "title", "image_uri")  # description and category are optional

INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("timestamp", pa.int64()),  # unix seconds
    ]
)

SPLIT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("history", pa.list_(pa.string())),  # chronological, last <= max_history
        pa.field("target", pa.string()),
    ]
)
SPLITS = ("train", "valid", "test")
_MAX_LISTED = 5  # problems of one kind listed in a message; the rest are counted


@dataclass(frozen=True)
class Issue:
    """One problem in a table: which column, which row (0-based, None for the whole column), which value."""

    table: str
    column: str
    row: int | None
    value: Any
    message: str

    def __str__(self) -> str:
        where = f"{self.table}.{self.column}" + (f" row {self.row}" if self.row is not None else "")
        return f"{where}: {self.message} (value {self.value!r})"


@dataclass
class ValidationReport:
    """What validation found. ``errors`` make a table unusable; ``warnings`` are rows a pipeline routes to
    its errors table with a reason; ``counts`` holds per-kind totals (e.g. ``unknown_item``: 12)."""

    table: str
    rows: int = 0
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, column: str, row: int | None, value: Any, message: str, kind: str) -> None:
        self.counts[kind] += 1
        if sum(1 for e in self.errors if e.message == message) < _MAX_LISTED:
            self.errors.append(Issue(self.table, column, row, value, message))

    def warn(self, column: str, row: int | None, value: Any, message: str, kind: str) -> None:
        self.counts[kind] += 1
        if sum(1 for w in self.warnings if w.message == message) < _MAX_LISTED:
            self.warnings.append(Issue(self.table, column, row, value, message))

    def summary(self) -> str:
        lines = [f"{self.table}: {self.rows} rows, {len(self.errors)} error(s) listed, counts {dict(self.counts)}"]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def raise_if_errors(self) -> None:
        """Raise ``ValueError`` listing every error (column, row, value) if there is any."""
        if self.errors:
            body = "\n".join(f"  - {e}" for e in self.errors)
            raise ValueError(
                f"invalid {self.table} ({self.rows} rows; counts {dict(self.counts)}):\n{body}"
            )


def _first_rows(mask: pa.ChunkedArray | pa.Array, limit: int = _MAX_LISTED) -> list[int]:
    idx = pc.indices_nonzero(pc.fill_null(mask, False))
    return [int(i) for i in idx.slice(0, limit).to_pylist()]


def _cast_column(table_name: str, name: str, col: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    """Cast one column, allowing only lossless conversions; otherwise name the first bad row and value."""
    src = col.type
    if src == target:
        return col
    if pa.types.is_null(src):
        return pa.chunked_array([pa.nulls(len(col), target)]) if len(col) else pa.chunked_array([], target)
    if pa.types.is_string(target):
        if pa.types.is_large_string(src) or pa.types.is_string_view(src) or pa.types.is_dictionary(src):
            return col.cast(target)
        values = col.to_pylist()
        row = next((i for i, v in enumerate(values) if v is not None), None)
        first = values[row] if row is not None else None
        raise ValueError(
            f"{table_name}.{name}: expected string, got {src} (e.g. row {row} value {first!r}); "
            f"write {name} as strings (ids are opaque strings, e.g. '{first}')"
        )
    if pa.types.is_int64(target):
        if pa.types.is_integer(src):
            return col.cast(target)
        if pa.types.is_timestamp(src):
            return pc.cast(col, pa.timestamp("s", tz=src.tz), safe=False).cast(pa.int64())
        if pa.types.is_floating(src):
            bad = pc.not_equal(pc.floor(col), col)
            rows = _first_rows(bad, 1)
            if rows:
                raise ValueError(
                    f"{table_name}.{name} row {rows[0]}: expected an integer (unix seconds), got "
                    f"{col[rows[0]].as_py()!r}; round or fix the value"
                )
            return col.cast(target)
        if pa.types.is_string(src) or pa.types.is_large_string(src):
            values = col.to_pylist()
            for i, v in enumerate(values):
                if v is not None and not v.strip().lstrip("-").isdigit():
                    raise ValueError(
                        f"{table_name}.{name} row {i}: expected int64 unix seconds, got {v!r}; "
                        "write timestamps as integers"
                    )
            return pa.chunked_array([pa.array([None if v is None else int(v) for v in values], target)])
        raise ValueError(f"{table_name}.{name}: expected int64 unix seconds, got type {src}")
    if pa.types.is_list(target):
        if (pa.types.is_list(src) or pa.types.is_large_list(src)) and (
            pa.types.is_string(src.value_type) or pa.types.is_large_string(src.value_type)
        ):
            return col.cast(target)
        raise ValueError(f"{table_name}.{name}: expected list<string>, got {src}")
    raise AssertionError(f"unhandled target type {target}")


def _conform(table: pa.Table, schema: pa.Schema, name: str, required: tuple[str, ...]) -> pa.Table:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{name} is missing required column(s) {missing}; it has {table.column_names}. "
            f"Expected columns: {schema.names}"
        )
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(_cast_column(name, f.name, table.column(f.name), f.type))
        else:
            columns.append(pa.chunked_array([pa.nulls(table.num_rows, f.type)]))
    # Fields are nullable in Arrow terms; which ones must be filled is checked by the validators.
    return pa.Table.from_arrays(columns, schema=schema)


def conform_catalog(table: pa.Table) -> pa.Table:
    """Cast to :data:`CATALOG_SCHEMA` (optional columns added as nulls, extra columns dropped)."""
    return _conform(table, CATALOG_SCHEMA, "catalog", CATALOG_REQUIRED)


def conform_interactions(table: pa.Table) -> pa.Table:
    return _conform(table, INTERACTIONS_SCHEMA, "interactions", tuple(INTERACTIONS_SCHEMA.names))


def conform_split(table: pa.Table) -> pa.Table:
    return _conform(table, SPLIT_SCHEMA, "split", tuple(SPLIT_SCHEMA.names))


def _check_not_null(report: ValidationReport, table: pa.Table, column: str, *, empty_too: bool) -> None:
    col = table.column(column)
    bad = pc.is_null(col)
    if empty_too and pa.types.is_string(col.type):
        bad = pc.or_(bad, pc.equal(pc.utf8_trim_whitespace(pc.fill_null(col, "")), ""))
    n = int(pc.sum(bad).as_py() or 0)
    if n:
        for r in _first_rows(bad):
            report.error(column, r, col[r].as_py(), f"{column} is null or empty ({n} rows)", f"null_{column}")
        report.counts[f"null_{column}"] += n - min(n, _MAX_LISTED)


def validate_catalog(table: pa.Table) -> ValidationReport:
    """Check a conformed catalog: ids present and unique (error); empty titles and missing image URIs are
    warnings (the embed pipeline routes those rows to its errors table with reason ``empty_title`` /
    ``missing``)."""
    report = ValidationReport("catalog", rows=table.num_rows)
    _check_not_null(report, table, "item_id", empty_too=True)
    ids = table.column("item_id").to_pylist()
    seen: dict[str, int] = {}
    for i, item in enumerate(ids):
        if item is None:
            continue
        if item in seen:
            report.error("item_id", i, item, f"duplicate item_id (first at row {seen[item]})", "duplicate_item_id")
        else:
            seen[item] = i
    for col, kind in (("title", "empty_title"), ("image_uri", "missing_image_uri")):
        values = table.column(col).to_pylist()
        for i, v in enumerate(values):
            if v is None or not str(v).strip():
                report.warn(col, i, v, f"{col} is empty; the row will be reported, not embedded", kind)
    return report


def validate_interactions(table: pa.Table, known_item_ids: set[str] | None = None) -> ValidationReport:
    """Check a conformed interactions table; with ``known_item_ids`` count (as errors) interactions whose
    item is not in the catalog, naming the first rows and values."""
    report = ValidationReport("interactions", rows=table.num_rows)
    for c in ("user_id", "item_id", "timestamp"):
        _check_not_null(report, table, c, empty_too=c != "timestamp")
    ts = table.column("timestamp")
    neg = pc.less(ts, 0)
    for r in _first_rows(neg):
        report.error("timestamp", r, ts[r].as_py(), "negative timestamp; expected unix seconds", "bad_timestamp")
    if known_item_ids is not None:
        unknown = pc.invert(pc.is_in(table.column("item_id"), value_set=pa.array(sorted(known_item_ids), pa.string())))
        n = int(pc.sum(unknown).as_py() or 0)
        if n:
            items = table.column("item_id")
            distinct = len(set(pc.filter(items, unknown).to_pylist()))
            msg = f"item_id not in the catalog ({n} interactions on {distinct} unknown items)"
            for r in _first_rows(unknown):
                report.error("item_id", r, items[r].as_py(), msg, "unknown_item")
            report.counts["unknown_item"] += n - min(n, _MAX_LISTED)
    return report


def validate_split(table: pa.Table, known_item_ids: set[str] | None = None, max_history: int | None = None) -> ValidationReport:
    """Check a conformed split: non-empty histories, optional history cap, targets/history in the catalog."""
    report = ValidationReport("split", rows=table.num_rows)
    for c in ("user_id", "target"):
        _check_not_null(report, table, c, empty_too=True)
    lengths = pc.list_value_length(table.column("history"))
    for r in _first_rows(pc.or_(pc.is_null(lengths), pc.equal(lengths, 0))):
        report.error("history", r, table.column("history")[r].as_py(), "empty history", "empty_history")
    if max_history is not None:
        for r in _first_rows(pc.greater(lengths, max_history)):
            report.error("history", r, lengths[r].as_py(), f"history longer than max_history={max_history}",
                         "long_history")
    if known_item_ids is not None:
        value_set = pa.array(sorted(known_item_ids), pa.string())
        for col, arr in (("target", table.column("target")), ("history", pc.list_flatten(table.column("history")))):
            unknown = pc.invert(pc.is_in(arr, value_set=value_set))
            for r in _first_rows(unknown):
                report.error(col, None if col == "history" else r, arr[r].as_py(), "item not in the catalog",
                             "unknown_item")
    return report
