"""MoDA's adapter update (model/moda.py) against hand-worked values; one expert is plain LoRA."""

from __future__ import annotations

import pytest
import torch

from vlm2rec_ray.model.moda import moda_delta


def test_two_samples_two_experts_hand_worked() -> None:
    """Expert 0 copies coordinate 0, expert 1 coordinate 1 (rank 1 each), scaling 2: x = [3, 4] with gate
    [1, 0] -> [6, 0]; with gate [0.25, 0.75] -> [2 * 0.25 * 3, 2 * 0.75 * 4] = [1.5, 6]."""
    A = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (E=2, r/E=1, d_in=2)
    B = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]])  # (E=2, d_out=2, r/E=1)
    x = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    gate = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    assert torch.allclose(moda_delta(x, A, B, gate, 2.0), torch.tensor([[6.0, 0.0], [1.5, 6.0]]))


def test_one_expert_is_plain_lora_and_token_dims_pass_through() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g)  # (N, T, d_in)
    A = torch.randn(1, 4, 8, generator=g)  # r = 4
    B = torch.randn(1, 6, 4, generator=g)
    out = moda_delta(x, A, B, torch.ones(3, 1), 0.5)
    lora = 0.5 * (x @ A[0].T @ B[0].T)  # the PEFT LoRA update: scaling * B A x
    assert out.shape == (3, 5, 6) and torch.allclose(out, lora, atol=1e-5)


def test_gate_mixes_experts_linearly() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, generator=g)
    A, B = torch.randn(4, 2, 7, generator=g), torch.randn(4, 3, 2, generator=g)
    gate = torch.softmax(torch.randn(2, 4, generator=g), dim=1)
    expected = sum(gate[:, e:e + 1] * (x @ A[e].T @ B[e].T) for e in range(4)) * 1.5
    assert torch.allclose(moda_delta(x, A, B, gate, 1.5), expected, atol=1e-5)


def test_shape_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"A \[E, r/E, d_in\]"):
        moda_delta(torch.zeros(2, 3), torch.zeros(2, 1, 3), torch.zeros(3, 4, 1), torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match=r"gate must be \[N, E\] = \[2, 2\]"):
        moda_delta(torch.zeros(2, 3), torch.zeros(2, 1, 3), torch.zeros(2, 4, 1), torch.zeros(2, 3), 1.0)
