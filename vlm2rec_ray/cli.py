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

# --- train ------------------------------------------------------------------------------------------------

# --- embed ------------------------------------------------------------------------------------------------

# --- evaluate / demo --------------------------------------------------------------------------------------


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
