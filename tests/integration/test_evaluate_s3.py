"""`vlm2rec evaluate` reading a dataset and dt= embedding snapshots from S3 (moto_server) and writing
eval.json + report there; then --compare reading them back."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.unit.eval.synthetic_tables import world
from vlm2rec_ray import storage
from vlm2rec_ray.cli import app

pytestmark = pytest.mark.integration


def _put_parquet(table, uri: str) -> None:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def test_evaluate_on_s3(moto_endpoint: str, s3_bucket: str) -> None:
    base = f"s3://{s3_bucket}"
    w = world(num_users=30, num_items=140, text_signal=3.0, image_signal=3.0)
    for split in ("train", "valid", "test"):
        _put_parquet(w["test"], f"{base}/data/splits/{split}.parquet")
    # Two snapshots: the older one holds uninformative embeddings and must not be read when dt is not given.
    old = world(num_users=30, num_items=140, text_signal=0.0, image_signal=0.0, seed=5)
    for dt, src in (("2026-01-01", old), ("2026-01-02", w)):
        _put_parquet(src["items"], f"{base}/run/items/dt={dt}/part-0.parquet")
        _put_parquet(src["seqs"], f"{base}/run/seqs/dt={dt}/part-0.parquet")
    storage.write_text(f"{base}/run/train/metrics.jsonl", json.dumps({"step": 0, "loss": 1.0}) + "\n")
    res = CliRunner().invoke(app, ["evaluate", "name=VLM2Rec", f"dataset_uri={base}/data",
                                   f"item_embeddings_uri={base}/run/items", f"sequence_embeddings_uri={base}/run/seqs",
                                   f"training_metrics_uri={base}/run/train", f"output_uri={base}/run/eval",
                                   "seeds=[0]", "task2.epochs=1", "task2.dim=16", "task2.models=[gru4rec]"])
    assert res.exit_code == 0, res.output
    result = json.loads(storage.read_text(f"{base}/run/eval/eval.json"))
    assert result["task1"]["sampled"]["hit@10"] > 0.8  # the latest snapshot (the informative one) was read
    assert "training_metrics_error" not in result
    assert storage.exists(f"{base}/run/eval/report.html") and storage.exists(f"{base}/run/eval/loss.png")
    res = CliRunner().invoke(app, ["evaluate", "--compare", f"{base}/run/eval"])
    assert res.exit_code == 0 and "VLM2Rec" in res.output, res.output


def test_evaluate_reads_snapshots_at_the_configured_endpoint(moto_endpoint: str, s3_bucket: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint given in the config (not the environment) reaches the snapshot reader too."""
    base = f"s3://{s3_bucket}/cfg-endpoint"
    w = world(num_users=20, num_items=140, text_signal=3.0, image_signal=3.0)
    for split in ("train", "valid", "test"):
        _put_parquet(w["test"], f"{base}/data/splits/{split}.parquet")
    _put_parquet(w["items"], f"{base}/run/items/dt=2026-01-01/part-0.parquet")
    _put_parquet(w["seqs"], f"{base}/run/seqs/dt=2026-01-01/part-0.parquet")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    res = CliRunner().invoke(app, ["evaluate", "name=VLM2Rec", f"dataset_uri={base}/data",
                                   f"item_embeddings_uri={base}/run/items", f"sequence_embeddings_uri={base}/run/seqs",
                                   f"output_uri={base}/run/eval", f"storage.endpoint_url={moto_endpoint}",
                                   "seeds=[0]", "task2.epochs=1", "task2.dim=16", "task2.models=[gru4rec]"])
    assert res.exit_code == 0, res.output
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    assert json.loads(storage.read_text(f"{base}/run/eval/eval.json"))["task1"]["sampled"]["hit@10"] > 0.8
