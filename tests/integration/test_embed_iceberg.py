"""`output_format: iceberg` end to end on real components: a moto S3 HTTP server on loopback as the warehouse, the
sqlite SQL catalog (pyiceberg), local Ray and the tiny offline Qwen2.5-VL; DuckDB reads the current snapshot.

The runs build on each other (full run, same-day re-run, next day's incremental run, a failing run), so the
tests run in file order. Every check reads the table the way another engine would: through the catalog.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from vlm2rec_ray import storage
from vlm2rec_ray.config import EmbedJobConfig, load_config

pytestmark = pytest.mark.integration

DT1, DT2, DT3 = "2026-11-21", "2026-11-22", "2026-11-23"
NUM_ITEMS = 40
MISSING = "I00003"  # planted failure: 1 of 40 (2.5% < max_failure_fraction 5%)
CHANGED, DELETED, NEW = "I00010", "I00020", "I09999"
TABLE = "embeddings.items"
ROW_COLUMNS = ["item_id", "emb_text", "emb_image", "emb_fused", "content_hash", "model_version", "embedded_at", "dt"]


@pytest.fixture(scope="module")
def world(moto_endpoint: str, ray_local: Any, tiny_backbone_dir: Any, tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Any]:
    from vlm2rec_ray.data.synthetic import generate_synthetic

    bucket = f"ice-{uuid.uuid4().hex[:10]}"
    storage.s3_client(moto_endpoint).create_bucket(Bucket=bucket)
    ds = f"s3://{bucket}/ds"
    generate_synthetic(ds, num_items=NUM_ITEMS, num_users=8, seed=0, image_size=32)
    catalog = storage.read_parquet(f"{ds}/catalog.parquet")
    ids = catalog.column("item_id").to_pylist()
    uris = catalog.column("image_uri").to_pylist()
    uris[ids.index(MISSING)] = "images/not-there.png"
    catalog = catalog.set_column(catalog.schema.get_field_index("image_uri"), "image_uri", pa.array(uris))
    storage.write_parquet(catalog, f"{ds}/catalog.parquet")
    db = tmp_path_factory.mktemp("iceberg") / "catalog.db"
    return {"bucket": bucket, "ds": ds, "out": f"s3://{bucket}/emb", "model": str(tiny_backbone_dir),
            "catalog": catalog, "props": {"type": "sql", "uri": f"sqlite:///{db}", "s3.endpoint": moto_endpoint,
                                          "s3.region": "us-east-1"}, "runs": {}}


def _cfg(w: dict[str, Any], *extra: str) -> EmbedJobConfig:
    return load_config(EmbedJobConfig, None, [
        f"model.name={w['model']}", "model.min_pixels=3136", "model.max_pixels=3136", "model_version=v1",
        f"dataset_uri={w['ds']}", f"output_uri={w['out']}", "progress=false", "batch_size=16",
        "preprocess_batch_size=32", "output_format=iceberg", f"iceberg.catalog.uri={w['props']['uri']}", *extra])


def _table(w: dict[str, Any]) -> Any:
    from pyiceberg.catalog import load_catalog

    return load_catalog("vlm2rec", **w["props"]).load_table(TABLE)  # the SQL catalog keys tables by catalog name


def _rows(table: Any, snapshot_id: int | None = None) -> pa.Table:
    return table.scan(snapshot_id=snapshot_id, selected_fields=tuple(ROW_COLUMNS)).to_arrow().sort_by("item_id")


def _props(snap: Any) -> dict[str, str]:
    return dict(snap.summary.additional_properties)


def _assert_no_duplicates_at_any_commit(table: Any) -> None:
    """Every state a reader could ever see is a snapshot: each has one row per item."""
    for snap in table.snapshots():
        keys = table.scan(snapshot_id=snap.snapshot_id, selected_fields=("item_id",)).to_arrow().column("item_id")
        assert len(pc.unique(keys)) == len(keys), f"duplicates in snapshot {snap.snapshot_id}"


def test_full_run_commits_one_tagged_snapshot(world: dict[str, Any]) -> None:
    from vlm2rec_ray.embed import read_embeddings, run_embed_items
    from vlm2rec_ray.embed.schema import output_schema

    w = world
    s = run_embed_items(_cfg(w, f"dt={DT1}"))
    assert (s["input_rows"], s["ok"], s["failed"]) == (NUM_ITEMS, NUM_ITEMS - 1, 1)
    t = _table(w)
    assert len(t.snapshots()) == 1 and t.current_snapshot().snapshot_id == s["snapshot_id"]
    assert t.metadata.refs[f"dt={DT1}"].snapshot_id == s["snapshot_id"]
    assert [f.name for f in t.spec().fields] == ["dt"]
    dim = int(t.properties["vlm2rec.embedding-dim"])
    p = _props(t.current_snapshot())
    assert p["vlm2rec.run-id"] == s["run_id"] and p["vlm2rec.model-version"] == "v1"
    assert p["vlm2rec.model-id"] == w["model"] and p["vlm2rec.mode"] == "full" and len(p["vlm2rec.config-hash"]) > 8
    assert '"failed": 1' in p["vlm2rec.counts"] and p["vlm2rec.dt"] == DT1
    rows = _rows(t)
    assert rows.num_rows == NUM_ITEMS - 1 and set(rows.column("dt").to_pylist()) == {DT1}
    assert MISSING not in rows.column("item_id").to_pylist()
    assert str(rows.schema.field("emb_fused").type).startswith(("list", "large_list"))  # Iceberg: variable lists
    # The errors Parquet of the run (named in the snapshot) holds the failed row.
    errors = storage.read_parquet(p["vlm2rec.errors-uri"] + "/part-00000.parquet")
    assert errors.column("item_id").to_pylist() == [MISSING] and errors.column("reason").to_pylist() == ["missing"]
    # read_embeddings gives the Parquet path's exact schema back (fixed-size vectors of the table's dim).
    got = read_embeddings(TABLE, catalog=w["props"])
    assert got.schema.equals(output_schema("items", dim), check_metadata=False), got.schema
    fused = got.column("emb_fused").combine_chunks().flatten().to_numpy().reshape(got.num_rows, dim)
    text = got.column("emb_text").combine_chunks().flatten().to_numpy().reshape(got.num_rows, dim)
    image = got.column("emb_image").combine_chunks().flatten().to_numpy().reshape(got.num_rows, dim)
    np.testing.assert_array_equal(fused, text + image)
    w["runs"]["full"] = s
    w["rows1"] = rows


def test_same_day_rerun_replaces_the_rows_and_moves_the_tag(world: dict[str, Any]) -> None:
    from vlm2rec_ray.embed import run_embed_items

    w = world
    s = run_embed_items(_cfg(w, f"dt={DT1}", "batch_size=5"))
    w["runs"]["rerun"] = s
    t = _table(w)
    assert len(t.snapshots()) == 2 and t.metadata.refs[f"dt={DT1}"].snapshot_id == s["snapshot_id"]
    _assert_no_duplicates_at_any_commit(t)
    rows = _rows(t)
    assert rows.select(["item_id", "emb_fused", "content_hash"]).equals(
        w["rows1"].select(["item_id", "emb_fused", "content_hash"]))  # deterministic CPU embeddings
    # The first run's data files are no longer in the current snapshot.
    files = {task.file.file_path for task in t.scan().plan_files()}
    assert files and all(f"run-{s['run_id']}" in f for f in files)
    w["rows1"] = rows


def test_incremental_run_changes_exactly_the_edited_rows(world: dict[str, Any]) -> None:
    from vlm2rec_ray.embed import run_embed_items

    w = world
    cat = w["catalog"]
    ids = cat.column("item_id").to_pylist()
    titles = cat.column("title").to_pylist()
    titles[ids.index(CHANGED)] += " (new edition)"
    v2 = cat.set_column(cat.schema.get_field_index("title"), "title", pa.array(titles))
    v2 = v2.filter(pa.array([i != DELETED for i in ids]))
    new_row = {c: v2.column(c)[0].as_py() for c in v2.column_names}
    new_row.update(item_id=NEW, title="a brand new item")
    v2 = pa.concat_tables([v2, pa.Table.from_pylist([new_row], schema=v2.schema)])
    storage.write_parquet(v2, f"{w['ds']}/catalog_v2.parquet")
    before = _table(w).current_snapshot().snapshot_id

    s = run_embed_items(_cfg(w, f"dt={DT2}", "incremental=true", f"catalog_uri={w['ds']}/catalog_v2.parquet"))
    assert (s["new"], s["changed"], s["deleted"], s["failed"], s["encoded"]) == (1, 1, 1, 1, 2)
    assert s["ok"] == NUM_ITEMS - 1 and s["previous"]["run_id"] == w["runs"]["rerun"]["run_id"]
    t = _table(w)
    assert len(t.snapshots()) == 3 and t.current_snapshot().parent_snapshot_id == before  # one commit
    assert t.metadata.refs[f"dt={DT2}"].snapshot_id == s["snapshot_id"]
    _assert_no_duplicates_at_any_commit(t)
    old, new = w["rows1"], _rows(t)
    old_by = {r["item_id"]: r for r in old.to_pylist()}
    new_by = {r["item_id"]: r for r in new.to_pylist()}
    assert set(old_by) - set(new_by) == {DELETED} and set(new_by) - set(old_by) == {NEW}
    differ = {k for k in set(old_by) & set(new_by) if old_by[k] != new_by[k]}
    assert differ == {CHANGED}, differ  # every other row is bit-identical (embedded_at and dt included)
    assert new_by[CHANGED]["dt"] == DT2 and new_by[NEW]["dt"] == DT2
    assert new_by[CHANGED]["emb_image"] == old_by[CHANGED]["emb_image"]  # same image, same bits
    assert new_by[CHANGED]["emb_text"] != old_by[CHANGED]["emb_text"]
    w["rows2"] = new


def test_failed_run_commits_nothing(world: dict[str, Any]) -> None:
    from vlm2rec_ray.embed import EmbedFailureError, run_embed_items

    w = world
    cat = w["catalog"]
    uris = cat.column("image_uri").to_pylist()
    broken = cat.set_column(cat.schema.get_field_index("image_uri"), "image_uri",
                            pa.array([f"images/gone-{i}.png" if i % 4 == 0 else u for i, u in enumerate(uris)]))
    storage.write_parquet(broken, f"{w['ds']}/catalog_broken.parquet")
    t = _table(w)
    before, meta = t.current_snapshot().snapshot_id, t.metadata_location
    with pytest.raises(EmbedFailureError, match="nothing committed") as e:
        run_embed_items(_cfg(w, f"dt={DT3}", f"catalog_uri={w['ds']}/catalog_broken.parquet"))
    t = _table(w)
    assert t.metadata_location == meta and t.current_snapshot().snapshot_id == before
    assert f"dt={DT3}" not in t.metadata.refs
    run_id = e.value.summary["run_id"]
    assert not storage.list_uris(f"{t.location()}/data/dt={DT3}/run-{run_id}")  # uncommitted files removed


def test_time_travel_to_the_previous_days_tag(world: dict[str, Any]) -> None:
    from vlm2rec_ray.embed import read_embeddings

    w = world
    day1 = read_embeddings(TABLE, DT1, catalog=w["props"], columns=["item_id", "emb_fused", "content_hash"])
    assert day1.sort_by("item_id").equals(w["rows1"].select(["item_id", "emb_fused", "content_hash"]).cast(
        day1.schema))
    assert read_embeddings(TABLE, DT2, catalog=w["props"]).num_rows == w["rows2"].num_rows
    with pytest.raises(FileNotFoundError, match="dt=2026-11-23"):
        read_embeddings(TABLE, DT3, catalog=w["props"])


def test_duckdb_reads_the_current_snapshot_from_arrow(world: dict[str, Any]) -> None:
    import duckdb

    w = world
    items = _table(w).scan().to_arrow()  # noqa: F841  (DuckDB finds the Arrow table by its variable name)
    con = duckdb.connect()
    n, distinct, days = con.execute("SELECT count(*), count(DISTINCT item_id), count(DISTINCT dt) FROM items").fetchone()
    assert (n, distinct, days) == (w["rows2"].num_rows, w["rows2"].num_rows, 2)
    # top-k by cosine similarity against one item's fused vector
    top = con.execute(f"""
        SELECT i.item_id, list_cosine_similarity(i.emb_fused, q.emb_fused) AS score
        FROM items i, (SELECT emb_fused FROM items WHERE item_id = '{CHANGED}') q
        ORDER BY score DESC LIMIT 3""").fetchall()
    assert top[0][0] == CHANGED and abs(top[0][1] - 1.0) < 1e-5 and len(top) == 3


def test_sequences_go_to_their_own_table(world: dict[str, Any]) -> None:
    from vlm2rec_ray.embed import read_embeddings, run_embed_sequences
    from vlm2rec_ray.embed.schema import output_schema

    w = world
    s = run_embed_sequences(_cfg(w, f"dt={DT1}", "split=test", "max_failure_fraction=0.5", "batch_size=8"))
    assert s["ok"] + s["failed"] == s["input_rows"] > 0 and s["ok"] > 0
    got = read_embeddings("embeddings.sequences", DT1, catalog=w["props"])
    dim = got.schema.field("emb_fused").type.list_size
    assert got.schema.equals(output_schema("sequences", dim), check_metadata=False) and got.num_rows == s["ok"]
    assert len(pc.unique(got.column("user_id"))) == got.num_rows
