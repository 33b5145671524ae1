"""Task 2 (paper 5.1.3): do our item embeddings help a sequential recommender?

Two small next-item models, both with ``d = 128``:

- :class:`SASRec`: item + learned position embeddings, ``num_blocks`` causal self-attention blocks
  (pre-LayerNorm), the last position's state is the user state;
- :class:`GRU4Rec`: item embeddings through a one-layer GRU, the last real step's state is the user state.

Scores are ``user_state @ item_table.T``. The item table is built one of two ways:

- ``init="id"`` (ID-only): a randomly initialised, trainable ``nn.Embedding``;
- ``init="ours"``: ``adapter(E)``, where ``E`` is our frozen, L2-normalised ``[N, d_emb]`` item embedding
  matrix and ``adapter`` is a trainable one-layer linear map ``d_emb -> 128``. Keeping ``E`` frozen means
  the comparison measures what the embeddings carry, not 2048-dim free parameters per item. Items without
  an embedding row get a zero row (they are counted in ``items_without_embedding``).

Training: the train split's rows (history -> target) with full-softmax cross-entropy over all items; AdamW.
Evaluation: leave-one-out on the test split with the Task 1 protocol (target + 100 negatives drawn
uniformly from items outside the history, averaged over seeds; :func:`vlm2rec_ray.eval.task1.sample_negatives`),
overall and by the target item's training frequency (its occurrences in the train split, histories and targets;
the paper's cold-start study, Fig. 3): :func:`frequency_bucket` names the bucket of each test row.
Sized for CPU: a few hundred users and items train in seconds.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm2rec_ray.eval import metrics
from vlm2rec_ray.eval.task1 import embedding_matrix, l2_normalize, sample_negatives

MODELS = ("sasrec", "gru4rec")
INITS = ("id", "ours")
PAD = 0  # item index 0 is padding; real items are 1..N

__all__ = [
    "FREQUENCY_EDGES",
    "INITS",
    "MODELS",
    "GRU4Rec",
    "SASRec",
    "Task2Settings",
    "build_vocab",
    "encode_split",
    "evaluate_task2",
    "frequency_bucket",
    "run_task2",
    "train_frequency",
]


@dataclass(frozen=True)
class Task2Settings:
    """Hyper-parameters of one Task 2 run (defaults sized for seconds on a CPU)."""

    dim: int = 128
    max_len: int = 10
    num_blocks: int = 2
    num_heads: int = 2
    dropout: float = 0.2
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    num_threads: int | None = 1  # tiny models run fastest on one thread; None keeps torch's setting


    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}; pick e.g. 2 or 4 heads")
        for name in ("dim", "max_len", "num_blocks", "num_heads", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")


class ItemTable(nn.Module):
    """The ``[N+1, dim]`` item table (row 0 = padding): ID embeddings or ``adapter(E)``."""

    def __init__(self, num_items: int, dim: int, pretrained: Tensor | None = None) -> None:
        super().__init__()
        if pretrained is None:
            self.ids: nn.Embedding | None = nn.Embedding(num_items + 1, dim, padding_idx=PAD)
            nn.init.normal_(self.ids.weight, std=dim ** -0.5)
            with torch.no_grad():
                self.ids.weight[PAD].zero_()
            self.adapter: nn.Linear | None = None
        else:
            if pretrained.shape[0] != num_items:
                raise ValueError(f"pretrained has {pretrained.shape[0]} rows for {num_items} items")
            self.ids = None
            self.register_buffer("pretrained", torch.cat([pretrained.new_zeros(1, pretrained.shape[1]), pretrained]))
            self.adapter = nn.Linear(pretrained.shape[1], dim)

    def weight(self) -> Tensor:
        """``[N+1, dim]``; row 0 is zero."""
        if self.ids is not None:
            return self.ids.weight
        table = self.adapter(self.pretrained)  # (N+1, dim)
        return torch.cat([table.new_zeros(1, table.shape[1]), table[1:]])


class SASRec(nn.Module):
    """Self-attentive sequential recommendation (Kang & McAuley, 2018), causal, pre-LN.

    ``forward(seqs)`` takes ``[B, L]`` left-padded item indices (0 = pad) and returns ``[B, dim]`` states.
    """

    def __init__(self, items: ItemTable, dim: int, max_len: int, num_blocks: int, num_heads: int,
                 dropout: float) -> None:
        super().__init__()
        self.items = items
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=dim, dropout=dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, num_blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.num_heads = num_heads

    def forward(self, seqs: Tensor) -> Tensor:
        _b, n = seqs.shape
        table = self.items.weight()
        if n > self.pos.num_embeddings:
            raise ValueError(f"sequences of length {n} exceed max_len={self.pos.num_embeddings}; truncate them")
        # Positions count back from the latest item, so left padding does not shift them.
        x = table[seqs] * (table.shape[1] ** 0.5) + self.pos.weight[:n].flip(0)  # (B, L, d)
        x = self.drop(x) * (seqs != PAD).unsqueeze(-1)
        # Position i may attend to j <= i unless j is padding; i always sees itself, so no row is fully
        # masked (a fully masked row gives NaN, which would leak through the 0-weighted attention).
        causal = torch.ones(n, n, dtype=torch.bool, device=seqs.device).triu(1)  # True = blocked
        blocked = causal.unsqueeze(0) | (seqs == PAD).unsqueeze(1)  # (B, L, L)
        blocked = blocked & ~torch.eye(n, dtype=torch.bool, device=seqs.device)
        mask = blocked.repeat_interleave(self.num_heads, dim=0)  # (B*heads, L, L)
        h = self.blocks(x, mask=mask)
        return self.norm(h[:, -1])  # left padding: the last position is the latest item


class GRU4Rec(nn.Module):
    """Session-based recommendation with a GRU (Hidasi et al., 2016); ``[B, L]`` left-padded -> ``[B, dim]``."""

    def __init__(self, items: ItemTable, dim: int, dropout: float) -> None:
        super().__init__()
        self.items = items
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, seqs: Tensor) -> Tensor:
        lengths = (seqs != PAD).sum(1).clamp(min=1)
        # Right-align -> left-align so packing sees the real steps only.
        n = seqs.shape[1]
        idx = (torch.arange(n, device=seqs.device).unsqueeze(0) + (n - lengths).unsqueeze(1)) % n
        left = torch.gather(seqs, 1, idx)  # (B, L), real items first
        x = self.drop(self.items.weight()[left])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)
        return h[-1]


def build_vocab(*tables: pa.Table, item_ids: Sequence[str] = ()) -> dict[str, int]:
    """Item id -> index ``1..N`` over ``item_ids`` then every history/target id in the split tables."""
    vocab: dict[str, int] = {}
    for iid in item_ids:
        vocab.setdefault(iid, len(vocab) + 1)
    for t in tables:
        for hist in t.column("history").to_pylist():
            for iid in hist:
                vocab.setdefault(iid, len(vocab) + 1)
        for iid in t.column("target").to_pylist():
            vocab.setdefault(iid, len(vocab) + 1)
    return vocab


def encode_split(split: pa.Table, vocab: dict[str, int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ``[R, max_len]`` history indices and ``[R]`` target indices (the latest items are kept)."""
    rows = split.num_rows
    seqs = np.zeros((rows, max_len), dtype=np.int64)
    for r, hist in enumerate(split.column("history").to_pylist()):
        ids = [vocab[i] for i in hist[-max_len:]]
        if ids:
            seqs[r, max_len - len(ids):] = ids
    targets = np.asarray([vocab[t] for t in split.column("target").to_pylist()], dtype=np.int64)
    return seqs, targets


def _pretrained_matrix(item_table: pa.Table, column: str, vocab: dict[str, int]) -> tuple[Tensor, int]:
    emb = l2_normalize(embedding_matrix(item_table, column))
    mat = np.zeros((len(vocab), emb.shape[1]), dtype=np.float32)
    found = np.zeros(len(vocab), dtype=bool)
    for row, iid in enumerate(item_table.column("item_id").to_pylist()):
        idx = vocab.get(iid)
        if idx is not None:
            mat[idx - 1] = emb[row]
            found[idx - 1] = True
    return torch.from_numpy(mat), int((~found).sum())


def _build_model(kind: str, items: ItemTable, s: Task2Settings) -> nn.Module:
    if kind == "sasrec":
        return SASRec(items, s.dim, s.max_len, s.num_blocks, s.num_heads, s.dropout)
    if kind == "gru4rec":
        return GRU4Rec(items, s.dim, s.dropout)
    raise ValueError(f"unknown Task 2 model {kind!r}; expected one of {list(MODELS)}")


#: Default edges of the training-frequency buckets: 0 (cold), 1-4, 5-9, 10-19, 20+.
FREQUENCY_EDGES = (1, 5, 10, 20)


def train_frequency(train_split: pa.Table) -> dict[str, int]:
    """``{item_id: occurrences}`` in the train split's histories and targets (how often training saw it)."""
    counts: dict[str, int] = {}
    for hist, target in zip(train_split.column("history").to_pylist(), train_split.column("target").to_pylist(),
                            strict=True):
        for item in (*hist, target):
            counts[item] = counts.get(item, 0) + 1
    return counts


def frequency_bucket(count: int, edges: Sequence[int] = FREQUENCY_EDGES) -> str:
    """The bucket label of a training frequency: with edges ``(1, 5, 10, 20)``: ``0``, ``1-4``, ``5-9``,
    ``10-19``, ``20+``."""
    if list(edges) != sorted(set(edges)) or not edges or edges[0] < 1:
        raise ValueError(f"frequency edges must be increasing positive integers, got {list(edges)}")
    if count < edges[0]:
        return "0" if edges[0] == 1 else f"0-{edges[0] - 1}"
    for lo, hi in itertools.pairwise(edges):
        if count < hi:
            return str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"
    return f"{edges[-1]}+"


def evaluate_task2(
    train_split: pa.Table,
    test_split: pa.Table,
    *,
    model: Literal["sasrec", "gru4rec"] = "sasrec",
    init: Literal["id", "ours"] = "id",
    item_table: pa.Table | None = None,
    embedding_column: str = "emb_fused",
    settings: Task2Settings | None = None,
    num_negatives: int = 100,
    seeds: Sequence[int] = (0, 1, 2),
    ks: Sequence[int] = (10, 20),
    frequency_edges: Sequence[int] = FREQUENCY_EDGES,
) -> dict[str, Any]:
    """Train one next-item model on the train split and evaluate it leave-one-out on the test split.

    Args:
        train_split: rows (``history``, ``target``) to learn from.
        test_split: one row per user; its target is ranked against ``num_negatives`` sampled items.
        model: ``"sasrec"`` or ``"gru4rec"``.
        init: ``"id"`` (random ID embeddings) or ``"ours"`` (frozen ``item_table`` embeddings through a
            trainable linear adapter to ``settings.dim``).
        item_table: our item embeddings (needed for ``init="ours"``; its ids also seed the vocabulary).
        embedding_column: which item embedding feeds the adapter.
        settings: model and optimisation hyper-parameters.
        num_negatives, seeds, ks: the evaluation protocol (same as Task 1).
        frequency_edges: bucket edges of the target's training frequency (:func:`frequency_bucket`).

    Returns:
        ``{"sampled": {"hit@10": ..}, "sampled_std": {..}, "by_frequency": [{"bucket", "users", "hit@10",
        ..}, ..], "model", "init", "num_users", "num_items", "items_without_embedding", "final_train_loss",
        "train_seconds"}``; ``by_frequency`` lists the non-empty buckets in order, metrics averaged over seeds.
    """
    s = settings or Task2Settings()
    previous_threads = torch.get_num_threads()
    if s.num_threads is not None:
        torch.set_num_threads(s.num_threads)
    try:
        return _train_and_evaluate(train_split, test_split, model, init, item_table, embedding_column, s,
                                   num_negatives, seeds, ks, frequency_edges)
    finally:
        torch.set_num_threads(previous_threads)


def _train_and_evaluate(train_split: pa.Table, test_split: pa.Table, model: str, init: str,
                        item_table: pa.Table | None, embedding_column: str, s: Task2Settings,
                        num_negatives: int, seeds: Sequence[int], ks: Sequence[int],
                        frequency_edges: Sequence[int] = FREQUENCY_EDGES) -> dict[str, Any]:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {list(INITS)}")
    if init == "ours" and item_table is None:
        raise ValueError("init='ours' needs item_table (our item embeddings); pass it or use init='id'")
    if train_split.num_rows == 0 or test_split.num_rows == 0:
        raise ValueError(f"Task 2 needs non-empty splits, got {train_split.num_rows} train and "
                         f"{test_split.num_rows} test rows")
    ids = item_table.column("item_id").to_pylist() if item_table is not None else []
    vocab = build_vocab(train_split, test_split, item_ids=ids)
    torch.manual_seed(s.seed)
    pretrained, missing = (None, 0)
    if init == "ours":
        pretrained, missing = _pretrained_matrix(item_table, embedding_column, vocab)
    net = _build_model(model, ItemTable(len(vocab), s.dim, pretrained), s)
    train_x, train_y = (torch.from_numpy(a) for a in encode_split(train_split, vocab, s.max_len))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=s.lr, weight_decay=s.weight_decay)
    gen = torch.Generator().manual_seed(s.seed)
    started = time.perf_counter()
    loss_value = float("nan")
    for _ in range(s.epochs):
        net.train()
        order = torch.randperm(len(train_y), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(order), s.batch_size):
            batch = order[start:start + s.batch_size]
            state = net(train_x[batch])  # (b, dim)
            logits = state @ net.items.weight()[1:].T  # (b, N)
            loss = F.cross_entropy(logits, train_y[batch] - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
            count += len(batch)
        loss_value = total / max(count, 1)
    train_seconds = time.perf_counter() - started

    net.eval()
    test_x, test_y = encode_split(test_split, vocab, s.max_len)
    with torch.inference_mode():
        states = net(torch.from_numpy(test_x)).numpy()  # (U, dim)
        table = net.items.weight()[1:].numpy()  # (N, dim)
    targets = test_y - 1
    histories = [row[row != PAD] - 1 for row in test_x]
    freq = train_frequency(train_split)
    buckets = np.array([frequency_bucket(freq.get(t, 0), frequency_edges)
                        for t in test_split.column("target").to_pylist()])
    order = [b for b in dict.fromkeys(frequency_bucket(c, frequency_edges) for c in [0, *frequency_edges])
             if (buckets == b).any()]
    per_seed, per_bucket = [], {b: [] for b in order}
    for seed in seeds:
        negatives = sample_negatives(len(vocab), targets, histories, num_negatives, np.random.default_rng(int(seed)))
        cands = np.concatenate([targets[:, None], negatives], axis=1)  # (U, 1+K)
        scores = np.einsum("ud,ukd->uk", states, table[cands])  # dot product: the models' training score
        ranks = metrics.sampled_ranks(scores[:, 0], scores[:, 1:]).numpy()  # (U,)
        per_seed.append({f"{m}@{k}": v for k in ks
                         for m, v in zip(("hit", "ndcg"), metrics.hit_ndcg_from_ranks(ranks, k), strict=True)})
        for b in order:
            per_bucket[b].append({f"{m}@{k}": v for k in ks for m, v in
                                  zip(("hit", "ndcg"), metrics.hit_ndcg_from_ranks(ranks[buckets == b], k), strict=True)})
    keys = per_seed[0].keys()
    return {
        "sampled": {k: float(np.mean([m[k] for m in per_seed])) for k in keys},
        "sampled_std": {k: float(np.std([m[k] for m in per_seed])) for k in keys},
        "by_frequency": [{"bucket": b, "users": int((buckets == b).sum()),
                          **{k: float(np.mean([m[k] for m in per_bucket[b]])) for k in keys}} for b in order],
        "model": model,
        "init": init,
        "num_users": int(test_split.num_rows),
        "num_items": len(vocab),
        "items_without_embedding": missing,
        "final_train_loss": loss_value,
        "train_seconds": round(train_seconds, 3),
    }


def run_task2(
    train_split: pa.Table,
    test_split: pa.Table,
    item_table: pa.Table | None,
    *,
    models: Sequence[str] = MODELS,
    inits: Sequence[str] = INITS,
    embedding_column: str = "emb_fused",
    settings: Task2Settings | None = None,
    num_negatives: int = 100,
    seeds: Sequence[int] = (0, 1, 2),
    ks: Sequence[int] = (10, 20),
    frequency_edges: Sequence[int] = FREQUENCY_EDGES,
) -> list[dict[str, Any]]:
    """Every (model, init) combination of :func:`evaluate_task2`; ``init="ours"`` is skipped without items.

    Returns:
        One result dict per combination, in ``models`` x ``inits`` order.
    """
    out = []
    for model in models:
        for init in inits:
            if init == "ours" and item_table is None:
                continue
            out.append(evaluate_task2(train_split, test_split, model=model, init=init, item_table=item_table,  # type: ignore[arg-type]
                                      embedding_column=embedding_column, settings=settings,
                                      num_negatives=num_negatives, seeds=seeds, ks=ks,
                                      frequency_edges=frequency_edges))
    return out
