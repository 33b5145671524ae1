"""The paper's modality diagnostics (section 3) computed from embedding tables.

- Modality dropout (Fig. 1a): Task 1 with the query restricted to one modality, items always fused:
  ``f2f`` = fused query z_T + z_V, ``t2f`` = text-only query z_T, ``v2f`` = image-only query z_V, each
  against fused items e_T + e_V. A collapsed model keeps f2f close to one of t2f / v2f and loses the other.
- Geometry (Table 1, eqs. 4-5) per modality m in {text, image, fused}: queries z_m against items e_m with
  :func:`vlm2rec_ray.eval.metrics.geometry_metrics` (squared distances on the unit sphere: A_pos to the
  target, A_neg to the negatives, S = A_neg / (A_pos + eps), U = log mean exp(-2 ||z_s - e_i||^2) over
  (sequence, item) pairs; see that module for the exact formulas). A user's negatives are every catalog item
  outside their target and history, so A_neg is the expectation that 100 sampled negatives estimate.

Large runs are subsampled (``max_users`` users, ``max_items`` items, seeded) because the geometry needs a
dense ``[users, users + items]`` similarity matrix; the sizes used are reported with the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from vlm2rec_ray.eval import metrics
from vlm2rec_ray.eval.task1 import Task1Inputs, align_task1_inputs, embedding_matrix, evaluate_task1

DROPOUT_QUERIES = {"f2f": "emb_fused", "t2f": "emb_text", "v2f": "emb_image"}
MODALITY_COLUMNS = {"text": "emb_text", "image": "emb_image", "fused": "emb_fused"}
GEOMETRY_KEYS = ("A_pos", "A_neg", "U", "S")

__all__ = ["DROPOUT_QUERIES", "GEOMETRY_KEYS", "MODALITY_COLUMNS", "geometry_table", "modality_dropout"]


def modality_dropout(
    seq_table: pa.Table,
    item_table: pa.Table,
    test_split: pa.Table,
    *,
    num_negatives: int = 100,
    seeds: Sequence[int] = (0, 1, 2),
    ks: Sequence[int] = (10, 20),
    inputs: Task1Inputs | None = None,
) -> dict[str, dict[str, Any]]:
    """Task 1 metrics for the f2f, t2f and v2f queries (paper Fig. 1a).

    Args:
        seq_table, item_table, test_split: as for :func:`vlm2rec_ray.eval.task1.evaluate_task1`.
        num_negatives, seeds, ks: the sampled protocol (the same negatives for all three queries).
        inputs: a precomputed alignment, to avoid redoing it.

    Returns:
        ``{"f2f": {"hit@10": .., "ndcg@10": .., ...}, "t2f": {...}, "v2f": {...}}`` (means over seeds).
    """
    inp = inputs if inputs is not None else align_task1_inputs(seq_table, item_table, test_split)
    out: dict[str, dict[str, Any]] = {}
    for name, column in DROPOUT_QUERIES.items():
        res = evaluate_task1(seq_table, item_table, test_split, query_column=column, item_column="emb_fused",
                             num_negatives=num_negatives, seeds=seeds, ks=ks, full_ranking=False, inputs=inp)
        out[name] = res["sampled"]
    return out


def geometry_table(
    seq_table: pa.Table,
    item_table: pa.Table,
    test_split: pa.Table,
    *,
    max_users: int = 2000,
    max_items: int = 5000,
    seed: int = 0,
    inputs: Task1Inputs | None = None,
) -> dict[str, Any]:
    """A_pos, A_neg, U, S per modality (paper Table 1).

    Args:
        seq_table, item_table, test_split: as for Task 1.
        max_users: at most this many test users (seeded sample) enter the geometry.
        max_items: at most this many catalog items serve as negatives and for U (seeded sample).
        seed: the subsampling seed.
        inputs: a precomputed alignment.

    Returns:
        ``{"text": {"A_pos", "A_neg", "U", "S"}, "image": {...}, "fused": {...}, "num_users": u,
        "num_items": n}``.
    """
    inp = inputs if inputs is not None else align_task1_inputs(seq_table, item_table, test_split)
    rng = np.random.default_rng(seed)
    users = np.arange(inp.num_users)
    if len(users) > max_users:
        users = np.sort(rng.choice(len(users), size=max_users, replace=False))
    num_items = len(inp.item_ids)
    pool = np.arange(num_items)
    if num_items > max_items:
        pool = np.sort(rng.choice(num_items, size=max_items, replace=False))
    targets = inp.targets[users]  # (u,)
    # Candidates = [each user's target (u columns) | the item pool (p columns)]. Row i's positive is
    # column i; its negatives are pool items other than its target and history.
    neg_pool = np.ones((len(users), len(pool)), dtype=bool)  # (u, p)
    pool_pos = {int(item): j for j, item in enumerate(pool)}
    for r, u in enumerate(users):
        for item in (int(inp.targets[u]), *inp.histories[u].tolist()):
            j = pool_pos.get(item)
            if j is not None:
                neg_pool[r, j] = False
    neg_mask = np.concatenate([np.zeros((len(users), len(users)), dtype=bool), neg_pool], axis=1)  # (u, u+p)
    out: dict[str, Any] = {}
    for modality, column in MODALITY_COLUMNS.items():
        query = embedding_matrix(seq_table, column)[inp.seq_rows[users]]  # (u, d)
        items = embedding_matrix(item_table, column)  # (N, d)
        cands = np.concatenate([items[targets], items[pool]])  # (u+p, d)
        geo = metrics.geometry_metrics(query, cands, neg_mask)
        # U over (sequence, catalog item) pairs: the candidate list repeats the targets, the pool does not.
        geo["U"] = metrics.uniformity(query, items[pool])
        out[modality] = {k: float(geo[k]) for k in GEOMETRY_KEYS}
    out["num_users"] = len(users)
    out["num_items"] = len(pool)
    return out
