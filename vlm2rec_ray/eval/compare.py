"""Tables over one or more evaluation results (``eval.json``), as text for the terminal and rows for HTML.

``vlm2rec evaluate --compare out1 out2 ...`` loads ``<out>/eval.json`` of each run and prints
:func:`summary_table` (one row per run: Task 1, the modality-dropout gap, geometry separation, Task 2);
``--details`` adds every table of :func:`tables` (Task 1 sampled + full ranking, modality dropout,
geometry in the paper's Table 1 layout, Task 2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from vlm2rec_ray import storage

RESULT_FILE = "eval.json"
Table = tuple[list[str], list[list[str]]]

TABLE_NOTES = {
    "task1": "Task 1: the target ranked by cosine(sequence, item) among sampled negatives (paper: 100) drawn uniformly from items "
             "outside the user's history (mean ± std over seeds); 'full' ranks against the whole catalog.",
    "dropout": "Modality dropout (paper Fig. 1a): f2f = fused query, t2f = text-only query, v2f = image-only "
               "query, always against fused items. A large f2f-v2f gap with f2f ≈ t2f means the image path "
               "collapsed.",
    "geometry": "Geometry (paper Table 1, eqs. 4-5), per modality on L2-normalised embeddings, in squared distances: "
                "A_pos = mean ||z - e_target||^2 (lower = tighter), A_neg = mean ||z - e_neg||^2 over non-interacted "
                "items (higher = pushed away), S = A_neg / (A_pos + eps) (separability: S > 1 separates), "
                "U = log mean exp(-2||z_s - e_i||^2) over (sequence, item) pairs (lower = more uniform).",
    "task2": "Task 2: SASRec / GRU4Rec (d=128) with randomly initialised ID embeddings ('id') or our frozen item "
             "embeddings through a trainable linear adapter ('ours'); same sampled-negative protocol as Task 1.",
    "cold_start": "Cold start (paper Fig. 3): Task 2 NDCG at the first cut-off by the target item's training "
                  "frequency (its occurrences in the train split's histories and targets); users per bucket in the "
                  "header. Bucket 0 = items training never showed: only content (our embeddings) can rank them.",
}

__all__ = ["RESULT_FILE", "TABLE_NOTES", "compare_runs", "format_table", "load_result", "summary_table", "tables"]


def load_result(run_uri: str, *, endpoint: str | None = None) -> dict[str, Any]:
    """Read ``eval.json`` from an evaluate output dir/prefix (or the file itself).

    Raises:
        FileNotFoundError: no ``eval.json`` there (the message says which command writes it).
    """
    uri = run_uri if run_uri.endswith(".json") else storage.join(run_uri, RESULT_FILE)
    try:
        text = storage.read_text(uri, endpoint=endpoint)
    except (storage.StorageError, FileNotFoundError, IsADirectoryError) as e:
        raise FileNotFoundError(f"no evaluation result at {uri}; run `vlm2rec evaluate` with output_uri={run_uri} "
                                "first") from e
    result = json.loads(text)
    result.setdefault("name", run_uri.rstrip("/").rsplit("/", 1)[-1])
    return result


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "nan" if math.isnan(v) else f"{v:.{digits}f}"


def _ks(results: Sequence[dict[str, Any]]) -> list[int]:
    for r in results:
        ks = r.get("config", {}).get("ks") or [int(k.split("@")[1]) for k in r.get("task1", {}).get("sampled", {})
                                                if k.startswith("hit@")]
        if ks:
            return list(ks)
    return [10, 20]


def _task1(results: Sequence[dict[str, Any]]) -> Table | None:
    if not any(r.get("task1") for r in results):
        return None
    ks = _ks(results)
    metrics = [f"{m}@{k}" for k in ks for m in ("hit", "ndcg")]
    full = any(r.get("task1", {}).get("full") for r in results)
    header = ["run", *[m.replace("hit", "Hit").replace("ndcg", "NDCG") for m in metrics]]
    if full:
        header += [f"full {m.replace('hit', 'Hit').replace('ndcg', 'NDCG')}" for m in metrics]
    rows = []
    for r in results:
        t1 = r.get("task1") or {}
        s, sd, f = t1.get("sampled", {}), t1.get("sampled_std", {}), t1.get("full") or {}
        row = [r["name"]] + [f"{_fmt(s.get(m))}±{_fmt(sd.get(m))}" if m in sd else _fmt(s.get(m)) for m in metrics]
        if full:
            row += [_fmt(f.get(m)) for m in metrics]
        rows.append(row)
    return header, rows


def _dropout(results: Sequence[dict[str, Any]]) -> Table | None:
    if not any(r.get("dropout") for r in results):
        return None
    ks = _ks(results)
    cols = [(q, f"{m}@{k}") for k in ks for m in ("hit", "ndcg") for q in ("f2f", "t2f", "v2f")]
    header = ["run", *[f"{q} {m.replace('hit', 'Hit').replace('ndcg', 'NDCG')}" for q, m in cols]]
    rows = [[r["name"], *[_fmt((r.get("dropout") or {}).get(q, {}).get(m)) for q, m in cols]] for r in results]
    return header, rows


def _geometry(results: Sequence[dict[str, Any]]) -> Table | None:
    if not any(r.get("geometry") for r in results):
        return None
    cols = [(mod, key) for mod in ("text", "image", "fused") for key in ("A_pos", "A_neg", "U", "S")]
    header = ["run", *[f"{mod} {key}" for mod, key in cols]]
    rows = [[r["name"], *[_fmt((r.get("geometry") or {}).get(mod, {}).get(key)) for mod, key in cols]]
            for r in results]
    return header, rows


def _task2(results: Sequence[dict[str, Any]]) -> Table | None:
    if not any(r.get("task2") for r in results):
        return None
    ks = _ks(results)
    metrics = [f"{m}@{k}" for k in ks for m in ("hit", "ndcg")]
    header = ["run", "model", "init", *[m.replace("hit", "Hit").replace("ndcg", "NDCG") for m in metrics], "train s"]
    rows = []
    for r in results:
        for t in r.get("task2") or []:
            rows.append([r["name"], t.get("model", "?"), t.get("init", "?"),
                         *[_fmt(t.get("sampled", {}).get(m)) for m in metrics], _fmt(t.get("train_seconds"), 1)])
    return header, rows


def frequency_buckets(results: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
    """``(bucket, users)`` of Task 2's training-frequency buckets in the results, in order (first run's counts)."""
    seen: dict[str, int] = {}
    for r in results:
        for t in r.get("task2") or []:
            for b in t.get("by_frequency") or []:
                seen.setdefault(b["bucket"], b["users"])
    return list(seen.items())


def _cold_start(results: Sequence[dict[str, Any]]) -> Table | None:
    buckets = frequency_buckets(results)
    if not buckets:
        return None
    k0 = _ks(results)[0]
    header = ["run", "model", "init", *[f"{b} ({n} users)" for b, n in buckets]]
    rows = []
    for r in results:
        for t in r.get("task2") or []:
            got = {b["bucket"]: b.get(f"ndcg@{k0}") for b in t.get("by_frequency") or []}
            rows.append([r["name"], t.get("model", "?"), t.get("init", "?"), *[_fmt(got.get(b)) for b, _ in buckets]])
    return header, rows


def tables(results: Sequence[dict[str, Any]]) -> dict[str, tuple[str, Table | None]]:
    """Every table, keyed ``task1``, ``dropout``, ``geometry``, ``task2``, ``cold_start``: ``(title, (header,
    rows) | None)``."""
    return {
        "task1": ("Task 1: retrieval with sequence and item embeddings", _task1(results)),
        "dropout": ("Modality dropout (f2f, t2f, v2f)", _dropout(results)),
        "geometry": ("Embedding geometry per modality (Table 1 layout)", _geometry(results)),
        "task2": ("Task 2: SASRec / GRU4Rec initialised from our embeddings", _task2(results)),
        "cold_start": ("Cold start: Task 2 by the target's training frequency", _cold_start(results)),
    }


def summary_table(results: Sequence[dict[str, Any]]) -> Table:
    """One row per run: Task 1 at every k, dropout Hit@k0 (t2f, v2f), separation S (text, image), Task 2
    NDCG@k0 with our embeddings (k0 = the first cut-off)."""
    ks = _ks(results)
    k0 = ks[0]
    metrics = [f"{m}@{k}" for k in ks for m in ("hit", "ndcg")]
    task2_cols = sorted({(t.get("model"), t.get("init")) for r in results for t in (r.get("task2") or [])},
                        key=lambda mi: (str(mi[0]), str(mi[1])))
    header = ["run", *[m.replace("hit", "Hit").replace("ndcg", "NDCG") for m in metrics],
              f"t2f Hit@{k0}", f"v2f Hit@{k0}", "S text", "S image",
              *[f"{m} {i} NDCG@{k0}" for m, i in task2_cols]]
    rows = []
    for r in results:
        s = (r.get("task1") or {}).get("sampled", {})
        d = r.get("dropout") or {}
        g = r.get("geometry") or {}
        t2 = {(t.get("model"), t.get("init")): t for t in (r.get("task2") or [])}
        rows.append([
            r["name"], *[_fmt(s.get(m)) for m in metrics],
            _fmt(d.get("t2f", {}).get(f"hit@{k0}")), _fmt(d.get("v2f", {}).get(f"hit@{k0}")),
            _fmt(g.get("text", {}).get("S")), _fmt(g.get("image", {}).get("S")),
            *[_fmt(t2.get(c, {}).get("sampled", {}).get(f"ndcg@{k0}")) for c in task2_cols],
        ])
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table with aligned columns (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *[line(r) for r in rows]])


def compare_runs(results: Sequence[dict[str, Any]], *, details: bool = False) -> str:
    """The summary table, and with ``details`` every table with its title, as text."""
    if not results:
        raise ValueError("nothing to compare: pass at least one evaluation output")
    parts = [format_table(*summary_table(results))]
    if details:
        for title, table in tables(results).values():
            if table is not None and table[1]:
                parts.append(f"\n{title}\n{format_table(*table)}")
    return "\n".join(parts)
