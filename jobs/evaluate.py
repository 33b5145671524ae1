"""Evaluate one run: Task 1, modality dropout, geometry, Task 2, eval.json and report.html (+ PNGs).

Run locally or on a Ray cluster (CPU is enough; Task 2 models are small):

    python jobs/evaluate.py --config jobs/configs/evaluate.yaml name=VLM2Rec output_uri=runs/vlm2rec/eval
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/evaluate.yaml

Arguments after the flags are dotted ``key=value`` overrides of :class:`vlm2rec_ray.config.EvalJobConfig`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="EvalJobConfig YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. task2.epochs=5")
    args = parser.parse_args(argv)

    from vlm2rec_ray.config import ConfigError, EvalJobConfig, load_config
    from vlm2rec_ray.eval.compare import compare_runs
    from vlm2rec_ray.eval.runner import run_evaluation

    try:
        cfg = load_config(EvalJobConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_evaluation(cfg, progress=lambda m: print(m, file=sys.stderr))
    print(compare_runs([result], details=True))
    print(f"wrote {cfg.output_uri}/eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
