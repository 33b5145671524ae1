"""The item table: a training run on S3 GETs each referenced image once, however many rows and epochs use it,
and a broken image drops exactly the rows it should, with one errors-table row per drop.

The dataset sits in moto behind the recording proxy of tests/faults.py (no faults injected), which lists every
request: image GETs are counted per object key over the whole run (item pass, 2 epochs on 2 workers, probe).
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.faults import FaultPlan, FaultProxy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlm2rec_ray.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("items")
    generate_synthetic(str(out), num_items=30, num_users=24, image_size=32, seed=0)
    return out


def _expected_errors(records: list[dict[str, Any]], bad: dict[str, str], uris: dict[str, str]) -> list[tuple]:
    """The drops, worked out from the split alone: a bad target drops its row, a bad history item is removed,
    a history left empty drops the row."""
    out = []
    for r in records:
        if r["target"] in bad:
            out.append((r["target"], r["user_id"], uris[r["target"]], bad[r["target"]], "dropped_row"))
            continue
        history = [h for h in r["history"] if h not in bad]
        out += [(h, r["user_id"], uris[h], bad[h], "dropped_history_item") for h in r["history"] if h in bad]
        if not history:
            out.append((r["target"], r["user_id"], uris[r["target"]], "empty_history", "dropped_row"))
    return sorted(out)


def test_each_image_fetched_once_per_run_and_a_bad_image_drops_its_rows(
        ray_local: Any, tiny_backbone_dir: Path, dataset: Path, moto_endpoint: str, s3_bucket: str,
        tmp_path: Path) -> None:
    from vlm2rec_ray import storage
    from vlm2rec_ray.config import TrainJobConfig, load_config
    from vlm2rec_ray.train.trainer import run_training

    data = tmp_path / "d"
    shutil.copytree(dataset, data)
    split = pq.read_table(data / "splits" / "train.parquet").to_pylist()
    catalog = pq.read_table(data / "catalog.parquet").to_pylist()
    refs = Counter(i for r in split for i in [r["target"], *r["history"]])
    # the most referenced item's image is corrupt: some rows lose their target, others a history item
    victim, uses = refs.most_common(1)[0]
    assert uses >= 5
    image_of = {c["item_id"]: c["image_uri"] for c in catalog}
    (data / image_of[victim]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    prefix = f"s3://{s3_bucket}/ds"
    storage.upload_dir(data, prefix, endpoint=moto_endpoint)  # straight to moto: not counted

    out = tmp_path / "out"
    with FaultProxy(moto_endpoint, FaultPlan(error_rate=0.0, drop_rate=0.0, slow_rate=0.0)) as proxy:
        cfg = load_config(TrainJobConfig, REPO / "jobs" / "configs" / "train_tiny.yaml", [
            f"model.name={tiny_backbone_dir}", f"data.dataset_uri={prefix}", f"output_uri={out}", "run_name=items",
            f"storage.endpoint_url={proxy.url}", "data.max_rows=null", "train.epochs=2",
            "train.per_device_batch_size=8", "train.checkpoint_every=1000", "train.diag_every=0",
            "train.gradient_checkpointing=false", "objective.num_sampled_negatives=2"])
        summary = run_training(cfg)

    gets = Counter(path.split("?")[0] for method, path in proxy.plan.requests
                   if method == "GET" and "/images/" in path)
    assert set(gets.values()) == {1}, gets.most_common(3)  # each image once: item pass only, no GET while training
    assert len(gets) == len(refs)  # every referenced image (the corrupt one too: it was fetched, then failed)
    assert summary["global_step"] == 2 * summary["steps_per_epoch"] > 0

    uris = {c["item_id"]: f"{prefix}/{c['image_uri']}" for c in catalog}
    expected = _expected_errors(split, {victim: "corrupt"}, uris)
    errors = pq.read_table(out / "data_errors.parquet")
    assert errors.schema.names == ["item_id", "user_id", "image_uri", "reason", "action"]
    got = sorted(tuple(e.values()) for e in errors.to_pylist())
    assert got == expected
    actions = Counter(e[-1] for e in expected)
    data_counts = summary["data"]
    assert data_counts["dropped_rows"] == actions["dropped_row"] >= 1
    assert data_counts["dropped_history_items"] == actions["dropped_history_item"] >= 1
    assert data_counts["rows"] == len(split) - actions["dropped_row"]


def test_without_the_check_the_same_pass_stops_at_a_bad_image(ray_local: Any, dataset: Path, tmp_path: Path) -> None:
    """data.check_images=false: one item pass still builds the table; a failing image stops the run before
    training (nothing is dropped silently), naming the item and its reason."""
    from vlm2rec_ray.config import TrainJobConfig, load_config
    from vlm2rec_ray.train.data import ItemTable, ensure_item_table, prepare_training_rows

    data = tmp_path / "d"
    shutil.copytree(dataset, data)
    cfg = load_config(TrainJobConfig, None, ["model.name=unused", f"data.dataset_uri={data}", "output_uri=unused",
                                             "data.check_images=false", "model.min_pixels=3136",
                                             "model.max_pixels=3136"])
    prepared = prepare_training_rows(cfg)  # no Ray pass yet
    assert prepared.item_refs is None
    items = ItemTable.from_refs(ensure_item_table(prepared, cfg))
    assert len(items) == len(prepared.items) and items.image(prepared.items[0][0]).size == (56, 56)

    victim = pq.read_table(data / "splits" / "train.parquet").column("target").to_pylist()[0]
    uri = {c["item_id"]: c["image_uri"] for c in pq.read_table(data / "catalog.parquet").to_pylist()}[victim]
    (data / uri).write_bytes(b"not an image at all")
    prepared = prepare_training_rows(cfg)
    with pytest.raises(RuntimeError, match=rf"1 referenced images failed .*{victim} \(not_image\)"):
        ensure_item_table(prepared, cfg)
