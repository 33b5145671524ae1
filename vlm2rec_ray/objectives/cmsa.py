"""SDA's Cross-Modal Structural Alignment (CMSA) as a pure tensor function.

SDA (Structural and Disentangled Adaptation; ../shared/papers/sda-spec.md) trains item-level: one item gives
a text embedding ``t_i`` (its text prompt) and an image embedding ``v_i`` (its image prompt). By default
:func:`cmsa_loss` computes exactly what SDA's public code computes (RaoZhongtao/SDA @28637dbf,
``llm/qwen_vl.py:236-262``):

- logits ``L = v t^T / tau`` (row i: image anchor i against every text), embeddings **not** normalised;
- teacher ``P = softmax_row(tau * (t t^T + v v^T) / 2)``: the averaged intra-modal similarities, with the
  same tau *multiplying* (a teacher temperature of 1/tau), **not** detached;
- image -> text soft cross-entropy ``x_i = -sum_j P_ij log softmax(L_i)_j`` and text -> image
  ``y_i = -sum_j P_ji log softmax(L^T_i)_j`` (the code uses ``P.T``: a column of P, not renormalised);
- ``loss = mean_i (x_i + y_i) / 2``. tau is learnable in SDA (init 3.0; the objective module holds it).

Options for the paper's prose reading (its equations were lost), each off by default:
``divergence="kl"`` (KL instead of cross-entropy: CE minus the teacher's entropy term, so a perfect match
costs 0), ``detach_teacher=True`` (no gradient into P), ``normalize=True`` (L2-normalised embeddings,
cosine similarities).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm2rec_ray.objectives.contrastive import LossOutput, crtr_loss, modality_margin

__all__ = ["cmsa_loss", "cmsa_objective"]


def cmsa_loss(e_t: Tensor, e_v: Tensor, tau: Tensor | float, *, divergence: Literal["ce", "kl"] = "ce",
              detach_teacher: bool = False, normalize: bool = False) -> Tensor:
    """CMSA (SDA's stage-1 objective) over a batch of items; see the module docstring for the equations.

    Hand-worked (``tau = 1``, ``t = v = I_2``): ``L = I``, so ``log softmax(L_i) = (log s, log(1-s))`` with
    ``s = sigmoid(1) = 0.731059``; the teacher ``P = softmax(I) = [[s, 1-s], [1-s, s]]``. Each row's cross
    entropy is ``-(s log s + (1-s) log(1-s)) = 0.582203`` in both directions, so the loss is 0.582203; with
    ``divergence="kl"`` it is 0 (the teacher equals both cross-modal distributions).

    Args:
        e_t: ``[B, d]`` item text embeddings (row i: item i).
        e_v: ``[B, d]`` item image embeddings of the same items.
        tau: temperature (float or 0-d/[1] tensor, > 0; a learnable parameter in SDA).
        divergence: ``"ce"`` (SDA's code) or ``"kl"``.
        detach_teacher: stop gradients into the teacher P.
        normalize: L2-normalise the embeddings first.

    Returns:
        Scalar: the mean over the batch.
    """
    if e_t.dim() != 2 or e_t.shape != e_v.shape or e_t.shape[0] < 2:
        raise ValueError(f"cmsa_loss expects e_t and e_v of the same shape [B>=2, d], got {tuple(e_t.shape)} and "
                         f"{tuple(e_v.shape)}")
    if divergence not in ("ce", "kl"):
        raise ValueError(f"divergence must be 'ce' or 'kl', got {divergence!r}")
    tau_t = torch.as_tensor(tau, dtype=e_t.dtype, device=e_t.device).reshape(())
    if not bool(tau_t > 0):
        raise ValueError(f"tau must be > 0, got {float(tau_t)}")
    t, v = (F.normalize(e_t, dim=-1), F.normalize(e_v, dim=-1)) if normalize else (e_t, e_v)
    logits = v @ t.T / tau_t  # (B, B): image rows against texts
    teacher = torch.softmax(tau_t * (t @ t.T + v @ v.T) / 2, dim=1)  # (B, B), rows sum to 1
    if detach_teacher:
        teacher = teacher.detach()
    log_img2txt = F.log_softmax(logits, dim=1)  # (B, B)
    log_txt2img = F.log_softmax(logits.T, dim=1)  # (B, B)
    targets_t = teacher.T  # SDA's code: the text->image targets are P's columns (not renormalised)
    x = -(teacher * log_img2txt).sum(dim=1)  # (B,)
    y = -(targets_t * log_txt2img).sum(dim=1)  # (B,)
    if divergence == "kl":
        x = x + (teacher * torch.log(teacher.clamp_min(1e-30))).sum(dim=1)
        y = y + (targets_t * torch.log(targets_t.clamp_min(1e-30))).sum(dim=1)
    return ((x + y) / 2).mean()


def cmsa_objective(z_t: Tensor, z_v: Tensor, e_t: Tensor, e_v: Tensor, *, tau_wpcl: float, tau_crtr: float,
                   lam: float, alpha: Tensor | float, beta: Tensor | float, neg_mask: Tensor | None = None,
                   tau: Tensor | float = 3.0, divergence: Literal["ce", "kl"] = "ce", detach_teacher: bool = False,
                   normalize: bool = False) -> LossOutput:
    """The ``cmsa`` objective variant: :func:`cmsa_loss` over the batch's items, with the registry's signature.

    SDA's stage 1 trains items only: with item-level rows ``z_t``/``z_v`` are empty (``[0, d]``) and only the
    ``N`` items count. With sequence rows the sequences are not trained (CMSA has no sequence term); their
    margins and CRTR are computed, detached, for the logs. ``tau_wpcl``, ``tau_crtr``, ``lam``, ``alpha``,
    ``beta`` are accepted for the common signature and used for those diagnostics only.

    Args:
        z_t, z_v: ``[B, d]`` sequence embeddings (``B`` may be 0).
        e_t, e_v: ``[N, d]`` item text / image embeddings, ``N >= 2``.
        tau: CMSA temperature (the objective's learnable one).
        divergence, detach_teacher, normalize: :func:`cmsa_loss` options.

    Returns:
        :class:`LossOutput` with ``total = wpcl = CMSA``; ``crtr``, ``penalty``, margins ``[B]`` detached
        diagnostics (empty without sequences); ``tau`` the temperature used.
    """
    loss = cmsa_loss(e_t, e_v, tau, divergence=divergence, detach_teacher=detach_teacher, normalize=normalize)
    b = z_t.shape[0]
    with torch.no_grad():
        if b:
            m_t, m_v = modality_margin(z_t, e_t, neg_mask), modality_margin(z_v, e_v, neg_mask)
            crtr = crtr_loss(z_t, z_v, e_t, e_v, tau_crtr)
        else:
            m_t = m_v = e_t.new_zeros(0)
            crtr = e_t.new_zeros(())
    tau_t = torch.as_tensor(tau, dtype=torch.float32).reshape(())
    return LossOutput(total=loss, wpcl=loss, crtr=crtr, penalty=torch.ones_like(m_t), margin_text=m_t,
                      margin_image=m_v, alpha=None, beta=None, tau=tau_t.detach())
