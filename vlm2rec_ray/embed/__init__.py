"""Ray Data pipelines that embed items and user sequences into Parquet snapshots (nightly, incremental):
:func:`run_embed_items` / :func:`run_embed_sequences` (the jobs; imported on first use, with Ray), and
:func:`read_embeddings` / :func:`read_errors` (a published snapshot, following its manifest). Schemas of the output
and errors tables and the row contract between the stages: :mod:`vlm2rec_ray.embed.schema`.
"""

from __future__ import annotations

from typing import Any

from vlm2rec_ray.embed.snapshot import read_embeddings, read_errors, snapshot_files

__all__ = ["EmbedFailureError", "format_summary", "read_embeddings", "read_errors", "run_embed_items",
           "run_embed_sequences", "snapshot_files"]


def __getattr__(name: str) -> Any:
    if name in ("run_embed_items", "run_embed_sequences", "EmbedFailureError", "format_summary"):
        from vlm2rec_ray.embed import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'vlm2rec_ray.embed' has no attribute {name!r}")
