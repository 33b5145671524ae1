"""vlm2rec_ray.demo: which steps a re-run skips."""

from __future__ import annotations

from pathlib import Path

from vlm2rec_ray import storage
from vlm2rec_ray.demo import DemoConfig, _State


def test_a_finished_step_is_skipped_only_while_its_output_exists(tmp_path: Path) -> None:
    cfg = DemoConfig(store=str(tmp_path / "demo"))
    output = str(tmp_path / "demo" / "runs" / "A" / "manifest.json")
    state = _State(cfg)
    assert not state.is_done("embed/A/items", "k1", output)  # never ran
    storage.write_text(output, "{}")
    state.mark("embed/A/items", "k1")

    again = _State(cfg)  # a re-run reads demo_state.json
    assert again.is_done("embed/A/items", "k1", output)
    assert not again.is_done("embed/A/items", "k2", output)  # the step's config changed: run it again
    Path(output).unlink()
    assert not again.is_done("embed/A/items", "k1", output)  # its output was deleted: run it again
    assert not _State(cfg.model_copy(update={"fresh": True})).is_done("embed/A/items", "k1", output)


def test_run_overrides_apply_per_run_and_typos_fail() -> None:
    import pytest

    from vlm2rec_ray.config import ConfigError, load_config
    from vlm2rec_ray.demo import DEFAULT_CONFIG, train_config

    cfg = load_config(DemoConfig, DEFAULT_CONFIG, ["run_overrides.VLM2Rec.train.lr=0.0003"])
    assert train_config(cfg, "VLM2Rec").train.lr == 0.0003
    assert train_config(cfg, "VLM2Rec").objective.variant == "vlm2rec"  # the baseline's own overrides stay
    assert train_config(cfg, "VLM_SFT_external").train.lr == 0.00025  # demo.yaml: the study's choice for SFT
    with pytest.raises(ConfigError, match=r"run_overrides names \['VLM2rec'\], which are not baselines"):
        load_config(DemoConfig, DEFAULT_CONFIG, ["run_overrides.VLM2rec.train.lr=1"])
