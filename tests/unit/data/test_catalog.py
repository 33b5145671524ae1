"""Catalog/interactions/split readers: exact schemas, and errors naming the column, row and value."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlm2rec_ray.data.catalog import (
    read_catalog,
    read_interactions,
    read_split,
    read_stats,
    resolve_image_uri,
    write_prepared,
)
from vlm2rec_ray.data.schemas import (
    CATALOG_SCHEMA,
    INTERACTIONS_SCHEMA,
    SPLIT_SCHEMA,
    validate_catalog,
    validate_interactions,
)


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _catalog_rows() -> list[dict]:
    return [
        {"item_id": "a", "title": "Red mug", "image_uri": "images/a.png", "category": "kitchen"},
        {"item_id": "b", "title": "Blue mug", "image_uri": "s3://bkt/b.png"},
        {"item_id": "c", "title": "", "image_uri": "/abs/c.png", "description": "no title"},
    ]


def test_read_catalog_jsonl_and_parquet_give_exact_schema(tmp_path: Path) -> None:
    t = read_catalog(_jsonl(tmp_path / "cat.jsonl", _catalog_rows()))
    assert t.schema == CATALOG_SCHEMA and t.num_rows == 3
    assert t.column("category").to_pylist() == ["kitchen", None, None]
    pq.write_table(t, tmp_path / "catalog.parquet")
    assert read_catalog(str(tmp_path / "catalog.parquet")).equals(t)
    assert read_catalog(str(tmp_path)).equals(t)  # a dataset dir picks catalog.parquet
    report = validate_catalog(t)
    assert report.ok and report.counts["empty_title"] == 1  # kept and counted, not dropped


def test_missing_column_is_named(tmp_path: Path) -> None:
    rows = [{"item_id": "a", "image_uri": "x.png"}]
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['title'\]"):
        read_catalog(_jsonl(tmp_path / "c.jsonl", rows))


def test_wrong_type_names_row_and_value(tmp_path: Path) -> None:
    rows = [{"item_id": "a", "title": "t", "image_uri": "x"}, {"item_id": 17, "title": "t", "image_uri": "y"}]
    with pytest.raises(ValueError, match=r"row 1: column 'item_id' expected string, got int value 17"):
        read_catalog(_jsonl(tmp_path / "c.jsonl", rows))
    pq.write_table(pa.table({"item_id": [1, 2], "title": ["x", "y"], "image_uri": ["a", "b"]}), tmp_path / "i.parquet")
    with pytest.raises(ValueError, match=r"catalog.item_id: expected string, got int64 \(e.g. row 0 value 1\)"):
        read_catalog(str(tmp_path / "i.parquet"))
    inter = [{"user_id": "u", "item_id": "a", "timestamp": 5}, {"user_id": "u", "item_id": "a", "timestamp": "soon"}]
    with pytest.raises(ValueError, match=r"row 1: column 'timestamp' expected int64, got str value 'soon'"):
        read_interactions(_jsonl(tmp_path / "i.jsonl", inter))


def test_duplicate_item_ids_name_both_rows(tmp_path: Path) -> None:
    rows = [*_catalog_rows(), {"item_id": "b", "title": "again", "image_uri": "z"}]
    with pytest.raises(ValueError, match=r"catalog.item_id row 3: duplicate item_id \(first at row 1\) \(value 'b'\)"):
        read_catalog(_jsonl(tmp_path / "c.jsonl", rows))


def test_null_item_id_is_an_error(tmp_path: Path) -> None:
    rows = [{"item_id": "a", "title": "t", "image_uri": "x"}, {"item_id": None, "title": "t", "image_uri": "x"}]
    with pytest.raises(ValueError, match=r"item_id row 1: item_id is null or empty"):
        read_catalog(_jsonl(tmp_path / "c.jsonl", rows))


def test_unknown_items_counted_and_named(tmp_path: Path) -> None:
    catalog = read_catalog(_jsonl(tmp_path / "c.jsonl", _catalog_rows()))
    inter = [{"user_id": "u1", "item_id": i, "timestamp": n} for n, i in enumerate(["a", "zz", "b", "zz", "yy"])]
    path = _jsonl(tmp_path / "i.jsonl", inter)
    t = read_interactions(path)  # without a catalog nothing to check against
    assert t.schema == INTERACTIONS_SCHEMA
    report = validate_interactions(t, set(catalog.column("item_id").to_pylist()))
    assert report.counts["unknown_item"] == 3
    assert [(e.row, e.value) for e in report.errors] == [(1, "zz"), (3, "zz"), (4, "yy")]
    with pytest.raises(ValueError, match=r"3 interactions on 2 unknown items"):
        read_interactions(path, catalog=catalog)


def test_timestamps_cast_from_int32_and_timestamp(tmp_path: Path) -> None:
    import datetime as dt

    t = pa.table({"user_id": ["u"], "item_id": ["a"],
                  "timestamp": pa.array([dt.datetime(2020, 1, 1, 0, 0, 1)], pa.timestamp("ms"))})
    pq.write_table(t, tmp_path / "i.parquet")
    assert read_interactions(str(tmp_path / "i.parquet")).column("timestamp").to_pylist() == [1577836801]
    pq.write_table(t.set_column(2, "timestamp", pa.array([3], pa.int32())), tmp_path / "j.parquet")
    assert read_interactions(str(tmp_path / "j.parquet")).column("timestamp").type == pa.int64()


def test_resolve_image_uri() -> None:
    assert resolve_image_uri("images/a.png", "s3://bkt/ds/catalog.parquet") == "s3://bkt/ds/images/a.png"
    assert resolve_image_uri("images/a.png", "s3://bkt/ds") == "s3://bkt/ds/images/a.png"
    assert resolve_image_uri("images/a.png", "/data/ds/catalog.parquet") == "/data/ds/images/a.png"
    assert resolve_image_uri("images/a.png", "file:///data/ds/") == "/data/ds/images/a.png"
    for absolute in ("s3://o/x.png", "/abs/x.png", "file:///x.png", "https://h/x.png"):
        assert resolve_image_uri(absolute, "/data/ds/catalog.parquet") == absolute


def test_write_prepared_round_trip_and_refuses_bad_tables(tmp_path: Path) -> None:
    catalog = pa.table({"item_id": ["a", "b"], "title": ["A", "B"], "image_uri": ["images/a.png", "images/b.png"]})
    inter = pa.table({"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": [1, 2]})
    split = pa.table({"user_id": ["u"], "history": [["a"]], "target": ["b"]})
    out = str(tmp_path / "ds")
    stats = {"users": 1, "items": 2, "interactions": 2, "avg_length": 2.0, "sparsity": 0.0}
    write_prepared(out, catalog=catalog, interactions=inter, splits={"train": split, "valid": split, "test": split},
                   stats=stats)
    assert read_catalog(out).num_rows == 2
    assert read_interactions(out, catalog=read_catalog(out)).num_rows == 2
    assert read_split(out, "test").schema == SPLIT_SCHEMA
    assert read_stats(out) == stats
    with pytest.raises(ValueError, match="unknown split"):
        read_split(out, "dev")
    bad = pa.table({"user_id": ["u"], "item_id": ["nope"], "timestamp": [1]})
    with pytest.raises(ValueError, match="not in the catalog"):
        write_prepared(str(tmp_path / "bad"), catalog=catalog, interactions=bad,
                       splits={"train": split, "valid": split, "test": split}, stats=stats)
    assert not (tmp_path / "bad").exists()


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_catalog(str(tmp_path / "nope.parquet"))
