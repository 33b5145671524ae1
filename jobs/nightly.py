"""Nightly re-embedding: catalog items (incremental) then user sequences; non-zero exit if any step fails.

    python jobs/nightly.py --config jobs/configs/nightly.yaml embed.dt=2026-11-22
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/nightly.py --config jobs/configs/nightly.yaml

Arguments after the flags are dotted ``key=value`` overrides of :class:`vlm2rec_ray.nightly.NightlyConfig`.
Exit codes: 0 every step published; 1 a step failed (summary printed and written); 2 bad config.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vlm2rec_ray.runner import main as run

    return run("nightly", argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
