"""Embed a catalog into a Parquet snapshot: emb_text, emb_image, emb_fused per item (full or incremental).

Run locally (starts a private Ray instance) or on a cluster (``RAY_ADDRESS`` set, e.g. by ``ray job submit``):

    python jobs/embed_items.py --config jobs/configs/embed_items.yaml model_version=v2 dt=2026-11-22
    ray job submit --working-dir . -- python jobs/embed_items.py --config jobs/configs/embed_items.yaml incremental=true

Arguments after the flags are dotted ``key=value`` overrides of :class:`vlm2rec_ray.config.EmbedJobConfig`.
Exit codes: 0 published; 1 the run failed (too many failed rows, bad input; nothing published); 2 bad config.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="EmbedJobConfig YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. batch_size=64 incremental=true")
    args = parser.parse_args(argv)

    from vlm2rec_ray.config import ConfigError, EmbedJobConfig, load_config
    from vlm2rec_ray.embed import EmbedFailureError, format_summary, run_embed_items
    from vlm2rec_ray.storage import StorageError

    try:
        cfg = load_config(EmbedJobConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_embed_items(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except EmbedFailureError as e:
        print(format_summary(e.summary))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
