"""SDA's CMSA objective against hand-worked values and a naive per-element reference."""

from __future__ import annotations

import math

import pytest
import torch

from vlm2rec_ray.objectives.cmsa import cmsa_loss


def test_identity_embeddings_hand_worked() -> None:
    """tau = 1, t = v = I: L = I, P = softmax(I); each row's CE = -(s log s + (1-s) log(1-s)) with
    s = sigmoid(1) = 0.731059, i.e. 0.582203; the KL reading is 0 (teacher = both cross-modal rows)."""
    eye = torch.eye(2)
    s = 1 / (1 + math.exp(-1))
    ce = -(s * math.log(s) + (1 - s) * math.log(1 - s))
    assert cmsa_loss(eye, eye, 1.0).item() == pytest.approx(ce, rel=1e-6)
    assert ce == pytest.approx(0.582203, abs=1e-6)
    assert cmsa_loss(eye, eye, 1.0, divergence="kl").item() == pytest.approx(0.0, abs=1e-7)


def _reference(t: torch.Tensor, v: torch.Tensor, tau: float) -> float:
    """SDA's qwen_vl.py:236-262 written element by element."""
    b = t.shape[0]
    L = [[float(v[i] @ t[j]) / tau for j in range(b)] for i in range(b)]
    S = [[tau * float(t[i] @ t[j] + v[i] @ v[j]) / 2 for j in range(b)] for i in range(b)]
    P = [[math.exp(S[i][j]) / sum(math.exp(S[i][k]) for k in range(b)) for j in range(b)] for i in range(b)]
    total = 0.0
    for i in range(b):
        lse_row = math.log(sum(math.exp(L[i][k]) for k in range(b)))
        lse_col = math.log(sum(math.exp(L[k][i]) for k in range(b)))
        x = -sum(P[i][j] * (L[i][j] - lse_row) for j in range(b))
        y = -sum(P[j][i] * (L[j][i] - lse_col) for j in range(b))  # L^T row i is L's column i; targets P.T
        total += (x + y) / 2
    return total / b


def test_matches_the_code_element_by_element() -> None:
    g = torch.Generator().manual_seed(0)
    t, v = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert cmsa_loss(t, v, 3.0).item() == pytest.approx(_reference(t, v, 3.0), rel=1e-10)
    tn, vn = torch.nn.functional.normalize(t, dim=-1), torch.nn.functional.normalize(v, dim=-1)
    assert cmsa_loss(t, v, 0.5, normalize=True).item() == pytest.approx(_reference(tn, vn, 0.5), rel=1e-10)


def test_teacher_gradient_and_learnable_tau() -> None:
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4, 3, generator=g, requires_grad=True)
    v = torch.randn(4, 3, generator=g)
    tau = torch.nn.Parameter(torch.tensor([3.0]))
    cmsa_loss(t, v, tau).backward()
    assert tau.grad is not None and tau.grad.abs() > 0
    # With the teacher detached, t's gradient comes from the logits only, so it differs.
    g_full = t.grad.clone()
    t.grad = None
    cmsa_loss(t, v, 3.0, detach_teacher=True).backward()
    assert not torch.allclose(g_full, t.grad)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"e_t": torch.zeros(3, 2), "e_v": torch.zeros(3, 4), "tau": 1.0}, "same shape"),
    ({"e_t": torch.zeros(2, 2), "e_v": torch.zeros(2, 2), "tau": 0.0}, "tau must be > 0"),
    ({"e_t": torch.zeros(2, 2), "e_v": torch.zeros(2, 2), "tau": 1.0, "divergence": "js"}, "'ce' or 'kl'"),
])
def test_bad_inputs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cmsa_loss(**kwargs)


def test_cmsa_variant_learns_tau_and_trains_items_only() -> None:
    """objective.variant=cmsa: tau starts at tau_cmsa (3.0) and is a parameter that receives a gradient; the
    loss equals cmsa_loss on the items; item-level batches (no sequences) log no margins."""
    from vlm2rec_ray.config import ObjectiveConfig
    from vlm2rec_ray.objectives import build_objective

    obj = build_objective(ObjectiveConfig(variant="cmsa"))
    assert obj.item_level and obj.temperature is not None
    assert [n for n, p in obj.named_parameters()] == ["temperature.rho"]
    torch.manual_seed(0)
    e_t, e_v = torch.randn(4, 3), torch.randn(4, 3)
    out = obj(e_t[:0], e_v[:0], e_t, e_v)
    assert out.total.item() == pytest.approx(cmsa_loss(e_t, e_v, 3.0).item(), rel=1e-5)
    out.total.backward()
    assert obj.temperature.rho.grad is not None and obj.temperature.rho.grad.abs().item() > 0
    metrics = out.metrics()
    assert metrics["tau"] == pytest.approx(3.0, rel=1e-5) and "margin_text" not in metrics
    fixed = build_objective(ObjectiveConfig(variant="cmsa", learnable_tau=False, tau_cmsa=1.0, cmsa_divergence="kl"))
    assert list(fixed.parameters()) == []
    eye = torch.eye(2)
    assert fixed(eye[:0], eye[:0], eye, eye).total.item() == pytest.approx(0.0, abs=1e-6)


def test_cmsa_variant_with_sequence_rows_logs_margins() -> None:
    from vlm2rec_ray.config import ObjectiveConfig
    from vlm2rec_ray.objectives import build_objective

    torch.manual_seed(1)
    z_t, z_v, e_t, e_v = (torch.randn(3, 4) for _ in range(4))
    out = build_objective(ObjectiveConfig(variant="cmsa"))(z_t, z_v, e_t, e_v)
    m = out.metrics()
    assert {"margin_text", "margin_image", "loss_crtr"} <= m.keys() and not out.crtr.requires_grad
