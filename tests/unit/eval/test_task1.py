"""Task 1 (sampled + full ranking), negative sampling, and the modality dropout / geometry diagnostics."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tests.unit.eval.synthetic_tables import fsl, item_table, seq_table, split, world
from vlm2rec_ray.eval.diagnostics import geometry_table, modality_dropout
from vlm2rec_ray.eval.task1 import (
    align_task1_inputs,
    embedding_matrix,
    evaluate_task1,
    sample_negatives,
)


def test_embedding_matrix_reads_fixed_and_variable_lists() -> None:
    mat = np.arange(6, dtype=np.float32).reshape(3, 2)
    t = pa.table({"emb_fused": fsl(mat), "emb_text": pa.array(mat.tolist(), pa.list_(pa.float32()))})
    np.testing.assert_array_equal(embedding_matrix(t, "emb_fused"), mat)
    np.testing.assert_array_equal(embedding_matrix(t, "emb_text"), mat)
    with pytest.raises(ValueError, match=r"'emb_image' is missing"):
        embedding_matrix(t, "emb_image")
    ragged = pa.table({"emb_fused": pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32()))})
    with pytest.raises(ValueError, match=r"different lengths \(2 at row 0, 1 at row 1\)"):
        embedding_matrix(ragged, "emb_fused")
    nulls = pa.table({"emb_fused": pa.array([[1.0, 2.0], None], pa.list_(pa.float32()))})
    with pytest.raises(ValueError, match=r"1 null rows \(first at row 1\)"):
        embedding_matrix(nulls, "emb_fused")


def test_negatives_exclude_target_and_history_without_replacement() -> None:
    rng = np.random.default_rng(0)
    targets = np.array([3, 0, 19])
    exclude = [np.array([1, 2, 5]), np.array([], dtype=np.int64), np.array([18, 17, 3])]
    neg = sample_negatives(20, targets, exclude, 15, rng)
    assert neg.shape == (3, 15)
    for row, t, ex in zip(neg, targets, exclude, strict=True):
        assert len(set(row.tolist())) == 15  # without replacement
        assert t not in row and not set(ex.tolist()) & set(row.tolist())
        assert row.min() >= 0 and row.max() < 20
    # The whole eligible pool is reachable (the index mapping skips banned items, not their neighbours).
    many = sample_negatives(20, np.array([3] * 200), [np.array([1, 2, 5])] * 200, 3, np.random.default_rng(1))
    assert set(np.unique(many).tolist()) == set(range(20)) - {1, 2, 3, 5}
    # Same seed, same draw.
    again = sample_negatives(20, targets, exclude, 15, np.random.default_rng(0))
    np.testing.assert_array_equal(neg, again)
    with pytest.raises(ValueError, match=r"only 16 items are eligible negatives .* num_negatives=17"):
        sample_negatives(20, targets, exclude, 17, np.random.default_rng(0))


def test_perfect_and_random_queries() -> None:
    """A query equal to its target's embedding ranks it first (Hit = NDCG = 1); a random query scores about
    chance: Hit@10 ~ 10/101 with 100 negatives."""
    w = world(num_users=300, num_items=400, image_signal=0.0, text_signal=0.0)
    items, test = w["items"], w["test"]
    e = embedding_matrix(items, "emb_fused")
    index = {iid: i for i, iid in enumerate(items.column("item_id").to_pylist())}
    targets = [index[t] for t in test.column("target").to_pylist()]
    perfect = seq_table(test.column("user_id").to_pylist(), test.column("history").to_pylist(),
                        e[targets], np.zeros_like(e[targets]))
    res = evaluate_task1(perfect, items, test)
    assert res["sampled"] == {"hit@10": 1.0, "ndcg@10": 1.0, "hit@20": 1.0, "ndcg@20": 1.0}
    assert res["full"]["ndcg@10"] == pytest.approx(1.0)
    assert res["num_users"] == 300 and res["seeds"] == [0, 1, 2]
    rand = evaluate_task1(w["seqs"], items, test, full_ranking=False)
    assert 0.04 < rand["sampled"]["hit@10"] < 0.17
    assert "full" not in rand


def test_history_items_are_masked_in_both_protocols() -> None:
    """Items 1, 2 (the history) are more similar to the query than the target 3: neither sampled (they
    are never negatives) nor full ranking (masked) lets them outrank it, so the target is rank 0. Item 0
    is less similar than the target."""
    ids = ["a", "b", "c", "t"]
    e = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.01], [1.0, 0.3]])
    items = item_table(ids, e, np.zeros_like(e))
    test = split(["u"], [["b", "c"]], ["t"])
    seqs = seq_table(["u"], [["b", "c"]], np.array([[1.0, 0.0]]), np.zeros((1, 2)))
    res = evaluate_task1(seqs, items, test, num_negatives=1, seeds=(0,), ks=(1,))
    assert res["sampled"]["hit@1"] == 1.0 and res["full"]["hit@1"] == 1.0
    # Without the history the same query ranks the target third of four: full NDCG@3 = 1/log2(4) = 0.5.
    test2 = split(["u"], [[]], ["t"])
    seqs2 = seq_table(["u"], [[]], np.array([[1.0, 0.0]]), np.zeros((1, 2)))
    full = evaluate_task1(seqs2, items, test2, num_negatives=1, seeds=(0,), ks=(3,))["full"]
    assert full["hit@3"] == 1.0 and full["ndcg@3"] == pytest.approx(0.5)


def test_missing_rows_are_counted_not_dropped_silently() -> None:
    w = world(num_users=10, num_items=200)
    seqs = w["seqs"].slice(0, 8)  # two users without a sequence embedding
    test = w["test"]
    targets = set(test.column("target").to_pylist()[:8])
    lost = test.column("target").to_pylist()[0]
    keep = [i for i, iid in enumerate(w["items"].column("item_id").to_pylist()) if iid != lost]
    items = w["items"].take(keep)
    res = evaluate_task1(seqs, items, test, seeds=(0,))
    assert res["skipped"] == {"no_sequence_embedding": 2, "no_target_embedding": 1}
    assert res["num_users"] == 7 and lost in targets


def test_alignment_errors_name_the_problem() -> None:
    w = world(num_users=4, num_items=120)
    other_hist = seq_table(["u000"], [["i999"]], np.zeros((1, 16)), np.zeros((1, 16)))
    with pytest.raises(ValueError, match=r"not the test history's tail"):
        align_task1_inputs(other_hist, w["items"], w["test"])
    with pytest.raises(ValueError, match=r"no test user can be evaluated"):
        align_task1_inputs(w["seqs"], w["items"].slice(0, 0), w["test"])
    dup = pa.concat_tables([w["items"], w["items"].slice(0, 1)])
    with pytest.raises(ValueError, match=r"1 duplicate item_id"):
        align_task1_inputs(w["seqs"], dup, w["test"])
    small = pa.table({"item_id": w["items"].column("item_id"),
                      "emb_fused": fsl(np.zeros((w["items"].num_rows, 3)))})
    with pytest.raises(ValueError, match=r"dim 16 but items' emb_fused has 3"):
        evaluate_task1(w["seqs"], small, w["test"])
    with pytest.raises(ValueError, match=r"seeds is empty"):
        evaluate_task1(w["seqs"], w["items"], w["test"], seeds=())


def test_sequence_rows_are_matched_by_history_when_a_user_repeats() -> None:
    """Sequence embeddings of two splits for one user: the test-history row is used."""
    e = np.eye(4)
    items = item_table(["a", "b", "c", "t"], e, np.zeros_like(e))
    test = split(["u"], [["a", "b"]], ["t"])
    seqs = seq_table(["u", "u"], [["a"], ["a", "b"]], np.array([e[0], e[3]]), np.zeros((2, 4)))
    inp = align_task1_inputs(seqs, items, test)
    assert inp.seq_rows.tolist() == [1]


def test_modality_dropout_exposes_a_collapsed_image_path() -> None:
    """Text carries the signal, image none: f2f and t2f are high, v2f is at chance."""
    w = world(num_users=200, num_items=300, text_signal=3.0, image_signal=0.0)
    drop = modality_dropout(w["seqs"], w["items"], w["test"], seeds=(0, 1))
    assert set(drop) == {"f2f", "t2f", "v2f"}
    assert drop["t2f"]["hit@10"] > 0.8 and drop["f2f"]["hit@10"] > 0.5
    assert drop["v2f"]["hit@10"] < 0.2
    balanced = modality_dropout(*(world(num_users=200, num_items=300, text_signal=3.0, image_signal=3.0)[k]
                                  for k in ("seqs", "items", "test")), seeds=(0,))
    assert balanced["v2f"]["hit@10"] > 0.8


def test_geometry_per_modality() -> None:
    """Text queries equal to their targets' text embedding: A_pos(text) = 0 (eq. 4, squared distance). The
    image side is unrelated to the targets, so its separability S (eq. 5) is near 1 while text's is huge."""
    w = world(num_users=50, num_items=200, text_signal=1.0, image_signal=0.0)
    e_t = embedding_matrix(w["items"], "emb_text")
    index = {iid: i for i, iid in enumerate(w["items"].column("item_id").to_pylist())}
    t = [index[x] for x in w["test"].column("target").to_pylist()]
    z_v = embedding_matrix(w["seqs"], "emb_image")
    seqs = seq_table(w["test"].column("user_id").to_pylist(), w["test"].column("history").to_pylist(), e_t[t], z_v)
    geo = geometry_table(seqs, w["items"], w["test"])
    assert set(geo) == {"text", "image", "fused", "num_users", "num_items"}
    assert geo["text"]["A_pos"] == pytest.approx(0.0, abs=1e-9)
    assert geo["text"]["S"] == pytest.approx(geo["text"]["A_neg"] / (geo["text"]["A_pos"] + 1e-8))
    assert geo["text"]["S"] > 1e6 and abs(geo["image"]["S"] - 1.0) < 0.15
    assert geo["text"]["U"] < 0 and geo["num_users"] == 50 and geo["num_items"] == 200
    sub = geometry_table(seqs, w["items"], w["test"], max_users=10, max_items=40)
    assert sub["num_users"] == 10 and sub["num_items"] == 40
    assert sub["text"]["A_pos"] == pytest.approx(0.0, abs=1e-9)
