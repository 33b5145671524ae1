"""Fine-tune one configuration in this process, with the train job's own pieces (see :mod:`vlm2rec_ray.testbed`).

:func:`finetune` takes the same :class:`~vlm2rec_ray.config.TrainJobConfig` a ``vlm2rec train`` run takes and
reads it the same way: the model is :func:`~vlm2rec_ray.train.loop.build_train_module` (backbone, LoRA or
full fine-tuning, vision tower, objective), the optimizer :func:`~vlm2rec_ray.train.loop.build_optimizer`
(AdamW + warm-up), the loss :func:`~vlm2rec_ray.train.loop.compute_loss` (duplicate targets masked), the
gradient clipping ``train.grad_clip``; it logs every ``train.log_every`` steps (the objective's metrics: loss
parts, penalty, margins, alpha, beta) and runs the gradient-alignment diagnostic every ``train.diag_every``.

A step holds ``per_device_batch_size * num_workers * grad_accum`` rows (one Ray Train step's rows). Each epoch
visits the split's rows in a seeded order (``train.seed`` and the epoch), full batches only. Item-level
objectives (``cmsa``, SDA's stage 1) train on the split's distinct items instead, each once per epoch.
``data.few_shot_users = K`` keeps the rows of K users drawn with ``data.seed`` (as ``vlm2rec train`` does).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vlm2rec_ray.config import TrainJobConfig
    from vlm2rec_ray.testbed.data import TestbedData
    from vlm2rec_ray.train.module import TrainModule

__all__ = ["finetune", "make_batch"]


def make_batch(data: TestbedData, rows: list[tuple[str, list[int], int]]) -> Any:
    """A :class:`~vlm2rec_ray.train.data.TrainBatch` of ``(user, history rows, target row)`` rows (item-level
    rows have an empty history: the batch then has no sequences)."""
    from vlm2rec_ray.train.data import TrainBatch

    targets = [t for _, _, t in rows]
    return TrainBatch(seq_titles=[[data.titles[h] for h in hist] for _, hist, _ in rows if hist],
                      seq_images=[[data.images[h] for h in hist] for _, hist, _ in rows if hist],
                      item_titles=[data.titles[t] for t in targets], item_images=[data.images[t] for t in targets],
                      target_ids=torch.tensor(targets, dtype=torch.long), item_ids=torch.tensor(targets, dtype=torch.long))


def finetune(cfg: TrainJobConfig, data: TestbedData, *, split: str = "train",
             progress: Callable[[str], None] | None = None) -> tuple[TrainModule, list[dict[str, Any]]]:
    """Train ``cfg`` on ``data``'s ``split`` rows; returns the trained module (eval mode) and the metric history.

    Raises:
        ValueError: fewer rows than one step needs.
    """
    from vlm2rec_ray.train.loop import (
        build_optimizer,
        build_train_module,
        compute_loss,
        gradient_alignment_step,
    )

    t = cfg.train
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    module = build_train_module(cfg, torch.device("cpu"))
    optimizer, scheduler = build_optimizer(cfg, module)
    params = [p for p in module.parameters() if p.requires_grad]
    objective = module.objective
    rows = data.rows(split)
    if cfg.data.few_shot_users is not None:  # the paper's few-shot setting, sampled as the train job samples
        users = sorted({u for u, _, _ in rows})
        if cfg.data.few_shot_users < len(users):
            keep = set(random.Random(cfg.data.seed).sample(users, cfg.data.few_shot_users))
            rows = [r for r in rows if r[0] in keep]
    if objective.item_level:  # SDA's stage 1: every distinct item of the split once per epoch, no sequences
        rows = [("", [], i) for i in sorted({i for _, hist, target in rows for i in (*hist, target)})]
    batch_rows = t.per_device_batch_size * cfg.scaling.num_workers * t.grad_accum
    steps_per_epoch = len(rows) // batch_rows
    if steps_per_epoch < 1:
        raise ValueError(f"{len(rows)} {split} rows are fewer than one step's {batch_rows}; lower the batch size")
    total = steps_per_epoch * t.epochs if t.max_steps is None else min(steps_per_epoch * t.epochs, t.max_steps)
    history: list[dict[str, Any]] = []
    sums: dict[str, float] = {}
    count = 0
    started = time.perf_counter()
    step = 0
    for epoch in range(t.epochs):
        order = list(range(len(rows)))
        random.Random(t.seed + 1000 * epoch).shuffle(order)
        for k in range(steps_per_epoch):
            if step >= total:
                break
            batch = make_batch(data, [rows[i] for i in order[k * batch_rows:(k + 1) * batch_rows]])
            diag = {}
            if t.diag_every and (step + 1) % t.diag_every == 0:
                diag = gradient_alignment_step(module, batch, objective)
            out = module(batch.seq_titles, batch.seq_images, batch.item_titles, batch.item_images)
            loss = compute_loss(out, batch, objective, gather=False)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            for key, value in loss.metrics().items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
            if step % t.log_every == 0 or step == total:
                row = {"step": step, "epoch": epoch + (k + 1) / steps_per_epoch,
                       **{key: v / count for key, v in sums.items()}, "wall_s": time.perf_counter() - started}
                history.append(row)
                sums, count = {}, 0
                if progress is not None:
                    progress(" ".join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}"
                                      for key, v in row.items()))
            if diag:
                if history and history[-1]["step"] == step:
                    history[-1].update(diag)
                else:
                    history.append({"step": step, **diag})
    module.eval()
    if not all(math.isfinite(r.get("loss", 0.0)) for r in history):
        raise FloatingPointError(f"non-finite loss while fine-tuning {cfg.objective.variant}: {history[-1]}")
    return module, history
