"""Content hashes, the key index and new/changed/unchanged classification."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlm2rec_ray.config import EmbedJobConfig, load_config
from vlm2rec_ray.embed import incremental as inc


def _cfg(*over: str) -> EmbedJobConfig:
    return load_config(EmbedJobConfig, None, ["model.name=m", "model_version=v1", "output_uri=/o", "catalog_uri=/c",
                                              *over])


def test_content_hash_covers_title_image_and_model() -> None:
    fp = inc.encoder_fingerprint(_cfg(), "items")
    assert fp == inc.encoder_fingerprint(_cfg(), "items")  # stable
    assert fp != inc.encoder_fingerprint(_cfg("model_version=v2"), "items")
    assert fp != inc.encoder_fingerprint(_cfg("model.max_pixels=10000"), "items")
    assert fp != inc.encoder_fingerprint(_cfg(), "sequences")
    img = inc.image_digest(b"pixels")
    h = inc.content_hash(fp, ["Red mug"], [img])
    assert len(h) == 64 and h == inc.content_hash(fp, ["Red mug"], [img])
    assert h != inc.content_hash(fp, ["Red mug!"], [img])
    assert h != inc.content_hash(fp, ["Red mug"], [inc.image_digest(b"pixelz")])
    assert h != inc.content_hash(inc.encoder_fingerprint(_cfg("model_version=v2"), "items"), ["Red mug"], [img])
    # order and boundaries matter for histories
    a, b = inc.image_digest(b"a"), inc.image_digest(b"b")
    assert inc.content_hash(fp, ["x", "y"], [a, b]) != inc.content_hash(fp, ["y", "x"], [b, a])
    assert inc.text_key(["ab", "c"]) != inc.text_key(["a", "bc"])


def test_key_index_lookup_and_collisions() -> None:
    ids = [f"id{i}" for i in range(100)]
    hashes = [inc.image_digest(str(i).encode()) for i in range(100)]
    index = inc.KeyIndex.build(ids, hashes)
    assert len(index) == 100 and index.collisions == 0
    found, values = index.lookup(inc.id_keys(["id5", "nope", None]))
    assert found.tolist() == [True, False, False]
    assert values[0] == inc.hash_keys([hashes[5]])[0]
    # Two ids sharing a 64-bit key are dropped (re-encoded), never confused.
    keys = np.array([7, 7, 9], dtype=np.uint64)
    idx = inc.KeyIndex.build(keys, np.array([1, 2, 3], dtype=np.uint64))
    assert idx.collisions == 1 and idx.keys.tolist() == [9]
    empty = inc.KeyIndex.build([], [])
    assert empty.lookup(inc.id_keys(["a"]))[0].tolist() == [False]


def test_classify() -> None:
    index = inc.KeyIndex.build(["a", "b", "c"], ["1" * 64, "2" * 64, "3" * 64])
    status, in_prev = inc.classify(index, ["a", "b", "d", "c"], ["1" * 64, "9" * 64, "4" * 64, None])
    assert status == ["unchanged", "changed", "new", ""]
    assert in_prev.tolist() == [True, True, False, True]
    assert inc.classify(None, ["a"], ["1" * 64])[0] == ["new"]


def test_index_from_parquet_files(tmp_path: Path) -> None:
    t = pa.table({"key": ["a", "b", "c"], "content_hash": ["1" * 64, "2" * 64, "3" * 64], "other": [1, 2, 3]})
    pq.write_table(t.slice(0, 2), tmp_path / "p.parquet")
    pq.write_table(t.slice(2), tmp_path / "q.parquet")
    idx = inc.build_index_from_files([str(tmp_path / "p.parquet"), str(tmp_path / "q.parquet")], "key", endpoint=None)
    assert len(idx) == 3
    assert idx.lookup(inc.id_keys(["a", "c", "d"]))[0].tolist() == [True, True, False]
    assert inc.resolve_ref(None) is None and inc.resolve_ref([idx]) is idx
