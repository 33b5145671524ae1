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
