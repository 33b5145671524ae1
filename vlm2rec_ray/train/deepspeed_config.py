"""DeepSpeed engine settings derived from one :class:`~vlm2rec_ray.config.TrainJobConfig`.

``build_deepspeed_config(cfg)`` is the only place a DeepSpeed config dict is made (no inline dicts in jobs).
What it encodes, and why:

- Batch: ``train_micro_batch_size_per_gpu`` = ``train.per_device_batch_size``, ``gradient_accumulation_steps``
  = ``train.grad_accum``, and ``train_batch_size`` = their product times ``scaling.num_workers`` (DeepSpeed
  checks the three agree with the world size).
- ZeRO ``stage`` 0-3 from ``train.zero_stage``; ``offload_optimizer`` / ``offload_param`` to CPU (pinned
  memory on GPU hosts only). We pass our own ``torch.optim.AdamW`` (the client optimizer), so offload needs
  ``zero_force_ds_cpu_optimizer: false`` (else DeepSpeed refuses it) and LoRA-style optimizers need
  ``zero_allow_untested_optimizer``. ZeRO-3 keeps ``stage3_gather_16bit_weights_on_model_save`` on so a
  full fine-tune can be consolidated for export.
- Precision: ``bf16.enabled`` for bf16 (DeepSpeed casts the module), ``fp16`` with dynamic loss scaling on
  GPU only (the config refuses fp16 on CPU), nothing for fp32.
- ``gradient_clipping`` from ``train.grad_clip`` (0 = off).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlm2rec_ray.config import TrainJobConfig

__all__ = ["build_deepspeed_config"]


def build_deepspeed_config(cfg: TrainJobConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for ``deepspeed.initialize(config=...)``.

    Args:
        cfg: the validated train job config (``train`` and ``scaling`` sections are read).

    Returns:
        A JSON-serialisable dict (also written into every checkpoint and the model card).
    """
    t, s = cfg.train, cfg.scaling
    stage = int(t.zero_stage)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero["contiguous_gradients"] = True
        zero["overlap_comm"] = bool(s.use_gpu)  # overlap needs CUDA streams; on CPU it only adds buffers
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(s.use_gpu)}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(s.use_gpu)}

    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.per_device_batch_size * t.grad_accum * s.num_workers,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000_000,  # we log ourselves (train/loop.py)
        "wall_clock_breakdown": False,
    }
    if t.grad_clip > 0:
        ds["gradient_clipping"] = float(t.grad_clip)
    precision = cfg.precision
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    return ds
