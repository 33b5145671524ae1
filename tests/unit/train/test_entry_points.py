"""`vlm2rec train` and jobs/train.py: a bad config is a clean message and exit code 2, before Ray starts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlm2rec_ray.cli import app

REPO = Path(__file__).resolve().parents[3]
TINY = str(REPO / "jobs" / "configs" / "train_tiny.yaml")


def test_cli_train_bad_config_exits_2() -> None:
    res = CliRunner().invoke(app, ["train", "--config", TINY, "train.zero_stage=5"])
    assert res.exit_code == 2, res.output
    assert "train.zero_stage=5 is not a DeepSpeed ZeRO stage; use 0, 1, 2 or 3" in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(app, ["train", "--config", "missing.yaml"])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = CliRunner().invoke(app, ["train", "--help"])
    assert res.exit_code == 0 and "--config" in res.output


def test_jobs_train_bad_config_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--config", TINY, "train.precision=fp16"]) == 2
    err = capsys.readouterr().err
    assert "train.precision='fp16' is not supported on CPU" in err and "use train.precision=bf16 or fp32" in err


def test_connect_ray_joins_a_cluster_when_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """RAY_ADDRESS (set by `ray job submit`) or an explicit address joins that cluster; otherwise a private
    local instance starts."""
    import ray

    import vlm2rec_ray.runtime
    from vlm2rec_ray.train.trainer import connect_ray

    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("init", kw.get("address"))))
    monkeypatch.setattr(vlm2rec_ray.runtime, "init_local_ray", lambda **kw: calls.append(("local", None)))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    connect_ray()
    monkeypatch.delenv("RAY_ADDRESS")
    connect_ray("auto")
    connect_ray()
    assert calls == [("init", "127.0.0.1:6379"), ("init", "auto"), ("local", None)]
