"""Cross-worker candidates whose gradients flow back to the worker that computed them.

:func:`vlm2rec_ray.objectives.gather_with_grad` keeps the graph of the local slice only: the other workers'
candidates are constants, so the repulsion that this worker's sequences exert on them is dropped. With a
model whose embeddings start nearly identical (a random-init backbone, or any backbone before its last-token
state is adapted), that half-gradient is not enough: on 2 CPU workers the tiny backbone's margins shrank to
~1e-7 and the loss stayed at log(1 + w (N - 1)) while the same rows trained on one worker went down.

:func:`all_gather_full_grad` is the exact version (open_clip's ``gather_with_grad=True``): the backward
all-reduces (sums) the gradient of the gathered tensor and hands every worker the slice of its own rows.
The sum over workers of their per-worker losses then has the same gradient as one loss over the global
batch; with the engine's data-parallel averaging, each rank's update equals the single-process update on
the mean of the per-worker losses. gloo has no reduce_scatter, so the backward uses one all_reduce of the
``[N, d]`` gradient (small: N = global batch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vlm2rec_ray.objectives import is_distributed
from vlm2rec_ray.objectives.distributed import gather_parts

__all__ = ["all_gather_full_grad"]


class _AllGatherFullGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, local_first: bool) -> Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        parts, sizes = gather_parts(x)
        order = [rank, *range(rank), *range(rank + 1, world)] if local_first else list(range(world))
        starts, offset = {}, 0
        for r in order:
            starts[r] = offset
            offset += sizes[r]
        ctx.local_slice = (starts[rank], starts[rank] + sizes[rank])
        ctx.order, ctx.sizes, ctx.starts = order, sizes, starts
        return torch.cat([parts[r] for r in order])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # Rows are ordered differently on every rank (local first): put them in rank order, sum, slice.
        world = len(ctx.sizes)
        by_rank = torch.cat([grad[ctx.starts[r]:ctx.starts[r] + ctx.sizes[r]] for r in range(world)]).contiguous()
        dist.all_reduce(by_rank)
        rank = dist.get_rank()
        start = sum(ctx.sizes[:rank])
        return by_rank[start:start + ctx.sizes[rank]], None


def all_gather_full_grad(x: Tensor, *, local_first: bool = True) -> Tensor:
    """All-gather ``x`` (``[b, ...]`` float) along dim 0; the backward sums every worker's gradient.

    Args:
        x: this worker's rows.
        local_first: this worker's rows first (row i's positive stays candidate i), then the others in rank
            order; else rank order.

    Returns:
        ``[sum of b over workers, ...]``; ``x`` itself when not distributed. Every worker must call this the
        same number of times, and must run backward through the result (the backward is a collective).
    """
    if not is_distributed():
        return x
    return _AllGatherFullGrad.apply(x, local_first)
