"""The baseline / ablation config files: every one parses and its overrides validate against the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm2rec_ray.config import LoraConfig, ModelConfig, ObjectiveConfig, parse_overrides
from vlm2rec_ray.eval.baselines import BASELINES, BASELINES_DIR, baseline_overrides, load_baseline


def test_every_baseline_is_a_valid_override_set() -> None:
    assert sorted(p.stem for p in BASELINES_DIR.glob("*.yaml")) == sorted(BASELINES)
    variants = {}
    for name in BASELINES:
        meta = load_baseline(name)["baseline"]
        assert meta["name"] == name and isinstance(meta["trained"], bool) and meta["description"]
        tree = parse_overrides(baseline_overrides(name))
        assert set(tree) <= {"model", "objective", "lora"}, tree
        LoraConfig.model_validate(tree.get("lora", {}))
        ModelConfig.model_validate({"name": "x", **tree.get("model", {})})
        variants[name] = (ObjectiveConfig.model_validate(tree.get("objective", {})).variant if meta["trained"]
                          else None, tree["model"]["fusion"])
    assert variants == {
        "VLM_Vanilla": (None, "external"),
        "VLM_SFT_internal": ("sft", "internal"),
        "VLM_SFT_external": ("sft", "external"),
        "VLM2Rec": ("vlm2rec", "external"),
        "ablation_no_stop_grad": ("no_stop_grad", "external"),
        "ablation_no_penalty": ("no_penalty", "external"),
        "ablation_no_crtr": ("no_crtr", "external"),
        "SDA": ("cmsa", "external"),
        "VLM2Rec_MoDA": ("vlm2rec", "external"),
    }
    assert "lora.kind=moda" in baseline_overrides("SDA") and "lora.num_experts=8" in baseline_overrides("VLM2Rec_MoDA")
    assert baseline_overrides("VLM_SFT_internal") == ["model.fusion=internal", "objective.variant=sft"]


def test_unknown_and_malformed_baselines(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no baseline 'VLM_X'.*known baselines: \["):
        load_baseline("VLM_X")
    bad = tmp_path / "b.yaml"
    bad.write_text("objective:\n  variant: sft\n")
    with pytest.raises(ValueError, match=r"`baseline:` block"):
        load_baseline(str(bad))
