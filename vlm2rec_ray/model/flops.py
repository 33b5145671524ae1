"""Model FLOPs and model FLOP utilisation (MFU) for the embedding benchmarks.

FLOPs are *counted*, not estimated from a formula: :func:`count_flops` runs the forward under
``torch.utils.flop_counter.FlopCounterMode``, which adds up every matmul, convolution and attention kernel
the call dispatches with its real shapes (so the vision tower's windowed attention, GQA and the padded
prompt lengths count as they run). A multiply-add is two FLOPs, as in the MFU literature (PaLM, Megatron).

MFU = achieved FLOP/s / the device's peak dense FLOP/s for the dtype (:data:`PEAK_TFLOPS`, the vendors'
datasheet figures without sparsity). ::

    per_item = count_flops(lambda: encoder.encode_items(titles, images)) / len(titles)
    print(mfu(per_item, items_per_s, peak_flops(torch.cuda.get_device_name(), "bf16")))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Peak dense tensor-core TFLOP/s (bf16 = fp16 on these parts), by a substring of torch.cuda.get_device_name().
# Order matters: the first match wins ("H100 PCIe" before "H100").
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "fp16": 989.4}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1}),
    ("L4", {"bf16": 121.0, "fp16": 121.0}),
]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that ``fn()`` dispatches (matmuls, convolutions, attention), counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """The peak dense FLOP/s of a GPU named ``device_name`` for ``dtype`` (``bf16`` / ``fp16``), or None when
    the part or the dtype is not in :data:`PEAK_TFLOPS` (pass the figure yourself then)."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            tflops = peaks.get(dtype)
            return tflops * 1e12 if tflops else None
    return None


def mfu(flops_per_item: float, items_per_s: float, peak: float) -> float:
    """Model FLOP utilisation: ``flops_per_item * items_per_s / peak`` (a fraction; 0.4 = 40%)."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return flops_per_item * items_per_s / peak


__all__ = ["PEAK_TFLOPS", "count_flops", "mfu", "peak_flops"]
