"""The end of an embed run: the summary, the checks that nothing was lost, the manifest, publish or give up.

A run publishes only when every input row is in the output or the errors table and the failure share is within
``max_failure_fraction``; otherwise it marks itself failed and the previous snapshot stays the latest.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any

from vlm2rec_ray.config import config_hash
from vlm2rec_ray.embed import incremental, snapshot
from vlm2rec_ray.embed.plan import RunPlan
from vlm2rec_ray.embed.schema import errors_schema, output_schema, schema_to_json
from vlm2rec_ray.storage.retries import retries_since


class EmbedFailureError(RuntimeError):
    """Too many rows failed (or counts did not add up): nothing was published; the summary says why."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def summarize(plan: RunPlan, census: dict[str, Any], res: dict[str, Any], scan: dict[str, Any] | None,
              started: float, started_epoch: float) -> dict[str, Any]:
    c = res["counts"]
    timeline = res["timeline"]  # the sink's EncodeTimeline (None: nothing encoded)
    steady = timeline.steady_rows_per_s() if timeline else None
    rows, failed = int(census["rows"]), int(c.get("failed", 0))
    elapsed = round(time.perf_counter() - started, 3)
    summary: dict[str, Any] = {
        "kind": plan.kind, "dt": plan.run.dt, "run_id": plan.run.run_id, "mode": "full" if scan is None else "incremental",
        "input_rows": rows, "ok": sum(int(c.get(k, 0)) for k in ("encoded", "carried")), "failed": failed,
        "failure_fraction": (failed / rows) if rows else 0.0, "encoded": int(c.get("encoded", 0)),
        "carried": int(c.get("carried", 0)), "new": None, "changed": None, "unchanged": None, "deleted": None,
        "reasons": dict(sorted(res["reasons"].items())), "texts_encoded": int(c.get("texts_encoded", 0)),
        "images_encoded": int(c.get("images_encoded", 0)),
        "storage_retries": retries_since(plan.retries_at_start),  # a lower bound: storage/retries.py
        "uri": plan.run.root, "partition": plan.run.partition, "errors_uri": plan.run.errors_uri if failed else None,
        "files": len(res["files"]["data"]),
        "previous": {"dt": plan.previous["dt"], "run_id": plan.previous["run_id"]} if plan.previous else None,
        "elapsed_s": elapsed, "rows_per_s": round(rows / elapsed, 2) if elapsed > 0 else None,
        # seconds from the start until the model's first batch was done (start-up), and the encoded rows/s from
        # the first batch to the last (the steady rate); from the encoded rows' embedded_at stamps
        "first_batch_s": round(timeline.first_us / 1e6 - started_epoch, 2) if timeline else None,
        "encode_rows_per_s": round(steady, 2) if steady is not None else None,
    }
    if scan is not None:
        prev_rows = int(plan.previous["num_rows"]) if plan.previous else 0
        summary.update(new=int(c.get("new", 0)), changed=int(c.get("changed", 0)), unchanged=int(c.get("carried", 0)),
                       deleted=max(0, prev_rows - int(scan["counts"].get("in_prev", 0))))
    return summary


def problem(plan: RunPlan, summary: dict[str, Any], res: dict[str, Any], scan: dict[str, Any] | None) -> str | None:
    """Why the run must not publish: rows lost (every input row is in the output or the errors table), the
    previous snapshot changed under an incremental run, or too many rows failed; None when it may."""
    c, rows = res["counts"], summary["input_rows"]
    if int(c.get("rows", 0)) != rows:
        return (f"the run wrote {c.get('rows', 0)} rows (ok {summary['ok']} + failed {summary['failed']}) for "
                f"{rows} input rows; the input changed during the run or rows were lost; re-run the job")
    if scan is not None and summary["carried"] != int(scan["counts"].get("unchanged", 0)):
        return (f"{scan['counts'].get('unchanged', 0)} rows were unchanged but {summary['carried']} were carried "
                "over: the previous snapshot changed during the run; re-run the job")
    limit = plan.cfg.max_failure_fraction
    if summary["failure_fraction"] > limit:
        reasons = ", ".join(f"{k}={v}" for k, v in summary["reasons"].items())
        return (f"{summary['failed']} of {rows} rows failed ({summary['failure_fraction']:.1%} > "
                f"max_failure_fraction={limit:g}): {reasons}; failed rows are in {plan.run.errors_uri}; fix the "
                "inputs or raise max_failure_fraction")
    return None


def manifest(plan: RunPlan, census: dict[str, Any], res: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    m, run = plan.cfg.model, plan.run
    files = {k: [{"path": run.relative(f["uri"]), "rows": f["rows"], "bytes": f["bytes"]} for f in fs]
             for k, fs in res["files"].items()}
    return {
        "format": snapshot.MANIFEST_FORMAT, "kind": plan.kind, "dt": run.dt, "run_id": run.run_id,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(), "mode": summary["mode"],
        "num_rows": summary["ok"], "files": files["data"], "error_files": files["errors"],
        "counts": {k: summary[k] for k in ("input_rows", "ok", "failed", "encoded", "carried", "new", "changed",
                                            "unchanged", "deleted", "texts_encoded", "images_encoded")},
        "reasons": summary["reasons"],
        "schema": {"embedding_dim": plan.dim, "columns": schema_to_json(output_schema(plan.kind, plan.dim)),
                   "errors_columns": schema_to_json(errors_schema(plan.kind))},
        "model": {"model_id": m.name, "model_version": plan.cfg.model_version, "dtype": m.dtype, "fusion": m.fusion,
                  "min_pixels": m.min_pixels, "max_pixels": m.max_pixels, "max_history": m.max_history},
        "content_hash": {"scheme": incremental.HASH_SCHEME, "fingerprint": plan.fingerprint},
        "deterministic": plan.deterministic, "config_hash": config_hash(plan.cfg),
        "config": plan.cfg.model_dump(mode="json"),
        "source": {"uri": plan.source_uri, "files": plan.files, "rows": census["rows"]},
        "previous": summary["previous"],
    }


def finish(plan: RunPlan, census: dict[str, Any], res: dict[str, Any], scan: dict[str, Any] | None,
           started: float, started_epoch: float) -> dict[str, Any]:
    """Publish the run's snapshot (manifest last) and return its summary.

    Raises:
        EmbedFailureError: :func:`problem` found a reason not to publish (the run is marked failed).
    """
    summary = summarize(plan, census, res, scan, started, started_epoch)
    why = problem(plan, summary, res, scan)
    if why is not None:
        summary["status_uri"] = plan.run.fail({"error": why, "summary": summary})
        raise EmbedFailureError(f"embed {plan.kind} failed, nothing published (the previous snapshot stays): {why}",
                                summary)
    replaced = plan.run.publish(manifest(plan, census, res, summary))
    summary.update(manifest_uri=snapshot.manifest_uri(plan.run.root, plan.run.dt),
                   replaced_run=replaced["run_id"] if replaced else None,
                   storage_retries=retries_since(plan.retries_at_start), elapsed_s=round(time.perf_counter() - started, 3))
    summary["rows_per_s"] = round(summary["input_rows"] / summary["elapsed_s"], 2) if summary["elapsed_s"] else None
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines for the CLI and job logs."""
    s = summary
    lines = [f"{s['kind']} dt={s['dt']} run={s['run_id']} ({s['mode']}): {s['ok']} ok, {s['failed']} failed of "
             f"{s['input_rows']} rows in {s['elapsed_s']:.1f} s ({s.get('rows_per_s') or 0:.1f} rows/s)"]
    if s["mode"] == "incremental":
        lines.append(f"  new={s['new']} changed={s['changed']} unchanged={s['unchanged']} deleted={s['deleted']} "
                     f"failed={s['failed']}")
    lines.append(f"  encoded {s['texts_encoded']} distinct texts and {s['images_encoded']} distinct images "
                 f"for {s['encoded']} rows; carried {s['carried']}")
    if s.get("first_batch_s") is not None:
        rate = s.get("encode_rows_per_s")
        lines.append(f"  model: first batch done {s['first_batch_s']:.1f} s after the start (start-up)"
                     + (f", then {rate:.1f} rows/s" if rate is not None else ""))
    if s.get("storage_retries"):
        lines.append(f"  storage: about {s['storage_retries']} S3 retries (boto3 clients; all absorbed)")
    if s["reasons"]:
        lines.append("  failures: " + ", ".join(f"{k}={v}" for k, v in s["reasons"].items())
                     + (f" (errors table: {s['errors_uri']})" if s.get("errors_uri") else ""))
    if s.get("manifest_uri"):
        lines.append(f"  snapshot: {s['manifest_uri']}  (read with vlm2rec_ray.embed.read_embeddings({s['uri']!r}))")
    return "\n".join(lines)


__all__ = ["EmbedFailureError", "finish", "format_summary", "manifest", "problem", "summarize"]
