"""``vlm2rec study``: SFT vs VLM2Rec on the pretrained-like testbed, tuned with equal budgets, over seeds.

The protocol (written down in benchmarks/TESTBED.md before any comparison ran):

1. **Testbed**: the synthetic catalog of :mod:`vlm2rec_ray.data.synthetic` (``dataset``) and the pretrained
   tiny backbone of :mod:`vlm2rec_ray.model.pretrain` (built once, cached under ``build/backbones``).
2. **Fixed settings** for every method: ``train`` (a TrainJobConfig tree: LoRA, epochs, batch, clipping...).
3. **Tuning**: each method in ``methods`` gets ``budget`` runs (``train.seed = 0``) over its ``search`` keys
   (``lr``, ``tau_wpcl``, ``tau_crtr``, ``lam`` from the grids below): the whole grid when it has at most
   ``budget`` points, else ``budget`` points drawn without replacement (``random.Random(search_seed)``). The
   configuration with the best ``select_metric`` on the **valid** split wins. Test is never looked at here.
4. **Ablations** (``ablations``) reuse the chosen configuration of the method they ablate.
5. **Final**: every method and ablation at its chosen configuration, one run per ``final_seeds`` seed
   (``train.seed``), scored on **test**; Vanilla (the backbone untrained) is scored once. Reported as mean and
   sample standard deviation over seeds, with the gradient-alignment curves (``train.diag_every``).

Runs execute in ``workers`` processes of one torch thread each (the tiny model runs fastest that way) through
:func:`vlm2rec_ray.testbed.finetune.finetune` and :func:`vlm2rec_ray.testbed.evaluate.evaluate_encoder`;
every finished run is appended to ``<out>/runs.jsonl``, so an interrupted study resumes where it stopped.
The results go to ``<out>/<name>.json`` and ``<out>/<name>.md`` (and the curves' PNG); studies with other
``name`` s in the same ``out`` reuse each other's runs (a run is keyed by its settings).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from vlm2rec_ray.config import TrainJobConfig, _merge, _Part

__all__ = ["AblationSpec", "MethodSpec", "StudyConfig", "run_study"]

SEARCH_KEYS = {"lr": ("train", "lr"), "tau_wpcl": ("objective", "tau_wpcl"), "tau_crtr": ("objective", "tau_crtr"),
               "lam": ("objective", "lam"), "tau_cmsa": ("objective", "tau_cmsa")}
HEADLINE = ("hit@10", "ndcg@20", "t2f_hit@10", "v2f_hit@10", "S_text", "S_image", "S_fused", "U_text", "U_image",
            "U_fused")
#: Task 2 (SASRec on the frozen item embeddings, SDA's stage 2), where a run computes it (``task2``).
TASK2 = ("task2_hit@10", "task2_ndcg@20")
TRAIN_KEYS = ("loss", "loss_wpcl", "loss_crtr", "margin_text", "margin_image", "penalty_mean", "alpha", "beta", "tau")


class StudyDataConfig(_Part):
    """The synthetic evaluation catalog (``vlm2rec prepare synthetic``)."""

    num_items: int = Field(240, ge=20)
    num_users: int = Field(300, ge=20)
    image_only_signal: float = Field(0.5, ge=0.0, le=1.0)
    image_size: int = Field(32, ge=16, le=512)
    seed: int = 0
    coupling: float = Field(0.0, ge=0.0, le=1.0, description="share of items/users whose look follows their text")


class MethodSpec(_Part):
    """A tuned method: an objective variant, fixed overrides (for labelled variants) and its search keys."""

    name: str
    variant: str
    search: list[str] = Field(default_factory=lambda: ["lr", "tau_wpcl"])
    grid: dict[str, list[float]] = Field(default_factory=dict, description="this method's own values for some "
                                         "search keys (default: the study's lrs / tau_wpcl / tau_crtr / lam)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="TrainJobConfig tree merged over `train`")
    select_metric: str | None = Field(None, description="this method's valid-split selection metric (default the "
                                      "study's); task2_* for methods whose recommender is Task 2's (SDA)")

    @field_validator("select_metric")
    @classmethod
    def _select(cls, v: str | None) -> str | None:
        if v is not None and v not in HEADLINE + TASK2:
            raise ValueError(f"select_metric={v!r}; pick one of {list(HEADLINE + TASK2)}")
        return v

    @field_validator("search")
    @classmethod
    def _search(cls, v: list[str]) -> list[str]:
        bad = [k for k in v if k not in SEARCH_KEYS]
        if bad or len(set(v)) != len(v):
            raise ValueError(f"search={v}: keys must be distinct among {sorted(SEARCH_KEYS)}")
        return v

    @model_validator(mode="after")
    def _own_grid(self) -> MethodSpec:
        stray = sorted(set(self.grid) - set(self.search))
        if stray or any(not values for values in self.grid.values()):
            raise ValueError(f"method {self.name!r}: grid keys {sorted(self.grid)} must be non-empty and among its "
                             f"search keys {self.search}")
        return self


class AblationSpec(_Part):
    """A method run at another method's chosen configuration with another objective variant (and, e.g. for
    the few-shot curve, other settings: ``overrides`` is merged over that method's own)."""

    name: str
    variant: str
    of: str
    overrides: dict[str, Any] = Field(default_factory=dict, description="TrainJobConfig tree, e.g. "
                                      "{data: {few_shot_users: 64}}")


class StudyConfig(_Part):
    """``vlm2rec study``: see the module docstring for the protocol."""

    out: str = Field("build/study", description="local directory for runs.jsonl, <name>.json, <name>.md")
    name: str = Field("study", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="names the result files; studies in one `out` share runs.jsonl, so a run "
                      "another study already made (same settings) is reused")
    dataset: StudyDataConfig = Field(default_factory=StudyDataConfig)
    backbone: str | None = Field(None, description="backbone dir; default the cached pretrained tiny backbone")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainJobConfig tree shared by every run")
    lrs: list[float] = Field(default_factory=lambda: [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3])
    tau_wpcl: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.5, 1.0])
    tau_crtr: list[float] = Field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0])
    lam: list[float] = Field(default_factory=lambda: [0.1, 0.5, 1.0])
    tau_cmsa: list[float] = Field(default_factory=lambda: [0.3, 1.0, 3.0, 10.0], description="CMSA's initial tau")
    task2: bool = Field(False, description="also score Task 2 (SASRec on the frozen item embeddings) in the final "
                        "runs (and in the tuning runs of methods that select on it)")
    transfer: dict[str, StudyDataConfig] = Field(default_factory=dict, description="zero-shot target domains "
                                                 "(other synthetic catalogs): every final run is also scored on "
                                                 "each one's test split, untrained there (the paper's Table 6)")
    budget: int = Field(24, ge=1, description="tuning runs per method")
    search_seed: int = 0
    select_metric: str = Field("ndcg@20", description="valid-split metric that picks each method's config")
    methods: list[MethodSpec] = Field(default_factory=lambda: [
        MethodSpec(name="SFT", variant="sft", search=["lr", "tau_wpcl"]),
        MethodSpec(name="VLM2Rec", variant="vlm2rec", search=["lr", "tau_wpcl", "tau_crtr", "lam"])])
    ablations: list[AblationSpec] = Field(default_factory=lambda: [
        AblationSpec(name="WPCL only", variant="no_crtr", of="VLM2Rec"),
        AblationSpec(name="InfoNCE + CRTR", variant="no_penalty", of="VLM2Rec")])
    final_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    eval_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="negative-sampling seeds")
    num_negatives: int = Field(100, ge=1, description="sampled negatives per user (paper: 100)")
    workers: int = Field(2, ge=1, description="parallel runs (processes of one torch thread)")

    @field_validator("select_metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in HEADLINE:
            raise ValueError(f"select_metric={v!r}; pick one of {list(HEADLINE)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        from vlm2rec_ray.objectives import OBJECTIVES

        names = [m.name for m in self.methods] + [a.name for a in self.ablations]
        if len(set(names)) != len(names) or "Vanilla" in names:
            raise ValueError(f"method and ablation names must be distinct and not 'Vanilla', got {names}")
        for v in [m.variant for m in self.methods] + [a.variant for a in self.ablations]:
            if v not in OBJECTIVES:
                raise ValueError(f"objective variant {v!r} is not registered; choose one of {sorted(OBJECTIVES)}")
        tuned = {m.name for m in self.methods}
        for a in self.ablations:
            if a.of not in tuned:
                raise ValueError(f"ablation {a.name!r} ablates {a.of!r}, which is not a tuned method {sorted(tuned)}")
        for m in self.methods:  # every run's config must validate before anything starts
            for point in _grid(self, m)[:1]:
                TrainJobConfig.model_validate(_train_tree(self, m.overrides, m.variant, point, 0, "x"))
        by_name = {m.name: m for m in self.methods}
        for a in self.ablations:
            m = by_name[a.of]
            TrainJobConfig.model_validate(_train_tree(self, _merge(m.overrides, a.overrides), a.variant,
                                                      _grid(self, m)[0], 0, "x"))
        return self


def _grid(cfg: StudyConfig, method: MethodSpec) -> list[dict[str, float]]:
    """The method's tuning points: the full grid if it fits the budget, else a seeded sample of ``budget``."""
    values = {"lr": cfg.lrs, "tau_wpcl": cfg.tau_wpcl, "tau_crtr": cfg.tau_crtr, "lam": cfg.lam,
              "tau_cmsa": cfg.tau_cmsa, **method.grid}
    points = [dict(zip(method.search, combo, strict=True))
              for combo in itertools.product(*(values[k] for k in method.search))]
    if len(points) <= cfg.budget:
        return points
    return random.Random(cfg.search_seed).sample(points, cfg.budget)


def _train_tree(cfg: StudyConfig, overrides: dict[str, Any], variant: str, point: dict[str, float], seed: int,
                backbone: str) -> dict[str, Any]:
    tree = _merge(cfg.train, overrides)
    tree = _merge(tree, {"model": {"name": backbone}, "objective": {"variant": variant},
                         "data": {"dataset_uri": str(Path(cfg.out) / "dataset")},
                         "output_uri": str(Path(cfg.out) / "unused"), "train": {"seed": seed}})
    for key, value in point.items():
        section, field = SEARCH_KEYS[key]
        tree = _merge(tree, {section: {field: value}})
    return tree


def _run_id(spec: dict[str, Any]) -> str:
    optional = [k for k in ("task2", "transfer") if spec.get(k)]  # absent from older runs' ids
    keys = ("kind", "train", "splits", "eval_seeds", "num_negatives", *optional)
    blob = json.dumps({k: spec[k] for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ worker side

_DATA: dict[tuple[str, int, int], Any] = {}


def _init_worker() -> None:
    import logging
    import os
    import warnings

    import torch

    _die_with_parent()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the study process dies (even by SIGKILL), so no run goes on alone."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _data(uri: str, min_pixels: int, max_pixels: int) -> Any:
    from vlm2rec_ray.testbed.data import load_testbed

    key = (uri, min_pixels, max_pixels)
    if key not in _DATA:
        _DATA[key] = load_testbed(uri, min_pixels=min_pixels, max_pixels=max_pixels)
    return _DATA[key]


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One run (in a worker process): fine-tune ``spec["train"]`` (or, for ``kind == "vanilla"``, load the
    backbone untrained) and score ``spec["splits"]``."""
    import torch

    from vlm2rec_ray.model.backbone import load_backbone
    from vlm2rec_ray.model.encoder import VLM2RecEncoder
    from vlm2rec_ray.testbed.evaluate import evaluate_encoder, headline
    from vlm2rec_ray.testbed.finetune import finetune

    cfg = TrainJobConfig.model_validate(spec["train"])
    data = _data(cfg.data.dataset_uri, cfg.model.min_pixels, cfg.model.max_pixels)
    started = time.perf_counter()
    history: list[dict[str, Any]] = []
    if spec["kind"] == "vanilla":
        torch.manual_seed(0)
        backbone, processor = load_backbone(cfg.model.name, device="cpu", dtype="fp32", min_pixels=cfg.model.min_pixels,
                                            max_pixels=cfg.model.max_pixels)
        encoder = VLM2RecEncoder(backbone, processor, max_history=cfg.model.max_history)
    else:
        module, history = finetune(cfg, data)
        encoder = module.encoder
    train_s = time.perf_counter() - started
    results = {split: evaluate_encoder(encoder, data, split, num_negatives=spec["num_negatives"],
                                       seeds=spec["eval_seeds"], task2=bool(spec.get("task2")))
               for split in spec["splits"]}
    for name, uri in (spec.get("transfer") or {}).items():  # zero-shot: scored on another domain, not trained there
        other = _data(uri, cfg.model.min_pixels, cfg.model.max_pixels)
        results[f"{name}/test"] = evaluate_encoder(encoder, other, "test", num_negatives=spec["num_negatives"],
                                                   seeds=spec["eval_seeds"], task2=bool(spec.get("task2")))
    metrics = {split: headline(r) for split, r in results.items()}
    by_frequency = {split: r["task2_by_frequency"] for split, r in results.items() if "task2_by_frequency" in r}
    losses = [r for r in history if "loss" in r]
    last = {k: losses[-1][k] for k in TRAIN_KEYS if losses and k in losses[-1]}
    curves = [{"step": r["step"], "cos_total_text": r["grad_align/cos_total_text"],
               "cos_total_image": r["grad_align/cos_total_image"], "cos_text_image": r["grad_align/cos_text_image"]}
              for r in history if "grad_align/cos_total_text" in r]
    margins = [{"step": r["step"], **{k: r[k] for k in ("margin_text", "margin_image", "loss_crtr", "penalty_mean",
                                                        "tau") if k in r}} for r in losses]
    return {**{k: spec[k] for k in ("id", "phase", "method", "kind", "point", "seed")}, "metrics": metrics,
            "last": last, "curves": curves, "margins": margins, "train_s": round(train_s, 1),
            **({"task2_by_frequency": by_frequency} if by_frequency else {})}


# ------------------------------------------------------------------------------------------------ orchestration


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_study(cfg: StudyConfig, *, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the study; returns the content of ``study.json``."""
    import multiprocessing

    from vlm2rec_ray.data.synthetic import generate_synthetic
    from vlm2rec_ray.model.pretrain import ensure_pretrained_backbone
    from vlm2rec_ray.runtime import build_dir

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def ensure_dataset(path: Path, d: StudyDataConfig) -> str:
        settings = d.model_dump()
        marker = path / "synthetic.json"
        written = json.loads(marker.read_text()) if marker.exists() else None
        if written is None or {k: written.get(k, 0.0 if k == "coupling" else None) for k in settings} != settings:
            progress(f"dataset -> {path}")
            generate_synthetic(str(path), num_items=d.num_items, num_users=d.num_users,
                               image_only_signal=d.image_only_signal, image_size=d.image_size, seed=d.seed,
                               coupling=d.coupling)
        return str(path)

    ensure_dataset(out / "dataset", cfg.dataset)
    transfer = {name: ensure_dataset(out / f"transfer-{name}", d) for name, d in cfg.transfer.items()}
    backbone = cfg.backbone or str(ensure_pretrained_backbone(build_dir() / "backbones", progress=progress))
    progress(f"backbone: {backbone}")
    runs_path = out / "runs.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if runs_path.exists():
        for line in runs_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["id"]] = r
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx, initializer=_init_worker)

    def execute(specs: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
        for s in specs:
            s["id"] = _run_id(s)
        todo = [s for s in specs if s["id"] not in done]
        progress(f"{label}: {len(specs)} runs, {len(specs) - len(todo)} already done")
        futures = {pool.submit(run_one, s): s for s in todo}
        for n, fut in enumerate(as_completed(futures), 1):
            r = fut.result()
            done[r["id"]] = r
            with runs_path.open("a") as f:
                f.write(json.dumps(r) + "\n")
            shown = {k: round(v, 4) for k, v in next(iter(r["metrics"].values())).items()
                     if k in ("ndcg@20", "t2f_hit@10", "v2f_hit@10", "S_text", "S_image")}
            progress(f"  [{n}/{len(todo)}] {r['method']} {r['point']} seed={r['seed']} {r['train_s']}s {shown}")
        return [done[s["id"]] for s in specs]

    def spec(phase: str, method: str, variant: str, overrides: dict[str, Any], point: dict[str, float], seed: int,
             splits: list[str], kind: str = "finetune", task2: bool = False) -> dict[str, Any]:
        return {"phase": phase, "method": method, "kind": kind, "point": point, "seed": seed, "splits": splits,
                **({"task2": True} if task2 else {}), **({"transfer": transfer} if phase == "final" and transfer
                                                          else {}),
                "eval_seeds": list(cfg.eval_seeds), "num_negatives": cfg.num_negatives,
                "train": TrainJobConfig.model_validate(_train_tree(cfg, overrides, variant, point, seed, backbone))
                .model_dump(mode="json")}

    try:
        tuning: dict[str, list[dict[str, Any]]] = {}
        chosen: dict[str, dict[str, float]] = {}
        for m in cfg.methods:
            metric = m.select_metric or cfg.select_metric
            runs = execute([spec("tune", m.name, m.variant, m.overrides, p, 0, ["valid"], task2=metric in TASK2)
                            for p in _grid(cfg, m)], f"tune {m.name}")
            tuning[m.name] = sorted(runs, key=lambda r: -r["metrics"]["valid"][metric])
            chosen[m.name] = tuning[m.name][0]["point"]
            progress(f"  {m.name}: chose {chosen[m.name]} (valid {metric} "
                     f"{tuning[m.name][0]['metrics']['valid'][metric]:.4f})")
        finals_specs = [spec("final", "Vanilla", "sft", {}, {}, 0, ["valid", "test"], kind="vanilla",
                             task2=cfg.task2)]
        overrides = {m.name: m.overrides for m in cfg.methods}
        entries = [(m.name, m.variant, m.overrides, chosen[m.name]) for m in cfg.methods]
        entries += [(a.name, a.variant, _merge(overrides[a.of], a.overrides), chosen[a.of]) for a in cfg.ablations]
        for name, variant, ovr, point in entries:
            finals_specs += [spec("final", name, variant, ovr, point, s, ["valid", "test"], task2=cfg.task2)
                             for s in cfg.final_seeds]
        finals = execute(finals_specs, "final runs")
    except BaseException:  # Ctrl-C or a failed run: stop the runs in flight instead of waiting minutes for them
        for p in list((getattr(pool, "_processes", None) or {}).values()):
            p.terminate()
        raise
    finally:
        pool.shutdown(cancel_futures=True)
    result = _summarise(cfg, backbone, tuning, chosen, finals, entries)
    result["wall_s"] = round(time.time() - started, 1)
    (out / f"{cfg.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{cfg.name}.md").write_text(format_study(result))
    _plot_alignment(result, out / ("grad_alignment.png" if cfg.name == "study" else f"{cfg.name}_grad_alignment.png"))
    _plot_few_shot(result, out / f"{cfg.name}_few_shot.png")
    _plot_transfer(result, out / f"{cfg.name}_transfer.png")
    return result


def _summarise(cfg: StudyConfig, backbone: str, tuning: dict[str, list[dict[str, Any]]],
               chosen: dict[str, dict[str, float]], finals: list[dict[str, Any]],
               entries: list[tuple[str, str, dict[str, Any], dict[str, float]]]) -> dict[str, Any]:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in finals:
        by_method.setdefault(r["method"], []).append(r)
    table: dict[str, Any] = {}
    for name, runs in by_method.items():
        row: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "point": runs[0]["point"]}
        for split in ("valid", "test", *(f"{name}/test" for name in cfg.transfer)):
            if all(split in r["metrics"] for r in runs):
                row[split] = {k: _mean_std([r["metrics"][split][k] for r in runs]) for k in HEADLINE + TASK2
                              if all(k in r["metrics"][split] for r in runs)}
        row["per_seed_test"] = [{"seed": r["seed"], **r["metrics"]["test"]} for r in runs]
        if all("test" in r.get("task2_by_frequency", {}) for r in runs):  # cold start: Task 2 by frequency
            buckets = [b["bucket"] for b in runs[0]["task2_by_frequency"]["test"]]
            row["task2_by_frequency"] = [
                {"bucket": b, "users": runs[0]["task2_by_frequency"]["test"][i]["users"],
                 **{k: _mean_std([r["task2_by_frequency"]["test"][i][k] for r in runs]) for k in ("hit@10", "ndcg@20")}}
                for i, b in enumerate(buckets)]
        row["train_last"] = {k: _mean_std([r["last"][k] for r in runs if k in r["last"]])
                             for k in TRAIN_KEYS if any(k in r["last"] for r in runs)}
        steps = sorted({c["step"] for r in runs for c in r["curves"]})
        row["grad_alignment"] = [{"step": s, **{k: statistics.fmean(c[k] for r in runs for c in r["curves"]
                                                                   if c["step"] == s and k in c)
                                                for k in ("cos_total_text", "cos_total_image", "cos_text_image")
                                                if any(k in c for r in runs for c in r["curves"])}} for s in steps]
        table[name] = row
    variants = {name: {"variant": variant, "overrides": ovr} for name, variant, ovr, _ in entries}
    return {"config": cfg.model_dump(mode="json"), "backbone": backbone, "chosen": chosen, "variants": variants,
            "tuning": {m: [{"point": r["point"], "valid": r["metrics"]["valid"], "train_s": r["train_s"],
                            "last": r["last"]} for r in runs] for m, runs in tuning.items()},
            "final": table}


def _fmt(ms: tuple[float, float], digits: int = 4) -> str:
    mean, std = ms
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"


def format_study(result: dict[str, Any]) -> str:
    """``study.md``: the final table (test, mean ± std over seeds), the per-seed rows, the chosen configs, the
    training-end diagnostics, the gradient-alignment curves and every tuning run."""
    cfg = result["config"]
    methods = " vs ".join(n for n in result["final"] if n != "Vanilla")
    lines = [f"# {methods} on the testbed (backbone `{result['backbone']}`)", ""]
    cols = ["hit@10", "ndcg@20", "t2f_hit@10", "v2f_hit@10", "S_text", "S_image", "S_fused", "U_text", "U_image"]
    cols += [k for k in TASK2 if all(k in row["test"] for row in result["final"].values())]
    lines += [f"Test split, mean ± std over training seeds {cfg['final_seeds']} (Vanilla: untrained, one run); "
              f"negatives: {cfg['eval_seeds']} sampling seeds of 100.", "",
              "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in result["final"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row["test"][c]) for c in cols) + " |")
    if "task2_ndcg@20" in cols:
        lines += ["", "task2_*: SASRec (d=128) trained on the train split over the frozen, L2-normalised fused item "
                  "embeddings through a linear adapter (SDA's stage 2; `vlm2rec_ray.eval.task2`)."]
    select = {m["name"]: m.get("select_metric") or cfg["select_metric"] for m in cfg["methods"]}
    lines += ["", "Chosen configurations (on the valid split):", ""]
    for name, row in result["final"].items():
        if name != "Vanilla":
            v = result["variants"].get(name, {})
            lines.append(f"- {name}: variant `{v.get('variant')}`, {json.dumps(row['point'])}"
                         + (f", selected on {select[name]}" if name in select else "")
                         + (f", overrides {json.dumps(v.get('overrides'))}" if v.get("overrides") else ""))
    lines += ["", "Per seed (test):", "", "| method | seed | " + " | ".join(cols) + " |",
              "|---" * (len(cols) + 2) + "|"]
    for name, row in result["final"].items():
        for r in row["per_seed_test"]:
            lines.append(f"| {name} | {r['seed']} | " + " | ".join(f"{r[c]:.4f}" if c in r else "-" for c in cols)
                         + " |")
    lines += ["", "At the end of training (mean ± std over seeds; margins are the last logging window's means):",
              "", "| method | " + " | ".join(TRAIN_KEYS) + " |", "|---" * (len(TRAIN_KEYS) + 1) + "|"]
    for name, row in result["final"].items():
        if row["train_last"]:
            lines.append(f"| {name} | " + " | ".join(_fmt(row["train_last"][k]) if k in row["train_last"] else "-"
                                                   for k in TRAIN_KEYS) + " |")
    lines += ["", "Gradient alignment cos(g_total, g_T) / cos(g_total, g_V) by step (mean over seeds):", ""]
    named = [n for n in result["final"] if result["final"][n]["grad_alignment"]]
    if named:
        steps = [p["step"] for p in result["final"][named[0]]["grad_alignment"]]
        lines += ["| step | " + " | ".join(named) + " |", "|---" * (len(named) + 1) + "|"]
        for i, s in enumerate(steps):
            cells = []
            for n in named:
                ga = result["final"][n]["grad_alignment"]
                cells.append(f"{ga[i]['cos_total_text']:.3f} / {ga[i]['cos_total_image']:.3f}" if i < len(ga) else "-")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    domains = list(cfg.get("transfer") or {})
    if domains:
        keys = [k for k in ("ndcg@20", "t2f_hit@10", "v2f_hit@10", "task2_ndcg@20")
                if all(k in row.get(f"{d}/test", {}) for row in result["final"].values() for d in domains)]
        lines += ["", "Cross-domain, zero-shot (the paper's Table 6): trained on the study's catalog, scored on another "
                  "catalog's test split without training there (Task 2's SASRec does train on that domain's train "
                  "split, over the frozen embeddings); mean ± std over seeds:", "",
                  "| method | " + " | ".join(f"{d}: {k}" for d in domains for k in keys) + " |",
                  "|---" * (len(domains) * len(keys) + 1) + "|"]
        for name, row in result["final"].items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row[f"{d}/test"][k]) if f"{d}/test" in row else "-"
                                                   for d in domains for k in keys) + " |")
    curves = few_shot_curves(result)
    if curves:
        keys = [k for k in ("ndcg@20", "task2_ndcg@20") if all(k in m for pts in curves.values() for _, m in pts)]
        lines += ["", "Few shot (the paper's Table 7): test NDCG@20 by the number K of users whose rows train the "
                  "model (drawn with data.seed; 'all' is the method's own row), mean ± std over seeds:", "",
                  "| method | metric | " + " | ".join(str(k) if k is not None else "all"
                                                     for k, _ in next(iter(curves.values()))) + " |",
                  "|---" * (len(next(iter(curves.values()))) + 2) + "|"]
        for method, points in curves.items():
            for key in keys:
                lines.append(f"| {method} | {key} | " + " | ".join(_fmt(m[key]) for _, m in points) + " |")
    cold = [n for n, row in result["final"].items() if row.get("task2_by_frequency")]
    if cold:
        buckets = result["final"][cold[0]]["task2_by_frequency"]
        lines += ["", "Cold start (the paper's Fig. 3): Task 2 NDCG@20 on test by the target item's training frequency "
                  "(occurrences in the train split), mean ± std over seeds:", "",
                  "| method | " + " | ".join(f"{b['bucket']} ({b['users']} users)" for b in buckets) + " |",
                  "|---" * (len(buckets) + 1) + "|"]
        for n in cold:
            lines.append(f"| {n} | " + " | ".join(_fmt(b["ndcg@20"]) for b in result["final"][n]["task2_by_frequency"])
                         + " |")
    if any("cos_text_image" in p for n in named for p in result["final"][n]["grad_alignment"]):
        lines += ["", "Gradient conflict cos(g_T, g_V) on the trainable adapters by step (mean over seeds; SDA reports "
                  "it for LoRA vs MoDA):", "", "| step | " + " | ".join(named) + " |", "|---" * (len(named) + 1) + "|"]
        for i, s in enumerate(steps):
            cells = []
            for n in named:
                ga = result["final"][n]["grad_alignment"]
                cells.append(f"{ga[i]['cos_text_image']:.3f}" if i < len(ga) and "cos_text_image" in ga[i] else "-")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", f"Every tuning run (train.seed 0, valid split; budget {cfg['budget']} per method):", ""]
    for m, runs in result["tuning"].items():
        tcols = ["ndcg@20", "hit@10", "t2f_hit@10", "v2f_hit@10", "S_text", "S_image"]
        tcols += [k for k in TASK2 if runs and all(k in r["valid"] for r in runs)]
        lines += [f"### {m}", "", "| config | " + " | ".join(tcols) + " |", "|---" * (len(tcols) + 1) + "|"]
        for r in runs:
            lines.append(f"| {json.dumps(r['point'])} | " + " | ".join(f"{r['valid'][c]:.4f}" for c in tcols) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def few_shot_curves(result: dict[str, Any]) -> dict[str, list[tuple[int | None, dict[str, tuple[float, float]]]]]:
    """``{method: [(K, test metrics), ...]}`` for every method with ablations that set ``data.few_shot_users``
    (the paper's Table 7), K ascending and ``None`` (all users: the method's own row) last."""
    curves: dict[str, list[tuple[int | None, dict[str, tuple[float, float]]]]] = {}
    for a in result["config"].get("ablations", []):
        k = (a.get("overrides") or {}).get("data", {}).get("few_shot_users")
        if k is not None and a["name"] in result["final"]:
            curves.setdefault(a["of"], []).append((int(k), result["final"][a["name"]]["test"]))
    for method, points in curves.items():
        points.sort(key=lambda p: p[0])
        if method in result["final"]:
            points.append((None, result["final"][method]["test"]))
    return curves


def _plot_few_shot(result: dict[str, Any], path: Path) -> None:
    curves = few_shot_curves(result)
    if not curves:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("ndcg@20", "task2_ndcg@20") if all(k in m for pts in curves.values() for _, m in pts)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for method, points in curves.items():
            ks = [p[0] for p in points]
            xs = list(range(len(points)))
            ax.errorbar(xs, [m[key][0] for _, m in points], yerr=[m[key][1] for _, m in points], marker="o", ms=3,
                        capsize=3, label=method)
            ax.set_xticks(xs, [str(k) if k is not None else "all" for k in ks])
        ax.set_title(("Task 2 " if key.startswith("task2") else "Task 1 ") + "NDCG@20 by sampled users K")
        ax.set_xlabel("K (users in training)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_transfer(result: dict[str, Any], path: Path) -> None:
    """Table 6 as bars: per method, NDCG@20 on the study's own test split and on each transfer domain's."""
    domains = list(result["config"].get("transfer") or {})
    if not domains:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["final"])
    splits = ["test", *(f"{d}/test" for d in domains)]
    keys = [k for k in ("ndcg@20", "task2_ndcg@20") if all(k in row.get(s, {}) for row in result["final"].values()
                                                           for s in splits)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.6), squeeze=False)
    width = 0.8 / len(splits)
    for ax, key in zip(axes[0], keys, strict=True):
        for j, split in enumerate(splits):
            rows = [result["final"][n][split][key] for n in names]
            ax.bar([i + (j - (len(splits) - 1) / 2) * width for i in range(len(names))], [m for m, _ in rows], width,
                   yerr=[sd for _, sd in rows], capsize=2,
                   label="own catalog (trained)" if split == "test" else f"{split[:-5]} (zero-shot)")
        ax.set_xticks(range(len(names)), names, rotation=15, ha="right")
        ax.set_title(("Task 2 " if key.startswith("task2") else "Task 1 ") + "NDCG@20")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_alignment(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = [n for n in result["final"] if result["final"][n]["grad_alignment"]]
    if not named:
        return
    panels = [("cos_total_text", "cos(g_total, g_T)"), ("cos_total_image", "cos(g_total, g_V)")]
    if any("cos_text_image" in p for n in named for p in result["final"][n]["grad_alignment"]):
        panels.append(("cos_text_image", "gradient conflict cos(g_T, g_V)"))  # SDA's figure
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), sharey=True)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for n in named:
            ga = [p for p in result["final"][n]["grad_alignment"] if key in p]
            ax.plot([p["step"] for p in ga], [p[key] for p in ga], marker="o", ms=3, label=n)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

