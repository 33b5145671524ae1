"""`prepare amazon` on tiny dumps in each McAuley format (2014 Python-literal metadata, 2018, 2023)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.amazon import EXPECTED_STATS, write_amazon_fixture
from vlm2rec_ray.data.amazon import detect_meta_format, detect_review_format, parse_meta, prepare_amazon
from vlm2rec_ray.data.catalog import read_catalog, read_interactions, read_split, read_stats
from vlm2rec_ray.data.schemas import validate_split


@pytest.mark.parametrize("fmt", ["2014", "2018", "2023"])
@pytest.mark.parametrize("gz", [True, False])
def test_prepare_each_format(tmp_path: Path, fmt: str, gz: bool) -> None:
    reviews, meta = write_amazon_fixture(tmp_path / "raw", fmt, gz=gz)
    out = str(tmp_path / "out")
    result = prepare_amazon(str(reviews), str(meta), out)
    stats, report = result["stats"], result["report"]
    assert stats == EXPECTED_STATS
    assert read_stats(out) == stats
    assert report["format"] == {"reviews": fmt, "meta": fmt}
    assert report["dropped_items"] == {"no_title": 1, "no_image": 1, "no_metadata": 1}
    assert report["dropped_interactions_item_filter"] == 11  # 5 notitle + 5 noimg + 1 nometa
    assert report["duplicate_interactions"] == 1
    assert report["kcore"]["removed_users"] == 2 and report["kcore"]["removed_items"] == 1  # edge, few; rare
    assert report["line_problems"] == {"unparseable": 2}
    assert any("line 4" in e for e in report["line_problem_examples"])  # the malformed review line, by number
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report

    catalog = read_catalog(out)
    assert sorted(catalog.column("item_id").to_pylist()) == [f"i{k}" for k in range(1, 7)]
    row = next(r for r in catalog.to_pylist() if r["item_id"] == "i2")
    assert row["title"] == "Item i2 & friends"  # HTML entities unescaped
    assert row["image_uri"] == "http://images.example/i2.jpg"  # high-res / MAIN large, not the thumbnail
    assert row["category"] == "Beauty > Skin Care"
    inter = read_interactions(out, catalog=catalog)
    assert inter.num_rows == 30
    assert min(inter.column("timestamp").to_pylist()) > 1_000_000_000  # 2023 ms converted to seconds
    assert max(inter.column("timestamp").to_pylist()) < 2_000_000_000

    ids = set(catalog.column("item_id").to_pylist())
    test = {r["user_id"]: r for r in read_split(out, "test").to_pylist()}
    valid = {r["user_id"]: r for r in read_split(out, "valid").to_pylist()}
    train = read_split(out, "train")
    assert set(test) == {f"u{k}" for k in range(1, 7)}
    # u1 skipped i1: chronological items i2..i6 (by timestamp, although the file is shuffled)
    assert test["u1"] == {"user_id": "u1", "history": ["i2", "i3", "i4", "i5"], "target": "i6"}
    assert valid["u1"] == {"user_id": "u1", "history": ["i2", "i3", "i4"], "target": "i5"}
    assert train.num_rows == 6 * 2  # t = 2..n-2 with n = 5: two rows per user
    for split in ("train", "valid", "test"):
        assert validate_split(read_split(out, split), ids, max_history=10).ok


def test_history_capped_at_max_history(tmp_path: Path) -> None:
    reviews, meta = write_amazon_fixture(tmp_path / "raw", "2018")
    out = str(tmp_path / "out")
    prepare_amazon(str(reviews), str(meta), out, max_history=2)
    assert max(len(r["history"]) for r in read_split(out, "test").to_pylist()) == 2


def test_format_can_be_forced_and_mismatch_is_reported(tmp_path: Path) -> None:
    reviews, meta = write_amazon_fixture(tmp_path / "raw", "2023")
    with pytest.raises(ValueError, match="no usable reviews"):
        prepare_amazon(str(reviews), str(meta), str(tmp_path / "o"), fmt="2014")
    with pytest.raises(ValueError, match="unknown format"):
        prepare_amazon(str(reviews), str(meta), str(tmp_path / "o"), fmt="2019")


def test_nothing_left_names_k(tmp_path: Path) -> None:
    reviews, meta = write_amazon_fixture(tmp_path / "raw", "2014")
    with pytest.raises(ValueError, match="lower k"):
        prepare_amazon(str(reviews), str(meta), str(tmp_path / "o"), k=50)
    assert not (tmp_path / "o" / "stats.json").exists()


def test_detection_and_image_choice() -> None:
    assert detect_review_format({"reviewerID": "a", "asin": "b", "unixReviewTime": 1}) == "2014"
    assert detect_review_format({"reviewerID": "a", "asin": "b", "unixReviewTime": 1, "verified": True}) == "2018"
    assert detect_review_format({"user_id": "a", "parent_asin": "b", "timestamp": 1}) == "2023"
    with pytest.raises(ValueError, match="unrecognised review record"):
        detect_review_format({"foo": 1})
    assert detect_meta_format({"asin": "a", "imUrl": "http://x"}) == "2014"
    assert detect_meta_format({"asin": "a", "imageURLHighRes": []}) == "2018"
    assert detect_meta_format({"parent_asin": "a", "images": []}) == "2023"
    rec = {"parent_asin": "p", "title": " A  B ", "images": [
        {"thumb": "http://t", "large": "http://variant", "variant": "PT01", "hi_res": None},
        {"thumb": "http://t2", "large": "http://main", "variant": "MAIN", "hi_res": "http://hi"}]}
    assert parse_meta(rec, "2023")["image_uri"] == "http://main"
    assert parse_meta(rec, "2023")["title"] == "A B"
    assert parse_meta({"asin": "x", "title": "t", "imageURL": ["http://small"], "imageURLHighRes": []}, "2018")[
        "image_uri"] == "http://small"
