"""Retrieval metrics and the paper's diagnostics (arXiv 2603.17450, sections 3 and 5.1.3), torch + numpy only.

- Ranking: ``hit_ndcg_at_k`` for the sampled protocol (the target against 100 sampled negatives) and
  ``full_ranking_hit_ndcg`` against the whole catalog. The rank of a target is the number of competitors
  scored **strictly higher** (ties go to the target), ``Hit@k = 1[rank < k]`` and
  ``NDCG@k = 1[rank < k] / log2(rank + 2)`` (one relevant item, so IDCG = 1); both averaged over users.
- Geometry (eqs. 4-5), on L2-normalised embeddings, in squared Euclidean distances: ``A_pos`` (mean
  ``||z_i - e_i||^2`` of a sequence to its target), ``A_neg`` (mean over sequences of the mean distance to
  that sequence's negatives), ``S = A_neg / (A_pos + eps)`` (separability; S > 1 separates) and ``U`` (log
  mean ``exp(-2 ||z_s - e_i||^2)`` over uniformly drawn (sequence, item) pairs). On the unit sphere
  ``||x - y||^2 = 2 - 2 cos(x, y)``.
- Gradient alignment (section 3): ``cos(g_total, g_T)`` and ``cos(g_total, g_V)`` over the trainable
  parameters. :func:`modality_path_losses` builds the per-modality losses by cutting the other modality's
  path (``g_T + g_V = g_total`` exactly by the chain rule); unimodal losses can be passed instead.

Scores and embeddings may be torch tensors or numpy arrays. NaN scores raise: a NaN compares False against
everything and would silently count as a perfect rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

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

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _tensor(x: ArrayLike, name: str) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.is_floating_point() and torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN; fix the embeddings/scores before computing metrics")
    return t


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


def sampled_ranks(pos_scores: ArrayLike, neg_scores: ArrayLike) -> Tensor:
    """0-based rank of each target among its sampled negatives.

    Args:
        pos_scores: ``[U]`` score of each user's target.
        neg_scores: ``[U, n]`` scores of each user's n negatives.

    Returns:
        ``[U]`` int64: the number of negatives scored strictly higher than the target.
    """
    pos = _tensor(pos_scores, "pos_scores")
    neg = _tensor(neg_scores, "neg_scores")
    if pos.dim() != 1 or neg.dim() != 2:
        raise ValueError(f"expected pos_scores [U] and neg_scores [U,n], got shapes {tuple(pos.shape)} and "
                         f"{tuple(neg.shape)}")
    if pos.shape[0] != neg.shape[0]:
        raise ValueError(f"pos_scores has {pos.shape[0]} users but neg_scores has {neg.shape[0]}")
    if pos.shape[0] == 0:
        raise ValueError("no users to evaluate (U = 0)")
    return (neg > pos[:, None].to(neg.dtype)).sum(dim=1)


def hit_ndcg_from_ranks(ranks: ArrayLike, k: int) -> tuple[float, float]:
    """``(Hit@k, NDCG@k)`` averaged over users from 0-based ranks.

    Hand-worked: ranks ``[0, 1, 3]``, k = 2: hits ``[1, 1, 0]`` -> 2/3; gains ``[1, 1/log2(3), 0]`` ->
    ``(1 + 0.630930) / 3 = 0.543643``.
    """
    _check_k(k)
    r = _tensor(ranks, "ranks").to(torch.float64)
    if r.dim() != 1 or r.numel() == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {tuple(r.shape)}")
    inside = r < k
    hit = inside.double().mean().item()
    ndcg = torch.where(inside, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean().item()
    return hit, ndcg


def hit_ndcg_at_k(pos_scores: ArrayLike, neg_scores: ArrayLike, k: int) -> tuple[float, float]:
    """Hit@k and NDCG@k of the sampled-negatives protocol (paper 5.1.3: 100 sampled negatives).

    rank = number of negatives scored strictly higher than the target; ``Hit@k = mean 1[rank < k]``,
    ``NDCG@k = mean 1[rank < k] / log2(rank + 2)``.

    Hand-worked: pos ``[0.9, 0.5]``, neg ``[[0.1, 0.95, 0.2], [0.6, 0.7, 0.5]]``: ranks ``[1, 2]`` (the tie
    0.5 = 0.5 is not counted). k = 2: Hit = 1/2, NDCG = ``(1/log2(3) + 0) / 2 = 0.315465``; k = 3: Hit = 1,
    NDCG = ``(0.630930 + 0.5) / 2 = 0.565465``.

    Args:
        pos_scores: ``[U]`` target scores.
        neg_scores: ``[U, n]`` negative scores.
        k: cut-off (>= 1).

    Returns:
        ``(hit, ndcg)`` as Python floats.
    """
    return hit_ndcg_from_ranks(sampled_ranks(pos_scores, neg_scores), k)


def hit_ndcg_at_ks(pos_scores: ArrayLike, neg_scores: ArrayLike, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """``{"hit@10": .., "ndcg@10": .., "hit@20": .., "ndcg@20": ..}`` in one pass."""
    ranks = sampled_ranks(pos_scores, neg_scores)
    out: dict[str, float] = {}
    for k in ks:
        out[f"hit@{k}"], out[f"ndcg@{k}"] = hit_ndcg_from_ranks(ranks, k)
    return out


def full_ranking_ranks(scores: ArrayLike, targets: ArrayLike, exclude_mask: ArrayLike | None = None) -> Tensor:
    """0-based rank of each target among all catalog items.

    Args:
        scores: ``[U, I]`` score of every item for every user.
        targets: ``[U]`` int column index of each user's target.
        exclude_mask: optional ``[U, I]`` bool, True for items that do not compete (e.g. the user's history).
            The target itself never competes, even if marked.

    Returns:
        ``[U]`` int64: number of competing items scored strictly higher than the target.
    """
    s = _tensor(scores, "scores")
    t = _tensor(targets, "targets").long()
    if s.dim() != 2 or t.dim() != 1 or s.shape[0] != t.shape[0]:
        raise ValueError(f"expected scores [U,I] and targets [U], got {tuple(s.shape)} and {tuple(t.shape)}")
    if s.shape[0] == 0:
        raise ValueError("no users to evaluate (U = 0)")
    if (t < 0).any() or (t >= s.shape[1]).any():
        raise ValueError(f"targets must index the {s.shape[1]} items; got values in [{int(t.min())}, {int(t.max())}]")
    t = t.to(s.device)
    pos = s.gather(1, t[:, None])  # (U, 1)
    higher = s > pos  # (U, I); the target is never strictly higher than itself
    if exclude_mask is not None:
        ex = _tensor(exclude_mask, "exclude_mask").to(device=s.device, dtype=torch.bool)
        if ex.shape != s.shape:
            raise ValueError(f"exclude_mask must have the shape of scores {tuple(s.shape)}, got {tuple(ex.shape)}")
        higher = higher & ~ex
    return higher.sum(dim=1)


def full_ranking_hit_ndcg(scores: ArrayLike, targets: ArrayLike, k: int,
                          exclude_mask: ArrayLike | None = None) -> tuple[float, float]:
    """Hit@k, NDCG@k ranking each target against the full catalog (see :func:`full_ranking_ranks`).

    Hand-worked: scores ``[[0.2, 0.9, 0.5, 0.1]]``, target 2, k = 1: rank 1 (0.9 beats 0.5) -> (0, 0); with
    item 1 excluded (in the history) rank 0 -> (1, 1).
    """
    return hit_ndcg_from_ranks(full_ranking_ranks(scores, targets, exclude_mask), k)


GEOMETRY_EPS = 1e-8


def uniformity(query_emb: ArrayLike, item_emb: ArrayLike, *, t: float = 2.0, chunk: int = 4096) -> float:
    """U of paper eq. 4: ``log mean_{(s, i)} exp(-t ||z_s - e_i||^2)`` over every (sequence, item) pair, after
    L2 normalisation (the exact expectation that uniform pair sampling estimates); lower = more spread.

    Hand-worked: ``z = [[1,0]]``, ``e = [[1,0],[0,1],[-1,0]]``: squared distances 0, 2, 4, so
    ``U = log((1 + e^-4 + e^-8) / 3) = -1.080133``.

    Args:
        query_emb: ``[B, d]`` sequence embeddings.
        item_emb: ``[N, d]`` item embeddings.
        t: temperature (the paper's 2).
        chunk: query rows per block (bounds memory at ``chunk x N``).

    Returns:
        U as a float.
    """
    z = F.normalize(_tensor(query_emb, "query_emb").double(), dim=-1)
    e = F.normalize(_tensor(item_emb, "item_emb").double(), dim=-1)
    if z.dim() != 2 or e.dim() != 2 or z.shape[1] != e.shape[1] or z.shape[0] == 0 or e.shape[0] == 0:
        raise ValueError(f"uniformity expects non-empty 2-D query [B,d] and item [N,d] embeddings, got "
                         f"{tuple(z.shape)} and {tuple(e.shape)}")
    parts = []
    for start in range(0, z.shape[0], chunk):
        sq = (2.0 - 2.0 * (z[start:start + chunk] @ e.T)).clamp_min(0.0)  # (c, N) squared distances
        parts.append(torch.logsumexp((-t * sq).flatten(), dim=0))
    return (torch.logsumexp(torch.stack(parts), dim=0) - math.log(z.shape[0] * e.shape[0])).item()


def geometry_metrics(query_emb: ArrayLike, item_emb: ArrayLike, neg_mask: ArrayLike | None = None, *,
                     t: float = 2.0, eps: float = GEOMETRY_EPS) -> dict[str, float]:
    """A_pos, A_neg, S and U (paper eqs. 4-5) of one embedding space, after L2 normalisation.

    Row i's positive is item i (as in the objectives); its negatives are the items with ``neg_mask[i, j]``
    (default every ``j != i``).

    - ``A_pos = mean_i ||z_i - e_i||^2``
    - ``A_neg = mean_i mean_{j in neg(i)} ||z_i - e_j||^2`` (rows without negatives are left out)
    - ``S = A_neg / (A_pos + eps)``: S > 1 means negatives lie further than positives
    - ``U = log mean_{(i, j)} exp(-t ||z_i - e_j||^2)`` over all B x N pairs (:func:`uniformity`)

    Hand-worked: ``z = [[1,0],[0,1]]``, ``e = [[1/2, sqrt(3)/2], [-1,0]]``. Squared distances
    ``2 - 2 cos``: row 0 to e_0 = 1, to e_1 = 4; row 1 to e_1 = 2, to e_0 = 2 - sqrt(3) = 0.267949. So
    ``A_pos = (1 + 2)/2 = 1.5``, ``A_neg = (4 + 0.267949)/2 = 2.133975``, ``S = 1.422650`` and
    ``U = log((e^-2 + e^-8 + e^-4 + e^-0.535898) / 4) = -1.688576``.

    Args:
        query_emb: ``[B, d]`` sequence embeddings.
        item_emb: ``[N, d]`` item embeddings, ``N >= B``.
        neg_mask: optional ``[B, N]`` bool negatives.
        t: uniformity temperature.
        eps: the epsilon of eq. 5.

    Returns:
        ``{"A_pos", "A_neg", "S", "U"}`` as floats.
    """
    z = _tensor(query_emb, "query_emb").double()
    e = _tensor(item_emb, "item_emb").double()
    if z.dim() != 2 or e.dim() != 2 or z.shape[1] != e.shape[1] or e.shape[0] < z.shape[0] or z.shape[0] == 0:
        raise ValueError(f"geometry metrics expect 2-D query [B,d] and item [N>=B,d] embeddings, got "
                         f"{tuple(z.shape)} and {tuple(e.shape)}")
    b, n = z.shape[0], e.shape[0]
    z, e = F.normalize(z, dim=-1), F.normalize(e, dim=-1)
    sq = (2.0 - 2.0 * (z @ e.T)).clamp_min(0.0)  # (B, N) squared distances on the sphere
    neg = torch.ones(b, n, dtype=torch.bool)
    neg[:, :b].fill_diagonal_(False)
    if neg_mask is not None:
        m = _tensor(neg_mask, "neg_mask").to(torch.bool)
        if m.shape != (b, n):
            raise ValueError(f"neg_mask must have shape ({b}, {n}), got {tuple(m.shape)}")
        neg = neg & m
    a_pos = sq[:, :b].diagonal().mean().item()
    negf = neg.double()
    has_neg = negf.sum(dim=1) > 0
    a_neg = ((sq * negf).sum(dim=1)[has_neg] / negf.sum(dim=1)[has_neg]).mean().item() if has_neg.any() else float("nan")
    return {"A_pos": a_pos, "A_neg": a_neg, "S": a_neg / (a_pos + eps), "U": uniformity(z, e, t=t)}


def modality_geometry(z_t: ArrayLike, z_v: ArrayLike, e_t: ArrayLike, e_v: ArrayLike,
                      neg_mask: ArrayLike | None = None, *, t: float = 2.0) -> dict[str, float]:
    """:func:`geometry_metrics` for the text, image and fused (sum) spaces, keys ``text/A_pos`` etc."""
    zt, zv = _tensor(z_t, "z_t").double(), _tensor(z_v, "z_v").double()
    et, ev = _tensor(e_t, "e_t").double(), _tensor(e_v, "e_v").double()
    out: dict[str, float] = {}
    for name, (q, c) in {"text": (zt, et), "image": (zv, ev), "fused": (zt + zv, et + ev)}.items():
        for key, value in geometry_metrics(q, c, neg_mask, t=t).items():
            out[f"{name}/{key}"] = value
    return out


def flat_grad(loss: Tensor, params: Sequence[Tensor], *, retain_graph: bool = True) -> Tensor:
    """Gradient of ``loss`` w.r.t. ``params`` flattened into one fp32 vector (zeros where unreached)."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params, strict=True)])


def modality_path_losses(loss_fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], z_t: Tensor, z_v: Tensor,
                         e_t: Tensor, e_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(L, L_T, L_V)``: the loss, and the same loss with the image (resp. text) path detached.

    ``grad L_T`` is the part of ``grad L`` that flows through the text embeddings, so ``g_T + g_V = g_total``.
    """
    total = loss_fn(z_t, z_v, e_t, e_v)
    text_path = loss_fn(z_t, z_v.detach(), e_t, e_v.detach())
    image_path = loss_fn(z_t.detach(), z_v, e_t.detach(), e_v)
    return total, text_path, image_path


def gradient_alignment(total_loss: Tensor, text_loss: Tensor, image_loss: Tensor,
                       params: Iterable[Tensor]) -> dict[str, float]:
    """Gradient-alignment diagnostic: ``cos(g_total, g_T)``, ``cos(g_total, g_V)`` and the gradient norms.

    A collapsed model has ``cos(g_total, g_dominant) ~ 1`` and a small, weakly aligned ``g_weak``.

    Args:
        total_loss, text_loss, image_loss: scalars sharing a graph with ``params`` (e.g. from
            :func:`modality_path_losses`, or unimodal InfoNCE losses).
        params: the trainable parameters (those with ``requires_grad``; others are skipped).

    Returns:
        ``{"cos_total_text", "cos_total_image", "cos_text_image", "norm_total", "norm_text", "norm_image"}``.
    """
    ps = [p for p in params if p.requires_grad]
    if not ps:
        raise ValueError("gradient_alignment needs at least one parameter with requires_grad=True")
    g = flat_grad(total_loss, ps)
    g_t = flat_grad(text_loss, ps)
    g_v = flat_grad(image_loss, ps)

    def cos(a: Tensor, b: Tensor) -> float:
        denom = a.norm() * b.norm()
        return (a @ b / denom).item() if denom > 0 else float("nan")

    return {"cos_total_text": cos(g, g_t), "cos_total_image": cos(g, g_v), "cos_text_image": cos(g_t, g_v),
            "norm_total": g.norm().item(), "norm_text": g_t.norm().item(), "norm_image": g_v.norm().item()}
