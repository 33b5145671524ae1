"""Evaluate one run: Task 1, modality dropout, geometry, Task 2, eval.json and report.html (+ PNGs).

Run locally or on a Ray cluster (CPU is enough; Task 2 models are small):

    python jobs/evaluate.py --config jobs/configs/evaluate.yaml name=VLM2Rec output_uri=runs/vlm2rec/eval
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/evaluate.yaml

Arguments after the flags are dotted ``key=value`` overrides of :class:`vlm2rec_ray.config.EvalJobConfig`.
Exit codes: 0 done; 1 the job failed (one line on stderr, nothing published); 2 bad config.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vlm2rec_ray.runner import main as run

    return run("evaluate", argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
