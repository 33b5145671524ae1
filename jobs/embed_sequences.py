"""Embed user histories (each user's last model.max_history items) into a Parquet snapshot of sequences.

Run locally (starts a private Ray instance) or on a cluster (``RAY_ADDRESS`` set, e.g. by ``ray job submit``):

    python jobs/embed_sequences.py --config jobs/configs/embed_sequences.yaml model_version=v2 dt=2026-11-22
    ray job submit --working-dir . -- python jobs/embed_sequences.py --config jobs/configs/embed_sequences.yaml split=test

Arguments after the flags are dotted ``key=value`` overrides of :class:`vlm2rec_ray.config.EmbedJobConfig`.
Output rows: user_id, history (the item ids encoded), emb_text, emb_image, emb_fused, content_hash, ...
Exit codes: 0 published; 1 the run failed (too many failed rows, bad input; nothing published); 2 bad config.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vlm2rec_ray.runner import main as run

    return run("embed-sequences", argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
