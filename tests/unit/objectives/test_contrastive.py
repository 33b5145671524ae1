"""The pure losses: hand-worked values, naive references, float64 gradcheck, and the stop-gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlm2rec_ray.objectives import (
    build_neg_mask,
    crtr_loss,
    info_nce,
    modality_margin,
    vlm2rec_loss,
    weak_modality_penalty,
    wpcl_loss,
)

# ---------------------------------------------------------------- naive references (row by row, no tricks)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _ref_info_nce(z, e, tau, neg_mask=None, w=None) -> float:
    b, n = z.shape[0], e.shape[0]
    total = 0.0
    for i in range(b):
        pos = math.exp(_cos(z[i], e[i]) / tau)
        negs = sum(math.exp(_cos(z[i], e[j]) / tau) for j in range(n)
                   if j != i and (neg_mask is None or bool(neg_mask[i, j])))
        wi = 1.0 if w is None else float(w[i])
        total += -math.log(pos / (pos + wi * negs))
    return total / b


def _ref_margin(z, e, neg_mask=None) -> list[float]:
    out = []
    for i in range(z.shape[0]):
        negs = [_cos(z[i], e[j]) for j in range(e.shape[0]) if j != i and (neg_mask is None or bool(neg_mask[i, j]))]
        out.append(_cos(z[i], e[i]) - (sum(negs) / len(negs) if negs else 0.0))
    return out


def _ref_wpcl(z_t, z_v, e_t, e_v, tau, alpha, beta, neg_mask=None) -> float:
    m_t, m_v = _ref_margin(z_t, e_t, neg_mask), _ref_margin(z_v, e_v, neg_mask)
    w = [1 + beta * math.log1p(math.exp(alpha * (max(a, b) - min(a, b)))) for a, b in zip(m_t, m_v, strict=True)]
    return _ref_info_nce(z_t + z_v, e_t + e_v, tau, neg_mask, w)


def _ref_crtr(z_t, z_v, e_t, e_v, tau) -> float:
    b = z_t.shape[0]
    total = 0.0
    for i in range(b):
        lt = [_cos(z_t[i], e_t[j]) / tau for j in range(b)]
        lv = [_cos(z_v[i], e_v[j]) / tau for j in range(b)]
        pt = [math.exp(x) / sum(math.exp(y) for y in lt) for x in lt]
        pv = [math.exp(x) / sum(math.exp(y) for y in lv) for x in lv]
        total += sum(p * math.log(p / q) for p, q in zip(pt, pv, strict=True)) + sum(q * math.log(q / p) for p, q in zip(pt, pv, strict=True))
    return total / (2 * b)


def _batch(b=4, n=7, d=5, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(s, d, generator=g, dtype=dtype) for s in (b, b, n, n)]
    return [x.requires_grad_(grad) for x in xs]


# ---------------------------------------------------------------- hand-worked values (docstrings)


def test_info_nce_hand_worked() -> None:
    """z = e = [[1,0],[0,1]], tau = 1: each row log(1 + e^-1) = 0.313262; weight 2: log(1 + 2/e) = 0.551445."""
    eye = torch.eye(2, dtype=torch.float64)
    assert info_nce(eye, eye, 1.0).item() == pytest.approx(0.313262, abs=1e-6)
    assert info_nce(eye, eye, 1.0, neg_weight=2.0).item() == pytest.approx(0.551445, abs=1e-6)
    assert info_nce(eye, eye, 1.0, neg_weight=torch.tensor([1.0, 2.0])).item() == pytest.approx(
        (0.313262 + 0.551445) / 2, abs=1e-6)
    # Cosine, not dot product: scaling the embeddings changes nothing.
    assert info_nce(3 * eye, 0.5 * eye, 1.0).item() == pytest.approx(0.313262, abs=1e-6)


def test_modality_margin_hand_worked() -> None:
    """z = [[1,0]], e = [[1,0],[0,1],[-1,0]]: sims [1, 0, -1] -> M = 1 - (0 - 1)/2 = 1.5."""
    z = torch.tensor([[1.0, 0.0]])
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert modality_margin(z, e).tolist() == pytest.approx([1.5])
    # Only candidate 2 a negative: M = 1 - (-1) = 2.
    assert modality_margin(z, e, torch.tensor([[False, False, True]])).tolist() == pytest.approx([2.0])
    # No negatives at all: M = s(pos) = 1.
    assert modality_margin(z, e, torch.zeros(1, 3, dtype=torch.bool)).tolist() == pytest.approx([1.0])


def test_penalty_hand_worked() -> None:
    """M^T = 1.5, M^V = 0.5, alpha = beta = 1: Delta = 1, w = 1 + log(1 + e) = 2.313262; equal margins:
    w = 1 + beta log 2."""
    w = weak_modality_penalty(torch.tensor([1.5, 0.3]), torch.tensor([0.5, 0.3]), 1.0, 1.0)
    assert w.tolist() == pytest.approx([2.313262, 1 + math.log(2)], abs=1e-6)
    assert weak_modality_penalty(torch.tensor([0.5]), torch.tensor([1.5]), 1.0, 0.0).tolist() == [1.0]


def test_wpcl_hand_worked() -> None:
    """B=1, N=2, tau = alpha = beta = 1. Text: z_t = [1,0], e_t = [[1,0],[-1,0]] -> M^T = 2. Image: z_v = [0,1],
    e_v = [[0,1],[0,1]] -> M^V = 0. Delta = 2, w = 1 + softplus(2) = 3.126928. Fused z = [1,1],
    e = [[1,1],[-1,1]]: s_pos = 1, s_neg = 0 -> loss = log(1 + w/e) = 0.765622; without the penalty
    log(1 + 1/e) = 0.313262."""
    z_t, e_t = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    z_v, e_v = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert wpcl_loss(z_t, z_v, e_t, e_v, 1.0, 1.0, 1.0).item() == pytest.approx(0.765622, abs=1e-6)
    assert wpcl_loss(z_t, z_v, e_t, e_v, 1.0, 1.0, 1.0, use_penalty=False).item() == pytest.approx(0.313262, abs=1e-6)
    out = vlm2rec_loss(z_t, z_v, e_t, e_v, tau_wpcl=1.0, tau_crtr=1.0, lam=0.5, alpha=1.0, beta=1.0)
    assert out.penalty.tolist() == pytest.approx([3.126928], abs=1e-6)
    assert out.margin_text.tolist() == pytest.approx([2.0]) and out.margin_image.tolist() == pytest.approx([0.0])
    assert out.crtr.item() == pytest.approx(0.0, abs=1e-12)  # B = 1: one-point distributions agree


def test_crtr_hand_worked() -> None:
    """tau = 1, B = 2, text sims [[1,0],[0,1]], image sims [[0,1],[1,0]]: P^T_0 = (p, 1-p), P^V_0 = (1-p, p),
    p = sigmoid(1); each KL = (2p - 1) * logit(p) = 0.462117; L = 4 * 0.462117 / (2 * 2) = 0.462117."""
    eye = torch.eye(2)
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert crtr_loss(eye, eye, eye, swap, 1.0).item() == pytest.approx(0.462117, abs=1e-6)
    # Extra (gathered or sampled) candidates beyond the first B are ignored.
    extra = torch.cat([eye, torch.randn(3, 2)])
    assert crtr_loss(eye, eye, extra, torch.cat([swap, torch.randn(3, 2)]), 1.0).item() == pytest.approx(0.462117,
                                                                                                      abs=1e-6)
    # Identical relational topology -> 0.
    z, e = torch.randn(4, 3), torch.randn(6, 3)
    assert crtr_loss(z, 2 * z, e, 3 * e, 0.1).item() == pytest.approx(0.0, abs=1e-6)


def test_build_neg_mask() -> None:
    """targets [7, 3], candidates [7, 3, 7] -> [[F, T, F], [T, F, T]]."""
    m = build_neg_mask(torch.tensor([7, 3]), torch.tensor([7, 3, 7]))
    assert m.tolist() == [[False, True, False], [True, False, True]]


# ---------------------------------------------------------------- against the naive references


@pytest.mark.parametrize("masked", [False, True])
def test_against_naive_reference(masked: bool) -> None:
    z_t, z_v, e_t, e_v = _batch()
    mask = None
    if masked:
        mask = build_neg_mask(torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 0, 5, 1, 6]))
    assert info_nce(z_t, e_t, 0.3, mask).item() == pytest.approx(_ref_info_nce(z_t, e_t, 0.3, mask), rel=1e-10)
    assert modality_margin(z_v, e_v, mask).tolist() == pytest.approx(_ref_margin(z_v, e_v, mask), rel=1e-10)
    assert wpcl_loss(z_t, z_v, e_t, e_v, 0.3, 0.7, 1.3, mask).item() == pytest.approx(
        _ref_wpcl(z_t, z_v, e_t, e_v, 0.3, 0.7, 1.3, mask), rel=1e-10)
    assert crtr_loss(z_t, z_v, e_t, e_v, 0.2).item() == pytest.approx(_ref_crtr(z_t, z_v, e_t, e_v, 0.2), rel=1e-10)
    out = vlm2rec_loss(z_t, z_v, e_t, e_v, tau_wpcl=0.3, tau_crtr=0.2, lam=0.5, alpha=0.7, beta=1.3, neg_mask=mask)
    assert out.total.item() == pytest.approx(out.wpcl.item() + 0.5 * out.crtr.item(), rel=1e-12)
    assert out.penalty.shape == out.margin_text.shape == out.margin_image.shape == (4,)


def test_diagonal_is_never_a_negative() -> None:
    z_t, _, e_t, _ = _batch()
    all_true = torch.ones(4, 7, dtype=torch.bool)
    assert info_nce(z_t, e_t, 0.5, all_true).item() == pytest.approx(info_nce(z_t, e_t, 0.5).item(), rel=1e-12)


def test_row_without_negatives_contributes_zero() -> None:
    z_t, _, e_t, _ = _batch(b=2, n=2)
    none = torch.zeros(2, 2, dtype=torch.bool)
    assert info_nce(z_t, e_t, 0.1, none).item() == 0.0


def test_ablation_switches() -> None:
    z_t, z_v, e_t, e_v = _batch()
    kw = dict(tau_wpcl=0.2, tau_crtr=0.1, lam=0.7, alpha=1.0, beta=2.0)
    sft = vlm2rec_loss(z_t, z_v, e_t, e_v, use_penalty=False, use_crtr=False, **kw)
    assert sft.total.item() == pytest.approx(info_nce(z_t + z_v, e_t + e_v, 0.2).item(), rel=1e-12)
    assert torch.all(sft.penalty == 1)
    full = vlm2rec_loss(z_t, z_v, e_t, e_v, **kw)
    assert full.wpcl.item() > sft.wpcl.item()  # w >= 1 + beta log 2 > 1 adds weight to the negatives
    no_crtr = vlm2rec_loss(z_t, z_v, e_t, e_v, use_crtr=False, **kw)
    assert no_crtr.total.item() == pytest.approx(full.wpcl.item(), rel=1e-12)
    assert no_crtr.crtr.item() == pytest.approx(full.crtr.item(), rel=1e-12) and not no_crtr.crtr.requires_grad
    no_sg = vlm2rec_loss(z_t, z_v, e_t, e_v, stop_grad=False, **kw)
    assert no_sg.total.item() == pytest.approx(full.total.item(), rel=1e-12)  # same value, different gradient


# ---------------------------------------------------------------- float64 gradcheck of every loss


def test_gradcheck_info_nce() -> None:
    z, _, e, _ = _batch(b=3, n=5, d=4, grad=True)
    w = torch.tensor([1.5, 2.0, 1.1], dtype=torch.float64, requires_grad=True)
    mask = build_neg_mask(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 1, 4]))
    assert torch.autograd.gradcheck(lambda z, e, w: info_nce(z, e, 0.3, mask, w), (z, e, w))


def test_gradcheck_modality_margin_and_penalty() -> None:
    z, _, e, _ = _batch(b=3, n=5, d=4, grad=True)
    assert torch.autograd.gradcheck(lambda z, e: modality_margin(z, e), (z, e))
    m_t = torch.tensor([0.9, 0.1, 0.4], dtype=torch.float64, requires_grad=True)
    m_v = torch.tensor([0.2, 0.6, 0.3], dtype=torch.float64, requires_grad=True)
    a = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: weak_modality_penalty(*x, stop_grad=False), (m_t, m_v, a, b))
    # With sg the forward value is unchanged (finite differences cannot see it): the strong margin gets exactly
    # zero gradient and the weak one the same gradient as without sg.
    g_sg = torch.autograd.grad(weak_modality_penalty(m_t, m_v, a, b).sum(), (m_t, m_v))
    g_no = torch.autograd.grad(weak_modality_penalty(m_t, m_v, a, b, stop_grad=False).sum(), (m_t, m_v))
    weak_is_text = m_t < m_v
    torch.testing.assert_close(g_sg[0], torch.where(weak_is_text, g_no[0], 0.0))
    torch.testing.assert_close(g_sg[1], torch.where(~weak_is_text, g_no[1], 0.0))


@pytest.mark.parametrize("stop_grad", [True, False])
def test_gradcheck_wpcl(stop_grad: bool) -> None:
    # With sg the function value is unchanged, so gradcheck compares the *analytical* gradient against finite
    # differences of the un-stopped function: they differ. Check the sg=True gradient against finite
    # differences of the function with the strong margin frozen at its current value instead.
    z_t, z_v, e_t, e_v = _batch(b=3, n=5, d=4, grad=True)
    a = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    if not stop_grad:
        assert torch.autograd.gradcheck(
            lambda *x: wpcl_loss(*x[:4], 0.4, x[4], x[5], stop_grad=False), (z_t, z_v, e_t, e_v, a, b))
        return
    with torch.no_grad():
        strong = torch.maximum(modality_margin(z_t, e_t), modality_margin(z_v, e_v))

    def frozen_strong(z_t, z_v, e_t, e_v, a, b):
        m_t, m_v = modality_margin(z_t, e_t), modality_margin(z_v, e_v)
        w = 1 + b * F.softplus(a * (strong - torch.minimum(m_t, m_v)))
        return info_nce(z_t + z_v, e_t + e_v, 0.4, neg_weight=w)

    args = (z_t, z_v, e_t, e_v, a, b)
    analytical = torch.autograd.grad(wpcl_loss(*args[:4], 0.4, a, b, stop_grad=True), args)
    assert torch.autograd.gradcheck(frozen_strong, args)
    expected = torch.autograd.grad(frozen_strong(*args), args)
    for g, h in zip(analytical, expected, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


def test_gradcheck_crtr_and_total() -> None:
    z_t, z_v, e_t, e_v = _batch(b=3, n=5, d=4, grad=True)
    assert torch.autograd.gradcheck(lambda *x: crtr_loss(*x, 0.2), (z_t, z_v, e_t, e_v))
    a = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *x: vlm2rec_loss(*x[:4], tau_wpcl=0.3, tau_crtr=0.2, lam=0.5, alpha=x[4], beta=x[5],
                                stop_grad=False).total,
        (z_t, z_v, e_t, e_v, a, b))


# ---------------------------------------------------------------- the stop-gradient


def test_stop_gradient_blocks_the_strong_margin() -> None:
    """Text is the strong modality in every row (its positives are its own queries). With sg, d(penalty)/d(text
    inputs) is exactly zero while the weak (image) side gets gradient; without sg the text side gets it too."""
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    e_t = torch.cat([z_t + 0.01 * torch.randn(4, 6, generator=g, dtype=torch.float64),
                     torch.randn(2, 6, generator=g, dtype=torch.float64)])
    z_v = torch.randn(4, 6, generator=g, dtype=torch.float64)
    e_v = torch.cat([-z_v + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64),
                     torch.randn(2, 6, generator=g, dtype=torch.float64)])  # image positives point away
    for x in (z_t, z_v, e_t, e_v):
        x.requires_grad_(True)
    kw = dict(tau_wpcl=0.5, tau_crtr=0.5, lam=0.0, alpha=1.0, beta=1.0)
    out = vlm2rec_loss(z_t, z_v, e_t, e_v, **kw)
    assert torch.all(out.margin_text > out.margin_image)
    gz_t, ge_t, gz_v, ge_v = torch.autograd.grad(out.penalty.sum(), (z_t, e_t, z_v, e_v), allow_unused=True,
                                                  materialize_grads=True, retain_graph=True)
    assert torch.count_nonzero(gz_t) == 0 and torch.count_nonzero(ge_t) == 0
    assert gz_v.abs().sum() > 0 and ge_v.abs().sum() > 0

    out_nosg = vlm2rec_loss(z_t, z_v, e_t, e_v, stop_grad=False, **kw)
    gz_t2, ge_t2 = torch.autograd.grad(out_nosg.penalty.sum(), (z_t, e_t))
    assert gz_t2.abs().sum() > 0 and ge_t2.abs().sum() > 0

    # And in the full loss, the text inputs' gradient equals that of InfoNCE with the weight held constant.
    g_full = torch.autograd.grad(out.total, (z_t, e_t), retain_graph=True)
    fixed_w = info_nce(z_t + z_v, e_t + e_v, 0.5, neg_weight=out.penalty.detach())
    g_fixed = torch.autograd.grad(fixed_w, (z_t, e_t))
    for a, b in zip(g_full, g_fixed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_minimising_the_penalty_raises_the_weak_margin() -> None:
    """A gradient step on the penalty alone (sg on) increases the weak modality's margin."""
    torch.manual_seed(0)
    z_t, z_v, e_t, e_v = (x.detach() for x in _batch(b=4, n=6, d=8))
    z_v = z_v.clone().requires_grad_(True)
    def weak_mean() -> torch.Tensor:
        return torch.minimum(modality_margin(z_t, e_t), modality_margin(z_v, e_v)).mean()

    before = weak_mean().item()
    opt = torch.optim.SGD([z_v], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        weak_modality_penalty(modality_margin(z_t, e_t), modality_margin(z_v, e_v), 1.0, 1.0).sum().backward()
        opt.step()
    assert weak_mean().item() > before


# ---------------------------------------------------------------- input validation


def test_errors_say_what_and_value() -> None:
    z, e = torch.randn(4, 3), torch.randn(3, 3)
    with pytest.raises(ValueError, match=r"need N >= B candidates .* B=4, N=3"):
        info_nce(z, e, 0.1)
    with pytest.raises(ValueError, match=r"embedding dims differ \(3 vs 5\)"):
        info_nce(z, torch.randn(4, 5), 0.1)
    with pytest.raises(ValueError, match=r"tau must be > 0, got 0"):
        info_nce(z, torch.randn(4, 3), 0.0)
    with pytest.raises(ValueError, match=r"neg_mask must have shape \[B,N\]=\(4, 4\), got \(4, 3\)"):
        info_nce(z, torch.randn(4, 3), 0.1, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bool tensor"):
        info_nce(z, torch.randn(4, 3), 0.1, torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"neg_weight must be a scalar or \[B\]=4"):
        info_nce(z, torch.randn(4, 3), 0.1, neg_weight=torch.ones(3))


def test_crtr_teacher_variant_hand_worked_and_one_way() -> None:
    """Not the paper's eq. 13 (a labelled variant): tau = 1, text rows P^T_0 = (p, 1-p), P^T_1 = (1-p, p) with
    p = sigmoid(1). Image row 0 is flat (cosines 0.707, 0.707), image row 1 equals text row 1. With text teaching,
    L = (KL((p, 1-p) || (1/2, 1/2)) + 0) / 2 = (p log 2p + (1-p) log 2(1-p)) / 2 = 0.110944 / 2, and only the
    image (student) side gets gradient."""
    import math

    from vlm2rec_ray.objectives import crtr_loss

    z_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_v = torch.tensor([[1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss = crtr_loss(z_t, z_v, e, e, 1.0, text_teaches=torch.tensor([True, True]))
    p = 1 / (1 + math.exp(-1))
    assert loss.item() == pytest.approx((p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(0.110944 / 2, abs=1e-6)
    loss.backward()
    assert z_t.grad is None or z_t.grad.abs().sum() == 0
    assert z_v.grad is not None and z_v.grad.abs().sum() > 0
    # Image teaching row 0 instead: the flat image row is the target, the text row moves towards flatness.
    z_t.grad = None
    crtr_loss(z_t, z_v.detach(), e, e, 1.0, text_teaches=torch.tensor([False, True])).backward()
    assert z_t.grad is not None and z_t.grad[0].abs().sum() > 0
    with pytest.raises(ValueError, match=r"text_teaches must be a \[B\]=2 bool tensor"):
        crtr_loss(z_t, z_v, e, e, 1.0, text_teaches=torch.tensor([1, 0]))


def test_vlm2rec_teacher_variant_uses_the_stronger_margin() -> None:
    """The registered variant picks, per row, the modality with the larger margin (eq. 6) as the teacher."""
    from vlm2rec_ray.objectives.contrastive import crtr_loss, modality_margin, vlm2rec_loss

    g = torch.Generator().manual_seed(0)
    z_t, z_v, e_t, e_v = (torch.randn(6, 8, generator=g) for _ in range(4))
    out = vlm2rec_loss(z_t, z_v, e_t, e_v, tau_wpcl=0.1, tau_crtr=0.5, lam=1.0, alpha=1.0, beta=1.0, crtr_teacher=True)
    teach = modality_margin(z_t, e_t) >= modality_margin(z_v, e_v)
    assert 0 < teach.sum() < 6  # both kinds of rows occur in this draw
    assert out.crtr.item() == pytest.approx(crtr_loss(z_t, z_v, e_t, e_v, 0.5, text_teaches=teach).item())
    assert out.total.item() == pytest.approx(out.wpcl.item() + out.crtr.item())
