"""Fine-tune a VLM into a VLM2Rec embedder: Ray Train TorchTrainer + DeepSpeed ZeRO, then export to output_uri.

Run locally (starts a private Ray instance) or on a cluster (joins the one in RAY_ADDRESS, which
``ray job submit`` sets for the job's driver):

    python jobs/train.py --config jobs/configs/train_tiny.yaml train.zero_stage=3
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train.py --config cluster/presets/qwen2_5_vl_7b.yaml output_uri=s3://bucket/models/x

Arguments after the flags are dotted ``key=value`` overrides of :class:`vlm2rec_ray.config.TrainJobConfig`.
Re-running the same command resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="TrainJobConfig YAML")
    parser.add_argument("--address", default=None, help="Ray cluster to join (auto, ray://host:10001); default "
                        "RAY_ADDRESS, else a private local instance")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.zero_stage=3")
    args = parser.parse_args(argv)

    from vlm2rec_ray.config import ConfigError, TrainJobConfig, load_config
    from vlm2rec_ray.train.trainer import run_training

    try:
        cfg = load_config(TrainJobConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = run_training(cfg, progress=lambda m: print(m, file=sys.stderr), ray_address=args.address)
    keys = ("global_step", "resumes", "final_metrics", "export_max_abs_diff", "output_uri")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
