"""DeepSpeed checkpoint files are read with torch's weights-only unpickler: tensors and DeepSpeed's few
state classes load; any other pickled object is refused instead of executed."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlm2rec_ray.train.checkpoint import weights_only_loading


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))

    def __init__(self, target: str) -> None:
        self.target = target


class _UnsafeEngine:
    """Stands in for DeepSpeed's TorchCheckpointEngine (whose load passes weights_only=False)."""

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)


def test_tensors_and_deepspeed_state_load(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optim_states.pt"
    torch.save({"w": torch.ones(3), "stage": ZeroStageEnum.gradients, "scaler": LossScaler(1.0)}, path)
    engine = SimpleNamespace(checkpoint_engine=_UnsafeEngine())
    with weights_only_loading(engine):
        state = engine.checkpoint_engine.load(str(path), map_location="cpu")
    assert torch.equal(state["w"], torch.ones(3)) and state["stage"] == ZeroStageEnum.gradients
    assert "load" not in engine.checkpoint_engine.__dict__  # the engine is restored afterwards


def test_arbitrary_pickled_objects_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": _Exploit(str(marker))}, path)
    engine = SimpleNamespace(checkpoint_engine=_UnsafeEngine())
    with weights_only_loading(engine), pytest.raises(pickle.UnpicklingError):
        engine.checkpoint_engine.load(str(path), map_location="cpu")
    assert not marker.exists()
