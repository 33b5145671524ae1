"""Checkpoints: DeepSpeed engine state + our loop state, persisted through Ray Train, and resumed from it.

A checkpoint directory (one per report, merged by Ray from every rank's files) holds::

    ds/ds/...            engine.save_checkpoint(tag="ds") from every rank: module (LoRA runs: trainable
                         weights only), optimizer shards per rank, LR scheduler
    state.json           rank 0: TrainState (global step, epoch, position in the epoch, samples seen, resumes,
                         fingerprints of the initial trainable weights)
    metrics.jsonl        rank 0: every metrics row logged so far (so history survives restarts)

    done_rank<r>.json    every rank: its part is in (a checkpoint is complete when all ranks' markers are)

Saving: every rank writes into its own temporary directory and calls ``ray.train.report(metrics,
checkpoint=...)``; Ray uploads to ``storage_path/run_name`` and keeps the latest ``train.keep_checkpoints``.
Resuming: ``ray.train.get_checkpoint()`` returns the latest *registered* checkpoint, both after a worker
failure (FailureConfig restarts the worker group) and when the same command is run again (Ray Train V2 finds
the run's snapshot under the same storage path and name). Ray registers a checkpoint only once its controller
has polled the report from every worker, so a worker that dies right after a report can lose that
registration although the files are in storage; :func:`find_latest_complete` therefore also scans the run
folder, and the restore takes whichever complete checkpoint has the higher step. Every rank then loads the
engine state and the loop state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow.fs
    from deepspeed import DeepSpeedEngine

__all__ = [
    "DS_TAG",
    "TrainState",
    "find_latest_complete",
    "load_checkpoint_dir",
    "restore_from_ray",
    "save_and_report",
    "write_checkpoint_dir",
]

DS_TAG = "ds"


@dataclass
class TrainState:
    """The loop's position and bookkeeping, saved with every checkpoint.

    ``epoch`` is the epoch in progress and ``step_in_epoch`` the optimizer steps already done in it.
    ``resumes`` lists the global step each restore started from (failure recovery or a re-run).
    ``initial_fingerprints`` maps trainable parameter names to (sum, sum of squares) of their values at step 0,
    so the final check "every trainable tensor changed" holds across restarts.
    """

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    resumes: list[int] = field(default_factory=list)
    initial_fingerprints: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def write_checkpoint_dir(engine: DeepSpeedEngine, state: TrainState, history: list[dict[str, Any]], *,
                         rank: int, world_size: int, trainable_only: bool) -> str:
    """Write this rank's part of a checkpoint to a new temporary directory (all ranks must call this)."""
    root = tempfile.mkdtemp(prefix="vlm2rec-ckpt-")
    (Path(root) / "ds" / DS_TAG).mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(os.path.join(root, "ds"), tag=DS_TAG, exclude_frozen_parameters=trainable_only)
    if rank == 0:
        (Path(root) / "state.json").write_text(json.dumps(asdict(state)))
        (Path(root) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    (Path(root) / f"done_rank{rank}.json").write_text(json.dumps({"global_step": state.global_step, "rank": rank,
                                                                 "world_size": world_size}))
    return root


def save_and_report(engine: DeepSpeedEngine, state: TrainState, history: list[dict[str, Any]],
                    metrics: dict[str, Any], *, rank: int, world_size: int, trainable_only: bool) -> None:
    """Checkpoint and report in one call (a barrier across workers); the local copy is removed after upload."""
    import ray.train

    root = write_checkpoint_dir(engine, state, history, rank=rank, world_size=world_size,
                                trainable_only=trainable_only)
    try:
        has_files = any(p.is_file() for p in Path(root).rglob("*"))
        checkpoint = ray.train.Checkpoint.from_directory(root) if has_files else None
        ray.train.report(metrics, checkpoint=checkpoint)
    finally:
        shutil.rmtree(root, ignore_errors=True)


#: The non-tensor classes DeepSpeed pickles into its engine checkpoints; the only globals allowed when loading.
_DS_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
)


@contextlib.contextmanager
def weights_only_loading(engine: DeepSpeedEngine) -> Iterator[None]:
    """Make DeepSpeed read its checkpoint files with ``torch.load(weights_only=True)``.

    DeepSpeed's torch checkpoint engine calls ``torch.load(..., weights_only=False)``, which unpickles
    arbitrary objects. Inside this context it loads with the restricted unpickler instead, allowing only
    tensors, containers and the few DeepSpeed classes of :data:`_DS_SAFE_GLOBALS`; anything else in a
    checkpoint file fails with torch's ``UnpicklingError`` instead of running code.
    """
    import importlib

    import torch

    allowed = []
    for dotted in _DS_SAFE_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        allowed.append(getattr(importlib.import_module(module), name))
    ce = engine.checkpoint_engine

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    original = ce.__dict__.get("load")
    ce.load = load
    try:
        yield
    finally:
        if original is None:
            del ce.load
        else:
            ce.load = original


def load_checkpoint_dir(engine: DeepSpeedEngine, directory: str, *, trainable_only: bool
                        ) -> tuple[TrainState, list[dict[str, Any]]]:
    """Load engine + loop state from a checkpoint directory (all ranks must call this)."""
    root = Path(directory)
    state_file = root / "state.json"
    if not state_file.exists():
        raise RuntimeError(f"checkpoint {directory} has no state.json; it was not written by vlm2rec train "
                           "(delete the run's storage folder or pick another run_name)")
    with weights_only_loading(engine):
        load_path, _ = engine.load_checkpoint(str(root / "ds"), tag=DS_TAG, load_module_strict=not trainable_only,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no engine state under {root / 'ds'}; the checkpoint is incomplete")
    state = TrainState.from_dict(json.loads(state_file.read_text()))
    history_file = root / "metrics.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines() if line.strip()] \
        if history_file.exists() else []
    return state, history


def _read_json(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError):
        return None


def find_latest_complete(fs: pyarrow.fs.FileSystem, run_path: str) -> tuple[str, int] | None:
    """``(checkpoint path, global step)`` of the complete checkpoint with the highest step under ``run_path``
    (a Ray Train run folder on ``fs``), or None. Complete = ``state.json`` plus every rank's marker."""
    import pyarrow.fs as pafs

    try:
        entries = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    except OSError:
        return None
    best: tuple[str, int] | None = None
    for entry in entries:
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        state = _read_json(fs, f"{entry.path}/state.json")
        marker = _read_json(fs, f"{entry.path}/done_rank0.json")
        if state is None or marker is None:
            continue
        world = int(marker.get("world_size", 1))
        if any(_read_json(fs, f"{entry.path}/done_rank{r}.json") is None for r in range(1, world)):
            continue
        step = int(state.get("global_step", -1))
        if best is None or step > best[1] or (step == best[1] and entry.path > best[0]):
            best = (entry.path, step)
    return best


def restore_from_ray(engine: DeepSpeedEngine, *, trainable_only: bool
                     ) -> tuple[TrainState, list[dict[str, Any]]] | None:
    """The latest complete checkpoint of this run (after a failure or on a re-run), or None on a fresh start."""
    import pyarrow.fs
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    registered_step = -1
    if checkpoint is not None:
        state = _read_json(checkpoint.filesystem, f"{checkpoint.path}/state.json") or {}
        registered_step = int(state.get("global_step", -1))
    try:
        storage_ctx = ray.train.get_context().get_storage()
        found = find_latest_complete(storage_ctx.storage_filesystem, storage_ctx.experiment_fs_path)
    except (AttributeError, NotImplementedError):
        storage_ctx, found = None, None
    if found is not None and found[1] > registered_step:
        checkpoint = ray.train.Checkpoint(path=found[0], filesystem=storage_ctx.storage_filesystem)
    if checkpoint is None:
        return None
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        state, history = load_checkpoint_dir(engine, checkpoint.path, trainable_only=trainable_only)
    else:
        # Each worker downloads into its own directory. Ray's shared as_directory() lets a worker that arrives after
        # another's download has finished download again into the same directory, over files the first is still
        # reading (a fresh-clone CI run read a half-rewritten ZeRO shard: EOFError in torch.load).
        rank = ray.train.get_context().get_world_rank()
        with tempfile.TemporaryDirectory(prefix=f"vlm2rec-restore-rank{rank}-") as tmp:
            directory = checkpoint.to_directory(tmp)
            state, history = load_checkpoint_dir(engine, directory, trainable_only=trainable_only)
    state.resumes.append(state.global_step)
    return state, history
