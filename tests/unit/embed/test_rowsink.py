"""The embed job's sink (``RowSink``: rows routed by status into Parquet files, counted) called as Ray Data calls
it, without Ray; and its inputs read by Ray Data's own readers (``inputs.read_rows``)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.faults import FaultPlan, FaultProxy
from vlm2rec_ray import storage
from vlm2rec_ray.embed import inputs, stages
from vlm2rec_ray.embed.schema import output_schema, row_schema, rows
from vlm2rec_ray.embed.sink import Route, RowSink
from vlm2rec_ray.embed.snapshot import SnapshotRun

DIM = 4


def _rows(keys: list[str], status: str, **extra: Any) -> pa.Table:
    n = len(keys)
    emb = None
    if status in ("encoded", "carried"):
        emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * DIM, np.float32)),
                                                type=row_schema(DIM).field("emb_text").type)
    return rows(DIM, n, key=keys, emb_text=emb, emb_image=emb, emb_fused=emb,
                content_hash=["h" * 64] * n if emb is not None else None, status=[status] * n,
                embedded_at=[0] * n if emb is not None else None, **extra)


def _plan(root: str, endpoint: str | None = None) -> Any:
    cfg = SimpleNamespace(model=SimpleNamespace(name="m"), model_version="v")
    return SimpleNamespace(cfg=cfg, run=SnapshotRun(root, "2026-01-01", "r1", endpoint), kind="items", dim=DIM,
                           endpoint=endpoint, rows_per_file=10)


def test_snapshot_sink_routes_by_status_and_counts(tmp_path: Path) -> None:
    sink = stages.snapshot_sink(_plan(str(tmp_path / "items")))
    blocks = [_rows(["a", "b"], "carried", change=["unchanged"] * 2, in_prev=[True, True]),
              _rows(["c"], "encoded", change=["new"], texts_encoded=[1], images_encoded=[1]),
              _rows(["d"], "failed", reason=["missing"], detail=["image x: missing"], title=["t"], image_uri=["x"])]
    res = sink.write(blocks, SimpleNamespace(task_idx=0))
    c = res["counts"]
    assert (c["rows"], c["carried"], c["encoded"], c["failed"], c["new"], c["unchanged"], c["in_prev"]) == (
        4, 2, 1, 1, 1, 2, 2)
    assert (c["texts_encoded"], c["images_encoded"], res["reasons"]) == (1, 1, {"missing": 1})
    run = tmp_path / "items" / "dt=2026-01-01" / "run=r1"
    data = pq.read_table(run / "part-00000.parquet")
    assert data.schema.remove_metadata() == output_schema("items", DIM) and data.column("item_id").to_pylist() == ["a", "b", "c"]
    errors = pq.read_table(run / "_errors" / "part-00000.parquet")
    assert errors.column("item_id").to_pylist() == ["d"] and errors.column("reason").to_pylist() == ["missing"]
    assert [f["rows"] for f in res["files"]["data"]] == [3] and [f["rows"] for f in res["files"]["errors"]] == [1]
    with pytest.raises(AssertionError, match="unrouted status"):
        sink.write([_rows(["e"], "encode")], SimpleNamespace(task_idx=1))
    assert not (run / "part-00001.parquet").exists()  # nothing of the failed write task is left


def test_sink_uploads_through_s3_faults_and_staged_rows_read_back(moto_endpoint: str, s3_bucket: str) -> None:
    plan = FaultPlan(error_rate=0.3, drop_rate=0.1, slow_rate=0.0, seed=4)
    with FaultProxy(moto_endpoint, plan) as proxy:
        snap = stages.snapshot_sink(_plan(f"s3://{s3_bucket}/items", proxy.url))
        res = snap.write([_rows(["a", "b", "c"], "carried")], SimpleNamespace(task_idx=3))
        scan = RowSink(name="scan", endpoint=proxy.url, rows_per_file=10, routes={
            g: Route(f"s3://{s3_bucket}/scan/{g}", st, row_schema(DIM)) for g, st in stages.SCAN_GROUPS.items()})
        scan_rows = pa.concat_tables([_rows(["a"], "new"), _rows(["b"], "unchanged", in_prev=[True]),
                                      _rows(["c"], "failed", reason=["corrupt"])])
        scan_res = scan.write([scan_rows], SimpleNamespace(task_idx=0))
    assert plan.counts["error"] + plan.counts["drop"] >= 1  # the uploads met faults and still landed
    assert res["counts"]["rows"] == 3 and scan_res["counts"]["unchanged"] == 1
    part = f"s3://{s3_bucket}/items/dt=2026-01-01/run=r1/part-00003.parquet"
    assert storage.read_parquet(part, endpoint=moto_endpoint).num_rows == 3
    assert {g: [f["uri"] for f in fs] for g, fs in scan_res["files"].items()} == {
        g: [f"s3://{s3_bucket}/scan/{g}/part-00000.parquet"] for g in ("encode", "failed", "unchanged")}
    staged = storage.read_parquet(scan_res["files"]["failed"][0]["uri"], endpoint=moto_endpoint)
    assert staged.schema.remove_metadata() == row_schema(DIM)  # rows of the contract, read back unchanged
    assert staged.column("reason").to_pylist() == ["corrupt"]


def test_read_rows_uses_ray_datas_readers(ray_local: Any, tmp_path: Path) -> None:
    recs = [{"item_id": "a", "title": "t a", "image_uri": "x.png"}, {"item_id": "b", "title": "t b", "image_uri": "y"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "c.json.gz").write_bytes(gzip.compress(json.dumps(recs).encode()))  # one JSON array, gzipped
    files = [str(tmp_path / n) for n in ("c.jsonl", "c.json.gz")]
    got = inputs.read_rows(files, "json", endpoint=None, include_paths=True).take_all()
    assert sorted(r["item_id"] for r in got) == ["a", "a", "b", "b"]
    assert {r["path"] for r in got} == set(inputs.fs_paths(files, None))  # Ray's path -> our URI
    pq.write_table(pa.table({"item_id": ["p", "q"], "title": ["t", "u"], "image_uri": ["i", "j"], "extra": [1, 2]}),
                   tmp_path / "cat.parquet")
    ds = inputs.read_rows([str(tmp_path / "cat.parquet")], "parquet", endpoint=None, columns=["item_id", "title"])
    assert ds.to_arrow_refs() and sorted(r["item_id"] for r in ds.take_all()) == ["p", "q"]
    assert ds.schema().names == ["item_id", "title"]
