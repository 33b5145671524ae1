"""The paper's baselines and Table 5 ablations as config files (``jobs/configs/baselines/*.yaml``).

Each file is a small set of TrainJobConfig overrides (``model.fusion``, ``objective.variant``) plus a
``baseline`` metadata block (name, whether it is trained, a one-line description). Print a baseline's
overrides as dotted ``key=value`` arguments for ``vlm2rec train``::

    python -m vlm2rec_ray.eval.baselines VLM_SFT_internal     # -> model.fusion=internal objective.variant=sft
    python -m vlm2rec_ray.eval.baselines                      # lists the baselines

Baselines: VLM_Vanilla (no training), VLM_SFT_internal, VLM_SFT_external, VLM2Rec, the ablations
ablation_no_stop_grad, ablation_no_penalty, ablation_no_crtr, and SDA (CMSA + MoDA) and VLM2Rec_MoDA.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

BASELINES_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "baselines"
BASELINES = ("VLM_Vanilla", "VLM_SFT_internal", "VLM_SFT_external", "VLM2Rec",
             "ablation_no_stop_grad", "ablation_no_penalty", "ablation_no_crtr", "SDA", "VLM2Rec_MoDA")

__all__ = ["BASELINES", "BASELINES_DIR", "baseline_overrides", "load_baseline"]


def load_baseline(name_or_path: str, *, directory: str | Path | None = None) -> dict[str, Any]:
    """The parsed YAML of a baseline (by name in ``directory``, default :data:`BASELINES_DIR`, or a path).

    Raises:
        FileNotFoundError: no such baseline (the message lists the known ones).
        ValueError: the file has no ``baseline`` block or is not a mapping.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(directory or BASELINES_DIR) / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in Path(directory or BASELINES_DIR).glob("*.yaml"))
        raise FileNotFoundError(f"no baseline {name_or_path!r} at {path}; known baselines: {known}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("baseline"), dict):
        raise ValueError(f"{path} must be a mapping with a `baseline:` block (name, trained, description)")
    return data


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


def baseline_overrides(name_or_path: str, *, directory: str | Path | None = None) -> list[str]:
    """A baseline's TrainJobConfig overrides as dotted ``key=value`` strings (metadata stripped).

    Example: ``baseline_overrides("VLM_SFT_internal") == ["model.fusion=internal", "objective.variant=sft"]``.
    """
    data = dict(load_baseline(name_or_path, directory=directory))
    data.pop("baseline")
    return _flatten(data)


def _main(argv: list[str]) -> int:
    if not argv:
        for name in BASELINES:
            meta = load_baseline(name)["baseline"]
            print(f"{name:24s} {'trained' if meta.get('trained') else 'not trained':12s} {meta.get('description', '')}")
        return 0
    print(" ".join(baseline_overrides(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
