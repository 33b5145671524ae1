"""gather_with_grad: identity when not distributed; faked collectives (uneven sizes); real 2-process gloo."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vlm2rec_ray.objectives import build_neg_mask, gather_with_grad, info_nce


def test_identity_without_process_group() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def test_fake_collectives_uneven_sizes_local_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """World 2, this is rank 1 with 2 rows; rank 0 holds 3 rows. Rank order is [rank0, rank1]; local_first
    puts our 2 rows first. Only the local slice carries gradient."""
    other = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)

    def fake_all_gather(out: list[torch.Tensor], t: torch.Tensor, group=None) -> None:
        if t.dtype == torch.long:  # the size exchange
            out[0].fill_(other.shape[0])
        else:
            assert t.shape[0] == 3  # padded to the largest worker's batch
            out[0].copy_(other)
        out[1].copy_(t)

    monkeypatch.setattr(dist, "all_gather", fake_all_gather)
    x = torch.randn(2, 4, requires_grad=True)
    rank_order = gather_with_grad(x)
    assert rank_order.shape == (5, 4)
    torch.testing.assert_close(rank_order[:3], other)
    torch.testing.assert_close(rank_order[3:], x)
    local_first = gather_with_grad(x, local_first=True)
    torch.testing.assert_close(local_first[:2], x)
    torch.testing.assert_close(local_first[2:], other)
    local_first.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)
        b = 2 + rank  # uneven local batches: 2 and 3
        z = torch.randn(b, 4, dtype=torch.float64, requires_grad=True)
        e = torch.randn(b, 4, dtype=torch.float64, requires_grad=True)
        ids = torch.arange(b) + 10 * rank
        e_all = gather_with_grad(e, local_first=True)
        ids_all = gather_with_grad(ids, local_first=True)
        loss = info_nce(z, e_all, 0.5, build_neg_mask(ids, ids_all))
        loss.backward()
        torch.save({"z": z.detach(), "e": e.detach(), "e_all": e_all.detach(), "ids_all": ids_all,
                    "loss": loss.detach(), "grad_e": e.grad}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_real_gloo_two_workers(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(r0["e_all"], torch.cat([r0["e"], r1["e"]]))
    torch.testing.assert_close(r1["e_all"], torch.cat([r1["e"], r0["e"]]))
    assert r1["ids_all"].tolist() == [10, 11, 12, 0, 1]
    # Each worker's loss equals the single-process loss over its queries against all candidates.
    expected = info_nce(r1["z"], torch.cat([r1["e"], r0["e"]]), 0.5)
    torch.testing.assert_close(r1["loss"], expected)
    assert r0["grad_e"].abs().sum() > 0 and r1["grad_e"].abs().sum() > 0
