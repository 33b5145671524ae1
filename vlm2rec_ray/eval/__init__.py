"""Evaluation: retrieval metrics and the paper's diagnostics (pure torch/numpy, see :mod:`.metrics`)."""

from vlm2rec_ray.eval.metrics import (
    flat_grad,
    full_ranking_hit_ndcg,
    full_ranking_ranks,
    geometry_metrics,
    gradient_alignment,
    hit_ndcg_at_k,
    hit_ndcg_at_ks,
    hit_ndcg_from_ranks,
    modality_geometry,
    modality_path_losses,
    sampled_ranks,
    uniformity,
)

__all__ = [
    "flat_grad",
    "full_ranking_hit_ndcg",
    "full_ranking_ranks",
    "geometry_metrics",
    "gradient_alignment",
    "hit_ndcg_at_k",
    "hit_ndcg_at_ks",
    "hit_ndcg_from_ranks",
    "modality_geometry",
    "modality_path_losses",
    "sampled_ranks",
    "uniformity",
]
