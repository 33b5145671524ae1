"""The ``vlm2rec`` command: prepare data, train, embed, evaluate, plan, and check the environment.

Every subcommand is a thin shell over the library: it loads one validated config (YAML + ``key=value``
overrides) and calls one library function. Run ``vlm2rec --help`` or ``vlm2rec <command> --help``.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    help="VLM2Rec on Ray: fine-tune vision-language models into recommendation embedders and embed catalogs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
prepare_app = typer.Typer(help="Prepare datasets (Amazon Reviews, synthetic) and images.", no_args_is_help=True)
embed_app = typer.Typer(help="Embed items or user sequences to Parquet with Ray Data.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")
app.add_typer(embed_app, name="embed")


def _set_verbose(flag: bool) -> None:
    """``--verbose``: export VLM2REC_VERBOSE=1 (read by the driver and passed on to the training workers)."""
    if flag:
        import os

        os.environ["VLM2REC_VERBOSE"] = "1"


def fail(message: str, code: int = 2) -> None:
    """Print an error for a user mistake and exit non-zero (no traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def doctor(
    endpoint: str = typer.Option(None, help="S3 endpoint to check (default: AWS_ENDPOINT_URL, if set)"),
    ray_address: str = typer.Option(None, help="Ray cluster to check (default: RAY_ADDRESS, if set)"),
) -> None:
    """Check versions, CPU/GPU, Ray and the object store; exit 1 if anything required is broken."""
    from vlm2rec_ray.doctor import run_doctor

    raise typer.Exit(run_doctor(endpoint=endpoint, ray_address=ray_address))


@app.command()
def plan(
    model: str = typer.Option(..., help="preset (Qwen2.5-VL-3B/7B/32B/72B) or a config.json path"),
    gpus: int = typer.Option(8, help="number of GPUs"),
    gpu_mem: float = typer.Option(80.0, "--gpu-mem", help="memory per GPU in GiB"),
    full: bool = typer.Option(False, "--full", help="full fine-tuning instead of LoRA"),
    lora_r: int = typer.Option(16, help="LoRA rank"),
    micro_batch: int = typer.Option(8, help="desired per-GPU batch (the paper uses 8)"),
    no_checkpointing: bool = typer.Option(False, "--no-checkpointing", help="plan without gradient checkpointing"),
) -> None:
    """Per-GPU memory of params, grads, optimizer states and activations per ZeRO stage, and a recommendation."""
    from vlm2rec_ray.plan import format_plan
    from vlm2rec_ray.plan import plan as make_plan

    try:
        result = make_plan(model, gpus, gpu_mem, lora=not full, lora_r=lora_r, micro_batch=micro_batch,
                           checkpointing=not no_checkpointing)
    except ValueError as e:
        fail(str(e))
    typer.echo(format_plan(result))


# --- prepare (data) ---------------------------------------------------------------------------------------


def _progress(label: str):  # type: ignore[no-untyped-def]
    """A ``progress(done, total)`` callback drawing a progress bar on stderr once work starts."""
    state: dict[str, object] = {}

    def update(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = typer.progressbar(length=total, label=label, file=sys.stderr)
            bar.__enter__()
            state["bar"] = bar
        bar.update(done - int(state.get("done", 0)))  # type: ignore[attr-defined]
        state["done"] = done
        if done >= total:
            bar.__exit__(None, None, None)  # type: ignore[attr-defined]

    return update


@prepare_app.command("amazon")
def prepare_amazon_cmd(
    reviews: str = typer.Option(..., help="reviews dump: reviews_<Cat>.json.gz (2014), <Cat>.json.gz (2018), <Cat>.jsonl (2023); local or s3://"),
    meta: str = typer.Option(..., help="metadata dump: meta_<Cat>.json(l)(.gz); local or s3://"),
    out: str = typer.Option(..., help="output dataset: local dir or s3:// prefix"),
    fmt: str = typer.Option("auto", "--format", help="auto | 2014 | 2018 | 2023"),
    k: int = typer.Option(5, help="k-core threshold for users and items"),
    max_history: int = typer.Option(10, help="history items kept per split row"),
    copy_images: bool = typer.Option(False, "--copy-images", help="copy item images into <out>/images (items whose image fails are dropped, counted)"),
    concurrency: int = typer.Option(16, help="parallel image downloads with --copy-images"),
    name: str = typer.Option(None, help="dataset name for the Table 3 row (default: the out path's last part)"),
    endpoint: str = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
) -> None:
    """Prepare an Amazon Reviews category: 5-core, chronological leave-one-out splits, Table 3 stats."""
    import json

    from vlm2rec_ray.data.amazon import prepare_amazon
    from vlm2rec_ray.data.splits import format_table3
    from vlm2rec_ray.storage import StorageError

    try:
        result = prepare_amazon(reviews, meta, out, fmt=fmt, k=k, max_history=max_history, endpoint=endpoint,
                                copy_images=copy_images, image_concurrency=concurrency)
    except (ValueError, FileNotFoundError, StorageError) as e:
        fail(str(e))
    report = result["report"]
    typer.echo(format_table3(result["stats"], name or out.rstrip("/").rsplit("/", 1)[-1]))
    typer.echo(f"dropped items: {json.dumps(report['dropped_items'])}; duplicate interactions: "
               f"{report['duplicate_interactions']}; k-core: {json.dumps(report['kcore'])}; "
               f"malformed lines: {json.dumps(report['line_problems'])}")
    if "images" in report:
        typer.echo(f"images: {json.dumps(report['images'])}")
    typer.echo(f"wrote {out} (details in report.json)")


@prepare_app.command("images")
def prepare_images_cmd(
    dataset: str = typer.Option(..., help="prepared dataset (local dir or s3:// prefix) whose catalog has remote image URLs"),
    concurrency: int = typer.Option(16, help="parallel downloads"),
    retries: int = typer.Option(3, help="retries per image on transient errors (5xx, timeouts)"),
    max_bytes: int = typer.Option(20_000_000, help="skip images larger than this (reason too_large)"),
    timeout: float = typer.Option(30.0, help="per-request timeout in seconds"),
    endpoint: str = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
) -> None:
    """Copy catalog images into <dataset>/images and point the catalog at them; failures by reason."""
    from vlm2rec_ray.data.prepare_images import prepare_images
    from vlm2rec_ray.storage import StorageError

    try:
        summary = prepare_images(dataset, endpoint=endpoint, concurrency=concurrency, retries=retries,
                                 max_bytes=max_bytes, timeout_s=timeout, progress=_progress("images"))
    except (ValueError, FileNotFoundError, StorageError) as e:
        fail(str(e))
    counts = ", ".join(f"{k}={v}" for k, v in summary["counts"].items()) or "none"
    typer.echo(f"images: {summary['ok']} ok, {summary['failed']} failed, {summary['skipped_local']} already local")
    typer.echo(f"counts: {counts}")
    if summary["failed"]:
        typer.echo(f"failed items (with reasons): {summary['errors_uri']}")


@prepare_app.command("synthetic")
def prepare_synthetic_cmd(
    out: str = typer.Option(..., help="output dataset: local dir or s3:// prefix"),
    num_items: int = typer.Option(300, help="catalog size"),
    num_users: int = typer.Option(200, help="number of users (one sequence each)"),
    image_only_signal: float = typer.Option(0.5, help="share of next-item signal visible only in images (0..1)"),
    seed: int = typer.Option(0, help="random seed (same seed, same data and images)"),
    image_size: int = typer.Option(64, help="image side in pixels"),
    noise: float = typer.Option(0.0, help="share of random steps in the sequences"),
    coupling: float = typer.Option(0.0, help="share of items/users whose look follows their text (0 = the "
                                   "modalities are independent)"),
    endpoint: str = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
) -> None:
    """Generate the synthetic multimodal benchmark (title-only and image-only item attributes)."""
    from vlm2rec_ray.data.splits import format_table3
    from vlm2rec_ray.data.synthetic import generate_synthetic
    from vlm2rec_ray.storage import StorageError

    try:
        stats = generate_synthetic(out, num_items=num_items, num_users=num_users, image_only_signal=image_only_signal,
                                   seed=seed, image_size=image_size, noise=noise, coupling=coupling,
                                   endpoint=endpoint)
    except (ValueError, StorageError) as e:
        fail(str(e))
    typer.echo(format_table3(stats, f"synthetic(s={image_only_signal:g})"))
    typer.echo(f"wrote {out}")


@prepare_app.command("backbone")
def prepare_backbone_cmd(
    out: str = typer.Option(..., help="output directory (a save_pretrained checkpoint) or s3:// prefix"),
    pretrain: bool = typer.Option(True, "--pretrain/--random", help="pre-train the tiny backbone (the testbed's "
                                  "Vanilla, ~1 min on 2 cores) or keep it random-init (tests)"),
    seed: int = typer.Option(0, help="weights and tokenizer seed"),
    endpoint: str = typer.Option(None, help="S3 endpoint for an s3:// --out (default: AWS_ENDPOINT_URL)"),
) -> None:
    """Build the offline tiny Qwen2.5-VL: random-init, or pre-trained per the fixed recipe (model/pretrain.py)."""
    import json
    import tempfile
    import time

    from vlm2rec_ray import storage
    from vlm2rec_ray.model.pretrain import PretrainRecipe, pretrain_backbone
    from vlm2rec_ray.model.tiny import build_tiny_backbone

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        local = tmp if storage.is_s3(out) else out
        try:
            if pretrain:
                summary = pretrain_backbone(local, PretrainRecipe(seed=seed), progress=typer.echo)
                typer.echo(f"recipe {summary['recipe_hash']}: {json.dumps(summary['recipe'])}")
            else:
                build_tiny_backbone(local, seed=seed)
            if storage.is_s3(out):
                storage.upload_dir(local, out, endpoint=endpoint)
        except (ValueError, OSError, storage.StorageError) as e:
            fail(str(e))
    typer.echo(f"wrote {out} in {time.perf_counter() - started:.1f} s")


# --- train ------------------------------------------------------------------------------------------------


@app.command()
def train(
    args: list[str] = typer.Argument(None, help="key=value overrides of the config (e.g. train.zero_stage=3 "
                                     "output_uri=s3://bucket/models/x)"),
    config: str = typer.Option(None, "--config", "-c", help="TrainJobConfig YAML (e.g. jobs/configs/train_tiny.yaml)"),
    address: str = typer.Option(None, "--address", help="Ray cluster to join (auto, ray://host:10001); default "
                                "RAY_ADDRESS, else a private local instance"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="full worker output: every metric dict, Ray Train's "
                                 "per-report results, library warnings (also VLM2REC_VERBOSE=1)"),
) -> None:
    """Fine-tune with Ray Train + DeepSpeed and export the model; re-running the same command resumes."""
    from vlm2rec_ray.runner import run_job

    _set_verbose(verbose)
    raise typer.Exit(run_job("train", config, list(args or []), address=address))


# --- embed ------------------------------------------------------------------------------------------------


def _embed(kind: str, config: str | None, args: list[str] | None, endpoint: str | None) -> None:
    """Run the embed job of ``kind`` through the shared runner (exit 1 if it failed, 2 for a bad config)."""
    from vlm2rec_ray.runner import run_job

    raise typer.Exit(run_job(f"embed-{kind}", config, list(args or []) + _endpoint(endpoint)))


def _endpoint(endpoint: str | None) -> list[str]:
    """``--endpoint`` as the override of the one storage section every job shares."""
    return [f"storage.endpoint_url={endpoint}"] if endpoint else []


_EMBED_ARGS_HELP = "key=value overrides of the config (e.g. model_version=v2 dt=2026-11-22 incremental=true)"
_EMBED_CONFIG_HELP = "EmbedJobConfig YAML (e.g. jobs/configs/embed_items.yaml)"


@embed_app.command("items")
def embed_items_cmd(
    args: list[str] = typer.Argument(None, help=_EMBED_ARGS_HELP),
    config: str = typer.Option(None, "--config", "-c", help=_EMBED_CONFIG_HELP),
    endpoint: str = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
) -> None:
    """Embed the catalog (emb_text, emb_image, emb_fused per item) into <output_uri>/items/dt=<dt>/.

    Failed rows go to the run's errors table, by reason.
    Exit 1 if their share exceeds max_failure_fraction (nothing published); exit 2 for a bad config.
    Runs on the Ray cluster at RAY_ADDRESS if set, else on a private local Ray.
    """
    _embed("items", config, args, endpoint)


@embed_app.command("sequences")
def embed_sequences_cmd(
    args: list[str] = typer.Argument(None, help=_EMBED_ARGS_HELP),
    config: str = typer.Option(None, "--config", "-c", help="EmbedJobConfig YAML (e.g. jobs/configs/embed_sequences.yaml)"),
    endpoint: str = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
) -> None:
    """Embed each user's last model.max_history items (<dataset_uri>/splits/<split>.parquet).

    Writes <output_uri>/sequences/dt=<dt>/ with user_id, history, emb_text, emb_image, emb_fused, ...

    Exit codes as for `vlm2rec embed items`.
    """
    _embed("sequences", config, args, endpoint)


# --- evaluate / demo --------------------------------------------------------------------------------------


@app.command()
def evaluate(
    args: list[str] = typer.Argument(None, help="key=value overrides of the config (e.g. name=VLM2Rec "
                                     "task2.epochs=5); with --compare: the evaluate output dirs to compare"),
    config: str = typer.Option(None, "--config", "-c", help="EvalJobConfig YAML (e.g. jobs/configs/evaluate.yaml)"),
    compare: bool = typer.Option(False, "--compare", help="compare finished runs: ARGS are their output dirs "
                                 "(each holding eval.json); prints one table"),
    details: bool = typer.Option(False, "--details", help="with --compare: also print every table"),
    report: str = typer.Option(None, "--report", help="with --compare: write report.html + PNGs for all runs here"),
    endpoint: str = typer.Option(None, help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
) -> None:
    """Task 1, modality dropout, geometry, Task 2 and a report for one run; or --compare several runs."""
    from vlm2rec_ray.eval.compare import compare_runs, load_result
    from vlm2rec_ray.storage import StorageError

    args = list(args or [])
    if compare:
        if not args:
            fail("--compare needs the output dirs of finished `vlm2rec evaluate` runs, e.g. --compare runs/sft runs/vlm2rec")
        try:
            results = [load_result(a, endpoint=endpoint) for a in args]
            typer.echo(compare_runs(results, details=details))
            if report:
                from vlm2rec_ray.eval.report import load_training_metrics, write_report

                histories = {}
                for r in results:
                    uri = (r.get("config") or {}).get("training_metrics_uri")
                    if uri:
                        try:
                            histories[r["name"]] = load_training_metrics(uri, endpoint=endpoint)
                        except FileNotFoundError as e:
                            typer.secho(f"warning: {e}", fg=typer.colors.YELLOW, err=True)
                out = write_report(report, results, histories, title="VLM2Rec: comparison", endpoint=endpoint)
                typer.echo(f"report: {out['html']}")
        except (FileNotFoundError, ValueError, StorageError) as e:
            fail(str(e))
        return
    if details or report:
        fail("--details and --report go with --compare; a single run writes its report to output_uri")
    from vlm2rec_ray.runner import run_job

    raise typer.Exit(run_job("evaluate", config, args + _endpoint(endpoint)))


@app.command()
def study(
    args: list[str] = typer.Argument(None, help="key=value overrides, e.g. budget=8 final_seeds='[0]'"),
    config: str = typer.Option("jobs/configs/study.yaml", help="study YAML (protocol: benchmarks/TESTBED.md)"),
) -> None:
    """SFT vs VLM2Rec on the pretrained-like testbed: equal tuning budgets on valid, seeds on test."""
    from vlm2rec_ray.config import ConfigError, load_config
    from vlm2rec_ray.runtime import configure_local_env
    from vlm2rec_ray.testbed.study import StudyConfig, format_study, run_study

    try:
        cfg = load_config(StudyConfig, config, args)
    except ConfigError as e:
        fail(str(e))
    configure_local_env()
    result = run_study(cfg, progress=typer.echo)
    typer.echo(format_study(result).split("\nChosen")[0])
    typer.echo(f"wrote {cfg.out}/{cfg.name}.md, {cfg.name}.json, runs.jsonl in {result['wall_s']:.0f} s")


@app.command()
def demo(
    args: list[str] = typer.Argument(None, help="key=value overrides (e.g. store=s3://bucket/demo "
                                     "dataset.image_only_signal=0.3 fresh=true)"),
    config: str = typer.Option(None, "--config", "-c", help="DemoConfig YAML (default jobs/configs/demo.yaml)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="full Ray and worker output (also VLM2REC_VERBOSE=1; "
                                 "make demo VERBOSE=1)"),
) -> None:
    """The whole pipeline on local Ray: synthetic catalog -> train VLM_SFT and VLM2Rec -> embed -> evaluate -> report.

    Re-running skips finished steps (same settings); fresh=true redoes everything.
    """
    from vlm2rec_ray.demo import DEFAULT_CONFIG
    from vlm2rec_ray.runner import run_job

    _set_verbose(verbose)
    raise typer.Exit(run_job("demo", config or str(DEFAULT_CONFIG), list(args or [])))


@app.command()
def nightly(
    args: list[str] = typer.Argument(None, help="key=value overrides (e.g. embed.dt=2026-11-22 sequences=false)"),
    config: str = typer.Option(None, "--config", "-c", help="NightlyConfig YAML (e.g. jobs/configs/nightly.yaml)"),
) -> None:
    """Re-embed the catalog (incremental) then the user sequences; exit 1 if any step failed."""
    from vlm2rec_ray.runner import run_job

    raise typer.Exit(run_job("nightly", config, list(args or [])))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
