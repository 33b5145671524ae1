"""Output and errors schemas: exact types, Parquet round trip, fixed_size_list construction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlm2rec_ray.embed.schema import (
    ERROR_REASONS,
    errors_schema,
    fixed_size_list,
    output_schema,
)

TAIL = ("emb_text", "emb_image", "emb_fused", "content_hash", "model_id", "model_version", "embedded_at")


def test_item_and_sequence_schemas() -> None:
    s = output_schema("items", 8)
    assert tuple(s.names) == ("item_id", *TAIL)
    assert s.field("emb_fused").type == pa.list_(pa.field("element", pa.float32(), nullable=False), 8)
    assert str(s.field("emb_text").type) == "fixed_size_list<element: float not null>[8]"
    assert s.field("embedded_at").type == pa.timestamp("us", tz="UTC")
    assert all(not f.nullable for f in s)
    q = output_schema("sequences", 8)
    assert tuple(q.names) == ("user_id", "history", *TAIL) and pa.types.is_list(q.field("history").type)
    assert all(not f.nullable for f in q)
    with pytest.raises(ValueError, match="unknown embedding kind"):
        output_schema("users", 8)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        output_schema("items", 0)
    with pytest.raises(ValueError, match="unknown embedding kind"):
        errors_schema("users")
    tail = ["title", "image_uri", "reason", "detail", "model_version", "failed_at"]
    assert errors_schema("items").names == ["item_id", *tail]
    assert errors_schema("sequences").names == ["user_id", "history", "item_id", *tail]
    assert [f.name for f in errors_schema("items") if not f.nullable] == ["reason", "model_version", "failed_at"]
    assert {"missing", "corrupt", "empty_title", "unknown_item", "encode_error"} <= set(ERROR_REASONS)


def test_parquet_round_trip_is_exact(tmp_path: Path) -> None:
    """What we write is what plain pyarrow reads back: same schema, same float bits."""
    emb = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    schema = output_schema("items", 8)
    now = pa.scalar(0, pa.timestamp("us", tz="UTC"))
    table = pa.Table.from_arrays([
        pa.array(["a", "b", "c"]), fixed_size_list(emb, 8), fixed_size_list(emb * 2, 8), fixed_size_list(emb * 3, 8),
        pa.array(["h"] * 3), pa.array(["m"] * 3), pa.array(["v"] * 3), pa.array([now.value] * 3, now.type),
    ], schema=schema)
    pq.write_table(table, tmp_path / "x.parquet")
    back = pq.read_table(tmp_path / "x.parquet")
    assert back.schema.remove_metadata() == schema
    got = np.stack(back.column("emb_text").to_numpy(zero_copy_only=False))
    assert got.dtype == np.float32 and np.array_equal(got, emb)


def test_fixed_size_list_checks_shape() -> None:
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        fixed_size_list(np.zeros((2, 3)), 4)
    arr = fixed_size_list(np.arange(8, dtype=np.float64).reshape(2, 4), 4)
    assert arr.type.list_size == 4 and arr.values.type == pa.float32()
