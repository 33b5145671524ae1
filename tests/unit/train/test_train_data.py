"""The driver-side training rows: catalog join, few-shot users, errors for unknown items and broken images,
sampled negatives, and the step arithmetic every worker shares (no Ray needed with data.check_images=false)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlm2rec_ray.config import TrainJobConfig, load_config
from vlm2rec_ray.train.data import (
    _check_batch,
    _image_kwargs,
    load_item_table,
    prepare_training_rows,
    steps_per_epoch,
    to_train_batch,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlm2rec_ray.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("syn")
    generate_synthetic(str(out), num_items=30, num_users=12, image_size=32, seed=0)
    return out


def _cfg(data: Path, *overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, None, ["model.name=unused", f"data.dataset_uri={data}", "output_uri=unused",
                                              "data.check_images=false", "model.min_pixels=3136",
                                              "model.max_pixels=3136", *overrides])


def test_rows_join_the_catalog_and_few_shot_keeps_k_users(dataset: Path) -> None:
    full = prepare_training_rows(_cfg(dataset))
    split = pq.read_table(dataset / "splits" / "train.parquet")
    assert full.rows.num_rows == split.num_rows and full.errors.num_rows == 0
    row = full.rows.slice(0, 1).to_pylist()[0]
    catalog = {r["item_id"]: r for r in pq.read_table(dataset / "catalog.parquet").to_pylist()}
    assert row["target_title"] == catalog[row["target_id"]]["title"]
    assert row["history_titles"] == [catalog[h]["title"] for h in row["history_ids"]]
    ids = pq.read_table(dataset / "catalog.parquet").column("item_id").to_pylist()
    assert [ids[i] for i in row["history_indices"]] == row["history_ids"] and ids[row["target_index"]] == row["target_id"]
    # every referenced item once, with its absolute image URI (the input of the item pass)
    referenced = {i for r in full.rows.to_pylist() for i in [r["target_index"], *r["history_indices"]]}
    assert sorted(i for i, _, _, _ in full.items) == sorted(referenced)
    assert all(Path(u).is_absolute() and Path(u).exists() for _, _, _, u in full.items)
    few = prepare_training_rows(_cfg(dataset, "data.few_shot_users=3", "data.seed=1"))
    assert len(set(few.rows.column("user_id").to_pylist())) == 3 == few.counts["users"]
    again = prepare_training_rows(_cfg(dataset, "data.few_shot_users=3", "data.seed=1"))
    assert again.rows.equals(few.rows)  # seeded
    capped = prepare_training_rows(_cfg(dataset, "data.max_rows=5"))
    assert capped.rows.num_rows == 5


def test_item_level_objective_trains_each_distinct_item_once(dataset: Path) -> None:
    """objective.variant=cmsa (SDA's stage 1): one row per distinct item of the kept rows, seeded order."""
    full = prepare_training_rows(_cfg(dataset))
    items = prepare_training_rows(_cfg(dataset, "objective.variant=cmsa"))
    referenced = {i for r in full.rows.to_pylist() for i in [r["target_index"], *r["history_indices"]]}
    got = items.rows.column("target_index").to_pylist()
    assert sorted(got) == sorted(referenced) and len(got) == len(set(got)) and items.counts["item_level"]
    assert got != sorted(got)  # shuffled with data.seed
    assert items.rows.column("history_indices").to_pylist() == [[i] for i in got]
    assert items.counts["rows"] == len(got) and items.counts["sampled_rows"] == full.rows.num_rows


def test_unknown_items_and_broken_images_are_errors_not_silent_drops(dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "d"
    shutil.copytree(dataset, data)
    split = pq.read_table(data / "splits" / "train.parquet").to_pylist()
    split[0]["target"] = "NOPE"  # a target missing from the catalog drops the row
    split[1]["history"] = [*split[1]["history"], "GONE"]  # a history item missing is removed from the history
    pq.write_table(pa.Table.from_pylist(split, schema=pq.read_schema(data / "splits" / "train.parquet")),
                   data / "splits" / "train.parquet")
    out = prepare_training_rows(_cfg(data))
    errors = out.errors.to_pylist()
    assert {(e["item_id"], e["reason"], e["action"]) for e in errors} == {
        ("NOPE", "unknown_item", "dropped_row"), ("GONE", "unknown_item", "dropped_history_item")}
    assert out.rows.num_rows == len(split) - 1 and out.counts["dropped_rows"] == 1
    # The image check (one Ray Data pass in training) reports a corrupt file with its reason.
    cfg = _cfg(data)
    bad = data / "images" / "broken.png"
    bad.write_bytes(b"not a png")
    good = next((data / "images").glob("I*.png"))
    checked = _check_batch(pa.table({"item_id": ["a", "b"], "image_uri": [str(good), str(bad)]}), **_image_kwargs(cfg))
    reasons = checked.column("reason").to_pylist()
    assert reasons[0] is None and reasons[1] is not None


def test_item_table_and_sampled_negatives(dataset: Path) -> None:
    cfg = _cfg(dataset, "objective.num_sampled_negatives=2")
    prepared = prepare_training_rows(cfg)
    items = load_item_table(prepared, cfg)
    assert len(items) == len(prepared.items) == len(items.usable)
    batch = to_train_batch(prepared.rows.slice(0, 3), items, num_negatives=2)
    assert len(batch) == 3 and len(batch.item_titles) == 3 + 3 * 2 and batch.item_ids.shape == (9,)
    assert batch.item_images[0].size == (56, 56)  # resized to model.min/max_pixels
    assert all(batch.item_ids[3 + 2 * i + k] != batch.target_ids[i] for i in range(3) for k in range(2))
    assert [len(s) for s in batch.seq_images] == [len(t) for t in batch.seq_titles]


def test_steps_per_epoch_is_equal_on_every_worker(dataset: Path) -> None:
    cfg = _cfg(dataset, "scaling.num_workers=2", "train.per_device_batch_size=4", "train.grad_accum=2")
    assert steps_per_epoch(35, cfg) == 2  # 17 rows per worker -> 4 micro-batches -> 2 optimizer steps
    with pytest.raises(ValueError, match=r"15 training rows are fewer than one optimizer step needs .* = 16"):
        steps_per_epoch(15, cfg)


def test_training_images_default_to_the_datasets_own_prefix(dataset: Path, tmp_path: Path) -> None:
    """The training job reads images under its dataset only, unless storage.allowed_roots lists more."""
    outside = tmp_path / "outside.png"
    shutil.copy(next((dataset / "images").glob("*.png")), outside)
    kw = _image_kwargs(_cfg(dataset))
    assert kw["allowed_roots"] == [str(dataset.resolve())] and kw["allow_private_addresses"] is False
    inside = str(next((dataset / "images").glob("*.png")))
    batch = pa.table({"item_id": ["in", "out", "web"], "image_uri": [inside, str(outside), "http://127.0.0.1:9/a.png"]})
    assert _check_batch(batch, **kw).column("reason").to_pylist() == [None, "outside_root", "outside_root"]
    kw = _image_kwargs(_cfg(dataset, f'storage.allowed_roots=["{dataset}", "{tmp_path}"]'))
    assert _check_batch(batch, **kw).column("reason").to_pylist() == [None, None, "outside_root"]
