"""Task 1 (paper 5.1.3): rank a user's held-out item by the similarity of sequence and item embeddings.

Protocol, per test user (leave-one-out: the target is the last item, the history everything before it):

- query = the user's sequence embedding (``emb_fused`` = z_T + z_V by default; ``emb_text`` /
  ``emb_image`` give the modality-dropout queries of :mod:`vlm2rec_ray.eval.diagnostics`);
- candidates = the target plus ``num_negatives`` (100) items drawn uniformly **without replacement from the
  items that are neither the target nor in the user's history** (the usual "items the user has not
  interacted with" rule; history items are never negatives, so re-consumption cannot count against a model);
- score = cosine similarity; Hit@k and NDCG@k (k = 10, 20) of the target, averaged over users, then over
  negative-sampling seeds (mean and std reported);
- full ranking (optional): the same metrics with every catalog item a candidate, history items masked out.

Nothing is silently dropped: test users without a sequence embedding and targets without an item embedding
(e.g. rows the embed job routed to its errors table) are counted in ``skipped`` and the metrics are over the
rest. All functions take pyarrow tables / numpy arrays, so tests build small synthetic tables directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from vlm2rec_ray.eval import metrics

EMBEDDING_COLUMNS = ("emb_text", "emb_image", "emb_fused")

__all__ = [
    "EMBEDDING_COLUMNS",
    "Task1Inputs",
    "align_task1_inputs",
    "embedding_matrix",
    "evaluate_task1",
    "full_ranking_metrics",
    "l2_normalize",
    "sample_negatives",
    "sampled_scores",
]


def embedding_matrix(table: pa.Table, column: str) -> np.ndarray:
    """A list / fixed_size_list embedding column as a dense float32 matrix.

    Args:
        table: a table with the column (item or sequence embeddings).
        column: e.g. ``"emb_fused"``.

    Returns:
        ``[N, d]`` float32.

    Raises:
        ValueError: the column is missing, holds nulls, rows of different lengths, or non-finite values.
    """
    if column not in table.column_names:
        raise ValueError(f"embedding column {column!r} is missing; the table has {table.column_names} "
                         f"(expected one of {list(EMBEDDING_COLUMNS)})")
    col = table.column(column).combine_chunks() if table.num_rows else table.column(column)
    if table.num_rows == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if col.null_count:
        first = col.is_null().to_pylist().index(True)
        raise ValueError(f"embedding column {column!r} has {col.null_count} null rows (first at row {first}); "
                         "drop failed rows before evaluating (the embed job writes them to its errors table)")
    typ = col.type
    if pa.types.is_fixed_size_list(typ):
        d = typ.list_size
        values = col.flatten().to_numpy(zero_copy_only=False)
        mat = values.astype(np.float32, copy=False).reshape(len(col), d)
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        lengths = np.asarray(col.value_lengths().to_numpy(zero_copy_only=False))
        if len(set(lengths.tolist())) != 1:
            bad = int(np.flatnonzero(lengths != lengths[0])[0])
            raise ValueError(f"embedding column {column!r}: rows have different lengths ({lengths[0]} at row 0, "
                             f"{lengths[bad]} at row {bad}); all embeddings must come from one model")
        mat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), int(lengths[0]))
    else:
        raise ValueError(f"embedding column {column!r} has type {typ}; expected fixed_size_list<float32, d>")
    if not np.isfinite(mat).all():
        row = int(np.flatnonzero(~np.isfinite(mat).all(axis=1))[0])
        raise ValueError(f"embedding column {column!r} has non-finite values (first at row {row})")
    return mat


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero). Shape kept: ``[N, d]``."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)


def sample_negatives(
    num_items: int,
    targets: np.ndarray,
    exclude: Sequence[np.ndarray],
    num_negatives: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Uniform negatives without replacement, never the target nor an excluded (history) item.

    Args:
        num_items: candidate pool size; items are ``0..num_items-1``.
        targets: ``[U]`` int, each user's positive.
        exclude: per user, extra item indices that may not be negatives (the history). Length ``U``.
        num_negatives: negatives per user.
        rng: the random generator (one seed gives one reproducible draw).

    Returns:
        ``[U, num_negatives]`` int64.

    Raises:
        ValueError: a user has fewer than ``num_negatives`` eligible items.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if len(exclude) != len(targets):
        raise ValueError(f"exclude has {len(exclude)} rows for {len(targets)} targets; pass one per user")
    out = np.empty((len(targets), num_negatives), dtype=np.int64)
    for u, (t, ex) in enumerate(zip(targets, exclude, strict=True)):
        banned = np.unique(np.concatenate([np.asarray(ex, dtype=np.int64), [t]]))
        eligible = num_items - len(banned)
        if eligible < num_negatives:
            raise ValueError(f"user row {u}: only {eligible} items are eligible negatives (catalog {num_items}, "
                             f"{len(banned)} target/history items) but num_negatives={num_negatives}; lower "
                             "num_negatives or evaluate on a larger catalog")
        draw = rng.choice(eligible, size=num_negatives, replace=False)
        # Map draws from the compacted range [0, eligible) back to item ids skipping banned ones:
        # item = draw + #{banned b : b - rank(b) <= draw}.
        shifted = banned - np.arange(len(banned))
        out[u] = draw + np.searchsorted(shifted, draw, side="right")
    return out


@dataclass
class Task1Inputs:
    """Test rows aligned with the embedding tables (only users that can be evaluated).

    Attributes:
        item_ids: ``[N]`` item ids, row order of the item table.
        seq_rows: ``[U]`` row index into the sequence table per evaluated test user.
        targets: ``[U]`` item row index of each user's target.
        histories: per user, item row indices of the history (ids without an embedding left out).
        skipped: counts of test users not evaluated, by reason.
    """

    item_ids: list[str]
    seq_rows: np.ndarray
    targets: np.ndarray
    histories: list[np.ndarray]
    skipped: dict[str, int]

    @property
    def num_users(self) -> int:
        return len(self.targets)


def _check_columns(table: pa.Table, what: str, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; it has {table.column_names}")


def align_task1_inputs(seq_table: pa.Table, item_table: pa.Table, test_split: pa.Table) -> Task1Inputs:
    """Match each test row to its sequence embedding (by ``user_id``) and its target's item row.

    When the sequence table holds several rows for a user (e.g. sequences of more than one split), the row
    whose ``history`` equals the test history is used. A sequence row whose history is not the test
    history's tail means the embeddings were made from another split: that is an error, not a skip.

    Raises:
        ValueError: missing columns, duplicate item ids, a history mismatch, or no evaluable user at all.
    """
    _check_columns(item_table, "item embeddings", ("item_id",))
    _check_columns(seq_table, "sequence embeddings", ("user_id",))
    _check_columns(test_split, "test split", ("user_id", "history", "target"))
    item_ids = item_table.column("item_id").to_pylist()
    item_index = {iid: i for i, iid in enumerate(item_ids)}
    if len(item_index) != len(item_ids):
        raise ValueError(f"item embeddings hold {len(item_ids) - len(item_index)} duplicate item_id rows; "
                         "read one snapshot (one dt= partition) only")
    seq_users = seq_table.column("user_id").to_pylist()
    seq_hist = seq_table.column("history").to_pylist() if "history" in seq_table.column_names else None
    by_user: dict[str, list[int]] = {}
    for r, user in enumerate(seq_users):
        by_user.setdefault(user, []).append(r)

    seq_rows, targets, histories = [], [], []
    skipped = {"no_sequence_embedding": 0, "no_target_embedding": 0}
    for user, history, target in zip(test_split.column("user_id").to_pylist(), test_split.column("history").to_pylist(),
                                      test_split.column("target").to_pylist(), strict=True):
        rows = by_user.get(user, [])
        if seq_hist is not None and len(rows) > 1:
            rows = [r for r in rows if seq_hist[r] == history] or rows[:1]
        if not rows:
            skipped["no_sequence_embedding"] += 1
            continue
        row = rows[0]
        if seq_hist is not None:
            got = list(seq_hist[row] or [])
            if (got != history[-len(got):]) if got else bool(history):
                raise ValueError(f"user {user!r}: the sequence embedding's history {got[-3:]}... is not the test "
                                 f"history's tail {history[-3:]}; embed the sequences of the test split "
                                 "(splits/test.parquet) for Task 1")
        if target not in item_index:
            skipped["no_target_embedding"] += 1
            continue
        seq_rows.append(row)
        targets.append(item_index[target])
        histories.append(np.asarray([item_index[h] for h in history if h in item_index], dtype=np.int64))
    if not targets:
        raise ValueError(f"no test user can be evaluated: {skipped['no_sequence_embedding']} have no sequence "
                         f"embedding and {skipped['no_target_embedding']} a target without an item embedding "
                         f"(of {test_split.num_rows}); check that both embedding tables come from this dataset")
    return Task1Inputs(item_ids, np.asarray(seq_rows, dtype=np.int64), np.asarray(targets, dtype=np.int64),
                       histories, skipped)


def sampled_scores(query_emb: np.ndarray, item_emb: np.ndarray, targets: np.ndarray,
                   negatives: np.ndarray, *, max_chunk_bytes: int = 256 << 20) -> np.ndarray:
    """Cosine similarity of each query to its target (column 0) and its negatives.

    Args:
        query_emb: ``[U, d]`` sequence embeddings.
        item_emb: ``[N, d]`` item embeddings.
        targets: ``[U]`` item row of the positive.
        negatives: ``[U, K]`` item rows of the negatives.
        max_chunk_bytes: memory bound for the gathered ``[u, 1+K, d]`` candidate block (users are chunked).

    Returns:
        ``[U, 1 + K]`` float32 scores, the positive first.
    """
    q = l2_normalize(query_emb.astype(np.float32, copy=False))
    items = l2_normalize(item_emb.astype(np.float32, copy=False))
    cands = np.concatenate([targets[:, None], negatives], axis=1)  # (U, 1+K)
    out = np.empty(cands.shape, dtype=np.float32)
    step = max(1, max_chunk_bytes // max(1, cands.shape[1] * items.shape[1] * 4))
    for start in range(0, len(q), step):
        stop = start + step
        out[start:stop] = np.einsum("ud,ukd->uk", q[start:stop], items[cands[start:stop]])  # (u, 1+K)
    return out


def _mean_std(per_seed: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = per_seed[0].keys()
    mean = {k: float(np.mean([m[k] for m in per_seed])) for k in keys}
    std = {k: float(np.std([m[k] for m in per_seed])) for k in keys}
    return mean, std


def evaluate_task1(
    seq_table: pa.Table,
    item_table: pa.Table,
    test_split: pa.Table,
    *,
    query_column: str = "emb_fused",
    item_column: str = "emb_fused",
    num_negatives: int = 100,
    seeds: Sequence[int] = (0, 1, 2),
    ks: Sequence[int] = (10, 20),
    full_ranking: bool = True,
    inputs: Task1Inputs | None = None,
) -> dict[str, Any]:
    """Task 1: Hit@k / NDCG@k of the target among sampled negatives (and optionally the full catalog).

    Args:
        seq_table: sequence embeddings (``user_id``, ``history``, ``emb_*``), one row per test user.
        item_table: item embeddings (``item_id``, ``emb_*``).
        test_split: ``splits/test.parquet`` (``user_id``, ``history``, ``target``).
        query_column: sequence embedding used as the query (``emb_fused``, ``emb_text`` or ``emb_image``).
        item_column: item embedding ranked against (``emb_fused`` for Task 1 and modality dropout).
        num_negatives: sampled negatives per user (paper: 100).
        seeds: negative-sampling seeds; metrics are averaged over them.
        ks: cut-offs.
        full_ranking: also rank against every item (history masked).
        inputs: a precomputed :func:`align_task1_inputs` result (saves re-aligning for several queries).

    Returns:
        ``{"sampled": {"hit@10": .., "ndcg@10": .., ...}, "sampled_std": {...}, "full": {...} (if asked),
        "num_users": U, "skipped": {...}, "num_negatives": K, "seeds": [...], "query": .., "items": ..}``.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if not seeds:
        raise ValueError("seeds is empty; pass at least one negative-sampling seed, e.g. seeds=(0,)")
    ks = tuple(int(k) for k in ks)
    inp = inputs if inputs is not None else align_task1_inputs(seq_table, item_table, test_split)
    query_emb = embedding_matrix(seq_table, query_column)[inp.seq_rows]  # (U, d)
    item_emb = embedding_matrix(item_table, item_column)  # (N, d)
    if query_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(f"{query_column} has dim {query_emb.shape[1]} but items' {item_column} has "
                         f"{item_emb.shape[1]}; both must come from the same model")
    per_seed = []
    for seed in seeds:
        rng = np.random.default_rng(int(seed))
        negatives = sample_negatives(len(inp.item_ids), inp.targets, inp.histories, num_negatives, rng)
        scores = sampled_scores(query_emb, item_emb, inp.targets, negatives)
        per_seed.append(metrics.hit_ndcg_at_ks(scores[:, 0], scores[:, 1:], ks))
    mean, std = _mean_std(per_seed)
    result: dict[str, Any] = {
        "sampled": mean,
        "sampled_std": std,
        "num_users": inp.num_users,
        "skipped": dict(inp.skipped),
        "num_negatives": num_negatives,
        "seeds": [int(s) for s in seeds],
        "query": query_column,
        "items": item_column,
    }
    if full_ranking:
        result["full"] = full_ranking_metrics(query_emb, item_emb, inp.targets, inp.histories, ks)
    return result


def full_ranking_metrics(query_emb: np.ndarray, item_emb: np.ndarray, targets: np.ndarray,
                         histories: Sequence[np.ndarray], ks: Sequence[int], *,
                         chunk_size: int = 1024) -> dict[str, float]:
    """Hit@k / NDCG@k with every item a candidate; history items are masked (never ranked above the target).

    Args:
        query_emb: ``[U, d]``; item_emb: ``[N, d]``; targets: ``[U]``; histories: per user item rows.

    Returns:
        ``{"hit@k": .., "ndcg@k": ..}`` averaged over users.
    """
    q = l2_normalize(query_emb.astype(np.float32, copy=False))
    items = l2_normalize(item_emb.astype(np.float32, copy=False))
    ranks = []
    for start in range(0, len(q), chunk_size):
        stop = min(start + chunk_size, len(q))
        scores = q[start:stop] @ items.T  # (u, N)
        mask = np.zeros_like(scores, dtype=bool)
        for r, hist in enumerate(histories[start:stop]):
            mask[r, hist] = True  # the target itself always competes, even if it is in the history
        ranks.append(metrics.full_ranking_ranks(scores, targets[start:stop], exclude_mask=mask))
    all_ranks = torch.cat(ranks)  # (U,)
    out: dict[str, float] = {}
    for k in ks:
        out[f"hit@{k}"], out[f"ndcg@{k}"] = metrics.hit_ndcg_from_ranks(all_ranks, int(k))
    return out
