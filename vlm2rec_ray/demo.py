"""``vlm2rec demo``: the whole pipeline on one box, on the synthetic modality-collapse benchmark.

Steps (each reused when its output exists for the same settings, so an interrupted demo continues):

1. the tiny Qwen2.5-VL backbone: by default the pretrained-like one of :mod:`vlm2rec_ray.model.pretrain`
   (the testbed's Vanilla, built once and cached under ``build/backbones``; ``backbone.pretrain=false`` keeps
   it random-init), copied into the store (uploaded for an s3:// store);
2. generate the synthetic multimodal dataset (a share of the next-item signal only in images);
3. train every trained run (VLM_SFT, VLM2Rec, ...) with Ray Train + DeepSpeed;
4. embed items and test sequences of every run with Ray Data;
5. evaluate every run (Task 1, modality dropout, geometry) and write one comparison report.

The library does the work: :func:`run_demo` only composes the job configs of ``vlm2rec train``, ``vlm2rec
embed`` and ``vlm2rec evaluate`` and calls their runners.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from vlm2rec_ray import storage
from vlm2rec_ray.config import (
    EmbedJobConfig,
    EvalJobConfig,
    TrainJobConfig,
    _merge,
    _Part,
    config_hash,
)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"
DEMO_DT = "2026-01-01"  # a fixed snapshot date: re-runs replace the same snapshot
# The demo prints its own steps and summaries; Ray Data's INFO progress lines, every model actor's
# weight-loading bar and library FutureWarnings/DeprecationWarnings from every Ray process would bury them (~200 lines
# against ~80 for the six embed steps). Set only where the user has not (export RAY_DATA_LOG_LEVEL=INFO,
# HF_HUB_DISABLE_PROGRESS_BARS=0 or PYTHONWARNINGS=default to see them), and not at all with VLM2REC_VERBOSE=1
# (``--verbose``). Workers started after this inherit it. The training workers' own console (one progress line per
# logging interval) is train/loop.py's quiet_worker_output.
QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "ERROR", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


class DemoDataConfig(_Part):
    """The synthetic dataset (``vlm2rec prepare synthetic``)."""

    num_items: int = Field(240, ge=20)
    num_users: int = Field(300, ge=20)
    image_only_signal: float = Field(0.5, ge=0.0, le=1.0, description="share of next-item steps visible only "
                                     "in images")
    image_size: int = Field(32, ge=16, le=512)
    seed: int = 0


class DemoBackboneConfig(_Part):
    """The demo's backbone: the pretrained-like tiny Qwen2.5-VL (default) or the random-init one."""

    pretrain: bool = Field(True, description="pre-train the tiny backbone (benchmarks/TESTBED.md) or keep it random")
    recipe: dict[str, Any] = Field(default_factory=dict, description="PretrainRecipe overrides (tests: fewer steps)")

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, v: dict[str, Any]) -> dict[str, Any]:
        from vlm2rec_ray.model.pretrain import PretrainRecipe

        try:
            PretrainRecipe(**v)
        except TypeError as e:
            raise ValueError(f"backbone.recipe={v} has an unknown key ({e}); see PretrainRecipe's fields") from e
        return v

    def key(self) -> str:
        from vlm2rec_ray.model.pretrain import PretrainRecipe, recipe_hash

        return f"pretrained-{recipe_hash(PretrainRecipe(**self.recipe))}" if self.pretrain else "random-seed0"


class DemoConfig(_Part):
    """``vlm2rec demo``: where everything goes and the settings shared by its train/embed/evaluate jobs."""

    store: str = Field("build/demo", description="local dir or s3:// prefix for dataset, models, embeddings, report")
    endpoint_url: str | None = Field(None, description="S3 endpoint for an s3:// store; default AWS_ENDPOINT_URL")
    dataset: DemoDataConfig = Field(default_factory=DemoDataConfig)
    backbone: DemoBackboneConfig = Field(default_factory=DemoBackboneConfig)
    runs: list[str] = Field(default_factory=lambda: ["VLM_Vanilla", "VLM_SFT_external", "VLM2Rec"],
                            description="baseline names (jobs/configs/baselines/*.yaml)")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainJobConfig fields shared by trained runs")
    run_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per run name, TrainJobConfig fields over `train` (e.g. its tuned lr)")
    embed: dict[str, Any] = Field(default_factory=dict, description="EmbedJobConfig fields shared by every run")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="EvalJobConfig fields shared by every run")
    fresh: bool = Field(False, description="redo every step even when its output exists")

    @field_validator("runs")
    @classmethod
    def _runs(cls, v: list[str]) -> list[str]:
        from vlm2rec_ray.eval.baselines import BASELINES

        unknown = [r for r in v if r not in BASELINES]
        if unknown or not v:
            raise ValueError(f"runs={v} has unknown names {unknown}; pick from {sorted(BASELINES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"runs={v} lists a run twice")
        return v

    @model_validator(mode="after")
    def _jobs_validate(self) -> DemoConfig:
        from vlm2rec_ray.eval.baselines import BASELINES

        stray = sorted(set(self.run_overrides) - set(BASELINES))
        if stray:
            raise ValueError(f"run_overrides names {stray}, which are not baselines; pick from {sorted(BASELINES)}")
        # Build every job config now, so a bad value fails before anything runs.
        for name in self.runs:
            if _is_trained(name):
                train_config(self, name)
            embed_config(self, name, "items")
            eval_config(self, name)
        return self

    def uri(self, *parts: str) -> str:
        return storage.join(self.store, *parts)

    @property
    def data_endpoint(self) -> str | None:
        return storage.endpoint_url(self.endpoint_url)


def _is_trained(name: str) -> bool:
    from vlm2rec_ray.eval.baselines import load_baseline

    return bool(load_baseline(name)["baseline"]["trained"])


def _baseline_tree(name: str) -> dict[str, Any]:
    from vlm2rec_ray.config import parse_overrides
    from vlm2rec_ray.eval.baselines import baseline_overrides

    return parse_overrides(baseline_overrides(name))


def backbone_uri(cfg: DemoConfig) -> str:
    return cfg.uri("backbone")


def dataset_uri(cfg: DemoConfig) -> str:
    return cfg.uri("dataset")


def model_uri(cfg: DemoConfig, name: str) -> str:
    """The model a run embeds with: its trained export, or the base backbone (VLM_Vanilla)."""
    return cfg.uri("runs", name, "model") if _is_trained(name) else backbone_uri(cfg)


def train_config(cfg: DemoConfig, name: str) -> TrainJobConfig:
    tree = _merge(_merge(cfg.train, _baseline_tree(name)), cfg.run_overrides.get(name, {}))
    tree = _merge(tree, {
        "model": {"name": backbone_uri(cfg), "endpoint_url": cfg.endpoint_url},
        "data": {"dataset_uri": dataset_uri(cfg), "endpoint_url": cfg.endpoint_url},
        "output_uri": cfg.uri("runs", name, "model"),
        "run_name": name,
    })
    return TrainJobConfig.model_validate(tree)


def embed_config(cfg: DemoConfig, name: str, kind: str) -> EmbedJobConfig:
    model = _merge(cfg.train.get("model", {}), _baseline_tree(name).get("model", {}))
    tree = _merge(cfg.embed, {
        "model": {**model, "name": model_uri(cfg, name), "endpoint_url": cfg.endpoint_url},
        "model_version": name,
        "dataset_uri": dataset_uri(cfg),
        "output_uri": cfg.uri("runs", name, "embeddings"),
        "split": "test",
        "dt": DEMO_DT,
        "endpoint_url": cfg.endpoint_url,
    })
    return EmbedJobConfig.model_validate(tree)


def eval_config(cfg: DemoConfig, name: str) -> EvalJobConfig:
    tree = _merge(cfg.evaluate, {
        "name": name,
        "dataset_uri": dataset_uri(cfg),
        "item_embeddings_uri": cfg.uri("runs", name, "embeddings", "items"),
        "sequence_embeddings_uri": cfg.uri("runs", name, "embeddings", "sequences"),
        "dt": DEMO_DT,
        "output_uri": cfg.uri("runs", name, "eval"),
        "training_metrics_uri": cfg.uri("runs", name, "model", "metrics.jsonl") if _is_trained(name) else None,
        "report": False,
        "storage": {"endpoint_url": cfg.endpoint_url},
    })
    return EvalJobConfig.model_validate(tree)


class _State:
    """``<store>/demo_state.json``: the config hash each finished step ran with (so re-runs skip it)."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.uri = cfg.uri("demo_state.json")
        self.endpoint = cfg.data_endpoint
        self.done: dict[str, str] = {}
        if not cfg.fresh and storage.exists(self.uri, endpoint=self.endpoint):
            self.done = json.loads(storage.read_text(self.uri, endpoint=self.endpoint))

    def is_done(self, step: str, key: str, output: str) -> bool:
        """``step`` ran with ``key`` and its ``output`` (a file it writes last) is still there: a step whose
        output was deleted since runs again."""
        return self.done.get(step) == key and storage.exists(output, endpoint=self.endpoint)

    def mark(self, step: str, key: str) -> None:
        self.done[step] = key
        storage.write_text(self.uri, json.dumps(self.done, indent=1, sort_keys=True) + "\n", endpoint=self.endpoint)


def run_demo(cfg: DemoConfig, *, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns ``{"report": html uri, "table": str, "runs": {name: eval result}, "wall_s"}``."""
    from vlm2rec_ray.data.synthetic import generate_synthetic
    from vlm2rec_ray.embed import format_summary, run_embed_items, run_embed_sequences, snapshot
    from vlm2rec_ray.eval.compare import compare_runs
    from vlm2rec_ray.eval.report import load_training_metrics, write_report
    from vlm2rec_ray.eval.runner import run_evaluation
    from vlm2rec_ray.model.pretrain import PretrainRecipe, ensure_pretrained_backbone
    from vlm2rec_ray.model.tiny import build_tiny_backbone
    from vlm2rec_ray.runtime import build_dir, configure_local_env, verbose
    from vlm2rec_ray.train.trainer import connect_ray, run_training

    started = time.time()
    configure_local_env()
    for key, value in ({} if verbose() else QUIET_ENV).items():
        os.environ.setdefault(key, value)
    endpoint = cfg.data_endpoint
    state = _State(cfg)
    trained = [n for n in cfg.runs if _is_trained(n)]
    total = 2 + len(trained) + 2 * len(cfg.runs) + len(cfg.runs) + 1
    step = 0

    def stage(msg: str) -> None:
        nonlocal step
        step += 1
        progress(f"\n[{step}/{total}] {msg}  (t={time.time() - started:.0f} s)")

    kind = "pretrained" if cfg.backbone.pretrain else "random-init"
    stage(f"{kind} tiny Qwen2.5-VL backbone -> {backbone_uri(cfg)}")
    key = cfg.backbone.key()
    if state.is_done("backbone", key, storage.join(backbone_uri(cfg), "config.json")):
        progress("  exists, reused")
    else:
        if cfg.backbone.pretrain:
            local = ensure_pretrained_backbone(build_dir() / "backbones", PretrainRecipe(**cfg.backbone.recipe),
                                               progress=lambda m: progress(f"  {m}"), log_every=100)
            progress(f"  {local}")
        else:
            local = build_dir() / "demo_backbone"
            build_tiny_backbone(local, seed=0)
        storage.upload_dir(local, backbone_uri(cfg), endpoint=endpoint)
        state.mark("backbone", key)

    d = cfg.dataset
    stage(f"synthetic dataset ({d.num_items} items, {d.num_users} users, image-only signal "
          f"{d.image_only_signal:.0%}) -> {dataset_uri(cfg)}")
    key = config_hash(d)
    if state.is_done("dataset", key, storage.join(dataset_uri(cfg), "stats.json")):
        progress("  exists, reused")
    else:
        stats = generate_synthetic(dataset_uri(cfg), num_items=d.num_items, num_users=d.num_users,
                                   image_only_signal=d.image_only_signal, image_size=d.image_size, seed=d.seed,
                                   endpoint=endpoint)
        progress(f"  {json.dumps(stats)}")
        state.mark("dataset", key)

    connect_ray()
    for name in trained:
        tcfg = train_config(cfg, name)
        stage(f"train {name} (objective {tcfg.objective.variant}, {tcfg.scaling.num_workers} workers, "
              f"ZeRO-{tcfg.train.zero_stage}) -> {tcfg.output_uri}")
        key = config_hash(tcfg) + state.done.get("dataset", "")
        if state.is_done(f"train/{name}", key, storage.join(tcfg.output_uri, "README.md")):
            progress("  exists, reused")
            continue
        summary = run_training(tcfg, progress=lambda m: progress(f"  {m}"))
        last = summary.get("final_metrics") or {}
        progress(f"  {summary.get('global_step')} steps in {summary.get('wall_s')} s; last loss "
                 f"{last.get('loss', last.get('train/loss', '?'))}")
        state.mark(f"train/{name}", key)

    results: dict[str, dict[str, Any]] = {}
    for name in cfg.runs:
        key = state.done.get(f"train/{name}", "") + state.done.get("dataset", "")
        for kind, fn in (("items", run_embed_items), ("sequences", run_embed_sequences)):
            ecfg = embed_config(cfg, name, kind)
            stage(f"embed {kind} with {name} -> {ecfg.output_uri}/{kind}/dt={DEMO_DT}")
            k = key + config_hash(ecfg)
            manifest = snapshot.manifest_uri(snapshot.kind_uri(ecfg.output_uri, kind), DEMO_DT)
            if state.is_done(f"embed/{name}/{kind}", k, manifest):
                progress("  exists, reused")
                continue
            summary = fn(ecfg, progress=lambda m: progress(f"  {m}"))
            progress("  " + format_summary(summary).replace("\n", "\n  "))
            state.mark(f"embed/{name}/{kind}", k)
    for name in cfg.runs:
        ecfg = eval_config(cfg, name)
        stage(f"evaluate {name} -> {ecfg.output_uri}")
        results[name] = run_evaluation(ecfg, progress=lambda m: progress(f"  {m}"))

    stage("comparison report")
    histories = {}
    for name in trained:
        try:
            histories[name] = load_training_metrics(cfg.uri("runs", name, "model", "metrics.jsonl"), endpoint=endpoint)
        except FileNotFoundError as e:
            progress(f"  warning: {e}")
    ordered = [results[n] for n in cfg.runs]
    report = write_report(cfg.uri("report"), ordered, histories, title="VLM2Rec demo: synthetic multimodal catalog",
                          endpoint=endpoint)
    table = compare_runs(ordered)
    wall = time.time() - started
    storage.write_text(cfg.uri("demo_summary.json"), json.dumps(
        {"report": report["html"], "runs": {n: _headline(results[n]) for n in cfg.runs}, "wall_s": round(wall, 1),
         "dataset": cfg.dataset.model_dump()}, indent=2) + "\n", endpoint=endpoint)
    return {"report": report["html"], "table": table, "runs": results, "wall_s": wall}


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers the demo reports: Task 1 (sampled), modality dropout and separation S per modality."""
    geometry = result.get("geometry") or {}
    return {"task1": (result.get("task1") or {}).get("sampled"), "dropout": result.get("dropout"),
            "S": {m: (geometry.get(m) or {}).get("S") for m in ("text", "image", "fused")}}
