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


# --- prepare (data) ---------------------------------------------------------------------------------------

# --- train ------------------------------------------------------------------------------------------------

# --- embed ------------------------------------------------------------------------------------------------

# --- evaluate / demo --------------------------------------------------------------------------------------


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
