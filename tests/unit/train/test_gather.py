"""all_gather_full_grad on 2 gloo processes: the summed per-worker losses have exactly the gradient of one
loss over the global batch (open_clip's gather_with_grad=True), unlike the local-slice-only gather."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from vlm2rec_ray.config import ObjectiveConfig
from vlm2rec_ray.objectives import build_neg_mask, build_objective

B, D = 3, 5


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    z_t, z_v, e_t, e_v = (torch.randn(2 * B, D, generator=g, dtype=torch.float64) for _ in range(4))
    ids = torch.tensor([0, 1, 2, 3, 1, 5])  # item 1 is the target of rows 1 and 4: masked as a negative
    return z_t, z_v, e_t, e_v, ids


def _objective():  # type: ignore[no-untyped-def]
    return build_objective(ObjectiveConfig(variant="vlm2rec", learnable_penalty=False)).double()


def _worker(rank: int, port: int, out: dict) -> None:  # type: ignore[type-arg]
    import torch.distributed as dist

    from vlm2rec_ray.objectives import gather_with_grad
    from vlm2rec_ray.train.gather import all_gather_full_grad

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    z_t, z_v, e_t, e_v, ids = _inputs()
    sl = slice(rank * B, (rank + 1) * B)
    leaves = [x[sl].clone().requires_grad_(True) for x in (z_t, z_v, e_t, e_v)]
    e_t_all = all_gather_full_grad(leaves[2], local_first=True)
    e_v_all = all_gather_full_grad(leaves[3], local_first=True)
    ids_all = gather_with_grad(ids[sl], local_first=True)
    loss = _objective()(leaves[0], leaves[1], e_t_all, e_v_all, build_neg_mask(ids[sl], ids_all)).total
    loss.backward()
    out[rank] = [x.grad.clone() for x in leaves] + [loss.detach().clone()]
    dist.destroy_process_group()


def _local_first(x: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.cat([x[r * B:(r + 1) * B] for r in (rank, 1 - rank)])


def test_full_grad_gather_matches_one_global_loss() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(port, out), nprocs=2)

    # Reference: each worker's loss is the mean over its rows against all 2B candidates (its own first), so
    # sum over workers = one objective per worker evaluated in one process; gradients of that sum.
    z_t, z_v, e_t, e_v, ids = (x.clone() for x in _inputs())
    leaves = [x.requires_grad_(True) for x in (z_t, z_v, e_t, e_v)]
    total = 0.0
    for rank in range(2):
        sl = slice(rank * B, (rank + 1) * B)
        loss = _objective()(leaves[0][sl], leaves[1][sl], _local_first(leaves[2], rank),
                            _local_first(leaves[3], rank), build_neg_mask(ids[sl], _local_first(ids, rank))).total
        torch.testing.assert_close(loss.detach(), out[rank][4])
        total = total + loss
    total.backward()
    for rank in range(2):
        sl = slice(rank * B, (rank + 1) * B)
        for i, leaf in enumerate(leaves):
            torch.testing.assert_close(out[rank][i], leaf.grad[sl], rtol=1e-10, atol=1e-12)
