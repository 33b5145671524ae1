"""Load a vision-language backbone and its processor by family.

``load_backbone(model)`` accepts a Hugging Face hub id (``Qwen/Qwen2.5-VL-3B-Instruct``), a local
directory, or an ``s3://`` prefix (copied to a local cache first, then loaded from disk). Every source goes
through the same ``from_pretrained`` calls, so the tiny test model exercises the production path.

- Families: Qwen2.5-VL and Qwen2-VL (detected from ``config.json``'s ``model_type``). We load the bare
  ``*VLModel`` (no LM head): the embedder only needs the final hidden states.
- Precision: bf16 on GPU, fp32 on CPU unless asked otherwise.
- Processor: an image-only subclass of the stock processor (no video processor), so it works without
  torchvision, with the PIL image processor backend. Never use ``AutoProcessor`` on a directory saved by
  it: that returns only the tokenizer.
- Weights load from safetensors only (``use_safetensors=True``): no pickle is ever unpickled.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from vlm2rec_ray import storage
from vlm2rec_ray.model import read_model_config


class ImageOnlyQwen25VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without a video processor (which would need torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kw: Any):
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template, **kw
        )


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without a video processor (which would need torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kw: Any):
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template, **kw
        )


@dataclass(frozen=True)
class BackboneFamily:
    model_type: str
    model_cls: str
    processor_cls: type


FAMILIES: dict[str, BackboneFamily] = {
    "qwen2_5_vl": BackboneFamily("qwen2_5_vl", "Qwen2_5_VLModel", ImageOnlyQwen25VLProcessor),
    "qwen2_vl": BackboneFamily("qwen2_vl", "Qwen2VLModel", ImageOnlyQwen2VLProcessor),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLM2REC_CACHE", Path.home() / ".cache" / "vlm2rec")) / "models"


def resolve_model_dir(model: str, *, cache_dir: str | os.PathLike[str] | None = None, endpoint: str | None = None) -> str:
    """Map a model reference to something ``from_pretrained`` takes: an object-store prefix is downloaded into
    ``cache_dir/<hash of the URI>``; local directories and hub ids pass through."""
    if storage.is_remote(model):
        digest = hashlib.sha256(model.rstrip("/").encode()).hexdigest()[:16]
        local = Path(cache_dir or default_cache_dir()) / digest
        storage.download_prefix(model, local, endpoint=endpoint)
        return str(local)
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"model directory {str(p)!r} has no config.json; point `model` at a directory written by "
                "save_pretrained (or vlm2rec's build_tiny_backbone / export)"
            )
        return str(p.resolve())
    if model.startswith(("/", "./", "../")):
        raise FileNotFoundError(f"model directory {model!r} does not exist")
    return model  # a hub id; transformers honours HF_HUB_OFFLINE / the HF cache


def pick_device_and_dtype(device: str | None = None, dtype: str | None = None) -> tuple[str, Any]:
    """bf16 on GPU, fp32 on CPU by default."""
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None or dtype == "auto":
        torch_dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    else:
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of auto, fp32, bf16, fp16")
        torch_dtype = names[dtype]
    return dev, torch_dtype


def load_processor(model: str, *, cache_dir: str | os.PathLike[str] | None = None, endpoint: str | None = None,
                   min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    """Load only the image-only processor (for CPU preprocessing stages)."""
    model_dir = resolve_model_dir(model, cache_dir=cache_dir, endpoint=endpoint)
    family = _family(model_dir, model)
    return _load_processor(family, model_dir, min_pixels, max_pixels)


def _family(model_dir: str, model: str) -> BackboneFamily:
    model_type = str(read_model_config(model_dir).get("model_type", ""))
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported backbone family {model_type!r} for {model!r}; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def _load_processor(family: BackboneFamily, model_dir: str, min_pixels: int | None, max_pixels: int | None) -> Any:
    kwargs: dict[str, Any] = {"backend": "pil"}
    if min_pixels is not None or max_pixels is not None:
        size = {}
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        kwargs["size"] = size
    processor = family.processor_cls.from_pretrained(model_dir, **kwargs)
    processor.tokenizer.padding_side = "left"  # last-token pooling needs left padding, whatever was saved
    return processor


def load_backbone(
    model: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
    attn_implementation: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    device_map: str | None = None,
) -> tuple[Any, Any]:
    """Load a VLM backbone and its image-only processor.

    Args:
        model: hub id, local directory, or ``s3://`` prefix holding a ``save_pretrained`` directory.
        device: ``cuda``/``cpu``/``cuda:1``...; default: cuda if available.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.
        cache_dir: where s3:// models are copied; default ``$VLM2REC_CACHE/models``.
        endpoint: S3 endpoint override (else ``AWS_ENDPOINT_URL``).
        attn_implementation: e.g. ``sdpa`` or ``flash_attention_2``; default: transformers' choice.
        min_pixels, max_pixels: image resize bounds for the processor (default: as saved).
        device_map: e.g. ``auto`` to shard the weights over the visible GPUs (``device`` then only picks the
            default dtype).

    Returns:
        ``(model, processor)``: the bare ``*VLModel`` in eval mode on ``device`` (with its MoDA adapters when
        the directory is a MoDA export), and the processor.
    """
    import transformers

    model_dir = resolve_model_dir(model, cache_dir=cache_dir, endpoint=endpoint)
    family = _family(model_dir, model)
    dev, torch_dtype = pick_device_and_dtype(device, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map:
        kwargs["device_map"] = device_map
    model_cls = getattr(transformers, family.model_cls)
    net = model_cls.from_pretrained(model_dir, **kwargs)
    if os.path.exists(os.path.join(model_dir, "moda_config.json")):  # a MoDA export (see model/moda.py)
        from vlm2rec_ray.model.moda import load_moda

        load_moda(net, model_dir)
    (net if device_map else net.to(dev)).eval()
    processor = _load_processor(family, model_dir, min_pixels, max_pixels)
    return net, processor
