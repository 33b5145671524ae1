"""Ray Data pipelines that embed items and user sequences into Parquet snapshots (nightly, incremental).

- :func:`run_embed_items` / :func:`run_embed_sequences`: the jobs (``vlm2rec embed items|sequences``).
- :func:`read_embeddings`: read a published snapshot (follows its manifest; default the latest ``dt``).
- Schemas of the output and errors tables, and the row contract between the stages: :mod:`vlm2rec_ray.embed.schema`.

Heavy imports (Ray, torch) happen inside the functions, so importing this package is cheap.
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
