"""jobs/nightly.py: exit codes and the summary when a step fails (no Ray needed: both steps fail early)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]


def _main():
    spec = importlib.util.spec_from_file_location("nightly_job", REPO / "jobs" / "nightly.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _config(tmp_path: Path, **embed) -> Path:
    cfg = {"embed": {"model": {"name": str(tmp_path / "model")}, "model_version": "v1",
                     "dataset_uri": str(tmp_path / "missing_dataset"), "output_uri": str(tmp_path / "out"),
                     "dt": "2026-11-22", **embed}}
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_failed_steps_exit_1_with_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main()(["--config", str(_config(tmp_path))]) == 1
    out = capsys.readouterr().out
    assert "nightly dt=2026-11-22: FAILED" in out and "items: FAILED" in out and "sequences: FAILED" in out
    summary = json.loads((tmp_path / "out" / "nightly" / "dt=2026-11-22" / "summary.json").read_text())
    assert summary["ok"] is False and set(summary["steps"]) == {"items", "sequences"}
    assert "missing_dataset" in summary["steps"]["items"]["error"]


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path)
    assert _main()(["--config", str(path), "items=false", "sequences=false"]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert _main()(["--config", str(path), "embed.batch_size=0"]) == 2
    assert "batch_size" in capsys.readouterr().err
