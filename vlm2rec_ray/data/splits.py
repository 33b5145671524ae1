"""Interactions -> k-core filtering -> chronological sequences -> leave-one-out splits, and Table 3 stats.

The split rule (paper 5.1.3, and ``.agents/CONTRACTS.md``): for a user with chronological items
``s_1..s_n`` (``n >= 3``), *test* has target ``s_n`` with history ``s_1..s_{n-1}``, *valid* has target
``s_{n-1}`` with history ``s_1..s_{n-2}``, and *train* has one row per ``t`` in ``2..n-2`` with history
``s_1..s_{t-1}`` and target ``s_t``. Histories keep the latest ``max_history`` items (10 in the paper).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vlm2rec_ray.data.schemas import SPLIT_SCHEMA

MIN_SEQUENCE = 3  # test + valid + at least one history item


def dedupe_interactions(interactions: pa.Table) -> tuple[pa.Table, int]:
    """Keep each (user, item) pair once, at its earliest timestamp; returns (table, number removed).

    A repeated review of the same item would otherwise let a split's target appear in its own history.
    """
    if interactions.num_rows == 0:
        return interactions, 0
    t = interactions.append_column("_row", pa.array(range(interactions.num_rows), pa.int64()))
    t = t.sort_by([("user_id", "ascending"), ("item_id", "ascending"), ("timestamp", "ascending"), ("_row", "ascending")])
    users, items = t.column("user_id").to_pylist(), t.column("item_id").to_pylist()
    keep = [True] + [users[i] != users[i - 1] or items[i] != items[i - 1] for i in range(1, len(users))]
    kept = t.filter(pa.array(keep)).sort_by("_row").drop_columns(["_row"])
    return kept, interactions.num_rows - kept.num_rows


def kcore_filter(interactions: pa.Table, k: int = 5) -> tuple[pa.Table, dict[str, int]]:
    """Iteratively drop users and items with fewer than ``k`` interactions until none is left.

    Returns:
        The filtered table and counts: ``rounds``, ``removed_interactions``, ``removed_users``,
        ``removed_items``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    t = interactions
    users0 = len(pc.unique(t.column("user_id"))) if t.num_rows else 0
    items0 = len(pc.unique(t.column("item_id"))) if t.num_rows else 0
    rounds = 0
    while t.num_rows:
        rounds += 1
        before = t.num_rows
        for col in ("item_id", "user_id"):
            counts = t.group_by(col).aggregate([(col, "count")])
            ok = counts.filter(pc.greater_equal(counts.column(f"{col}_count"), k)).column(col)
            t = t.filter(pc.is_in(t.column(col), value_set=ok.combine_chunks()))
        if t.num_rows == before:
            break
    users = len(pc.unique(t.column("user_id"))) if t.num_rows else 0
    items = len(pc.unique(t.column("item_id"))) if t.num_rows else 0
    return t, {
        "rounds": rounds,
        "removed_interactions": interactions.num_rows - t.num_rows,
        "removed_users": users0 - users,
        "removed_items": items0 - items,
    }


def build_sequences(interactions: pa.Table) -> dict[str, list[str]]:
    """Per user, item ids in chronological order (ties keep the input order: a stable sort)."""
    t = interactions.append_column("_row", pa.array(range(interactions.num_rows), pa.int64()))
    t = t.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), ("_row", "ascending")])
    seqs: dict[str, list[str]] = {}
    for user, item in zip(t.column("user_id").to_pylist(), t.column("item_id").to_pylist(), strict=True):
        seqs.setdefault(user, []).append(item)
    return seqs


def leave_one_out(sequences: dict[str, list[str]], max_history: int = 10) -> tuple[dict[str, pa.Table], dict[str, int]]:
    """Leave-one-out splits (see module docstring). Users with fewer than 3 items cannot give a test,
    a valid and a history item: they are counted in ``skipped_users``, not silently lost.

    Returns:
        ``({"train","valid","test"}: tables with SPLIT_SCHEMA), {"skipped_users": int}``.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    rows: dict[str, dict[str, list[Any]]] = {s: {"user_id": [], "history": [], "target": []} for s in ("train", "valid", "test")}

    def add(split: str, user: str, history: list[str], target: str) -> None:
        rows[split]["user_id"].append(user)
        rows[split]["history"].append(history[-max_history:])
        rows[split]["target"].append(target)

    skipped = 0
    for user in sorted(sequences):
        seq = sequences[user]
        n = len(seq)
        if n < MIN_SEQUENCE:
            skipped += 1
            continue
        for t in range(2, n - 1):  # 1-indexed t = 2..n-2 -> target seq[t-1], history seq[:t-1]
            add("train", user, seq[: t - 1], seq[t - 1])
        add("valid", user, seq[: n - 2], seq[n - 2])
        add("test", user, seq[: n - 1], seq[n - 1])
    tables = {s: pa.Table.from_pydict(cols, schema=SPLIT_SCHEMA) for s, cols in rows.items()}
    return tables, {"skipped_users": skipped}


def compute_stats(interactions: pa.Table) -> dict[str, Any]:
    """The paper's Table 3 row: #users, #items, #interactions, average sequence length, sparsity
    (``1 - interactions / (users * items)``, a fraction)."""
    n = interactions.num_rows
    users = len(pc.unique(interactions.column("user_id"))) if n else 0
    items = len(pc.unique(interactions.column("item_id"))) if n else 0
    return {
        "users": users,
        "items": items,
        "interactions": n,
        "avg_length": round(n / users, 4) if users else 0.0,
        "sparsity": round(1.0 - n / (users * items), 6) if users and items else 0.0,
    }


def format_table3(stats: dict[str, Any], name: str = "dataset") -> str:
    """Stats formatted like the paper's Table 3 (header + one row)."""
    header = f"{'Dataset':<20} {'#Users':>9} {'#Items':>9} {'#Inter.':>11} {'Avg.Len':>8} {'Sparsity':>9}"
    row = (
        f"{name:<20} {stats['users']:>9,} {stats['items']:>9,} {stats['interactions']:>11,} "
        f"{stats['avg_length']:>8.2f} {100 * stats['sparsity']:>8.2f}%"
    )
    return f"{header}\n{row}"
