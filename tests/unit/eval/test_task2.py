"""Task 2: SASRec / GRU4Rec with ID-only vs our-embeddings (linear adapter) item tables, on CPU in seconds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.unit.eval.synthetic_tables import item_table, split
from vlm2rec_ray.eval.task2 import (
    GRU4Rec,
    ItemTable,
    SASRec,
    Task2Settings,
    build_vocab,
    encode_split,
    evaluate_task2,
    run_task2,
)


def _cyclic_world(num_items: int = 40, num_users: int = 80, seed: int = 0, train_starts: int = 40) -> dict[str, pa.Table]:
    """Users walk a fixed cycle over items (next = item + 1 mod N) from random starts. Only users starting
    below ``train_starts`` give training rows; every user has a test row. "Our" embeddings encode each
    item's place on the cycle (an angle), so through a linear adapter the successor map (a rotation) is
    learnable and carries over to the part of the cycle training never showed; ID embeddings cannot."""
    rng = np.random.default_rng(seed)
    ids = [f"i{j:02d}" for j in range(num_items)]
    train_rows, test_rows = [], []
    for u in range(num_users):
        start = int(rng.integers(num_items))
        seq = [ids[(start + s) % num_items] for s in range(7)]
        if start < train_starts:
            train_rows.extend((f"u{u}", seq[:t], seq[t]) for t in range(2, 6))
        test_rows.append((f"u{u}", seq[:6], seq[6]))
    train = split(*map(list, zip(*train_rows, strict=True)))
    test = split(*map(list, zip(*test_rows, strict=True)))
    angle = 2 * np.pi * np.arange(num_items) / num_items
    e_t = np.stack([np.cos(angle), np.sin(angle), np.cos(2 * angle), np.sin(2 * angle)], axis=1)
    return {"train": train, "test": test, "items": item_table(ids, e_t, np.zeros_like(e_t))}


def test_vocab_and_left_padding() -> None:
    t = split(["u"], [["a", "b", "c"]], ["d"])
    vocab = build_vocab(t, item_ids=["z"])
    assert vocab == {"z": 1, "a": 2, "b": 3, "c": 4, "d": 5}
    seqs, targets = encode_split(t, vocab, max_len=5)
    assert seqs.tolist() == [[0, 0, 2, 3, 4]] and targets.tolist() == [5]
    seqs, _ = encode_split(t, vocab, max_len=2)
    assert seqs.tolist() == [[3, 4]]  # the latest items are kept


@pytest.mark.parametrize("kind", ["sasrec", "gru4rec"])
def test_state_does_not_depend_on_padding(kind: str) -> None:
    """The same history padded to 4 or 8 positions gives the same user state (padding is masked)."""
    torch.manual_seed(0)
    items = ItemTable(10, 16)
    net = SASRec(items, 16, 8, 2, 2, 0.0) if kind == "sasrec" else GRU4Rec(items, 16, 0.0)
    net.eval()
    short = torch.tensor([[0, 3, 5, 7]])
    long = torch.tensor([[0, 0, 0, 0, 0, 3, 5, 7]])
    with torch.inference_mode():
        a, b = net(short), net(long)
    assert a.shape == (1, 16) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        c = net(torch.tensor([[0, 0, 0, 0, 0, 3, 6, 7]]))
    assert not torch.allclose(b, c)  # and it does depend on the items


def test_adapter_table_maps_our_embeddings_to_dim() -> None:
    pre = torch.randn(5, 7)
    table = ItemTable(5, 16, pre)
    w = table.weight()
    assert w.shape == (6, 16) and torch.count_nonzero(w[0]) == 0
    torch.testing.assert_close(w[1:], table.adapter(pre))
    assert not table.pretrained.requires_grad  # frozen: only the adapter learns
    assert [n for n, p in table.named_parameters()] == ["adapter.weight", "adapter.bias"]


@pytest.mark.parametrize("model", ["sasrec", "gru4rec"])
def test_models_learn_and_our_init_generalises(model: str) -> None:
    """Trained on half the cycle, both inits beat chance (Hit@10 = 10/31 with 30 negatives); only the
    adapter over cycle-aware embeddings also predicts the unseen half (ID-only stays near 0.5 = the seen half)."""
    w = _cyclic_world(train_starts=20)
    s = Task2Settings(dim=32, epochs=30, batch_size=64, lr=5e-3, dropout=0.0, num_blocks=1)
    common = {"settings": s, "num_negatives": 30, "seeds": (0, 1), "ks": (1, 10)}
    ours = evaluate_task2(w["train"], w["test"], model=model, init="ours", item_table=w["items"],  # type: ignore[arg-type]
                          embedding_column="emb_text", **common)
    ids = evaluate_task2(w["train"], w["test"], model=model, init="id", item_table=w["items"], **common)  # type: ignore[arg-type]
    assert ids["sampled"]["hit@10"] > 10 / 31 + 0.1, ids
    assert ours["sampled"]["hit@10"] > ids["sampled"]["hit@10"] + 0.2, (ours, ids)
    assert ours["items_without_embedding"] == 0 and ours["num_items"] == 40 and ours["num_users"] == 80
    assert np.isfinite(ours["final_train_loss"]) and ours["train_seconds"] < 30


def test_run_task2_grid_and_errors() -> None:
    w = _cyclic_world(num_items=40, num_users=20)
    items = w["items"].slice(0, 35)  # 5 items have no embedding of ours
    s = Task2Settings(dim=16, epochs=1, num_blocks=1)
    res = run_task2(w["train"], w["test"], items, settings=s, num_negatives=20, seeds=(0,))
    assert [(r["model"], r["init"]) for r in res] == [("sasrec", "id"), ("sasrec", "ours"),
                                                      ("gru4rec", "id"), ("gru4rec", "ours")]
    assert res[1]["items_without_embedding"] == 5
    assert [r["init"] for r in run_task2(w["train"], w["test"], None, models=["gru4rec"], settings=s,
                                         num_negatives=20, seeds=(0,))] == ["id"]
    with pytest.raises(ValueError, match=r"init='ours' needs item_table"):
        evaluate_task2(w["train"], w["test"], init="ours", settings=s)
    with pytest.raises(ValueError, match=r"unknown Task 2 model 'bert4rec'"):
        evaluate_task2(w["train"], w["test"], model="bert4rec", settings=s)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dim=10 is not divisible by num_heads=4"):
        Task2Settings(dim=10, num_heads=4)


def test_frequency_buckets_hand_worked() -> None:
    from vlm2rec_ray.eval.task2 import frequency_bucket, train_frequency

    assert [frequency_bucket(c) for c in (0, 1, 4, 5, 9, 10, 19, 20, 99)] == \
        ["0", "1-4", "1-4", "5-9", "5-9", "10-19", "10-19", "20+", "20+"]
    assert [frequency_bucket(c, (2, 3)) for c in (0, 1, 2, 3, 7)] == ["0-1", "0-1", "2", "3+", "3+"]
    with pytest.raises(ValueError, match="increasing positive"):
        frequency_bucket(1, (5, 1))
    assert train_frequency(split(["u1", "u2"], [["a", "b"], ["b"]], ["c", "b"])) == {"a": 1, "b": 3, "c": 1}


def test_cold_start_buckets_partition_the_users_and_show_what_ids_cannot_learn() -> None:
    """The cyclic world trained on half the cycle: targets training never saw are bucket 0 (cold). The buckets
    partition the test users and their user-weighted mean is the overall figure; on cold targets our
    embeddings (through the adapter) beat ID embeddings, which never received a gradient there."""
    w = _cyclic_world(train_starts=20)
    s = Task2Settings(dim=32, epochs=30, batch_size=64, lr=5e-3, dropout=0.0, num_blocks=1)
    common = {"settings": s, "num_negatives": 30, "seeds": (0, 1), "ks": (10,)}
    ours = evaluate_task2(w["train"], w["test"], init="ours", item_table=w["items"], embedding_column="emb_text",
                          **common)
    ids = evaluate_task2(w["train"], w["test"], init="id", item_table=w["items"], **common)
    buckets = ours["by_frequency"]
    assert sum(b["users"] for b in buckets) == ours["num_users"] and buckets[0]["bucket"] == "0"
    mean = sum(b["users"] * b["hit@10"] for b in buckets) / ours["num_users"]
    assert mean == pytest.approx(ours["sampled"]["hit@10"], abs=1e-9)
    assert buckets[0]["hit@10"] > ids["by_frequency"][0]["hit@10"] + 0.3, (buckets[0], ids["by_frequency"][0])
