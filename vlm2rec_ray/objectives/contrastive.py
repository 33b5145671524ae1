"""VLM2Rec's training objectives as pure tensor functions (arXiv 2603.17450, section 4).

Conventions shared by every function here:

- ``z_t, z_v``: ``[B, d]`` sequence (user-history) embeddings from the text prompt P_T and the image
  prompt P_V. ``e_t, e_v``: ``[N, d]`` candidate item embeddings, ``N >= B``; **row i's positive is
  candidate i** (the first ``B`` candidates are the in-batch targets; any further candidates are
  gathered from other workers or sampled from the catalog).
- ``neg_mask``: ``[B, N]`` bool, True where candidate j is a negative of row i. Default: every
  ``j != i``. The diagonal is never a negative, whatever the mask says. Candidates that are the same item
  as row i's target must be False (see :func:`build_neg_mask`).
- ``s(a, b)`` is cosine similarity; temperatures divide it.
- Losses are means over the batch (scalars); per-row diagnostics are ``[B]``.

The functions never call ``torch.distributed``: gather candidates first with
:func:`vlm2rec_ray.objectives.distributed.gather_with_grad` (``local_first=True``), then call them.

Equations (s = cosine similarity; m in {T, V}; fused z = z_T + z_V, e = e_T + e_V; paper section 2.3):

- InfoNCE / SFT (eq. 3), with an optional per-row weight w_i on the negative sum (w_i = 1: plain InfoNCE)::

      L = -1/B sum_i log( exp(s(z_i,e_i)/tau) / (exp(s(z_i,e_i)/tau) + w_i sum_{j in neg(i)} exp(s(z_i,e_j)/tau)) )

- Modality margin (eq. 6): ``M^m_i = s(z^m_i, e^m_i) - 1/|neg(i)| sum_{j in neg(i)} s(z^m_i, e^m_j)``.
- Weak-modality penalty (eqs. 7-9): ``Delta_i = sg[max(M^T_i, M^V_i)] - min(M^T_i, M^V_i)`` and
  ``w_i = 1 + beta * softplus(alpha * Delta_i)``.
- WPCL (eq. 10): the fused InfoNCE above with weight w_i on the negatives.
- CRTR (eqs. 11-13): ``P^m_i = softmax_j(s(z^m_i, e^m_j) / tau_CRTR)`` over the B in-batch targets and
  ``L_CRTR = 1/(2B) sum_i [KL(P^T_i || P^V_i) + KL(P^V_i || P^T_i)]``.
- Total (eq. 14): ``L = L_WPCL + lambda * L_CRTR``.

Why the stop-gradient: w_i multiplies the negatives, so minimising L pushes Delta_i down. Without sg the
cheapest way to shrink Delta is to *lower the strong modality's margin*; with sg the only path left is to
raise the weak modality's margin, which is the point of WPCL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LossOutput",
    "build_neg_mask",
    "crtr_loss",
    "info_nce",
    "modality_margin",
    "vlm2rec_loss",
    "weak_modality_penalty",
    "wpcl_loss",
]


@dataclass
class LossOutput:
    """What one objective call returns.

    Attributes:
        total: scalar, the loss to backpropagate (``wpcl + lam * crtr`` for the full method).
        wpcl: scalar, the contrastive term actually used (WPCL, or plain fused InfoNCE for ``sft`` /
            ``no_penalty``).
        crtr: scalar, L_CRTR. Always computed (detached when the variant does not train on it) so runs
            without CRTR still log the cross-modal topology gap.
        penalty: ``[B]``, the weight w_i applied to row i's negatives (ones when the penalty is off).
        margin_text: ``[B]``, M^T_i (eq. 6).
        margin_image: ``[B]``, M^V_i (eq. 6).
        alpha, beta: 0-d tensors, the penalty parameters in effect (None when floats were passed); carried
            here so a trainer can log them even where the parameters themselves are sharded (ZeRO-3).
        tau: 0-d tensor, a learnable temperature in effect (CMSA), else None.
    """

    total: Tensor
    wpcl: Tensor
    crtr: Tensor
    penalty: Tensor
    margin_text: Tensor
    margin_image: Tensor
    alpha: Tensor | None = None
    beta: Tensor | None = None
    tau: Tensor | None = None

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Python floats for logging (one device sync): losses, mean penalty, mean margins, the share of rows
        where the image margin is the weaker one (all four only when there are sequence rows), and
        alpha/beta/tau when known."""
        names = ["loss", "loss_wpcl", "loss_crtr"]
        items = [self.total.detach().float(), self.wpcl.detach().float(), self.crtr.detach().float()]
        if self.margin_text.numel():
            names += ["penalty_mean", "margin_text", "margin_image", "image_weaker_frac"]
            items += [
                self.penalty.detach().float().mean(),
                self.margin_text.detach().float().mean(),
                self.margin_image.detach().float().mean(),
                (self.margin_image.detach() < self.margin_text.detach()).float().mean(),
            ]
        for name, value in (("alpha", self.alpha), ("beta", self.beta), ("tau", self.tau)):
            if value is not None:
                names.append(name)
                items.append(value.detach().float().reshape(()).to(items[0].device))
        values = torch.stack(items).tolist()
        return {f"{prefix}{n}": v for n, v in zip(names, values, strict=True)}


def _check_pair(z: Tensor, e: Tensor, *, what: str = "z, e") -> None:
    if z.dim() != 2 or e.dim() != 2:
        raise ValueError(f"{what}: expected 2-D [B,d] and [N,d] tensors, got shapes {tuple(z.shape)} and "
                         f"{tuple(e.shape)}")
    if z.shape[1] != e.shape[1]:
        raise ValueError(f"{what}: embedding dims differ ({z.shape[1]} vs {e.shape[1]}); both sides must come "
                         "from the same encoder")
    if e.shape[0] < z.shape[0]:
        raise ValueError(f"{what}: need N >= B candidates (row i's positive is candidate i), got B={z.shape[0]}, "
                         f"N={e.shape[0]}")
    if z.shape[0] == 0:
        raise ValueError(f"{what}: empty batch (B=0)")


def _resolve_neg_mask(neg_mask: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
    """[B,N] bool negatives with the diagonal (the positive) always excluded."""
    not_pos = torch.ones(b, n, dtype=torch.bool, device=device)
    not_pos[:, :b].fill_diagonal_(False)
    if neg_mask is None:
        return not_pos
    if neg_mask.shape != (b, n):
        raise ValueError(f"neg_mask must have shape [B,N]=({b}, {n}), got {tuple(neg_mask.shape)}")
    if neg_mask.dtype != torch.bool:
        raise ValueError(f"neg_mask must be a bool tensor (True = negative), got dtype {neg_mask.dtype}")
    return neg_mask.to(device) & not_pos


def _cosine(z: Tensor, e: Tensor) -> Tensor:
    return F.normalize(z, dim=-1) @ F.normalize(e, dim=-1).T  # (B, N)


def build_neg_mask(target_ids: Tensor, candidate_ids: Tensor) -> Tensor:
    """Negatives mask that never treats a copy of row i's target as a negative.

    Args:
        target_ids: ``[B]`` integer item ids of the rows' targets (candidate i is row i's positive).
        candidate_ids: ``[N]`` integer item ids of the candidates.

    Returns:
        ``[B, N]`` bool, True where ``candidate_ids[j] != target_ids[i]``. Example: targets ``[7, 3]``,
        candidates ``[7, 3, 7]`` -> ``[[F, T, F], [T, F, T]]``.
    """
    if target_ids.dim() != 1 or candidate_ids.dim() != 1:
        raise ValueError(f"target_ids and candidate_ids must be 1-D, got {tuple(target_ids.shape)} and "
                         f"{tuple(candidate_ids.shape)}")
    return candidate_ids.to(target_ids.device)[None, :] != target_ids[:, None]


def info_nce(z: Tensor, e: Tensor, tau: float, neg_mask: Tensor | None = None,
             neg_weight: Tensor | float | None = None) -> Tensor:
    """InfoNCE on cosine similarity (paper eq. 3), optionally with a weight on each row's negative sum.

    ``loss_i = -log( exp(p_i) / (exp(p_i) + w_i * sum_{j in neg(i)} exp(l_ij)) )`` with
    ``l_ij = s(z_i, e_j) / tau`` and ``p_i = l_ii``; computed as a log-sum-exp over
    ``[p_i] + [l_ij + log w_i]``. A row without negatives contributes 0.

    Hand-worked: ``z = e = [[1,0],[0,1]]``, ``tau = 1``: ``l = [[1,0],[0,1]]``, each row
    ``-1 + log(e^1 + e^0) = log(1 + e^-1) = 0.313262``; with ``neg_weight = 2``:
    ``log(1 + 2 e^-1) = 0.551445``.

    Args:
        z: ``[B, d]`` query (sequence) embeddings.
        e: ``[N, d]`` candidate item embeddings, ``N >= B``; candidate i is row i's positive.
        tau: temperature (> 0).
        neg_mask: ``[B, N]`` bool, True = negative; default all ``j != i``.
        neg_weight: scalar or ``[B]`` weight ``w_i > 0`` on the negative sum (WPCL's penalty); None = 1.

    Returns:
        Scalar: the mean over the batch.
    """
    _check_pair(z, e)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    b, n = z.shape[0], e.shape[0]
    neg = _resolve_neg_mask(neg_mask, b, n, z.device)
    logits = _cosine(z, e) / tau  # (B, N)
    pos = logits[:, :b].diagonal()  # (B,)
    neg_logits = logits
    if neg_weight is not None:
        w = torch.as_tensor(neg_weight, dtype=logits.dtype, device=logits.device)
        if w.dim() == 1 and w.shape[0] != b:
            raise ValueError(f"neg_weight must be a scalar or [B]={b}, got shape {tuple(w.shape)}")
        if w.dim() > 1:
            raise ValueError(f"neg_weight must be a scalar or [B], got shape {tuple(w.shape)}")
        log_w = torch.log(w)
        neg_logits = logits + (log_w[:, None] if log_w.dim() == 1 else log_w)
    neg_logits = neg_logits.masked_fill(~neg, float("-inf"))  # (B, N)
    denom = torch.logsumexp(torch.cat([pos[:, None], neg_logits], dim=1), dim=1)  # (B,)
    return (denom - pos).mean()


def modality_margin(z_m: Tensor, e_m: Tensor, neg_mask: Tensor | None = None) -> Tensor:
    """Per-row positive-vs-negative margin of one modality (paper eq. 6), no temperature.

    ``M_i = s(z_i, e_i) - mean_{j in neg(i)} s(z_i, e_j)``; a row without negatives gets ``M_i = s(z_i, e_i)``.

    Hand-worked: ``z = [[1,0]]``, ``e = [[1,0],[0,1],[-1,0]]``: similarities ``[1, 0, -1]``,
    ``M = 1 - (0 + -1)/2 = 1.5``.

    Args:
        z_m: ``[B, d]`` sequence embeddings of modality m.
        e_m: ``[N, d]`` candidates of modality m (candidate i is row i's positive).
        neg_mask: ``[B, N]`` bool, True = negative; default all ``j != i``.

    Returns:
        ``[B]`` margins.
    """
    _check_pair(z_m, e_m, what="z_m, e_m")
    b, n = z_m.shape[0], e_m.shape[0]
    neg = _resolve_neg_mask(neg_mask, b, n, z_m.device)
    sim = _cosine(z_m, e_m)  # (B, N)
    pos = sim[:, :b].diagonal()  # (B,)
    negf = neg.to(sim.dtype)
    neg_mean = (sim * negf).sum(dim=1) / negf.sum(dim=1).clamp_min(1.0)  # (B,)
    return pos - neg_mean


def weak_modality_penalty(margin_text: Tensor, margin_image: Tensor, alpha: Tensor | float,
                          beta: Tensor | float, stop_grad: bool = True) -> Tensor:
    """WPCL's per-row weight on the negatives (paper eqs. 7-9).

    ``Delta_i = sg[max(M^T_i, M^V_i)] - min(M^T_i, M^V_i)`` and ``w_i = 1 + beta * softplus(alpha * Delta_i)``.
    With ``stop_grad`` no gradient reaches the strong modality's margin; gradient flows only into the weak
    one (and into alpha/beta when they are tensors).

    Hand-worked: ``M^T = 1.5, M^V = 0.5, alpha = beta = 1``: ``Delta = 1``,
    ``w = 1 + log(1 + e) = 2.313262``.

    Args:
        margin_text, margin_image: ``[B]`` margins from :func:`modality_margin`.
        alpha: scale on Delta (float or 0-d tensor).
        beta: penalty strength (float or 0-d tensor, >= 0).
        stop_grad: detach the strong modality's margin (the paper's sg; off for the Table 5 ablation).

    Returns:
        ``[B]`` weights, each >= 1 when beta >= 0.
    """
    strong = torch.maximum(margin_text, margin_image)
    weak = torch.minimum(margin_text, margin_image)
    if stop_grad:
        strong = strong.detach()
    delta = strong - weak  # (B,) >= 0
    return 1.0 + beta * F.softplus(alpha * delta)


def wpcl_loss(z_t: Tensor, z_v: Tensor, e_t: Tensor, e_v: Tensor, tau: float, alpha: Tensor | float,
              beta: Tensor | float, neg_mask: Tensor | None = None, stop_grad: bool = True,
              use_penalty: bool = True) -> Tensor:
    """Weak-modality Penalized Contrastive Learning (paper eq. 10), arXiv 2603.17450.

    Fused InfoNCE over ``z = z_t + z_v`` and ``e = e_t + e_v`` whose negative sum for row i is multiplied by
    ``w_i = 1 + beta * softplus(alpha * (sg[max(M^T_i, M^V_i)] - min(M^T_i, M^V_i))``.

    Hand-worked (``tau = 1``, ``alpha = beta = 1``, B = 1, N = 2): text ``z_t = [1,0]``,
    ``e_t = [[1,0],[-1,0]]`` gives ``M^T = 1 - (-1) = 2``; image ``z_v = [0,1]``, ``e_v = [[0,1],[0,1]]``
    gives ``M^V = 1 - 1 = 0``; so ``Delta = 2``, ``w = 1 + softplus(2) = 3.126928``. Fused ``z = [1,1]``,
    ``e = [[1,1],[-1,1]]``: ``s_pos = 1``, ``s_neg = 0``, loss ``= log(1 + w e^-1) = 0.765622``.

    Args:
        z_t, z_v: ``[B, d]`` text / image sequence embeddings.
        e_t, e_v: ``[N, d]`` text / image candidate embeddings (candidate i is row i's positive).
        tau: tau_WPCL.
        alpha, beta: penalty parameters (floats or 0-d tensors; tensors receive gradients).
        neg_mask: ``[B, N]`` bool negatives; default all ``j != i``.
        stop_grad: stop-gradient on the strong modality's margin (Table 5 "w/o sg" sets False).
        use_penalty: False gives plain fused InfoNCE (w_i = 1; Table 5 "w/o w_pen").

    Returns:
        Scalar: the mean over the batch.
    """
    _check_pair(z_t, e_t, what="z_t, e_t")
    _check_pair(z_v, e_v, what="z_v, e_v")
    penalty = None
    if use_penalty:
        m_t = modality_margin(z_t, e_t, neg_mask)
        m_v = modality_margin(z_v, e_v, neg_mask)
        penalty = weak_modality_penalty(m_t, m_v, alpha, beta, stop_grad=stop_grad)
    return info_nce(z_t + z_v, e_t + e_v, tau, neg_mask, neg_weight=penalty)


def crtr_loss(z_t: Tensor, z_v: Tensor, e_t: Tensor, e_v: Tensor, tau: float,
              text_teaches: Tensor | None = None) -> Tensor:
    """Cross-Modal Relational Topology Regularization (paper eqs. 11-13), arXiv 2603.17450.

    Per modality m, ``P^m_i = softmax_j(s(z^m_i, e^m_j) / tau)`` over the B in-batch targets (the first B
    candidates; extra gathered/sampled candidates are ignored), then
    ``L = 1/(2B) sum_i [KL(P^T_i || P^V_i) + KL(P^V_i || P^T_i)]``. Both directions carry gradient.

    ``text_teaches`` (a labelled deviation from eq. 13, not the paper's loss): ``[B]`` bool, per row which
    modality is the teacher (True: text, False: image; e.g. the stronger margin, as WPCL picks it). The
    loss is then ``1/B sum_i KL(sg[P^teacher_i] || P^student_i)``: only the student's row moves, towards the
    teacher's ranking, so it cannot be satisfied by flattening both rows.

    Hand-worked (``tau = 1``, B = 2): text similarities ``[[1,0],[0,1]]`` and image ``[[0,1],[1,0]]`` give
    ``P^T_0 = (p, 1-p)``, ``P^V_0 = (1-p, p)`` with ``p = sigmoid(1) = 0.731059``; each KL is
    ``(2p - 1) * log(p / (1-p)) = 0.462117``, so ``L = (4 * 0.462117) / 4 = 0.462117``. With text teaching
    and an image row that is flat (``(1/2, 1/2)``), that row's loss is
    ``p log(2p) + (1-p) log(2(1-p)) = 0.110944``.

    Args:
        z_t, z_v: ``[B, d]`` text / image sequence embeddings.
        e_t, e_v: ``[N, d]`` text / image candidates, ``N >= B``.
        tau: tau_CRTR (> 0).
        text_teaches: optional ``[B]`` bool teacher choice (see above); None = eq. 13.

    Returns:
        Scalar.
    """
    _check_pair(z_t, e_t, what="z_t, e_t")
    _check_pair(z_v, e_v, what="z_v, e_v")
    if z_t.shape != z_v.shape:
        raise ValueError(f"z_t and z_v must have the same shape, got {tuple(z_t.shape)} and {tuple(z_v.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    b = z_t.shape[0]
    log_p_t = F.log_softmax(_cosine(z_t, e_t[:b]) / tau, dim=1)  # (B, B)
    log_p_v = F.log_softmax(_cosine(z_v, e_v[:b]) / tau, dim=1)  # (B, B)
    if text_teaches is not None:
        if text_teaches.shape != (b,) or text_teaches.dtype != torch.bool:
            raise ValueError(f"text_teaches must be a [B]={b} bool tensor, got {tuple(text_teaches.shape)} "
                             f"{text_teaches.dtype}")
        teach = text_teaches.to(log_p_t.device)[:, None]  # (B, 1)
        log_teacher = torch.where(teach, log_p_t, log_p_v).detach()  # (B, B)
        log_student = torch.where(teach, log_p_v, log_p_t)  # (B, B)
        return (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1).mean()
    p_t, p_v = log_p_t.exp(), log_p_v.exp()
    kl_tv = (p_t * (log_p_t - log_p_v)).sum(dim=1)  # KL(P^T || P^V), (B,)
    kl_vt = (p_v * (log_p_v - log_p_t)).sum(dim=1)  # KL(P^V || P^T), (B,)
    return (kl_tv + kl_vt).sum() / (2 * b)


def vlm2rec_loss(z_t: Tensor, z_v: Tensor, e_t: Tensor, e_v: Tensor, *, tau_wpcl: float, tau_crtr: float,
                 lam: float, alpha: Tensor | float, beta: Tensor | float, neg_mask: Tensor | None = None,
                 stop_grad: bool = True, use_penalty: bool = True, use_crtr: bool = True,
                 crtr_teacher: bool = False) -> LossOutput:
    """The VLM2Rec objective ``L = L_WPCL + lam * L_CRTR`` (paper eq. 14), arXiv 2603.17450.

    The switches give the paper's Table 5 ablations: ``use_penalty=False, use_crtr=False`` is SFT (plain fused
    InfoNCE, eq. 3); ``stop_grad=False`` is "w/o sg"; ``use_penalty=False`` is "w/o w_pen";
    ``use_crtr=False`` is "w/o CRTR". Terms a variant does not train on are still computed, detached, for
    logging (margins, penalty, CRTR).

    Args:
        z_t, z_v: ``[B, d]`` text / image sequence embeddings.
        e_t, e_v: ``[N, d]`` candidates, ``N >= B``, candidate i is row i's positive.
        tau_wpcl: temperature of the (penalised) fused InfoNCE.
        tau_crtr: temperature of the CRTR row distributions.
        lam: CRTR weight lambda.
        alpha, beta: penalty parameters (floats or 0-d tensors).
        neg_mask: ``[B, N]`` bool negatives; default all ``j != i``.
        stop_grad, use_penalty, use_crtr: ablation switches (see above).
        crtr_teacher: a labelled deviation from eq. 13 (not the paper): per row the modality with the larger
            margin M (eq. 6) is CRTR's stop-gradient teacher (:func:`crtr_loss` ``text_teaches``).

    Returns:
        :class:`LossOutput` with ``total``, ``wpcl``, ``crtr``, ``penalty [B]``, ``margin_text [B]``,
        ``margin_image [B]``.
    """
    _check_pair(z_t, e_t, what="z_t, e_t")
    _check_pair(z_v, e_v, what="z_v, e_v")
    if use_penalty:
        m_t = modality_margin(z_t, e_t, neg_mask)
        m_v = modality_margin(z_v, e_v, neg_mask)
        penalty = weak_modality_penalty(m_t, m_v, alpha, beta, stop_grad=stop_grad)
    else:
        with torch.no_grad():
            m_t = modality_margin(z_t, e_t, neg_mask)
            m_v = modality_margin(z_v, e_v, neg_mask)
        penalty = torch.ones_like(m_t)
    contrastive = info_nce(z_t + z_v, e_t + e_v, tau_wpcl, neg_mask, neg_weight=penalty if use_penalty else None)
    teacher = (m_t.detach() >= m_v.detach())[: z_t.shape[0]] if crtr_teacher else None
    if use_crtr:
        crtr = crtr_loss(z_t, z_v, e_t, e_v, tau_crtr, text_teaches=teacher)
        total = contrastive + lam * crtr
    else:
        with torch.no_grad():
            crtr = crtr_loss(z_t, z_v, e_t, e_v, tau_crtr, text_teaches=teacher)
        total = contrastive
    return LossOutput(total=total, wpcl=contrastive, crtr=crtr, penalty=penalty, margin_text=m_t,
                      margin_image=m_v, alpha=_as_tensor_or_none(alpha), beta=_as_tensor_or_none(beta))


def _as_tensor_or_none(x: Tensor | float) -> Tensor | None:
    return x.detach() if isinstance(x, Tensor) else None
