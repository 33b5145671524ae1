"""The one runner of jobs/*.py and the CLI: exit 2 for a bad config (field, value, fix), 1 with one line for a
failed job (a storage error is no traceback), the report on stdout."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vlm2rec_ray import runner, storage
from vlm2rec_ray.cli import app

REPO = Path(__file__).resolve().parents[3]


def _job(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture
def failing_job(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """embed-items whose run raises what the test puts in the list."""
    raised: list[BaseException] = []

    def run(cfg: Any, **_: Any) -> Any:
        raise raised[0]

    monkeypatch.setitem(runner.JOBS, "embed-items", runner.Job(runner.JOBS["embed-items"].config, run, str))
    return raised


def test_bad_config_exits_2_naming_field_value_and_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["model.name=m", "model_version=v", f"output_uri={tmp_path}", f"dataset_uri={tmp_path}", "batch_size=0"]
    assert _job("embed_items")(args) == 2
    err = capsys.readouterr().err
    assert "batch_size: Input should be greater than or equal to 1 (got 0)" in err and "Traceback" not in err
    res = CliRunner().invoke(app, ["embed", "items", *args])
    assert res.exit_code == 2 and "batch_size" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("error", [storage.StorageError("access denied to s3://b/k (AccessDenied); check the "
                                                        "credentials for this bucket", "denied"),
                                   FileNotFoundError("s3://b/cat.parquet not found; check the path")])
def test_failed_job_exits_1_with_one_line(failing_job: list[BaseException], error: Exception, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    failing_job.append(error)
    args = ["model.name=m", "model_version=v", f"output_uri={tmp_path}", f"dataset_uri={tmp_path}"]
    assert _job("embed_items")(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {error}"]  # one line, no traceback
    res = CliRunner().invoke(app, ["embed", "items", *args])
    assert res.exit_code == 1 and res.output.strip() == f"error: {error}"


def test_a_bug_is_not_hidden(failing_job: list[BaseException], tmp_path: Path) -> None:
    failing_job.append(KeyError("a bug"))
    with pytest.raises(KeyError, match="a bug"):
        runner.run_job("embed-items", None, ["model.name=m", "model_version=v", f"output_uri={tmp_path}",
                                             f"dataset_uri={tmp_path}"])
