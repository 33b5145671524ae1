"""The evaluation report: ``report.html`` plus PNG figures, for one run or several compared side by side.

Figures (matplotlib, Agg backend, no display needed):

- ``dropout.png`` (the paper's Fig. 1a): Hit@10 and NDCG@10 of the f2f, t2f and v2f queries, one group of
  bars per run;
- ``grad_alignment.png`` (Fig. 1b): cos(g_total, g_T) and cos(g_total, g_V) against the training step;
- ``loss.png``: the training losses (total, WPCL / InfoNCE, CRTR) against the step;
- ``penalty.png`` (when logged): the modality margins M^T, M^V and the learnable alpha, beta, so a
  penalty that drifts to its floor is visible.

Tables: Task 1 (sampled and full ranking), modality dropout, geometry (Table 1 layout: one row per run,
A_pos / A_neg / U / S per modality) and Task 2 (from :mod:`vlm2rec_ray.eval.compare`).

Training metrics are read from a JSONL, JSON-list or CSV file of per-step dicts (or a directory holding
``metrics.jsonl`` / ``metrics.csv`` / ``progress.csv``). Key names vary between trainers, so each curve
accepts a few spellings (see :data:`GRAD_ALIGN_KEYS` and :data:`LOSS_KEYS`); missing keys leave that panel
saying "not logged" instead of failing.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm2rec_ray import storage
from vlm2rec_ray.eval import compare

STEP_KEYS = ("step", "global_step", "train/step", "iteration", "training_iteration")
GRAD_ALIGN_KEYS: dict[str, tuple[str, ...]] = {
    "text": ("grad_align/text", "grad_align/cos_total_text", "cos_total_text", "grad_align_text",
             "grad/cos_total_text", "align/cos_total_text"),
    "image": ("grad_align/image", "grad_align/cos_total_image", "cos_total_image", "grad_align_image",
              "grad/cos_total_image", "align/cos_total_image"),
}
LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "total": ("loss/total", "loss", "train/loss", "loss_total"),
    "wpcl": ("loss/wpcl", "loss_wpcl", "train/loss_wpcl", "loss/infonce"),
    "crtr": ("loss/crtr", "loss_crtr", "train/loss_crtr"),
}
PENALTY_KEYS: dict[str, tuple[str, ...]] = {
    "beta": ("beta", "penalty/beta", "wpcl/beta"),
    "alpha": ("alpha", "penalty/alpha", "wpcl/alpha"),
}
MARGIN_KEYS = {"text": ("margin_text", "margin/text"), "image": ("margin_image", "margin/image")}
METRICS_FILES = ("metrics.jsonl", "metrics.csv", "metrics.json", "progress.csv", "train_metrics.jsonl")
_DROPOUT_COLOURS = {"f2f": "#4c72b0", "t2f": "#dd8452", "v2f": "#55a868"}

__all__ = [
    "GRAD_ALIGN_KEYS",
    "LOSS_KEYS",
    "load_training_metrics",
    "plot_dropout",
    "plot_grad_alignment",
    "plot_losses",
    "plot_penalty",
    "series",
    "write_report",
]


def _parse_rows(text: str, uri: str) -> list[dict[str, Any]]:
    stripped = text.lstrip()
    if uri.endswith(".csv"):
        rows: list[dict[str, Any]] = []
        for raw in csv.DictReader(io.StringIO(text)):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                try:
                    row[k] = float(v) if v not in (None, "") else None
                except ValueError:
                    row[k] = v
            rows.append(row)
        return rows
    if stripped.startswith("["):
        data = json.loads(stripped)
        if not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{uri}: expected a JSON list of objects (one per step)")
        return data
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}: line {n} is not JSON ({e}); expected one JSON object per line") from e
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_training_metrics(uri: str, *, endpoint: str | None = None) -> list[dict[str, Any]]:
    """Per-step training metrics as a list of dicts.

    Args:
        uri: a ``.jsonl`` / ``.json`` / ``.csv`` file, or a directory (local or s3://) holding one of
            :data:`METRICS_FILES`.
        endpoint: S3 endpoint.

    Raises:
        FileNotFoundError: nothing readable there.
        ValueError: the file is malformed (names the line).
    """
    candidates = [uri] if uri.rsplit("/", 1)[-1].count(".") else []
    candidates += [storage.join(uri, name) for name in METRICS_FILES]
    for cand in candidates:
        try:
            if not storage.exists(cand, endpoint=endpoint):
                continue
            text = storage.read_text(cand, endpoint=endpoint)
        except (storage.StorageError, IsADirectoryError):
            continue
        return _parse_rows(text, cand)
    raise FileNotFoundError(f"no training metrics at {uri}; expected a .jsonl/.csv file or a directory with one "
                            f"of {list(METRICS_FILES)}")


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def series(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the first key in ``keys`` present in the rows (rows without it are skipped).

    A key also matches under any prefix (``train/cos_total_text`` matches ``cos_total_text``), so trainers
    that namespace their metrics need no mapping. The step is the row's ``step`` (or another of
    :data:`STEP_KEYS`), else its position.
    """
    present = {k for r in rows for k, v in r.items() if _number(v) is not None}
    key = next((k for k in keys if k in present), None)
    if key is None:
        key = next((p for k in keys for p in sorted(present) if p.endswith("/" + k)), None)
    if key is None:
        return [], []
    xs, ys = [], []
    for i, row in enumerate(rows):
        y = _number(row.get(key))
        if y is None:
            continue
        step = next((_number(row.get(s)) for s in STEP_KEYS if _number(row.get(s)) is not None), None)
        xs.append(step if step is not None else float(i))
        ys.append(y)
    return xs, ys


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _empty(ax, text: str) -> None:  # type: ignore[no-untyped-def]
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_dropout(results: Sequence[dict[str, Any]], path: str | Path, *, k: int = 10) -> Path:
    """Fig. 1a: grouped bars of f2f / t2f / v2f Hit@k and NDCG@k per run. Returns the PNG path.

    Up to three runs the two metrics sit side by side; more runs stack them so the labels stay legible.
    """
    plt = _pyplot()
    have = [(r.get("name", f"run{i}"), r["dropout"]) for i, r in enumerate(results) if r.get("dropout")]
    many = len(have) > 3
    if many:
        fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.25 * len(have) + 2.0), 8.0), squeeze=False)
        panels = [axes[0][0], axes[1][0]]
    else:
        fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 2.2 * max(len(have), 1) + 3.0), 4.2), squeeze=False)
        panels = list(axes[0])
    width = 0.8 / 3
    for ax, metric in zip(panels, (f"hit@{k}", f"ndcg@{k}"), strict=True):
        label = metric.replace("hit", "Hit").replace("ndcg", "NDCG")
        if not have:
            _empty(ax, "modality dropout not computed")
            continue
        top = 0.0
        for j, query in enumerate(("f2f", "t2f", "v2f")):
            xs = [i + (j - 1) * width for i in range(len(have))]
            ys = [float(d.get(query, {}).get(metric, float("nan"))) for _, d in have]
            bars = ax.bar(xs, ys, width, label=query, color=_DROPOUT_COLOURS[query])
            for bar, y in zip(bars, ys, strict=True):
                if math.isfinite(y):
                    top = max(top, y)
                    ax.annotate(f"{y:.2f}" if many else f"{y:.3f}", (bar.get_x() + bar.get_width() / 2, y),
                                ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(have)), [n for n, _ in have], rotation=15 if many else 0,
                      ha="right" if many else "center")
        ax.set_ylim(0, max(top * 1.18, 0.05))
        ax.set_ylabel(label)
        ax.set_title(f"Modality dropout: {label}")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = panels[0].get_legend_handles_labels()
    if handles:
        names = {"f2f": "f2f: fused query", "t2f": "t2f: text-only query", "v2f": "v2f: image-only query"}
        fig.legend(handles, [names[lab] for lab in labels], loc="upper center", ncol=3, fontsize=9, frameon=False,
                   title="against fused items", title_fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.92 if many else 0.86))
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_cold_start(results: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Fig. 3: Task 2 NDCG@k0 by the target's training-frequency bucket, a line per run, model and init.
    Returns None when no result has the buckets."""
    from vlm2rec_ray.eval.compare import frequency_buckets

    buckets = frequency_buckets(results)
    if not buckets:
        return None
    ks = sorted({int(m.split("@")[1]) for r in results for t in (r.get("task2") or [])
                 for m in t.get("sampled", {}) if "@" in m}) or [10]
    metric = f"ndcg@{ks[0]}"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    for r in results:
        for t in r.get("task2") or []:
            got = {b["bucket"]: b.get(metric) for b in t.get("by_frequency") or []}
            ys = [float(got.get(b, float("nan"))) for b, _ in buckets]
            ax.plot(range(len(buckets)), ys, marker="o", ms=4, linestyle="-" if t.get("init") == "ours" else "--",
                    label=f"{r.get('name')} {t.get('model')} {t.get('init')}")
    ax.set_xticks(range(len(buckets)), [f"{b}\n({n} users)" for b, n in buckets])
    ax.set_xlabel("target item's training frequency")
    ax.set_ylabel(metric.replace("ndcg", "NDCG"))
    ax.set_title("Cold start: Task 2 by training frequency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _line_panels(histories: dict[str, list[dict[str, Any]]], panels: dict[str, tuple[str, ...]],
                 titles: dict[str, str], ylabel: str, path: str | Path, *, ylim: tuple[float, float] | None = None,
                 hline: float | None = None) -> Path:
    """One panel per curve, one line per run (same colour in every panel), one legend below the panels."""
    plt = _pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    legend_rows = math.ceil(len(histories) / 4)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.6 + 0.3 * legend_rows), squeeze=False)
    legend: dict[str, Any] = {}
    for ax, (panel, keys) in zip(axes[0], panels.items(), strict=True):
        drawn = 0
        for i, (run, rows) in enumerate(histories.items()):
            xs, ys = series(rows, keys)
            if not xs:
                continue
            # Colour and dash both vary, so runs stay distinguishable past the 10-colour cycle and where
            # curves overlap.
            (line,) = ax.plot(xs, ys, label=run, color=colours[i % len(colours)], linewidth=1.5,
                              linestyle=styles[(i // len(colours) + i) % len(styles)] if len(histories) > 2 else "-",
                              marker="o" if len(xs) <= 30 else None, markersize=3)
            legend.setdefault(run, line)
            drawn += 1
        ax.set_title(titles[panel])
        if not drawn:
            _empty(ax, f"not logged\n(keys tried: {', '.join(keys[:3])}, ...)")
            continue
        if hline is not None:
            ax.axhline(hline, color="#999999", linewidth=0.8, linestyle=":")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(len(legend), 4), fontsize=9,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.05 * legend_rows if legend else 0, 1, 1))
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_grad_alignment(histories: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Fig. 1b: cos(g_total, g_T) and cos(g_total, g_V) per run against the step. Returns the PNG path."""
    return _line_panels(histories, GRAD_ALIGN_KEYS,
                        {"text": "cos(g_total, g_T)  (text path)", "image": "cos(g_total, g_V)  (image path)"},
                        "cosine", path, ylim=(-1.05, 1.05), hline=0.0)


def plot_penalty(histories: dict[str, list[dict[str, Any]]], path: str | Path) -> Path | None:
    """WPCL internals: the modality margins M^T, M^V (eq. 6) and the learnable alpha, beta (eqs. 8-9) per run.

    Returns the PNG path, or None when none of these were logged (e.g. an SFT run).
    """
    if not any(series(rows, keys)[0] for rows in histories.values()
               for keys in (*MARGIN_KEYS.values(), PENALTY_KEYS["beta"], PENALTY_KEYS["alpha"])):
        return None
    plt = _pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 3, figsize=(15.0, 3.9 + 0.3 * math.ceil(len(histories) / 4)), squeeze=False)
    ax = axes[0][0]
    for i, (run, rows) in enumerate(histories.items()):
        for mod, dash in (("text", "-"), ("image", "--")):
            xs, ys = series(rows, MARGIN_KEYS[mod])
            if xs:
                ax.plot(xs, ys, color=colours[i % len(colours)], linestyle=dash, linewidth=1.4, label=f"{run}: {mod}")
    ax.set_title("modality margin M (eq. 6): text solid, image dashed")
    if ax.lines:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    else:
        _empty(ax, "margins not logged")
    for ax, name, title in ((axes[0][1], "beta", "beta (penalty scale; floored)"), (axes[0][2], "alpha", "alpha")):
        for i, (run, rows) in enumerate(histories.items()):
            xs, ys = series(rows, PENALTY_KEYS[name])
            if xs:
                ax.plot(xs, ys, color=colours[i % len(colours)], linewidth=1.4, label=run)
        ax.set_title(title)
        if ax.lines:
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        else:
            _empty(ax, f"{name} not logged")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_losses(histories: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Training losses (total, WPCL/InfoNCE, CRTR) per run against the step. Returns the PNG path."""
    return _line_panels(histories, LOSS_KEYS,
                        {"total": "total loss", "wpcl": "WPCL / InfoNCE", "crtr": "CRTR"}, "loss", path)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.note { color: #555; font-size: 0.88em; }
"""


def _render_html(title: str, results: Sequence[dict[str, Any]], figures: dict[str, str],
                 notes: list[str]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    meta = []
    for r in results:
        t1 = r.get("task1", {})
        skipped = t1.get("skipped") or {}
        skipped_text = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items() if v) or "none"
        meta.append(f"{r.get('name')}: {t1.get('num_users', '?')} test users evaluated, "
                    f"{t1.get('num_negatives', '?')} sampled negatives, seeds {t1.get('seeds', '?')}; "
                    f"test users skipped: {skipped_text}")
    parts.append("<p class='note'>" + "<br>".join(html.escape(m) for m in meta) + "</p>")
    for section, (title_, table) in compare.tables(results).items():
        parts.append(f"<h2>{html.escape(title_)}</h2>")
        if table is None:
            parts.append("<p class='note'>not computed for these runs</p>")
        else:
            parts.append(_html_table(*table))
        parts.append(f"<p class='note'>{html.escape(compare.TABLE_NOTES.get(section, ''))}</p>")
        if section == "dropout" and "dropout" in figures:
            parts.append(f"<img src='{figures['dropout']}' alt='modality dropout bars'>")
        if section == "cold_start" and "cold_start" in figures:
            parts.append(f"<img src='{figures['cold_start']}' alt='Task 2 by training frequency'>")
    parts.append("<h2>Training</h2>")
    for key, alt in (("grad_alignment", "gradient alignment"), ("loss", "loss curves"),
                     ("penalty", "WPCL margins and penalty parameters")):
        if key in figures:
            parts.append(f"<img src='{figures[key]}' alt='{alt}'>")
    for n in notes:
        parts.append(f"<p class='note'>{html.escape(n)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    output_uri: str,
    results: Sequence[dict[str, Any]],
    histories: dict[str, list[dict[str, Any]]] | None = None,
    *,
    title: str = "VLM2Rec evaluation",
    endpoint: str | None = None,
) -> dict[str, str]:
    """Write ``report.html`` and its PNGs to ``output_uri`` (local dir or s3:// prefix).

    Args:
        output_uri: destination directory/prefix.
        results: evaluation results (``eval.json`` contents, each with a ``name``).
        histories: per run name, its per-step training metrics (may be empty or missing).
        title: the page title.
        endpoint: S3 endpoint.

    Returns:
        ``{"html": uri, "dropout": uri, "grad_alignment": uri, "loss": uri}`` (figures only if drawn).
    """
    if not results:
        raise ValueError("write_report needs at least one evaluation result")
    histories = {k: v for k, v in (histories or {}).items() if v}
    notes = []
    if not histories:
        notes.append("No training metrics were given (training_metrics_uri), so the loss and gradient-alignment "
                     "curves are not drawn; VLM_Vanilla has none by definition.")
    with tempfile.TemporaryDirectory(prefix="vlm2rec-report-") as tmp:
        local = Path(tmp)
        figures: dict[str, str] = {}
        if any(r.get("dropout") for r in results):
            plot_dropout(results, local / "dropout.png")
            figures["dropout"] = "dropout.png"
        if plot_cold_start(results, local / "cold_start.png") is not None:
            figures["cold_start"] = "cold_start.png"
        if histories:
            plot_grad_alignment(histories, local / "grad_alignment.png")
            plot_losses(histories, local / "loss.png")
            figures["grad_alignment"] = "grad_alignment.png"
            figures["loss"] = "loss.png"
            if plot_penalty(histories, local / "penalty.png") is not None:
                figures["penalty"] = "penalty.png"
        (local / "report.html").write_text(_render_html(title, results, figures, notes), encoding="utf-8")
        out: dict[str, str] = {}
        for name in ("report.html", *figures.values()):
            uri = storage.join(output_uri, name)
            storage.write_bytes(uri, (local / name).read_bytes(), endpoint=endpoint)
            out["html" if name == "report.html" else name.removesuffix(".png")] = uri
    return out
