"""Cross-worker gathering of candidates for the contrastive objectives (kept apart from the pure losses).

``gather_with_grad(x)`` all-gathers a ``[b, ...]`` tensor from every worker and keeps the autograd graph
of the local slice only (the other workers' slices are constants here; each worker backpropagates its own
slice, and the data-parallel engine averages gradients). This is open_clip's ``gather_features`` without
``gather_with_grad=True``'s extra all-reduce, and it matches the usual "local queries against global
candidates" setup.

With ``local_first=True`` the local slice comes first, so the objectives' convention "row i's positive is
candidate i" and "the first B candidates are the in-batch targets" (CRTR) still holds after gathering::

    e_t_all = gather_with_grad(e_t, local_first=True)       # (N = sum of batch sizes, d)
    ids_all = gather_with_grad(target_ids, local_first=True)
    neg_mask = build_neg_mask(target_ids, ids_all)
    out = objective(z_t, z_v, e_t_all, e_v_all, neg_mask)

Workers may hold different batch sizes (the last batch of an epoch): sizes are exchanged first and slices
padded to the largest. Without an initialised process group (or with one worker) the input comes back
unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_parts", "gather_with_grad", "is_distributed"]


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: Tensor, *, local_first: bool = False) -> Tensor:
    """All-gather ``x`` along dim 0 from every worker, keeping gradients for the local slice.

    Args:
        x: ``[b, ...]`` local tensor (any dtype; float tensors keep their graph on the local slice).
        local_first: put this worker's slice first (then the others in rank order) instead of rank order.

    Returns:
        ``[sum_r b_r, ...]``; ``x`` itself when not distributed.
    """
    if not is_distributed():
        return x
    rank = dist.get_rank()
    parts, _ = gather_parts(x)
    parts[rank] = x  # the local slice keeps its autograd graph
    if local_first:
        parts = [parts[rank], *parts[:rank], *parts[rank + 1:]]
    return torch.cat(parts)


def gather_parts(x: Tensor) -> tuple[list[Tensor], list[int]]:
    """Every worker's ``x`` (detached), in rank order, and their sizes along dim 0.

    Batch sizes may differ (the last batch of an epoch): sizes are exchanged first and slices padded to the
    largest for the all-gather, then cut back. A collective: every worker must call it.
    """
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes_t = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size)
    sizes = [int(s.item()) for s in sizes_t]
    max_b = max(sizes)
    local = x.detach().contiguous()
    if local.shape[0] < max_b:
        local = torch.cat([local, local.new_zeros((max_b - local.shape[0], *local.shape[1:]))])
    buffers = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(buffers, local)
    return [buf[:n] for buf, n in zip(buffers, sizes, strict=True)], sizes
