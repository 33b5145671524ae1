"""CPU stage: validation, fetch/decode with reasons, hashing, scan classification, carry-over filter."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.unit.embed.helpers import item_opts, random_image, write_catalog
from vlm2rec_ray.data.images import encode_image
from vlm2rec_ray.embed import incremental as inc
from vlm2rec_ray.embed import preprocess as pre
from vlm2rec_ray.embed.schema import errors_table, fixed_size_list, row_schema


def _catalog(tmp_path: Path) -> tuple[Path, pa.Table]:
    cat = write_catalog(tmp_path, n=8)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    (tmp_path / "images" / "text.png").write_bytes(b"hello, not an image")
    t = pq.read_table(cat)
    extra = pa.table({
        "item_id": ["bad-missing", "bad-corrupt", "bad-notimage", "bad-title", "", "dup-image", "dup-title", "escape"],
        "title": ["x", "x", "x", "   ", "x", "another title", t.column("title")[0].as_py() + "  ", "x"],
        "image_uri": ["images/none.png", "images/broken.png", "images/text.png", "images/0.png", "images/0.png",
                      "images/0.png", "images/1.png", "../outside.png"],
    })
    return cat, pa.concat_tables([t, extra])


def test_prepare_items_reasons_and_keys(tmp_path: Path) -> None:
    cat, table = _catalog(tmp_path)
    out = pre.prepare_items(table, opts=item_opts(str(cat)))
    assert out.schema == row_schema(64) and out.num_rows == table.num_rows  # nothing dropped
    rows = {r["key"] if r["key"] else "<blank>": r for r in out.to_pylist()}
    reasons = {k: r["reason"] for k, r in rows.items() if r["status"] == "failed"}
    assert reasons == {"bad-missing": "missing", "bad-corrupt": "corrupt", "bad-notimage": "not_image",
                       "bad-title": "empty_title", "<blank>": "empty_item_id", "escape": "outside_root"}
    ok = {k: r for k, r in rows.items() if r["status"] == "encode"}
    assert len(ok) == 10
    for r in ok.values():
        w, h = r["widths"][0], r["heights"][0]
        assert 56 * 56 <= w * h <= 224 * 224 and len(r["pixels"][0]) == w * h * 3
        assert len(r["content_hash"]) == 64 and r["titles"] and r["history"] is None
    # Same bytes -> same image key; titles equal after cleaning -> same text key; hashes differ per content.
    assert ok["dup-image"]["image_key"] == ok["item000"]["image_key"]
    assert ok["dup-title"]["text_key"] == ok["item000"]["text_key"]
    assert ok["dup-title"]["content_hash"] != ok["item000"]["content_hash"]  # raw titles differ
    assert rows["bad-missing"]["image_uri"].endswith("images/none.png") and rows["bad-missing"]["content_hash"] is None
    # allowed_roots rejects images outside the listed roots
    out2 = pre.prepare_items(table.slice(0, 2), opts=item_opts(str(cat), allowed_roots=[str(tmp_path / "elsewhere")]))
    assert out2.column("reason").to_pylist() == ["outside_root", "outside_root"]


def test_scan_mode_classifies_against_previous(tmp_path: Path) -> None:
    cat, table = _catalog(tmp_path)
    first = pre.prepare_items(table, opts=item_opts(str(cat), mode="scan"))
    assert first.schema == row_schema(64) and first.column("pixels").null_count == first.num_rows  # nothing decoded
    assert set(first.column("status").to_pylist()) == {"new", "failed"}
    ok = first.filter(pa.compute.equal(first.column("status"), "new"))
    index = inc.KeyIndex.build(ok.column("key").to_pylist(), ok.column("content_hash").to_pylist())
    titles = table.column("title").to_pylist()
    titles[2] = "a changed title"
    changed = table.set_column(1, "title", pa.array(titles)).slice(0, 8)
    changed = pa.concat_tables([changed, pa.table({"item_id": ["brand-new"], "title": ["new"],
                                                   "image_uri": ["images/3.png"]})])
    again = pre.prepare_items(changed, opts=item_opts(str(cat), mode="scan", prev_index=[index]))
    status = dict(zip(again.column("key").to_pylist(), again.column("status").to_pylist(), strict=True))
    assert status.pop("item002") == "changed" and status.pop("brand-new") == "new"
    assert set(status.values()) == {"unchanged"}
    assert again.column("in_prev").to_pylist() == [True] * 8 + [False]


def test_prepare_sequences(tmp_path: Path) -> None:
    cat, table = _catalog(tmp_path)
    lookup = pre.CatalogLookup(table.column("item_id").to_pylist(), table.column("title").to_pylist(),
                               [str(tmp_path / u) for u in table.column("image_uri").to_pylist()])
    assert lookup.find(["item001", "zzz"])[1] is None and lookup.find(["item001"])[0][0] == table.column("title")[1].as_py()
    ids = [f"item{i:03d}" for i in range(8)]
    splits = pa.table({"user_id": ["u1", "u2", "u3", "u4", "u5"],
                       "history": [ids, ids[:2], ["item001", "unknown-item"], [], ["item000", "bad-corrupt"]]})
    out = pre.prepare_sequences(splits, opts=item_opts(str(cat), max_history=5, catalog=[lookup]))
    rows = {r["key"]: r for r in out.to_pylist()}
    assert rows["u1"]["history"] == ids[-5:] and len(rows["u1"]["pixels"]) == 5 and rows["u1"]["status"] == "encode"
    assert rows["u2"]["titles"] == table.column("title").to_pylist()[:2]
    assert (rows["u3"]["reason"], rows["u3"]["failed_item_id"]) == ("unknown_item", "unknown-item")
    assert rows["u4"]["reason"] == "empty_history"
    assert (rows["u5"]["reason"], rows["u5"]["failed_item_id"]) == ("corrupt", "bad-corrupt")


def test_carry_filter_and_failed_scan_rows(tmp_path: Path) -> None:
    import numpy as np

    dim = 4
    emb = fixed_size_list(np.ones((3, dim), np.float32), dim)
    prev = pa.table({"item_id": ["a", "b", "c"], "emb_text": emb, "emb_image": emb, "emb_fused": emb,
                     "content_hash": ["1" * 64, "2" * 64, "3" * 64], "model_id": ["m"] * 3, "model_version": ["v"] * 3,
                     "embedded_at": pa.array([5, 6, 7], pa.timestamp("us", tz="UTC"))})
    unchanged = inc.KeyIndex.build(["a", "c"], ["1" * 64, "9" * 64])  # c changed since: not carried
    out = pre.carry_filter(prev, opts={"unchanged": [unchanged]}, dim=dim)
    assert out.column("key").to_pylist() == ["a"] and out.column("status").to_pylist() == ["carried"]
    assert out.column("embedded_at")[0].value == 5  # the original embedding time is kept
    scan = pre.prepare_items(pa.table({"item_id": ["x"], "title": [""], "image_uri": ["nope.png"]}),
                             opts=item_opts(str(tmp_path / "c.parquet"), mode="scan"))
    # A failed scan row is already a row of the contract: it goes to the errors table as it is.
    failed = errors_table(scan, kind="items", model_version="v", failed_at=0)
    assert failed.column("reason").to_pylist() == ["empty_title"] and failed.column("item_id").to_pylist() == ["x"]
    assert scan.column("emb_fused").null_count == 1 and scan.column("status").to_pylist() == ["failed"]


def test_conform_batch_keeps_path() -> None:
    t = pa.table({"item_id": ["a"], "title": ["t"], "image_uri": ["u"], "extra": [1], "path": ["bucket/c.parquet"]})
    out = pre.conform_batch(t, kind="items")
    assert out.column_names == ["item_id", "title", "image_uri", "description", "category", "path"]
    with pytest.raises(ValueError, match="missing required column"):
        pre.conform_batch(pa.table({"item_id": ["a"]}), kind="items")
    _ = encode_image(random_image(0))
