"""Snapshot layout: manifest written last, atomic same-day swap, what readers can and cannot see."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlm2rec_ray.embed import snapshot as snap
from vlm2rec_ray.embed.schema import fixed_size_list, output_schema

DIM = 4


def _table(ids: list[str], value: float) -> pa.Table:
    emb = np.full((len(ids), DIM), value, np.float32)
    n = len(ids)
    return pa.Table.from_arrays([
        pa.array(ids), fixed_size_list(emb, DIM), fixed_size_list(emb, DIM), fixed_size_list(emb * 2, DIM),
        pa.array(["h"] * n), pa.array(["m"] * n), pa.array(["v"] * n),
        pa.array([0] * n, pa.timestamp("us", tz="UTC")),
    ], schema=output_schema("items", DIM))


def _write_run(root: Path, dt: str, run_id: str, parts: list[pa.Table]) -> dict:
    run = Path(snap.SnapshotRun(str(root), dt, run_id).uri)
    run.mkdir(parents=True)
    files = []
    for i, t in enumerate(parts):
        pq.write_table(t, run / f"part-{i:05d}.parquet")
        files.append({"path": f"run={run_id}/part-{i:05d}.parquet", "rows": t.num_rows, "bytes": 0})
    return {"format": snap.MANIFEST_FORMAT, "kind": "items", "dt": dt, "run_id": run_id, "files": files,
            "error_files": [], "num_rows": sum(t.num_rows for t in parts), "schema": {"embedding_dim": DIM}}


def _publish(root: str | Path, dt: str, manifest: dict) -> dict | None:
    return snap.SnapshotRun(str(root), dt, manifest["run_id"]).publish(manifest)


def test_manifest_is_the_snapshot(tmp_path: Path) -> None:
    root = tmp_path / "items"
    m1 = _write_run(root, "2026-01-01", "r1", [_table(["a", "b"], 1.0), _table(["c"], 1.0)])
    # Before the manifest exists the run is invisible: a half-written run is never read.
    with pytest.raises(FileNotFoundError, match="run in progress or a failed run"):
        snap.read_embeddings(str(root))
    assert _publish(str(root), "2026-01-01", m1) is None
    t = snap.read_embeddings(str(root))
    assert t.num_rows == 3 and t.schema == output_schema("items", DIM)
    # Plain pyarrow reads the files the manifest lists, and the dataset (it skips _manifest.json, _errors).
    manifest = json.loads((root / "dt=2026-01-01" / "_manifest.json").read_text())
    assert sum(pq.read_table(root / "dt=2026-01-01" / f["path"]).num_rows for f in manifest["files"]) == 3
    assert pq.read_table(root).num_rows == 3

    # A new day's run in progress does not hide the published day.
    _write_run(root, "2026-01-02", "r2", [_table(["a"], 2.0)])
    assert snap.read_embeddings(str(root)).num_rows == 3
    snaps, incomplete = snap.list_snapshots(str(root))
    assert sorted(snaps) == ["2026-01-01"] and incomplete == ["2026-01-02"]
    with pytest.raises(FileNotFoundError, match=r"no snapshot dt=2026-01-02 .*run in progress.*available: \['2026-01-01'\]"):
        snap.read_embeddings(str(root), "2026-01-02")


def test_same_day_rerun_swaps_and_deletes_the_old_run(tmp_path: Path) -> None:
    root = str(tmp_path / "items")
    _publish(root, "2026-01-01", _write_run(tmp_path / "items", "2026-01-01", "r1", [_table(["a", "b"], 1.0)]))
    # A failed run of the same day leaves a status file and is cleaned by the next publish.
    _write_run(tmp_path / "items", "2026-01-01", "rX", [_table(["zz"], 9.0)])
    snap.SnapshotRun(root, "2026-01-01", "rX").fail({"error": "too many failures"})
    m2 = _write_run(tmp_path / "items", "2026-01-01", "r2", [_table(["a", "b"], 2.0)])
    old = _publish(root, "2026-01-01", m2)
    assert old is not None and old["run_id"] == "r1"
    part = tmp_path / "items" / "dt=2026-01-01"
    assert sorted(p.name for p in part.iterdir()) == ["_manifest.json", "run=r2"]
    t = snap.read_embeddings(root)
    assert t.num_rows == 2 and t.column("emb_fused")[0].as_py() == [4.0] * DIM  # no duplicates, new values
    assert snap.latest_manifest(root)["run_id"] == "r2"
    assert snap.latest_manifest(root, on_or_before="2025-12-31") is None


def test_latest_and_plain_partitions(tmp_path: Path) -> None:
    root = tmp_path / "items"
    for dt, v in (("2026-01-01", 1.0), ("2026-01-03", 3.0)):
        _publish(str(root), dt, _write_run(root, dt, f"r{v:g}", [_table(["a"], v)]))
    # A partition written by another tool (no manifest, files directly inside) is a plain snapshot.
    (root / "dt=2026-01-02").mkdir()
    pq.write_table(_table(["a", "b"], 2.0), root / "dt=2026-01-02" / "part-0.parquet")
    assert snap.read_embeddings(str(root)).column("emb_text")[0].as_py() == [3.0] * DIM
    assert snap.read_embeddings(str(root), "2026-01-02").num_rows == 2
    assert snap.latest_manifest(str(root), on_or_before="2026-01-02")["dt"] == "2026-01-01"
    assert snap.read_embeddings(str(root), columns=["item_id"]).column_names == ["item_id"]
    with pytest.raises(FileNotFoundError, match="no embeddings at"):
        snap.read_embeddings(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"available: \['2026-01-01', '2026-01-02', '2026-01-03'\]"):
        snap.read_embeddings(str(root), "2020-01-01")


def test_empty_snapshot_and_errors(tmp_path: Path) -> None:
    root = str(tmp_path / "items")
    m = {"format": snap.MANIFEST_FORMAT, "kind": "items", "dt": "2026-01-01", "run_id": "r0", "files": [],
         "error_files": [], "num_rows": 0, "schema": {"embedding_dim": DIM}}
    _publish(root, "2026-01-01", m)
    t = snap.read_embeddings(root)
    assert t.num_rows == 0 and t.schema == output_schema("items", DIM)
    assert snap.read_errors(root).num_rows == 0


def test_run_ids_sort_by_time() -> None:
    import datetime as dt

    a = snap.new_run_id(dt.datetime(2026, 1, 1, 10, 0, 0, tzinfo=dt.timezone.utc))
    b = snap.new_run_id(dt.datetime(2026, 1, 1, 10, 0, 1, tzinfo=dt.timezone.utc))
    assert a < b and a.startswith("20260101T100000000Z-")
