"""`vlm2rec study` end to end on a small setting: tuning on valid, ablations at the chosen point, seeds on test, in
a spawned worker process; a second run resumes every finished run from runs.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.integration


def test_study_runs_and_resumes(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    from vlm2rec_ray.cli import app

    out = tmp_path / "study"
    args = ["study", f"out={out}", f"backbone={tiny_backbone_dir}", "dataset.num_items=40", "dataset.num_users=24",
            "dataset.image_size=16", "budget=2", "final_seeds=[0, 1]", "eval_seeds=[0]", "num_negatives=20",
            "workers=1", "train.train.max_steps=2", "train.train.per_device_batch_size=4", "train.train.diag_every=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-4000:]
    study = json.loads((out / "study.json").read_text())
    assert list(study["final"]) == ["Vanilla", "SFT", "VLM2Rec", "WPCL only", "InfoNCE + CRTR"]
    assert study["final"]["WPCL only"]["point"] == study["chosen"]["VLM2Rec"]  # ablations at VLM2Rec's point
    assert study["final"]["SFT"]["seeds"] == [0, 1] and len(study["tuning"]["VLM2Rec"]) == 2
    best = study["tuning"]["SFT"][0]
    assert best["point"] == study["chosen"]["SFT"]
    assert best["valid"]["ndcg@20"] == max(r["valid"]["ndcg@20"] for r in study["tuning"]["SFT"])
    assert study["final"]["VLM2Rec"]["grad_alignment"] and study["final"]["VLM2Rec"]["train_last"]["beta"][0] >= 0.05
    text = (out / "study.md").read_text()
    assert "| Vanilla |" in text and "### VLM2Rec" in text and (out / "grad_alignment.png").stat().st_size > 0
    runs = (out / "runs.jsonl").read_text().splitlines()
    assert len(runs) == 2 + 2 + 1 + 4 * 2  # tuning, Vanilla, 4 methods x 2 seeds

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output[-4000:]
    assert "tune SFT: 2 runs, 2 already done" in again.output and "final runs: 9 runs, 9 already done" in again.output
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(runs)
