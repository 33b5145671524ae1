"""Ranking metrics, geometry metrics and the gradient-alignment diagnostic against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlm2rec_ray.eval.metrics import (
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
from vlm2rec_ray.objectives import info_nce, vlm2rec_loss


def test_sampled_hand_worked() -> None:
    """pos [0.9, 0.5], neg [[0.1, 0.95, 0.2], [0.6, 0.7, 0.5]]: ranks [1, 2] (the tie 0.5 = 0.5 does not count).
    k = 2: Hit 1/2, NDCG (1/log2(3))/2 = 0.315465. k = 3: Hit 1, NDCG (0.630930 + 1/log2(4))/2 = 0.565465.
    k = 1: both 0."""
    pos = [0.9, 0.5]
    neg = [[0.1, 0.95, 0.2], [0.6, 0.7, 0.5]]
    assert sampled_ranks(pos, neg).tolist() == [1, 2]
    assert hit_ndcg_at_k(pos, neg, 2) == pytest.approx((0.5, 0.315465), abs=1e-6)
    assert hit_ndcg_at_k(pos, neg, 3) == pytest.approx((1.0, 0.565465), abs=1e-6)
    assert hit_ndcg_at_k(np.array(pos), torch.tensor(neg), 1) == (0.0, 0.0)
    assert hit_ndcg_at_ks(pos, neg, (2, 3)) == pytest.approx(
        {"hit@2": 0.5, "ndcg@2": 0.315465, "hit@3": 1.0, "ndcg@3": 0.565465}, abs=1e-6)


def test_from_ranks_hand_worked() -> None:
    """ranks [0, 1, 3], k = 2: Hit 2/3; NDCG (1 + 1/log2(3) + 0)/3 = 0.543643."""
    assert hit_ndcg_from_ranks(torch.tensor([0, 1, 3]), 2) == pytest.approx((2 / 3, 0.543643), abs=1e-6)


def test_100_negatives_perfect_and_worst() -> None:
    pos = torch.ones(5)
    assert hit_ndcg_at_k(pos, torch.zeros(5, 100), 10) == (1.0, 1.0)
    assert hit_ndcg_at_k(pos, torch.full((5, 100), 2.0), 20) == (0.0, 0.0)
    # Rank 9 is the last inside k = 10: gain 1/log2(11).
    neg = torch.cat([torch.full((1, 9), 2.0), torch.zeros(1, 91)], dim=1)
    assert hit_ndcg_at_k(torch.ones(1), neg, 10) == pytest.approx((1.0, 1 / math.log2(11)))
    assert hit_ndcg_at_k(torch.ones(1), neg, 9) == (0.0, 0.0)


def test_full_ranking_hand_worked() -> None:
    """scores [[0.2, 0.9, 0.5, 0.1]], target 2, k = 1: rank 1 -> (0, 0); item 1 excluded (history) -> rank 0
    -> (1, 1). Excluding the target itself changes nothing."""
    scores = [[0.2, 0.9, 0.5, 0.1]]
    assert full_ranking_hit_ndcg(scores, [2], 1) == (0.0, 0.0)
    assert full_ranking_hit_ndcg(scores, [2], 1, exclude_mask=[[False, True, False, False]]) == (1.0, 1.0)
    assert full_ranking_ranks(scores, [2], [[False, False, True, False]]).tolist() == [1]


def test_full_ranking_equals_sampled_on_the_same_candidates() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 30, generator=g)
    targets = torch.randint(0, 30, (6,), generator=g)
    pos = scores.gather(1, targets[:, None]).squeeze(1)
    others = torch.stack([torch.cat([row[:t], row[t + 1:]]) for row, t in zip(scores, targets, strict=True)])
    assert full_ranking_ranks(scores, targets).tolist() == sampled_ranks(pos, others).tolist()


def test_metric_errors() -> None:
    with pytest.raises(ValueError, match=r"pos_scores has 2 users but neg_scores has 3"):
        hit_ndcg_at_k([1.0, 2.0], np.zeros((3, 4)), 10)
    with pytest.raises(ValueError, match=r"expected pos_scores \[U\] and neg_scores \[U,n\]"):
        hit_ndcg_at_k(np.zeros((2, 1)), np.zeros((2, 4)), 10)
    with pytest.raises(ValueError, match=r"k must be a positive int, got 0"):
        hit_ndcg_at_k([1.0], [[0.0]], 0)
    with pytest.raises(ValueError, match=r"contains NaN"):
        hit_ndcg_at_k([float("nan")], [[0.0]], 1)
    with pytest.raises(ValueError, match=r"targets must index the 4 items; got values in \[0, 4\]"):
        full_ranking_ranks(np.zeros((2, 4)), [0, 4])


def test_geometry_hand_worked() -> None:
    """Paper eqs. 4-5 on z = [[1,0],[0,1]], e = [[1/2, sqrt(3)/2], [-1,0]] (scaled copies give the same).

    Squared distances on the sphere are 2 - 2 cos: row 0 to e_0 = 2 - 1 = 1 and to e_1 = 4; row 1 to
    e_1 = 2 and to e_0 = 2 - sqrt(3). A_pos = (1 + 2)/2 = 1.5, A_neg = (4 + 2 - sqrt(3))/2 = 2.133975,
    S = A_neg / A_pos = 1.422650, U = log((e^-2 + e^-8 + e^-4 + e^{-2(2 - sqrt(3))}) / 4) = -1.688576."""
    r = math.sqrt(3) / 2
    m = geometry_metrics([[3.0, 0.0], [0.0, 0.5]], [[1.0, 2 * r], [-1.0, 0.0]])
    d01 = 2 - math.sqrt(3)
    u = math.log((math.exp(-2) + math.exp(-8) + math.exp(-4) + math.exp(-2 * d01)) / 4)
    assert m == pytest.approx({"A_pos": 1.5, "A_neg": (4 + d01) / 2, "S": (4 + d01) / 3, "U": u}, rel=1e-7)
    assert m["S"] == pytest.approx(1.422650, abs=1e-6) and m["U"] == pytest.approx(-1.688576, abs=1e-6)


def test_geometry_negatives_and_eps() -> None:
    """z = [[1,0]], e = [[1,0],[0,1],[-1,0]]: A_pos = 0, negatives at 2 and 4 -> A_neg = 3, S = 3 / eps.
    Masking the far negative leaves A_neg = 2; U = log((1 + e^-4 + e^-8) / 3) over the three pairs."""
    z, e = [[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
    m = geometry_metrics(z, e, eps=0.5)
    assert m == pytest.approx({"A_pos": 0.0, "A_neg": 3.0, "S": 6.0, "U": math.log((1 + math.exp(-4) + math.exp(-8)) / 3)},
                              abs=1e-12)
    assert geometry_metrics(z, e, [[True, True, False]], eps=0.5)["A_neg"] == pytest.approx(2.0)
    assert uniformity(z, e) == pytest.approx(-1.080133, abs=1e-6)
    # Every distance equal (no structure, like a random space): S = 1; no negatives at all: A_neg is NaN.
    flat = geometry_metrics([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert flat["A_pos"] == pytest.approx(2.0) and flat["S"] == pytest.approx(1.0)
    assert math.isnan(geometry_metrics(z, e, [[False, False, False]])["A_neg"])


def test_uniformity_chunked_equals_direct() -> None:
    z = torch.nn.functional.normalize(torch.randn(50, 8, dtype=torch.float64), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(30, 8, dtype=torch.float64), dim=-1)
    d = torch.cdist(z, e) ** 2
    direct = torch.log(torch.exp(-2 * d).mean()).item()
    assert uniformity(z, e, chunk=7) == pytest.approx(direct, rel=1e-10)


def test_modality_geometry_keys() -> None:
    z_t, z_v, e_t, e_v = (torch.randn(4, 3) for _ in range(4))
    out = modality_geometry(z_t, z_v, e_t, e_v)
    assert set(out) == {f"{m}/{k}" for m in ("text", "image", "fused") for k in ("A_pos", "A_neg", "S", "U")}


def test_gradient_alignment_path_decomposition() -> None:
    """With a linear 'encoder' per modality, g_T + g_V = g_total exactly; a modality whose encoder is cut from
    the loss (image scaled to ~0 influence) gives cos(g_total, g_T) ~ 1."""
    torch.manual_seed(0)
    w_t = torch.nn.Linear(5, 4)
    w_v = torch.nn.Linear(5, 4)
    x_seq, x_item = torch.randn(6, 5), torch.randn(6, 5)
    z_t, e_t, z_v, e_v = w_t(x_seq), w_t(x_item), w_v(x_seq), w_v(x_item)
    params = [*w_t.parameters(), *w_v.parameters()]

    def loss_fn(a, b, c, d):
        return vlm2rec_loss(a, b, c, d, tau_wpcl=0.3, tau_crtr=0.3, lam=0.5, alpha=1.0, beta=1.0).total

    total, lt, lv = modality_path_losses(loss_fn, z_t, z_v, e_t, e_v)
    assert total.item() == pytest.approx(lt.item()) == pytest.approx(lv.item())
    from vlm2rec_ray.eval.metrics import flat_grad

    g, g_t, g_v = (flat_grad(x, params) for x in (total, lt, lv))
    torch.testing.assert_close(g, g_t + g_v, rtol=1e-5, atol=1e-6)
    out = gradient_alignment(total, lt, lv, params)
    assert set(out) == {"cos_total_text", "cos_total_image", "cos_text_image", "norm_total", "norm_text",
                        "norm_image"}
    assert -1.0 <= out["cos_total_text"] <= 1.0

    # Unimodal losses: the text loss touches only w_t, the image loss only w_v -> orthogonal gradients.
    uni = gradient_alignment(total, info_nce(z_t, e_t, 0.3), info_nce(z_v, e_v, 0.3), params)
    assert uni["cos_text_image"] == pytest.approx(0.0, abs=1e-7)

    # Image branch scaled down: the fused loss is dominated by text.
    z_v_small, e_v_small = 1e-4 * z_v, 1e-4 * e_v
    dom = gradient_alignment(*modality_path_losses(
        lambda a, b, c, d: info_nce(a + b, c + d, 0.3), z_t, z_v_small, e_t, e_v_small), params)
    assert dom["cos_total_text"] > 0.999 and dom["norm_image"] < 1e-2 * dom["norm_text"]


def test_gradient_alignment_needs_trainable_params() -> None:
    p = torch.zeros(2)
    with pytest.raises(ValueError, match="requires_grad=True"):
        gradient_alignment(p.sum(), p.sum(), p.sum(), [p])
