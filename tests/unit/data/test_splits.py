"""k-core filtering, chronological sequences, leave-one-out splits and Table 3 stats."""

from __future__ import annotations

import pyarrow as pa

from vlm2rec_ray.data.splits import (
    build_sequences,
    compute_stats,
    dedupe_interactions,
    format_table3,
    kcore_filter,
    leave_one_out,
)


def _inter(rows: list[tuple[str, str, int]]) -> pa.Table:
    u, i, t = zip(*rows, strict=True)
    return pa.table({"user_id": list(u), "item_id": list(i), "timestamp": pa.array(t, pa.int64())})


def test_leave_one_out_matches_the_contract() -> None:
    seq = [f"i{k}" for k in range(1, 15)]  # n = 14
    splits, info = leave_one_out({"u": seq, "short": ["a", "b"]}, max_history=10)
    assert info == {"skipped_users": 1}
    test, valid, train = (splits[s].to_pylist() for s in ("test", "valid", "train"))
    assert test == [{"user_id": "u", "history": seq[3:13], "target": "i14"}]  # last 10 of s_1..s_13
    assert valid == [{"user_id": "u", "history": seq[2:12], "target": "i13"}]
    # one row per t = 2..n-2: targets s_2..s_12, history s_1..s_{t-1} (last 10)
    assert [r["target"] for r in train] == seq[1:12]
    assert train[0]["history"] == ["i1"]
    assert train[-1]["history"] == seq[1:11]
    assert all(len(r["history"]) <= 10 for r in train)


def test_minimum_user_gives_valid_and_test_only() -> None:
    splits, _ = leave_one_out({"u": ["a", "b", "c"]})
    assert splits["train"].num_rows == 0
    assert splits["valid"].to_pylist() == [{"user_id": "u", "history": ["a"], "target": "b"}]
    assert splits["test"].to_pylist() == [{"user_id": "u", "history": ["a", "b"], "target": "c"}]


def test_sequences_are_chronological_with_stable_ties() -> None:
    t = _inter([("u", "c", 30), ("u", "a", 10), ("u", "b", 20), ("u", "x", 20), ("v", "z", 5)])
    assert build_sequences(t) == {"u": ["a", "b", "x", "c"], "v": ["z"]}


def test_kcore_is_iterative() -> None:
    # Users u0..u4 each rate items a..e (a 5-core); user w rates a..d and f: f has 1 rating, so it goes,
    # leaving w with 4 ratings, so w goes too (second round).
    rows = [(f"u{k}", it, k) for k in range(5) for it in "abcde"]
    rows += [("w", it, 9) for it in "abcdf"]
    out, info = kcore_filter(_inter(rows), k=5)
    assert set(out.column("user_id").to_pylist()) == {f"u{k}" for k in range(5)}
    assert set(out.column("item_id").to_pylist()) == set("abcde")
    assert info["removed_users"] == 1 and info["removed_items"] == 1 and info["removed_interactions"] == 5
    assert info["rounds"] >= 2
    for col in ("user_id", "item_id"):
        counts = out.group_by(col).aggregate([(col, "count")]).column(f"{col}_count").to_pylist()
        assert min(counts) >= 5


def test_dedupe_keeps_earliest() -> None:
    t = _inter([("u", "a", 5), ("u", "a", 1), ("u", "b", 3)])
    out, removed = dedupe_interactions(t)
    assert removed == 1
    assert sorted(zip(out.column("item_id").to_pylist(), out.column("timestamp").to_pylist(), strict=True)) == [
        ("a", 1), ("b", 3)]


def test_stats_and_table3_row() -> None:
    stats = compute_stats(_inter([("u", "a", 1), ("u", "b", 2), ("v", "a", 3)]))
    assert stats == {"users": 2, "items": 2, "interactions": 3, "avg_length": 1.5, "sparsity": 0.25}
    text = format_table3(stats, "toy")
    assert "#Users" in text and "toy" in text and "25.00%" in text
