"""The embed job's counted reader (``reader.read_pieces``, called as Ray Data would, without Ray) and the
``storage_retries`` column through the sinks: every retry a read or an upload makes ends up counted once."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.faults import FaultPlan, FaultProxy
from vlm2rec_ray import storage
from vlm2rec_ray.embed import preprocess as pre
from vlm2rec_ray.embed import reader
from vlm2rec_ray.embed.predictor import sink_row_schema
from vlm2rec_ray.embed.sink import ScanSink, SnapshotSink

DIM = 4


def _catalog(n: int) -> pa.Table:
    return pa.table({"item_id": [f"i{i:05d}" for i in range(n)], "title": [f"title {i}" for i in range(n)],
                     "image_uri": [f"images/{i}.png" for i in range(n)], "extra": list(range(n))})


def _read(files: list[str], fmt: str, endpoint: str | None, pieces: list[dict] | None = None,
          **kw: object) -> list[pa.Table]:
    if pieces is None:
        pieces = (reader.parquet_pieces(files, endpoint=endpoint) if fmt == "parquet"
                  else [{"uri": f, "row_group": -1} for f in files])
    batch = pa.Table.from_pylist([{"uri": p["uri"], "row_group": p["row_group"]} for p in pieces])
    out = []
    for i in range(batch.num_rows):  # batch_size=1, as read_files runs it
        out += list(reader.read_pieces(batch.slice(i, 1), fmt=fmt, endpoint=endpoint,
                                       columns=kw.get("columns"), include_paths=bool(kw.get("include_paths"))))
    return out


def test_pieces_are_row_groups_with_rows(tmp_path: Path) -> None:
    t = _catalog(25_000)
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=10_000)
    pq.write_table(t.slice(0, 0), tmp_path / "empty.parquet")
    files = [str(tmp_path / "a.parquet"), str(tmp_path / "empty.parquet")]
    pieces = reader.parquet_pieces(files, endpoint=None)
    assert [(p["row_group"], p["rows"]) for p in pieces] == [(0, 10_000), (1, 10_000), (2, 5_000)]
    tables = _read(files, "parquet", None, columns=["item_id", "title"], include_paths=True)
    assert all(tb.num_rows <= reader.READ_BATCH_ROWS for tb in tables)
    got = pa.concat_tables(tables)
    assert got.column_names == ["item_id", "title", "path", "storage_retries"]
    assert got.select(["item_id", "title"]).equals(t.select(["item_id", "title"]))
    assert set(got.column("path").to_pylist()) == {files[0]} and reader.retries_in(got) == 0
    assert reader.parquet_schema(files[1], endpoint=None, columns=["title"]).names == ["title"]


def test_json_pieces(tmp_path: Path) -> None:
    rows = [{"item_id": "a", "title": "t a", "image_uri": "x.png"}, {"item_id": "b", "title": "t b", "image_uri": "y"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "c.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode()))  # one JSON array
    (tmp_path / "blank.jsonl").write_text("\n \n")
    files = [str(tmp_path / n) for n in ("c.jsonl", "c.json.gz", "blank.jsonl")]
    got = pa.concat_tables(_read(files, "json", None))
    assert got.column("item_id").to_pylist() == ["a", "b", "a", "b"] and reader.retries_in(got) == 0


def test_reads_through_faults_carry_every_retry(moto_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    t = _catalog(30_000)
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=5000)
    files = []
    for name in ("a", "b"):
        uri = f"s3://{s3_bucket}/cat/{name}.parquet"
        storage.put_file(tmp_path / "a.parquet", uri, endpoint=moto_endpoint)
        files.append(uri)
    plan = FaultPlan(error_rate=0.3, drop_rate=0.1, slow_rate=0.0, seed=11)
    with FaultProxy(moto_endpoint, plan) as proxy:
        pieces = reader.parquet_pieces(files, endpoint=proxy.url)  # the driver's part: not in the column
        planned = plan.counts["error"] + plan.counts["drop"]
        before = storage.retry_attempts()
        tables = _read(files, "parquet", proxy.url, pieces, columns=["item_id"])
        counted = storage.retry_attempts() - before
    got = pa.concat_tables(tables)
    faults = plan.counts["error"] + plan.counts["drop"]
    print(f"\nfault proxy: {plan.counts}; footers {planned}, column {reader.retries_in(got)}")
    assert got.num_rows == 2 * t.num_rows == sum(p["rows"] for p in pieces)
    assert faults - planned >= 3  # the reads really met faults
    assert reader.retries_in(got) == counted == faults - planned  # each fault of a read: one retry, in the column


def _sink_rows(keys: list[str], status: str, retries: int) -> pa.Table:
    schema = sink_row_schema(DIM)
    n = len(keys)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * DIM, np.float32)), type=schema.field("emb_text").type)
    cols = {"key": pa.array(keys), "emb_text": emb, "emb_image": emb, "emb_fused": emb,
            "content_hash": pa.array(["h" * 64] * n), "embedded_at": pa.array([0] * n, schema.field("embedded_at").type),
            "status": pa.array([status] * n), "change": pa.array([""] * n), "in_prev": pa.array([False] * n),
            "texts_encoded": pa.array([0] * n, pa.int32()), "images_encoded": pa.array([0] * n, pa.int32())}
    t = pa.Table.from_arrays([cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in schema], schema=schema)
    return reader.with_retries(t, retries)


def test_sinks_add_up_row_retries_stats_rows_and_their_uploads(moto_endpoint: str, s3_bucket: str,
                                                                tmp_path: Path) -> None:
    stats = pre.stats_row(5, DIM)
    assert stats.column("status").to_pylist() == [pre.STATS_STATUS] and reader.retries_in(stats) == 5
    blocks = [_sink_rows(["a", "b"], "carried", 2), stats, _sink_rows(["c"], "carried", 0)]
    sink = SnapshotSink(kind="items", run_uri=str(tmp_path / "run"), errors_uri=str(tmp_path / "run" / "_errors"),
                        dim=DIM, model_id="m", model_version="v", endpoint=None, rows_per_file=10)
    res = sink.write(blocks, SimpleNamespace(task_idx=0))
    assert res["counts"]["rows"] == 3 and res["counts"]["storage_retries"] == 7  # the stats row is no row
    assert pq.read_table(tmp_path / "run" / "part-00000.parquet").column("item_id").to_pylist() == ["a", "b", "c"]

    plan = FaultPlan(error_rate=0.3, drop_rate=0.1, slow_rate=0.0, seed=4)
    with FaultProxy(moto_endpoint, plan) as proxy:
        s3 = SnapshotSink(kind="items", run_uri=f"s3://{s3_bucket}/run", errors_uri=f"s3://{s3_bucket}/run/_errors",
                          dim=DIM, model_id="m", model_version="v", endpoint=proxy.url, rows_per_file=10)
        res = s3.write(blocks, SimpleNamespace(task_idx=3))
        scan_rows = pa.Table.from_pylist([{"key": k, "status": st, "in_prev": st == "unchanged",
                                           "storage_retries": r} for k, st, r in
                                          [("a", "new", 1), ("b", "unchanged", 0), ("c", "failed", 0)]],
                                         schema=pre.SCAN_ROW_SCHEMA)
        scan = ScanSink(uri=f"s3://{s3_bucket}/scan", endpoint=proxy.url, schema=pre.SCAN_ROW_SCHEMA)
        scan_res = scan.write([scan_rows], SimpleNamespace(task_idx=0))
    uploads = plan.counts["error"] + plan.counts["drop"]
    assert res["counts"]["storage_retries"] + scan_res["counts"]["storage_retries"] == 7 + 1 + uploads
    assert storage.read_parquet(f"s3://{s3_bucket}/run/part-00003.parquet").num_rows == 3
    assert scan_res["files"] == {g: [f"s3://{s3_bucket}/scan/{g}/part-00000.parquet"]
                                 for g in ("encode", "failed", "unchanged")}
    staged = storage.read_parquet(scan_res["files"]["encode"][0], endpoint=moto_endpoint)
    assert staged.column("key").to_pylist() == ["a"] and "storage_retries" not in staged.column_names


def test_retries_travel_through_the_cpu_stages(tmp_path: Path) -> None:
    from tests.unit.embed.helpers import item_opts, write_catalog

    cat = write_catalog(tmp_path, n=6)
    raw = reader.with_retries(pq.read_table(cat).append_column("extra", pa.array(range(6))), 4)
    conformed = pre.conform_batch(raw, kind="items")
    assert reader.retries_in(conformed) == 4
    for mode in ("encode", "scan"):
        out = pre.prepare_items(conformed, opts=item_opts(str(cat), mode=mode))
        assert reader.retries_in(out) == 4 and out.column("storage_retries").to_pylist()[1:] == [0] * 5
    scan = pre.prepare_items(conformed, opts=item_opts(str(cat), mode="scan"))
    again = pre.prepare_from_scan(reader.with_retries(scan, 3), opts=item_opts(str(cat)), kind="items")
    assert reader.retries_in(again) == 3
    assert reader.retries_in(pre.to_sink_rows(reader.with_retries(scan, 2), source="failed", dim=DIM)) == 2
