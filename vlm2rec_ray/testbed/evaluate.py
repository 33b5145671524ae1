"""Evaluate an encoder in this process: embed a split the way the embed job does, then score it the way the
evaluate job does (see :mod:`vlm2rec_ray.testbed`).

Item embeddings are the encoder's ``(e_T, e_V)`` of every catalog item, sequence embeddings its ``(z_T,
z_V)`` of every history of the split; ``emb_fused`` is their sum (paper 2.3). They go into tables with the
embed job's columns (``item_id``, ``emb_text``, ``emb_image``, ``emb_fused``; ``user_id``, ``history``), so
:func:`~vlm2rec_ray.eval.task1.evaluate_task1`, :func:`~vlm2rec_ray.eval.diagnostics.modality_dropout` and
:func:`~vlm2rec_ray.eval.diagnostics.geometry_table` run unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

if TYPE_CHECKING:
    from vlm2rec_ray.model.encoder import VLM2RecEncoder
    from vlm2rec_ray.testbed.data import TestbedData

__all__ = ["embed_tables", "evaluate_encoder", "headline"]


def _column(x: np.ndarray) -> pa.Array:
    d = x.shape[1]
    return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1), pa.float32()), d)


@torch.inference_mode()
def embed_tables(encoder: VLM2RecEncoder, data: TestbedData, split: str, *,
                 batch_size: int = 64) -> tuple[pa.Table, pa.Table]:
    """``(item_table, sequence_table)`` of ``split`` with the embed job's columns."""
    was_training = encoder.training
    encoder.eval()
    e_t, e_v = [], []
    for s in range(0, len(data.item_ids), batch_size):
        a, b = encoder.encode_items(data.titles[s:s + batch_size], data.images[s:s + batch_size])
        e_t.append(a.float().cpu().numpy())
        e_v.append(b.float().cpu().numpy())
    rows = data.rows(split)
    z_t, z_v = [], []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        a, b = encoder.encode_sequences([[data.titles[h] for h in hist] for _, hist, _ in chunk],
                                        [[data.images[h] for h in hist] for _, hist, _ in chunk])
        z_t.append(a.float().cpu().numpy())
        z_v.append(b.float().cpu().numpy())
    encoder.train(was_training)
    et, ev, zt, zv = (np.concatenate(x) for x in (e_t, e_v, z_t, z_v))
    items = pa.table({"item_id": data.item_ids, "emb_text": _column(et), "emb_image": _column(ev),
                      "emb_fused": _column(et + ev)})
    seqs = pa.table({"user_id": [u for u, _, _ in rows],
                     "history": [[data.item_ids[h] for h in hist] for _, hist, _ in rows],
                     "emb_text": _column(zt), "emb_image": _column(zv), "emb_fused": _column(zt + zv)})
    return items, seqs


def evaluate_encoder(encoder: VLM2RecEncoder, data: TestbedData, split: str, *, num_negatives: int = 100,
                     seeds: Sequence[int] = (0, 1, 2), ks: Sequence[int] = (10, 20), task2: bool = False
                     ) -> dict[str, Any]:
    """Task 1 (sampled), modality dropout and geometry of ``split`` (``valid`` for tuning, ``test`` to report);
    with ``task2``, also Task 2: a SASRec trained on the train split over the frozen fused item embeddings
    (:func:`vlm2rec_ray.eval.task2.evaluate_task2`, ``init="ours"``; SDA's stage 2), scored on ``split`` with
    the same negatives protocol.

    Returns:
        ``{"task1": {"hit@10": ..}, "dropout": {"f2f"|"t2f"|"v2f": {..}}, "geometry": {"text"|"image"|"fused":
        {"A_pos", "A_neg", "U", "S"}}}`` (+ ``"task2": {"hit@10": ..}``, ``"task2_by_frequency": [{"bucket", "users",
        "hit@10", ..}]`` by the target's training frequency).
    """
    from vlm2rec_ray.eval.diagnostics import geometry_table, modality_dropout
    from vlm2rec_ray.eval.task1 import align_task1_inputs, evaluate_task1

    items, seqs = embed_tables(encoder, data, split)
    target = data.splits[split]
    inputs = align_task1_inputs(seqs, items, target)
    task1 = evaluate_task1(seqs, items, target, num_negatives=num_negatives, seeds=seeds, ks=ks, full_ranking=False,
                           inputs=inputs)
    dropout = modality_dropout(seqs, items, target, num_negatives=num_negatives, seeds=seeds, ks=ks, inputs=inputs)
    geometry = geometry_table(seqs, items, target, inputs=inputs)
    result = {"task1": task1["sampled"], "dropout": dropout, "geometry": geometry}
    if task2:
        from vlm2rec_ray.eval.task2 import evaluate_task2

        t2 = evaluate_task2(data.splits["train"], target, model="sasrec", init="ours", item_table=items,
                            num_negatives=num_negatives, seeds=seeds, ks=ks)
        result["task2"], result["task2_by_frequency"] = t2["sampled"], t2["by_frequency"]
    return result


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The study's columns: fused Hit@10 / NDCG@20, t2f and v2f Hit@10, S and U per space (and Task 2's)."""
    out = {"hit@10": result["task1"]["hit@10"], "ndcg@20": result["task1"]["ndcg@20"],
           "t2f_hit@10": result["dropout"]["t2f"]["hit@10"], "v2f_hit@10": result["dropout"]["v2f"]["hit@10"]}
    for m in ("text", "image", "fused"):
        out[f"S_{m}"] = result["geometry"][m]["S"]
        out[f"U_{m}"] = result["geometry"][m]["U"]
    if "task2" in result:
        out["task2_hit@10"], out["task2_ndcg@20"] = result["task2"]["hit@10"], result["task2"]["ndcg@20"]
    return {k: float(v) for k, v in out.items()}
