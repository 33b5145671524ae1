"""The shared body of ``jobs/embed_items.py`` and ``jobs/embed_sequences.py`` (thin entry points)."""

from __future__ import annotations

import argparse
import sys


def main(kind: str, argv: list[str] | None, *, description: str) -> int:
    """Parse ``--config X.yaml key=value ...``, run the ``kind`` (``items`` | ``sequences``) embed job, print its
    summary. Exit codes: 0 published; 1 the run failed (too many failed rows, bad input; nothing published);
    2 bad config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="EmbedJobConfig YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. batch_size=64 incremental=true")
    args = parser.parse_args(argv)

    from vlm2rec_ray.config import ConfigError, EmbedJobConfig, load_config
    from vlm2rec_ray.embed import EmbedFailureError, format_summary, run_embed_items, run_embed_sequences
    from vlm2rec_ray.storage import StorageError

    run = {"items": run_embed_items, "sequences": run_embed_sequences}[kind]
    try:
        cfg = load_config(EmbedJobConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except EmbedFailureError as e:
        print(format_summary(e.summary))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0
