"""The embed entry points on local paths: ``jobs/embed_items.py`` with a YAML of *relative* paths run from
another working directory than Ray's workers (exit 0, snapshot readable), a bad config (exit 2 with a
message), and ``vlm2rec embed items`` on a JSONL catalog failing loudly when the failure share exceeds the limit
(exit 1)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.unit.embed.helpers import write_catalog
from vlm2rec_ray.cli import app

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _job(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def workdir(tmp_path: Path, tiny_backbone_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory with ``model/``, ``data/catalog.parquet`` (+ images) and ``embed.yaml``, all
    relative; the driver moves there after Ray started elsewhere."""
    shutil.copytree(tiny_backbone_dir, tmp_path / "model")
    write_catalog(tmp_path / "data", n=12, seed=3)
    (tmp_path / "embed.yaml").write_text(
        "model:\n  name: model\n  min_pixels: 3136\n  max_pixels: 3136\nmodel_version: local-v1\n"
        "catalog_uri: data/catalog.parquet\noutput_uri: out\ndt: 2026-11-22\nbatch_size: 4\nprogress: false\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_jobs_embed_items_relative_paths(workdir: Path, ray_local: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    from vlm2rec_ray.embed import read_embeddings

    # Ray's workers do not share the driver's working directory here (as under a job's runtime_env).
    worker_cwd = ray.get(ray.remote(num_cpus=0)(lambda: str(Path.cwd())).remote())
    assert Path(worker_cwd).resolve() != workdir.resolve()

    assert _job("embed_items").main(["--config", "embed.yaml"]) == 0
    out = capsys.readouterr().out
    assert "12 ok, 0 failed of 12 rows" in out
    t = read_embeddings(str(workdir / "out" / "items"))
    assert t.num_rows == 12 and t.column("model_id")[0].as_py() == str((workdir / "model").resolve())
    assert not (Path(worker_cwd) / "out").exists()
    assert pq.read_table(workdir / "out" / "items").num_rows == 12  # plain pyarrow over the output root

    # A bad config: exit 2, a message naming the setting, nothing run.
    assert _job("embed_items").main(["--config", "embed.yaml", "batch_size=0", "num_actorz=2"]) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "num_actorz: unknown setting" in err
    assert _job("embed_sequences").main(["--config", "missing.yaml"]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_cli_embed_items_fails_loudly(workdir: Path, ray_local: Any) -> None:
    # The same catalog as JSONL, with one empty title.
    rows = pq.read_table(workdir / "data" / "catalog.parquet").to_pylist()
    rows[4]["title"] = ""
    (workdir / "data" / "catalog.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()

    res = runner.invoke(app, ["embed", "items", "--config", "embed.yaml", "catalog_uri=data/catalog.jsonl",
                              "max_failure_fraction=0"])
    assert res.exit_code == 1, res.output
    assert "11 ok, 1 failed of 12 rows" in res.stdout and "empty_title=1" in res.stdout
    assert "nothing published" in res.stderr and "max_failure_fraction" in res.stderr
    assert not (workdir / "out" / "items" / "dt=2026-11-22" / "_manifest.json").exists()

    res = runner.invoke(app, ["embed", "sequences", "--config", "embed.yaml", "dt=22-11-2026"])
    assert res.exit_code == 2 and "dt='22-11-2026' is not a date" in res.stderr, res.output
