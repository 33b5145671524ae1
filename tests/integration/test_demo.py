"""`vlm2rec demo` end to end on a small setting, with an s3:// store on the moto server; then every object it
wrote (dataset, models, model cards, manifests, errors tables, metrics, report) and everything it printed
is searched for the credentials, which must never appear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlm2rec_ray import storage

pytestmark = pytest.mark.integration

ACCESS_KEY = "AKIAVLM2RECDEMOTEST1"
SECRET = "vlm2recSecretValueThatMustNeverBeLogged0"


def test_demo_small_on_s3_and_no_credentials_anywhere(moto_endpoint: str, s3_bucket: str,
                                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vlm2rec_ray.cli import app

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("VLM2REC_BUILD_DIR", str(tmp_path))
    storage.s3._CLIENTS.clear()
    store = f"s3://{s3_bucket}/demo"
    args = ["demo", f"store={store}", f"endpoint_url={moto_endpoint}", "runs=[VLM_Vanilla, VLM2Rec]",
            "backbone.recipe.steps=4", "backbone.recipe.corpus_items=64", "backbone.recipe.batch_size=8",
            "dataset.num_items=60", "dataset.num_users=60", "train.train.epochs=1", "train.train.per_device_batch_size=4",
            "evaluate.seeds=[0]", "evaluate.num_negatives=30", "embed.progress=false"]
    result = CliRunner().invoke(app, args)
    output = result.output  # stdout and stderr, as a terminal shows them
    assert result.exit_code == 0, output[-6000:]
    assert f"report: {store}/report/report.html" in output
    assert "VLM2Rec" in output and "VLM_Vanilla" in output

    summary = json.loads(storage.read_text(f"{store}/demo_summary.json", endpoint=moto_endpoint))
    assert set(summary["runs"]) == {"VLM_Vanilla", "VLM2Rec"}
    for run in summary["runs"].values():
        assert 0.0 <= run["task1"]["ndcg@20"] <= 1.0 and run["S"]["image"] is not None
    html = storage.read_text(summary["report"], endpoint=moto_endpoint)
    assert "VLM2Rec" in html and "dropout.png" in html
    assert storage.exists(f"{store}/runs/VLM2Rec/model/README.md", endpoint=moto_endpoint)  # model card
    # The demo starts from the pretrained-like backbone (here a 4-step recipe), copied into the store.
    built = json.loads(storage.read_text(f"{store}/backbone/vlm2rec_pretrain.json", endpoint=moto_endpoint))
    assert built["recipe"]["steps"] == 4 and built["corpus"]["id_prefix"] == "P"

    # Re-running reuses every finished step.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output[-4000:]
    assert again.output.count("exists, reused") >= 6

    # Credentials never leak: not in any object written, nor in the logs.
    uris = storage.list_uris(store, endpoint=moto_endpoint)
    assert len(uris) > 20
    for uri in uris:
        data = storage.read_bytes(uri, endpoint=moto_endpoint)
        assert SECRET.encode() not in data and ACCESS_KEY.encode() not in data, uri
    for text in (output, again.output):
        assert SECRET not in text and ACCESS_KEY not in text
