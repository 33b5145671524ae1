"""One runner for every job: ``jobs/*.py`` (``ray job submit``) and the ``vlm2rec`` CLI load a config, run a
library function and report errors the same way.

Exit codes: 0 done; 1 the job failed (bad input, a storage error, too many failed rows: nothing published; the
message is one line, no traceback); 2 a bad config (the message names the field, the value and the fix).

    sys.exit(main("embed-items", argv, description=__doc__))      # a jobs/*.py entry point
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Job:
    """A config class (``module:Class``), the function that runs it, and how its result is reported."""

    config: str
    run: Callable[..., Any]  # run(cfg, progress=..., **options) -> result
    report: Callable[[Any], str]
    ok: Callable[[Any], bool] = lambda _result: True


def _embed(kind: str) -> Callable[..., Any]:
    def run(cfg: Any, **kw: Any) -> Any:
        from vlm2rec_ray.embed import run_embed_items, run_embed_sequences

        return (run_embed_items if kind == "items" else run_embed_sequences)(cfg, **kw)

    return run


def _embed_report(summary: dict[str, Any]) -> str:
    from vlm2rec_ray.embed import format_summary

    return format_summary(summary)


def _train(cfg: Any, *, progress: Callable[[str], None], address: str | None = None) -> Any:
    from vlm2rec_ray.train.trainer import run_training

    return run_training(cfg, progress=progress, ray_address=address)


def _evaluate(cfg: Any, **kw: Any) -> Any:
    from vlm2rec_ray.eval.runner import run_evaluation

    return run_evaluation(cfg, **kw)


def _evaluate_report(result: dict[str, Any]) -> str:
    from vlm2rec_ray.eval.compare import compare_runs

    lines = [compare_runs([result], details=True)]
    if "report" in result:
        lines.append(f"report: {result['report']['html']}")
    return "\n".join([*lines, f"wrote {result['config']['output_uri']}/eval.json"])


def _nightly(cfg: Any, **kw: Any) -> Any:
    from vlm2rec_ray.nightly import run_nightly

    return run_nightly(cfg, **kw)


def _nightly_report(out: dict[str, Any]) -> str:
    from vlm2rec_ray.nightly import format_nightly

    return format_nightly(out)


def _demo(cfg: Any, **kw: Any) -> Any:
    from vlm2rec_ray.demo import run_demo

    return run_demo(cfg, **kw)


JOBS: dict[str, Job] = {
    "train": Job("vlm2rec_ray.config:TrainJobConfig", _train, lambda s: json.dumps(
        {k: s.get(k) for k in ("global_step", "resumes", "final_metrics", "export_max_abs_diff", "output_uri")},
        indent=2, default=str)),
    "embed-items": Job("vlm2rec_ray.config:EmbedJobConfig", _embed("items"), _embed_report),
    "embed-sequences": Job("vlm2rec_ray.config:EmbedJobConfig", _embed("sequences"), _embed_report),
    "evaluate": Job("vlm2rec_ray.config:EvalJobConfig", _evaluate, _evaluate_report),
    "nightly": Job("vlm2rec_ray.nightly:NightlyConfig", _nightly, _nightly_report, lambda out: bool(out["ok"])),
    "demo": Job("vlm2rec_ray.demo:DemoConfig", _demo, lambda out: f"\n{out['table']}\n\ndemo finished in "
                f"{out['wall_s'] / 60:.1f} min; report: {out['report']}"),
}


def run_job(name: str, config: str | None, overrides: list[str] | None = None, **options: Any) -> int:
    """Load ``JOBS[name]``'s config (YAML + ``key=value`` overrides), run it and print its report (stdout) and
    progress and errors (stderr); returns the exit code (see the module doc)."""
    import importlib

    from vlm2rec_ray import storage
    from vlm2rec_ray.config import ConfigError, load_config

    job = JOBS[name]

    def err(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    module, _, cls = job.config.partition(":")
    try:
        cfg = load_config(getattr(importlib.import_module(module), cls), config, list(overrides or []))
    except ConfigError as e:
        err(f"error: {e}")
        return 2
    try:
        result = job.run(cfg, progress=err, **options)
    except Exception as e:
        from vlm2rec_ray.embed import EmbedFailureError

        if isinstance(e, EmbedFailureError):
            print(_embed_report(e.summary))
        elif not isinstance(e, (ValueError, FileNotFoundError, PermissionError, storage.StorageError)):
            raise  # a bug, not a user's mistake: the traceback is the report
        err(f"error: {storage.redact(str(e))}")
        return 1
    print(job.report(result), flush=True)
    return 0 if job.ok(result) else 1


def main(name: str, argv: list[str] | None = None, *, description: str | None = None) -> int:
    """The body of a ``jobs/*.py`` entry point: ``--config X.yaml key=value ...`` (and ``--address`` for train)."""
    parser = argparse.ArgumentParser(description=(description or name).strip().splitlines()[0])
    parser.add_argument("--config", default=None, help="the job's YAML config")
    if name == "train":
        parser.add_argument("--address", default=None, help="Ray cluster to join (auto, ray://host:10001); default "
                            "RAY_ADDRESS, else a private local instance")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. batch_size=64")
    args = parser.parse_args(argv)
    options = {"address": args.address} if name == "train" else {}
    return run_job(name, args.config, args.overrides, **options)


__all__ = ["JOBS", "Job", "main", "run_job"]
