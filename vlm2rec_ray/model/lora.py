"""PEFT LoRA on the language model's attention projections (paper 5.1.1: r=16, alpha=32, dropout 0.2).

``apply_lora(backbone, cfg.lora)`` wraps the backbone in a plain ``PeftModel`` (no task type, so its
``forward`` passes every keyword, ``pixel_values`` included, to the backbone). The default target regex
``.*language_model.*\\.(q_proj|k_proj|v_proj|o_proj)$`` selects the LLM's attention projections only; the
vision tower (``visual.*``, whose attention uses ``qkv``/``proj``) stays frozen. Every other base weight is
frozen too, so the trainable set is exactly the LoRA A/B matrices.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel

    from vlm2rec_ray.config import LoraConfig

__all__ = ["apply_adapters", "apply_lora", "load_lora_adapter", "lora_module_names", "trainable_parameter_names"]


def apply_adapters(backbone: nn.Module, cfg: LoraConfig) -> nn.Module:
    """The adapters ``cfg.kind`` names: :func:`apply_lora` (a ``PeftModel``) or MoDA
    (:func:`vlm2rec_ray.model.moda.apply_moda`, in place: the backbone itself is returned)."""
    if cfg.kind == "moda":
        from vlm2rec_ray.model.moda import apply_moda

        apply_moda(backbone, target_modules=cfg.target_modules, r=cfg.r, alpha=cfg.alpha,
                   num_experts=cfg.num_experts, dropout=cfg.dropout)
        return backbone
    return apply_lora(backbone, cfg)


def apply_lora(backbone: nn.Module, cfg: LoraConfig) -> PeftModel:
    """Wrap ``backbone`` (in place) with LoRA adapters as configured.

    Args:
        backbone: the loaded VLM (bare ``*VLModel`` from ``load_backbone``).
        cfg: :class:`vlm2rec_ray.config.LoraConfig` (``enabled`` must be true).

    Returns:
        The ``PeftModel``; only its LoRA parameters require grad.

    Raises:
        ValueError: LoRA disabled in the config, or the target regex matched no module.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if not cfg.enabled:
        raise ValueError("apply_lora was called with lora.enabled=false; set lora.enabled=true or skip apply_lora")
    pattern = re.compile(cfg.target_modules)
    matched = [name for name, module in backbone.named_modules()
               if pattern.fullmatch(name) and isinstance(module, nn.Linear)]
    if not matched:
        raise ValueError(
            f"lora.target_modules={cfg.target_modules!r} matches no nn.Linear in {type(backbone).__name__}; "
            "module names look like 'language_model.layers.0.self_attn.q_proj'"
        )
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, bias="none")
    return get_peft_model(backbone, peft_cfg)


def load_lora_adapter(backbone: nn.Module, adapter_dir: str, *, is_trainable: bool = False,
                      merge: bool = False) -> Any:
    """Load a saved adapter onto ``backbone``; with ``merge`` fold it into the weights (faster inference)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(backbone, adapter_dir, is_trainable=is_trainable)
    return model.merge_and_unload() if merge else model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad`` (for a LoRA model: the lora_A/lora_B weights)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def lora_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that carry LoRA adapters."""
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A) > 0]
