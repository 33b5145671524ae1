"""The nightly re-embedding: items (incremental) then user sequences, one summary, non-zero exit on failure.

``jobs/nightly.py`` (scheduled by ``cluster/kuberay/nightly-cronjob.yaml``) calls :func:`run_nightly`. Each step
publishes its own snapshot atomically (manifest last), so a failed step leaves yesterday's snapshot as the
latest complete one; the summary (``<output_uri>/nightly/dt=<dt>/summary.json``) says what happened.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import traceback
from collections.abc import Callable
from typing import Any

from pydantic import Field, model_validator

from vlm2rec_ray import storage
from vlm2rec_ray.config import EmbedJobConfig, _Part


class NightlyConfig(_Part):
    """``jobs/nightly.py``: the embed settings (an :class:`EmbedJobConfig`) and which steps to run."""

    embed: EmbedJobConfig
    items: bool = Field(True, description="re-embed the catalog")
    sequences: bool = Field(True, description="re-embed the user sequences of embed.split")
    incremental: bool = Field(True, description="items: encode only new/changed rows, carry the rest over")

    @model_validator(mode="after")
    def _steps(self) -> NightlyConfig:
        if not (self.items or self.sequences):
            raise ValueError("items=false and sequences=false: nothing to do; enable at least one step")
        return self

    def step_config(self, kind: str) -> EmbedJobConfig:
        """The embed config of one step, with the run's date fixed (both steps publish the same dt)."""
        day = self.embed.dt or dt.datetime.now(dt.UTC).date().isoformat()
        return self.embed.model_copy(update={"dt": day, "incremental": self.incremental and kind == "items"})


def run_nightly(cfg: NightlyConfig, *, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the enabled steps in order (items, then sequences) and write the summary.

    A failing step does not stop the next one (sequences embed from the catalog directly); the summary has
    ``ok: false`` and the failing step's error and counts. Never raises for a failed step.
    """
    from vlm2rec_ray.embed import EmbedFailureError, format_summary, run_embed_items, run_embed_sequences

    started = time.time()
    steps: dict[str, Any] = {}
    day = cfg.step_config("items").dt
    for kind, fn, enabled in (("items", run_embed_items, cfg.items), ("sequences", run_embed_sequences, cfg.sequences)):
        if not enabled:
            continue
        progress(f"nightly {day}: embed {kind}")
        try:
            summary = fn(cfg.step_config(kind), progress=progress)
            steps[kind] = {"ok": True, "summary": summary}
            progress(format_summary(summary))
        except EmbedFailureError as e:
            steps[kind] = {"ok": False, "error": str(e), "summary": e.summary}
            progress(f"nightly: embed {kind} FAILED: {e}")
        except Exception as e:  # any failure is reported in the summary and the exit code
            steps[kind] = {"ok": False, "error": storage.redact(f"{type(e).__name__}: {e}"),
                           "traceback": storage.redact(traceback.format_exc(limit=8))}
            progress(f"nightly: embed {kind} FAILED: {storage.redact(str(e))}")
    out = {"dt": day, "ok": all(s["ok"] for s in steps.values()), "steps": steps,
           "wall_s": round(time.time() - started, 1), "model_version": cfg.embed.model_version}
    uri = storage.join(cfg.embed.output_uri, "nightly", f"dt={day}", "summary.json")
    storage.write_text(uri, json.dumps(out, indent=2, sort_keys=True, default=str) + "\n",
                       endpoint=cfg.embed.storage.endpoint_url)
    out["summary_uri"] = uri
    return out


def format_nightly(out: dict[str, Any]) -> str:
    lines = [f"nightly dt={out['dt']}: {'OK' if out['ok'] else 'FAILED'} in {out['wall_s']} s "
             f"(summary: {out.get('summary_uri')})"]
    for kind, s in out["steps"].items():
        summ = s.get("summary") or {}
        counts = ", ".join(f"{k}={summ[k]}" for k in ("ok", "failed", "new", "changed", "unchanged", "deleted")
                           if k in summ)
        lines.append(f"  {kind}: {'ok' if s['ok'] else 'FAILED: ' + s['error']} ({counts})")
    return "\n".join(lines)
