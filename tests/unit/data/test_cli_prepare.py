"""`vlm2rec prepare amazon|synthetic` on local paths: Table 3 row printed, user errors exit 2 without a traceback."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tests.fixtures.amazon import write_amazon_fixture
from vlm2rec_ray.cli import app
from vlm2rec_ray.data.catalog import read_stats


def test_prepare_amazon_cli(tmp_path: Path) -> None:
    reviews, meta = write_amazon_fixture(tmp_path / "raw", "2014")
    out = tmp_path / "Beauty"
    result = CliRunner().invoke(app, ["prepare", "amazon", "--reviews", str(reviews), "--meta", str(meta),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["Dataset", "#Users", "#Items", "#Inter.", "Avg.Len", "Sparsity"]
    assert lines[1].split() == ["Beauty", "6", "6", "30", "5.00", "16.67%"]
    assert '"no_title": 1' in result.output and "malformed lines" in result.output


def test_prepare_amazon_cli_user_errors(tmp_path: Path) -> None:
    reviews, meta = write_amazon_fixture(tmp_path / "raw", "2018")
    missing = CliRunner().invoke(app, ["prepare", "amazon", "--reviews", str(tmp_path / "nope.json.gz"), "--meta",
                                       str(meta), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "file not found" in missing.output and "Traceback" not in missing.output
    bad = CliRunner().invoke(app, ["prepare", "amazon", "--reviews", str(reviews), "--meta", str(meta), "--out",
                                   str(tmp_path / "o"), "--format", "1999"])
    assert bad.exit_code == 2 and "unknown format" in bad.output


def test_prepare_synthetic_cli(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    result = CliRunner().invoke(app, ["prepare", "synthetic", "--out", str(out), "--num-items", "40",
                                      "--num-users", "30", "--image-only-signal", "0.7", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "synthetic(s=0.7)" in result.output
    assert read_stats(str(out))["users"] == 30
    bad = CliRunner().invoke(app, ["prepare", "synthetic", "--out", str(out), "--image-only-signal", "2"])
    assert bad.exit_code == 2 and "image_only_signal must be in [0, 1]" in bad.output
