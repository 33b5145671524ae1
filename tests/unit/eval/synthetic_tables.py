"""Small synthetic embedding tables and splits for the eval tests (no model, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlm2rec_ray.data.schemas import SPLIT_SCHEMA


def fsl(mat: np.ndarray) -> pa.FixedSizeListArray:
    """``[N, d]`` -> fixed_size_list<float32, d>."""
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(mat, np.float32).reshape(-1)), mat.shape[1])


def item_table(ids: list[str], e_t: np.ndarray, e_v: np.ndarray) -> pa.Table:
    return pa.table({"item_id": ids, "emb_text": fsl(e_t), "emb_image": fsl(e_v), "emb_fused": fsl(e_t + e_v)})


def seq_table(users: list[str], histories: list[list[str]], z_t: np.ndarray, z_v: np.ndarray) -> pa.Table:
    return pa.table({"user_id": users, "history": pa.array(histories, pa.list_(pa.string())),
                     "emb_text": fsl(z_t), "emb_image": fsl(z_v), "emb_fused": fsl(z_t + z_v)})


def split(users: list[str], histories: list[list[str]], targets: list[str]) -> pa.Table:
    return pa.Table.from_pydict({"user_id": users, "history": histories, "target": targets}, schema=SPLIT_SCHEMA)


def world(num_users: int = 60, num_items: int = 150, d: int = 16, *, text_signal: float = 1.0,
          image_signal: float = 1.0, seed: int = 0) -> dict[str, pa.Table]:
    """A catalog and users whose embeddings point at their targets with tunable per-modality strength.

    z_m = signal_m * e_m[target] + noise, so ``text_signal=1, image_signal=0`` is a run whose image path
    carries nothing (a collapsed model).
    """
    rng = np.random.default_rng(seed)
    ids = [f"i{j:03d}" for j in range(num_items)]
    e_t, e_v = rng.normal(size=(num_items, d)), rng.normal(size=(num_items, d))
    users, hists, targets, tidx = [], [], [], []
    for u in range(num_users):
        seq = rng.choice(num_items, size=6, replace=False)
        users.append(f"u{u:03d}")
        hists.append([ids[j] for j in seq[:-1]])
        targets.append(ids[seq[-1]])
        tidx.append(seq[-1])
    tidx_a = np.asarray(tidx)
    z_t = text_signal * e_t[tidx_a] + rng.normal(size=(num_users, d))
    z_v = image_signal * e_v[tidx_a] + rng.normal(size=(num_users, d))
    return {"items": item_table(ids, e_t, e_v), "seqs": seq_table(users, hists, z_t, z_v),
            "test": split(users, hists, targets)}


def write_dataset(root: Path, test: pa.Table, train: pa.Table | None = None) -> Path:
    """``<root>/splits/{train,valid,test}.parquet`` (train defaults to each test row minus its last step)."""
    (root / "splits").mkdir(parents=True, exist_ok=True)
    if train is None:
        rows = [(u, h[:-1], h[-1]) for u, h in zip(test.column("user_id").to_pylist(),
                                                   test.column("history").to_pylist(), strict=True) if len(h) > 1]
        train = split(*map(list, zip(*rows, strict=True)))
    pq.write_table(train, root / "splits" / "train.parquet")
    pq.write_table(test, root / "splits" / "valid.parquet")
    pq.write_table(test, root / "splits" / "test.parquet")
    return root
