"""SDA's Modality-Disentangled Adaptation (MoDA): LoRA split into experts routed by modality.

What SDA's code does (RaoZhongtao/SDA @28637dbf, ``llm/peft/tuners/moelora/moelora_model.py``;
../shared/papers/sda-spec.md): rank r is split into E experts ``A_e [r/E, d_in]``, ``B_e [d_out, r/E]``; per
layer a modality table ``Embedding(2, 64)`` and a gate ``Linear(64, E, bias=False)`` give softmax weights
``w(m)`` over the experts for modality m (0 image, 1 text; constant over a sequence's tokens), and

    y = W0 x + (alpha / r) * sum_e w_e(m) * B_e A_e dropout(x)

with ``A ~ N(0, 0.01^2)``, ``B = 0``. :func:`moda_delta` is the adapter update as a pure function; E = 1
(gate 1) is plain LoRA.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["moda_delta"]


def moda_delta(x: Tensor, A: Tensor, B: Tensor, gate: Tensor, scaling: float) -> Tensor:
    """The MoDA update ``scaling * sum_e gate[n, e] * B_e A_e x[n]`` of every sample n.

    Hand-worked (two samples, two experts of rank 1, d_in = d_out = 2, scaling 2): ``A_0 = [[1, 0]]``,
    ``A_1 = [[0, 1]]``, ``B_0 = [[1], [0]]``, ``B_1 = [[0], [1]]`` (expert 0 copies the first coordinate, expert 1
    the second); ``x = [[3, 4], [3, 4]]``, gates ``[1, 0]`` and ``[0.25, 0.75]`` give ``[[6, 0], [1.5, 6]]``.

    Args:
        x: ``[N, ..., d_in]`` inputs (e.g. ``[N, T, d_in]`` tokens; the gate is constant over the middle dims).
        A: ``[E, r/E, d_in]`` down-projections.
        B: ``[E, d_out, r/E]`` up-projections.
        gate: ``[N, E]`` expert weights per sample (rows sum to 1 after SDA's softmax).
        scaling: ``alpha / r`` (r the total rank).

    Returns:
        ``[N, ..., d_out]``.
    """
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(f"moda_delta expects A [E, r/E, d_in] and B [E, d_out, r/E], got {tuple(A.shape)} and "
                         f"{tuple(B.shape)}")
    if x.shape[-1] != A.shape[2]:
        raise ValueError(f"x's last dim {x.shape[-1]} is not A's d_in {A.shape[2]}")
    if gate.dim() != 2 or gate.shape != (x.shape[0], A.shape[0]):
        raise ValueError(f"gate must be [N, E] = [{x.shape[0]}, {A.shape[0]}], got {tuple(gate.shape)}")
    n = x.shape[0]
    flat = x.reshape(n, -1, x.shape[-1])  # (N, T, d_in)
    low = torch.einsum("ntd,erd->nter", flat, A)  # (N, T, E, r/E)
    low = low * gate.to(low.dtype)[:, None, :, None]  # weight each expert per sample
    out = torch.einsum("nter,eor->nto", low, B) * scaling  # (N, T, d_out)
    return out.reshape(*x.shape[:-1], B.shape[1])
