"""Nightly re-embedding: catalog items (incremental) then user sequences; non-zero exit if any step fails.

    python jobs/nightly.py --config jobs/configs/nightly.yaml embed.dt=2026-11-22
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/nightly.py --config jobs/configs/nightly.yaml

Arguments after the flags are dotted ``key=value`` overrides of :class:`vlm2rec_ray.nightly.NightlyConfig`.
Exit codes: 0 every step published; 1 a step failed (summary printed and written); 2 bad config.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="NightlyConfig YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. embed.dt=2026-11-22 sequences=false")
    args = parser.parse_args(argv)

    from vlm2rec_ray.config import ConfigError, load_config
    from vlm2rec_ray.nightly import NightlyConfig, format_nightly, run_nightly

    try:
        cfg = load_config(NightlyConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = run_nightly(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_nightly(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
