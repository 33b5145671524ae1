"""Fine-tune a VLM into a VLM2Rec embedder: Ray Train TorchTrainer + DeepSpeed ZeRO, then export to output_uri.

Run locally (starts a private Ray instance) or on a cluster (joins the one in RAY_ADDRESS, which
``ray job submit`` sets for the job's driver):

    python jobs/train.py --config jobs/configs/train_tiny.yaml train.zero_stage=3
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train.py --config cluster/presets/qwen2_5_vl_7b.yaml output_uri=s3://bucket/models/x

Arguments after the flags are dotted ``key=value`` overrides of :class:`vlm2rec_ray.config.TrainJobConfig`.
Re-running the same command resumes from the run's latest checkpoint.
Exit codes: 0 done; 1 the job failed (one line on stderr, nothing published); 2 bad config.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vlm2rec_ray.runner import main as run

    return run("train", argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
