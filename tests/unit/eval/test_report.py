"""The report (HTML + PNG), the comparison tables, `vlm2rec evaluate` and jobs/evaluate.py end to end."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.unit.eval.synthetic_tables import world, write_dataset
from vlm2rec_ray.cli import app
from vlm2rec_ray.eval.compare import compare_runs, format_table, load_result, summary_table, tables
from vlm2rec_ray.eval.report import load_training_metrics, series, write_report

REPO = Path(__file__).resolve().parents[3]


def _history(kind: str, steps: int = 40) -> list[dict[str, Any]]:
    rows = []
    for s in range(steps):
        row: dict[str, Any] = {"step": s * 10, "loss/total": 3 * math.exp(-s / 10) + 0.5}
        if kind == "vlm2rec":
            row.update({"loss/wpcl": row["loss/total"] - 0.1, "loss/crtr": 0.1 * math.exp(-s / 8),
                        "grad_align/text": 0.9 - 0.3 * s / steps, "grad_align/image": 0.1 + 0.6 * s / steps,
                        "train/margin_text": 0.4, "train/margin_image": 0.1 + s / steps / 4, "train/beta": 1 - s / steps})
        else:  # another trainer's spelling of the same curves
            row.update({"cos_total_text": 0.98, "cos_total_image": 0.05})
        rows.append(row)
    return rows


def _result(name: str, v2f: float) -> dict[str, Any]:
    m = {"hit@10": 0.5, "ndcg@10": 0.3, "hit@20": 0.6, "ndcg@20": 0.33}
    return {
        "name": name,
        "task1": {"sampled": m, "sampled_std": {k: 0.01 for k in m}, "full": m, "num_users": 200,
                  "num_negatives": 100, "seeds": [0, 1, 2], "skipped": {"no_sequence_embedding": 3}},
        "dropout": {"f2f": m, "t2f": {**m, "hit@10": 0.45}, "v2f": {**m, "hit@10": v2f, "ndcg@10": v2f / 2}},
        "geometry": {mod: {"A_pos": 0.5, "A_neg": 0.2, "U": -2.5, "S": 0.3} for mod in ("text", "image", "fused")},
        "task2": [{"model": "sasrec", "init": i, "sampled": m, "train_seconds": 1.0,
                   "by_frequency": [{"bucket": "0", "users": 20, **m, "ndcg@10": 0.1 if i == "id" else 0.25},
                                    {"bucket": "1-4", "users": 180, **m}]} for i in ("id", "ours")],
    }


def test_training_metrics_readers(tmp_path: Path) -> None:
    rows = _history("vlm2rec", 5)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_training_metrics(str(tmp_path / "a")) == rows  # a directory holding metrics.jsonl
    csv_file = tmp_path / "m.csv"
    csv_file.write_text("step,loss,note\n0,2.5,x\n1,,y\n2,1.5,z\n")
    got = load_training_metrics(str(csv_file))
    assert series(got, ("loss/total", "loss")) == ([0.0, 2.0], [2.5, 1.5])  # blank cells skipped
    (tmp_path / "list.json").write_text(json.dumps([{"loss": 1.0}, {"loss": 0.5}]))
    assert series(load_training_metrics(str(tmp_path / "list.json")), ("loss",)) == ([0.0, 1.0], [1.0, 0.5])
    (tmp_path / "bad.jsonl").write_text('{"step": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"line 2 is not JSON"):
        load_training_metrics(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"no training metrics"):
        load_training_metrics(str(tmp_path / "nothing"))
    assert series(rows, ("absent",)) == ([], [])
    prefixed = [{"train/step": 3, "train/cos_total_text": 0.5}, {"train/step": 4, "train/cos_total_text": "nan"}]
    assert series(prefixed, ("grad_align/text", "cos_total_text")) == ([3.0], [0.5])  # NaN rows skipped


def test_report_html_and_pngs(tmp_path: Path) -> None:
    results = [_result("VLM_SFT", 0.15), _result("VLM2Rec", 0.4)]
    out = write_report(str(tmp_path / "rep"), results, {"VLM_SFT": _history("sft"), "VLM2Rec": _history("vlm2rec")})
    assert set(out) == {"html", "dropout", "grad_alignment", "loss", "penalty", "cold_start"}
    for key in ("dropout", "grad_alignment", "loss", "penalty", "cold_start"):
        with Image.open(out[key]) as im:
            assert im.format == "PNG" and im.width >= 600 and im.height >= 300
    page = Path(out["html"]).read_text()
    for text in ("VLM_SFT", "VLM2Rec", "Modality dropout", "Table 1 layout", "Task 2", "src='dropout.png'",
                 "src='grad_alignment.png'", "src='loss.png'", "0.1500", "3 no sequence embedding",
                 "Cold start", "src='cold_start.png'", "0 (20 users)"):
        assert text in page, text
    # No training metrics (e.g. VLM_Vanilla): no curves, and the page says why instead of failing.
    sft_only = write_report(str(tmp_path / "sft"), results[:1], {"VLM_SFT": _history("sft")})
    assert "penalty" not in sft_only  # nothing of WPCL was logged, so no empty figure
    out2 = write_report(str(tmp_path / "rep2"), [_result("VLM_Vanilla", 0.1)], {"VLM_Vanilla": []})
    assert set(out2) == {"html", "dropout", "cold_start"}
    assert "No training metrics were given" in Path(out2["html"]).read_text()
    with pytest.raises(ValueError, match=r"at least one evaluation result"):
        write_report(str(tmp_path / "rep3"), [])


def test_compare_tables() -> None:
    results = [_result("VLM_SFT", 0.15), {"name": "partial", "task1": _result("x", 0)["task1"]}]
    header, rows = summary_table(results)
    assert header[:5] == ["run", "Hit@10", "NDCG@10", "Hit@20", "NDCG@20"] and "v2f Hit@10" in header
    assert rows[0][header.index("v2f Hit@10")] == "0.1500" and rows[1][header.index("v2f Hit@10")] == "-"
    assert rows[0][header.index("sasrec ours NDCG@10")] == "0.3000"
    text = compare_runs(results, details=True)
    assert "Embedding geometry" in text and "0.5000±0.0100" in text
    lines = format_table(["a", "bb"], [["x", "1"], ["yyy", "22"]]).splitlines()
    assert lines == ["a    bb", "---  --", "x     1", "yyy  22"]
    assert tables([{"name": "n"}])["geometry"][1] is None and tables([{"name": "n"}])["cold_start"][1] is None
    header, rows = tables(results)["cold_start"][1]
    assert header == ["run", "model", "init", "0 (20 users)", "1-4 (180 users)"]
    assert rows == [["VLM_SFT", "sasrec", "id", "0.1000", "0.3000"], ["VLM_SFT", "sasrec", "ours", "0.2500", "0.3000"]]


def test_evaluate_cli_end_to_end(tmp_path: Path) -> None:
    """Write embeddings as the embed job does (dt= partitions), evaluate two runs, compare them."""
    runner = CliRunner()
    data = write_dataset(tmp_path / "dataset", world(num_users=40, num_items=150)["test"])
    outs = []
    for name, text_signal, image_signal in (("VLM_SFT", 3.0, 0.0), ("VLM2Rec", 3.0, 3.0)):
        w = world(num_users=40, num_items=150, text_signal=text_signal, image_signal=image_signal)
        for kind in ("items", "seqs"):
            part = tmp_path / name / kind / "dt=2026-01-02"
            part.mkdir(parents=True)
            pq.write_table(w[kind], part / "part-0.parquet")
        metrics_file = tmp_path / name / "metrics.jsonl"
        metrics_file.write_text("\n".join(json.dumps(r) for r in _history("vlm2rec", 8)))
        out = tmp_path / name / "eval"
        res = runner.invoke(app, ["evaluate", f"name={name}", f"dataset_uri={data}",
                                  f"item_embeddings_uri={tmp_path / name / 'items'}",
                                  f"sequence_embeddings_uri={tmp_path / name / 'seqs'}",
                                  f"training_metrics_uri={metrics_file}", f"output_uri={out}",
                                  "seeds=[0]", "task2.epochs=1", "task2.dim=16", "task2.models=[gru4rec]"])
        assert res.exit_code == 0, res.output
        assert "Modality dropout" in res.output and f"wrote {out}/eval.json" in res.output
        assert (out / "report.html").exists() and (out / "grad_alignment.png").exists()
        outs.append(out)
    sft, ours = (load_result(str(o)) for o in outs)
    assert sft["dropout"]["v2f"]["hit@10"] < 0.3 < ours["dropout"]["v2f"]["hit@10"]
    assert [(t["model"], t["init"]) for t in ours["task2"]] == [("gru4rec", "id"), ("gru4rec", "ours")]
    assert sum(b["users"] for b in ours["task2"][1]["by_frequency"]) == 40 and (outs[1] / "cold_start.png").exists()
    assert ours["config"]["seeds"] == [0] and ours["task1"]["num_users"] == 40

    res = runner.invoke(app, ["evaluate", "--compare", *map(str, outs), "--report", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].startswith("run ") and "VLM_SFT" in res.output and "VLM2Rec" in res.output
    assert (tmp_path / "cmp" / "report.html").exists() and (tmp_path / "cmp" / "loss.png").exists()

    res = runner.invoke(app, ["evaluate", "--compare", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "run `vlm2rec evaluate`" in res.output
    res = runner.invoke(app, ["evaluate", "name=x", "num_negatives=0"])
    assert res.exit_code == 2 and "num_negatives" in res.output and "dataset_uri: required" in res.output
    res = runner.invoke(app, ["evaluate", "name=x", f"dataset_uri={data}", "item_embeddings_uri=/nope",
                              "sequence_embeddings_uri=/nope", f"output_uri={tmp_path / 'x'}"])
    assert res.exit_code == 1 and "no embeddings at /nope" in res.output


def test_job_entry_point(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(job)  # type: ignore[union-attr]
    w = world(num_users=20, num_items=130)
    data = write_dataset(tmp_path / "dataset", w["test"])
    pq.write_table(w["items"], tmp_path / "items.parquet")
    pq.write_table(w["seqs"], tmp_path / "seqs.parquet")
    rc = job.main(["--config", str(REPO / "jobs" / "configs" / "evaluate.yaml"), f"dataset_uri={data}",
                   f"item_embeddings_uri={tmp_path / 'items.parquet'}",
                   f"sequence_embeddings_uri={tmp_path / 'seqs.parquet'}", f"output_uri={tmp_path / 'out'}",
                   "seeds=[0]", "task2.enabled=false", "report=false"])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["name"] == "VLM2Rec" and "task2" not in result and "report" not in result
    assert job.main(["task2.dim=10", "task2.num_heads=4"]) == 2


def test_embedding_snapshot_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Latest dt= partition by default, several files concatenated; errors tables and hidden files skipped."""
    from vlm2rec_ray.eval.runner import read_embedding_table

    w = world(num_users=4, num_items=10)
    items = w["items"]
    for dt, table in (("2026-01-01", items.slice(0, 2)), ("2026-01-02", items.slice(0, 6))):
        (tmp_path / "items" / f"dt={dt}").mkdir(parents=True)
        pq.write_table(table.slice(0, 3), tmp_path / "items" / f"dt={dt}" / "part-0.parquet")
        pq.write_table(table.slice(3), tmp_path / "items" / f"dt={dt}" / "part-1.parquet")
    (tmp_path / "items" / "errors" / "dt=2026-01-03").mkdir(parents=True)
    pq.write_table(items.slice(0, 1), tmp_path / "items" / "errors" / "dt=2026-01-03" / "part-0.parquet")
    pq.write_table(items, tmp_path / "items" / "dt=2026-01-02" / ".part-2.parquet.tmp.parquet")
    monkeypatch.chdir(tmp_path)  # relative URIs resolve like absolute ones
    assert read_embedding_table("items").num_rows == 6
    assert read_embedding_table("items", "2026-01-01").num_rows == 2
    with pytest.raises(FileNotFoundError, match=r"no snapshot dt=2020-01-01 .*available: \['2026-01-01', '2026-01-02'\]"):
        read_embedding_table("items", "2020-01-01")
    with pytest.raises(FileNotFoundError, match=r"no embeddings at nowhere"):
        read_embedding_table("nowhere")
