"""The in-process testbed (vlm2rec_ray/testbed): data, fine-tuning with the train job's pieces, evaluation in the
embed/evaluate jobs' layout, and the study's grid and protocol checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vlm2rec_ray.config import TrainJobConfig
from vlm2rec_ray.eval.task1 import embedding_matrix
from vlm2rec_ray.testbed.data import TestbedData, load_testbed
from vlm2rec_ray.testbed.evaluate import embed_tables, evaluate_encoder, headline
from vlm2rec_ray.testbed.finetune import finetune
from vlm2rec_ray.testbed.study import (
    AblationSpec,
    MethodSpec,
    StudyConfig,
    _grid,
    format_study,
    run_one,
)

PIXELS = 56 * 56


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlm2rec_ray.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("testbed") / "dataset"
    generate_synthetic(str(out), num_items=40, num_users=24, image_size=16, seed=3, max_length=6)
    return out


@pytest.fixture(scope="module")
def data(dataset_dir: Path) -> TestbedData:
    return load_testbed(str(dataset_dir), min_pixels=PIXELS, max_pixels=PIXELS)


def _cfg(backbone: Path, dataset: Path, **train: Any) -> TrainJobConfig:
    return TrainJobConfig.model_validate({
        "model": {"name": str(backbone), "min_pixels": PIXELS, "max_pixels": PIXELS},
        "data": {"dataset_uri": str(dataset)}, "output_uri": "unused", "lora": {"dropout": 0.0},
        "objective": {"variant": "vlm2rec"}, "scaling": {"num_workers": 2},
        "train": {"lr": 5e-3, "per_device_batch_size": 4, "gradient_checkpointing": False, "precision": "fp32",
                  "log_every": 1, "diag_every": 2, **train}})


def test_load_testbed_decodes_every_image_like_the_jobs(data: TestbedData) -> None:
    assert len(data.item_ids) == len(data.titles) == len(data.images) == 40
    assert {im.size for im in data.images} == {(56, 56)}  # 16 px pictures upscaled to min_pixels
    rows = data.rows("test")
    assert len(rows) == data.splits["test"].num_rows == 24
    user, hist, target = rows[0]
    assert user == data.splits["test"].column("user_id")[0].as_py()
    assert data.splits["test"].column("target")[0].as_py() == data.item_ids[target]
    assert [data.item_ids[h] for h in hist] == data.splits["test"].column("history")[0].as_py()


def test_load_testbed_names_the_failing_item(dataset_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(dataset_dir, copy)
    (copy / "images" / "I00003.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"item 'I00003'.*not_image"):
        load_testbed(str(copy), min_pixels=PIXELS, max_pixels=PIXELS)


def test_finetune_trains_lora_and_logs_objective_and_alignment(tiny_backbone_dir: Path, dataset_dir: Path,
                                                              data: TestbedData) -> None:
    module, history = finetune(_cfg(tiny_backbone_dir, dataset_dir, max_steps=4), data)
    losses = [r for r in history if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["alpha"] > 0 and r["beta"] >= 0.05 for r in losses)
    assert [r["step"] for r in history if "grad_align/cos_total_text" in r] == [2, 4]
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: every adapter was trained
    assert not module.training


def test_finetune_needs_one_full_step(tiny_backbone_dir: Path, dataset_dir: Path, data: TestbedData) -> None:
    cfg = _cfg(tiny_backbone_dir, dataset_dir, per_device_batch_size=64)
    with pytest.raises(ValueError, match="fewer than one step's 128"):
        finetune(cfg, data)


def test_embed_tables_are_the_encoders_embeddings(tiny_backbone_dir: Path, data: TestbedData) -> None:
    from vlm2rec_ray.model.backbone import load_backbone
    from vlm2rec_ray.model.encoder import VLM2RecEncoder

    backbone, processor = load_backbone(str(tiny_backbone_dir), min_pixels=PIXELS, max_pixels=PIXELS)
    encoder = VLM2RecEncoder(backbone, processor)
    items, seqs = embed_tables(encoder, data, "valid", batch_size=7)
    assert items.num_rows == 40 and seqs.num_rows == data.splits["valid"].num_rows
    assert str(items.schema.field("emb_fused").type) == "fixed_size_list<item: float>[64]"
    fused = embedding_matrix(items, "emb_fused")
    assert np.allclose(fused, embedding_matrix(items, "emb_text") + embedding_matrix(items, "emb_image"), atol=1e-6)
    with torch.no_grad():
        e_t, e_v = encoder.encode_items(data.titles[5:6], data.images[5:6])
        _, hist, _ = data.rows("valid")[3]
        z_t, _ = encoder.encode_sequences([[data.titles[h] for h in hist]], [[data.images[h] for h in hist]])
    assert np.allclose(embedding_matrix(items, "emb_text")[5], e_t[0].numpy(), atol=1e-5)
    assert np.allclose(embedding_matrix(items, "emb_image")[5], e_v[0].numpy(), atol=1e-5)
    assert np.allclose(embedding_matrix(seqs, "emb_text")[3], z_t[0].numpy(), atol=1e-5)
    result = evaluate_encoder(encoder, data, "valid", num_negatives=20, seeds=(0,))
    h = headline(result)
    assert set(h) == {"hit@10", "ndcg@20", "t2f_hit@10", "v2f_hit@10", "S_text", "S_image", "S_fused", "U_text",
                      "U_image", "U_fused"}
    assert all(np.isfinite(v) for v in h.values()) and 0 <= h["ndcg@20"] <= 1


def test_grid_is_whole_when_it_fits_else_a_seeded_sample() -> None:
    cfg = StudyConfig(budget=24)
    sft, vlm = cfg.methods
    assert len(_grid(cfg, sft)) == 24 and {tuple(p) for p in _grid(cfg, sft)} == {("lr", "tau_wpcl")}
    sample = _grid(cfg, vlm)
    assert len(sample) == 24 and len({tuple(sorted(p.items())) for p in sample}) == 24  # no repeats
    assert sample == _grid(cfg, vlm) and sample != _grid(cfg.model_copy(update={"search_seed": 1}), vlm)
    assert all(p["tau_crtr"] in cfg.tau_crtr and p["lam"] in cfg.lam for p in sample)
    own = MethodSpec(name="V", variant="vlm2rec", search=["tau_crtr", "lam"], grid={"tau_crtr": [0.2, 0.3]})
    assert _grid(cfg, own) == [{"tau_crtr": t, "lam": lam} for t in (0.2, 0.3) for lam in cfg.lam]
    with pytest.raises(ValueError, match="grid keys"):
        MethodSpec(name="V", variant="sft", search=["lr"], grid={"tau_crtr": [0.2]})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"methods": [MethodSpec(name="X", variant="nope")]}, "variant 'nope' is not registered"),
    ({"ablations": [AblationSpec(name="A", variant="sft", of="Missing")]}, "ablates 'Missing'"),
    ({"select_metric": "mrr"}, "select_metric='mrr'"),
    ({"train": {"train": {"epochs": 0}}}, "greater than or equal to 1"),
])
def test_study_config_fails_before_running(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StudyConfig(**kwargs)
    with pytest.raises(ValueError, match=r"search=.*distinct"):
        MethodSpec(name="X", variant="sft", search=["lr", "lr"])


def test_run_one_vanilla_scores_the_untrained_backbone(tiny_backbone_dir: Path, dataset_dir: Path) -> None:
    cfg = _cfg(tiny_backbone_dir, dataset_dir)
    r = run_one({"id": "x", "phase": "final", "method": "Vanilla", "kind": "vanilla", "point": {}, "seed": 0,
                 "splits": ["test"], "eval_seeds": [0], "num_negatives": 20, "train": cfg.model_dump(mode="json")})
    assert set(r["metrics"]) == {"test"} and r["curves"] == [] and r["last"] == {}
    assert 0 <= r["metrics"]["test"]["hit@10"] <= 1


def test_format_study_reports_every_run() -> None:
    m = {k: 0.5 for k in ("hit@10", "ndcg@20", "t2f_hit@10", "v2f_hit@10", "S_text", "S_image", "S_fused", "U_text",
                          "U_image", "U_fused")}
    row = {"seeds": [0, 1], "point": {"lr": 0.001}, "test": {k: (v, 0.01) for k, v in m.items()},
           "valid": {k: (v, 0.0) for k, v in m.items()}, "per_seed_test": [{"seed": 0, **m}, {"seed": 1, **m}],
           "train_last": {"loss": (1.0, 0.1)}, "grad_alignment": [{"step": 10, "cos_total_text": 0.9,
                                                                   "cos_total_image": 0.3}]}
    result = {"config": StudyConfig().model_dump(mode="json"), "backbone": "b", "chosen": {"SFT": {"lr": 0.001}},
              "variants": {"SFT": {"variant": "sft", "overrides": {}}}, "final": {"SFT": row},
              "tuning": {"SFT": [{"point": {"lr": 0.001}, "valid": m, "train_s": 1.0, "last": {}}] * 3}}
    text = format_study(result)
    assert "| SFT | 0.5000 ± 0.0100 |" in text and "| 10 | 0.900 / 0.300 |" in text
    assert text.count('| {"lr": 0.001} |') == 3  # every tuning run is listed


def test_sda_run_trains_items_with_moda_and_scores_task2(tiny_backbone_dir: Path, dataset_dir: Path,
                                                         data: TestbedData) -> None:
    """SDA's stage 1 in the testbed: objective cmsa on the split's distinct items (no sequences), MoDA adapters,
    learnable tau; the run's metrics carry Task 2 (SASRec on the frozen item embeddings, SDA's stage 2) and the
    gradient-conflict curve cos(g_T, g_V)."""
    from vlm2rec_ray.model.moda import MoDALinear

    cfg = _cfg(tiny_backbone_dir, dataset_dir, max_steps=2)
    cfg = TrainJobConfig.model_validate({**cfg.model_dump(mode="json"), "objective": {"variant": "cmsa"},
                                         "lora": {"kind": "moda", "r": 4, "num_experts": 2, "dropout": 0.0}})
    module, history = finetune(cfg, data)
    losses = [r for r in history if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2] and "margin_text" not in losses[0]
    assert losses[-1]["tau"] != pytest.approx(3.0, abs=1e-7)  # learnt from 3.0
    assert any(isinstance(m, MoDALinear) for m in module.modules())
    spec = {"id": "x", "phase": "final", "method": "SDA", "kind": "finetune", "point": {}, "seed": 0,
            "splits": ["test"], "eval_seeds": [0], "num_negatives": 20, "task2": True,
            "train": cfg.model_dump(mode="json")}
    r = run_one(spec)
    assert 0 <= r["metrics"]["test"]["task2_ndcg@20"] <= 1 and "cos_text_image" in r["curves"][0]
    assert r["last"]["tau"] > 0
    from vlm2rec_ray.testbed.study import _run_id

    assert _run_id(spec) != _run_id({**spec, "task2": False})
    assert _run_id({**spec, "task2": False}) == _run_id({k: v for k, v in spec.items() if k != "task2"})


def test_few_shot_users_keep_k_users_rows(tiny_backbone_dir: Path, dataset_dir: Path, data: TestbedData) -> None:
    """data.few_shot_users = K trains on the rows of K users (the paper's Table 7); a study ablation carries it."""
    rows = data.rows("train")
    per_user = {u: sum(r[0] == u for r in rows) for u, _, _ in rows}
    cfg = _cfg(tiny_backbone_dir, dataset_dir, per_device_batch_size=2, epochs=1, diag_every=0)
    cfg = TrainJobConfig.model_validate({**cfg.model_dump(mode="json"),
                                         "data": {"dataset_uri": str(dataset_dir), "few_shot_users": 3}})
    import random

    keep = random.Random(0).sample(sorted(per_user), 3)  # the train job's draw (data.seed 0)
    _, history = finetune(cfg, data)
    kept_rows = sum(per_user[u] for u in keep)
    assert kept_rows < len(rows) and history[-1]["step"] == kept_rows // 4  # 2 x 2 rows per step, one epoch
    spec = AblationSpec(name="VLM2Rec K=3", variant="vlm2rec", of="VLM2Rec", overrides={"data": {"few_shot_users": 3}})
    StudyConfig(ablations=[spec])  # validates the merged settings up front
    with pytest.raises(ValueError, match="few_shot_users"):
        StudyConfig(ablations=[AblationSpec(name="bad", variant="vlm2rec", of="VLM2Rec",
                                            overrides={"data": {"few_shot_users": 0}})])


def test_few_shot_curve_table() -> None:
    from vlm2rec_ray.testbed.study import few_shot_curves

    def row(v: float) -> dict[str, Any]:
        return {"test": {"ndcg@20": (v, 0.01), "task2_ndcg@20": (v / 2, 0.0)}}

    cfg = StudyConfig(ablations=[AblationSpec(name=f"VLM2Rec K={k}", variant="vlm2rec", of="VLM2Rec",
                                              overrides={"data": {"few_shot_users": k}}) for k in (64, 32)])
    result = {"config": cfg.model_dump(mode="json"),
              "final": {"VLM2Rec": row(0.4), "VLM2Rec K=32": row(0.2), "VLM2Rec K=64": row(0.3)}}
    curve = few_shot_curves(result)["VLM2Rec"]
    assert [k for k, _ in curve] == [32, 64, None] and [m["ndcg@20"][0] for _, m in curve] == [0.2, 0.3, 0.4]


def test_transfer_domain_scored_zero_shot(tiny_backbone_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    """A final run with transfer domains is also scored on each one's test split (Table 6's zero-shot)."""
    from vlm2rec_ray.data.synthetic import generate_synthetic
    from vlm2rec_ray.testbed.study import _run_id

    other = tmp_path / "other"
    generate_synthetic(str(other), num_items=30, num_users=20, image_size=16, seed=9, max_length=6)
    cfg = _cfg(tiny_backbone_dir, dataset_dir)
    spec = {"id": "x", "phase": "final", "method": "Vanilla", "kind": "vanilla", "point": {}, "seed": 0,
            "splits": ["test"], "eval_seeds": [0], "num_negatives": 10, "transfer": {"other": str(other)},
            "train": cfg.model_dump(mode="json")}
    r = run_one(spec)
    assert set(r["metrics"]) == {"test", "other/test"} and r["metrics"]["other/test"] != r["metrics"]["test"]
    assert _run_id(spec) != _run_id({**spec, "transfer": {}})


def test_transfer_and_few_shot_figures(tmp_path: Path) -> None:
    from PIL import Image

    from vlm2rec_ray.testbed.study import _plot_few_shot, _plot_transfer, format_study

    m = {k: (0.3, 0.01) for k in ("hit@10", "ndcg@20", "t2f_hit@10", "v2f_hit@10", "S_text", "S_image", "S_fused",
                                  "U_text", "U_image", "U_fused", "task2_hit@10", "task2_ndcg@20")}
    cfg = StudyConfig(transfer={"B": {"seed": 1}}, methods=[MethodSpec(name="SFT", variant="sft")],
                      ablations=[AblationSpec(name="SFT K=32", variant="sft", of="SFT",
                                              overrides={"data": {"few_shot_users": 32}})])
    row = {"seeds": [0], "point": {}, "test": m, "B/test": m, "valid": m, "per_seed_test": [],
           "train_last": {}, "grad_alignment": []}
    result = {"config": cfg.model_dump(mode="json"), "backbone": "b", "chosen": {}, "variants": {},
              "final": {"SFT": row, "SFT K=32": row}, "tuning": {}}
    _plot_transfer(result, tmp_path / "t.png")
    _plot_few_shot(result, tmp_path / "f.png")
    for name in ("t.png", "f.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 400
    text = format_study(result)
    assert "Cross-domain, zero-shot" in text and "| SFT | 0.3000 ± 0.0100 |" in text and "Few shot" in text


def test_study_workers_die_with_the_study_process(tmp_path: Path) -> None:
    """A study killed hard (SIGKILL) leaves no pool worker running its current run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from vlm2rec_ray.testbed.study import _init_worker\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'), initializer=_init_worker)\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 600)\n"
        "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())  # type: ignore[union-attr]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{worker}/stat") as f:
                if f.read().split(") ")[1][0] == "Z":  # exited, waiting to be reaped
                    break
            time.sleep(0.2)
        else:
            os.kill(worker, signal.SIGKILL)
            raise AssertionError(f"pool worker {worker} outlived the killed study process")
    finally:
        parent.kill()
