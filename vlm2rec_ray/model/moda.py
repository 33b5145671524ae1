"""SDA's Modality-Disentangled Adaptation (MoDA): LoRA split into experts routed by modality.

What SDA's code does (RaoZhongtao/SDA @28637dbf, ``llm/peft/tuners/moelora/moelora_model.py``;
../shared/papers/sda-spec.md): rank r is split into E experts ``A_e [r/E, d_in]``, ``B_e [d_out, r/E]``; per
layer a modality table ``Embedding(2, 64)`` and a gate ``Linear(64, E, bias=False)`` give softmax weights
``w(m)`` over the experts for modality m (0 image, 1 text; constant over a sequence's tokens), and

    y = W0 x + (alpha / r) * sum_e w_e(m) * B_e A_e dropout(x)

with ``A ~ N(0, 0.01^2)``, ``B = 0``. :func:`moda_delta` is the adapter update as a pure function; E = 1
(gate 1) is plain LoRA.

In this project the text prompt and the image prompt are separate forward passes (external fusion), so the
modality is one value per forward: the encoder wraps each pass in :func:`modality` (``TEXT`` or ``IMAGE``)
and every :class:`MoDALinear` reads it. Activation checkpointing recomputes a layer during backward, outside
that ``with`` block; :func:`checkpoint_context` (passed as ``context_fn`` to ``torch.utils.checkpoint``)
replays the modality of the original forward. Differences from SDA's code, both deliberate: one dropout
mask for all experts (SDA draws one per expert), and the gate is computed once per forward, not per token
(the same values: it depends on the modality only).

Because the gate depends on the modality only, a trained MoDA layer is, for each modality, an ordinary
rank-r LoRA: ``B' = [w_1 B_1 | ... | w_E B_E]``, ``A' = [A_1; ...; A_E]``, same ``alpha / r``.
:func:`lora_weights_for` gives those per-modality matrices (for tools that only know LoRA).

Export (:func:`save_moda` / :func:`load_moda`): no single merged model exists (the merged weights differ per
modality), so a MoDA run exports the base weights unchanged (``save_pretrained`` after :func:`strip_moda`) plus
``moda_config.json`` (r, alpha, experts, dropout, the adapted module names) and ``moda.safetensors`` (every
expert, modality table and gate). :func:`vlm2rec_ray.model.backbone.load_backbone` re-applies MoDA when it
finds ``moda_config.json``, so the embedding actors, the evaluation and ``load_backbone(output_uri)`` need
nothing new: the encoder already sets the modality of each pass. Serving cost: the adapters stay unmerged
(one extra rank-r product per adapted layer, as an unmerged LoRA).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CONFIG_NAME", "IMAGE", "TEXT", "WEIGHTS_NAME", "MoDALinear", "apply_moda", "checkpoint_context",
           "current_modality", "load_moda", "lora_weights_for", "moda_delta", "modality", "save_moda", "strip_moda"]

CONFIG_NAME = "moda_config.json"
WEIGHTS_NAME = "moda.safetensors"

IMAGE = 0  # SDA's ids: 0 = image sequence, 1 = text sequence
TEXT = 1
_current: list[int] = []  # a stack: the modality of the forward in progress


def moda_delta(x: Tensor, A: Tensor, B: Tensor, gate: Tensor, scaling: float) -> Tensor:
    """The MoDA update ``scaling * sum_e gate[n, e] * B_e A_e x[n]`` of every sample n.

    Hand-worked (two samples, two experts of rank 1, d_in = d_out = 2, scaling 2): ``A_0 = [[1, 0]]``,
    ``A_1 = [[0, 1]]``, ``B_0 = [[1], [0]]``, ``B_1 = [[0], [1]]`` (expert 0 copies the first coordinate, expert 1
    the second); ``x = [[3, 4], [3, 4]]``, gates ``[1, 0]`` and ``[0.25, 0.75]`` give ``[[6, 0], [1.5, 6]]``.

    Args:
        x: ``[N, ..., d_in]`` inputs (e.g. ``[N, T, d_in]`` tokens; the gate is constant over the middle dims).
        A: ``[E, r/E, d_in]`` down-projections.
        B: ``[E, d_out, r/E]`` up-projections.
        gate: ``[N, E]`` expert weights per sample (rows sum to 1 after SDA's softmax).
        scaling: ``alpha / r`` (r the total rank).

    Returns:
        ``[N, ..., d_out]``.
    """
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(f"moda_delta expects A [E, r/E, d_in] and B [E, d_out, r/E], got {tuple(A.shape)} and "
                         f"{tuple(B.shape)}")
    if x.shape[-1] != A.shape[2]:
        raise ValueError(f"x's last dim {x.shape[-1]} is not A's d_in {A.shape[2]}")
    if gate.dim() != 2 or gate.shape != (x.shape[0], A.shape[0]):
        raise ValueError(f"gate must be [N, E] = [{x.shape[0]}, {A.shape[0]}], got {tuple(gate.shape)}")
    n = x.shape[0]
    flat = x.reshape(n, -1, x.shape[-1])  # (N, T, d_in)
    low = torch.einsum("ntd,erd->nter", flat, A)  # (N, T, E, r/E)
    low = low * gate.to(low.dtype)[:, None, :, None]  # weight each expert per sample
    out = torch.einsum("nter,eor->nto", low, B) * scaling  # (N, T, d_out)
    return out.reshape(*x.shape[:-1], B.shape[1])


@contextlib.contextmanager
def modality(m: int) -> Iterator[None]:
    """Every :class:`MoDALinear` forward inside this block routes by modality ``m`` (``TEXT`` or ``IMAGE``)."""
    if m not in (IMAGE, TEXT):
        raise ValueError(f"modality must be vlm2rec_ray.model.moda.TEXT (1) or IMAGE (0), got {m!r}")
    _current.append(m)
    try:
        yield
    finally:
        _current.pop()


def current_modality() -> int | None:
    """The modality of the forward in progress, or None outside :func:`modality`."""
    return _current[-1] if _current else None


def checkpoint_context() -> tuple[Any, Any]:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: the recomputation during backward runs
    under the modality the original forward had."""
    m = current_modality()
    return contextlib.nullcontext(), (_Replay(m) if m is not None else contextlib.nullcontext())


class _Replay:
    """Re-enterable :func:`modality` block: a layer is recomputed once per backward pass over it, and a
    ``torch.autograd.grad(..., retain_graph=True)`` followed by another backward recomputes it twice."""

    def __init__(self, m: int):
        self.m = m

    def __enter__(self) -> None:
        _current.append(self.m)

    def __exit__(self, *exc: object) -> None:
        _current.pop()


class MoDALinear(nn.Module):
    """``y = W0 x + (alpha / r) * sum_e w_e(m) B_e A_e dropout(x)`` around a frozen ``base`` Linear.

    Args:
        base: the frozen linear layer (its weight and bias are not trained).
        r: total rank, split over ``num_experts`` experts (``r % num_experts == 0``).
        alpha: LoRA alpha (scaling ``alpha / r`` with the full r, as SDA).
        num_experts: E.
        dropout: dropout on the adapter's input.
        gate_dim: width of the modality embedding (SDA: 64).
    """

    def __init__(self, base: nn.Linear, *, r: int, alpha: float, num_experts: int, dropout: float = 0.0,
                 gate_dim: int = 64):
        super().__init__()
        if num_experts < 1 or r % num_experts:
            raise ValueError(f"MoDA needs r divisible by num_experts, got r={r}, num_experts={num_experts}; pick "
                             "lora.r as a multiple of lora.num_experts (e.g. r=16, num_experts=8)")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        d_in, d_out, k = base.in_features, base.out_features, r // num_experts
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.randn(num_experts, k, d_in, dtype=dtype, device=device) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, k, dtype=dtype, device=device))
        self.modality_embedding = nn.Embedding(2, gate_dim, dtype=dtype, device=device)
        self.gate = nn.Linear(gate_dim, num_experts, bias=False, dtype=dtype, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.num_experts = int(r), float(alpha), int(num_experts)
        self.scaling = float(alpha) / int(r)

    def expert_weights(self, m: int) -> Tensor:
        """``[E]`` softmax gate of modality ``m``."""
        idx = torch.tensor([m], device=self.modality_embedding.weight.device)
        return torch.softmax(self.gate(self.modality_embedding(idx)), dim=-1)[0]

    def forward(self, x: Tensor) -> Tensor:
        m = current_modality()
        if m is None:
            raise RuntimeError("a MoDA layer ran outside `with vlm2rec_ray.model.moda.modality(TEXT|IMAGE)`; the "
                               "VLM2RecEncoder sets it for every pass; other callers must set it too")
        y = self.base(x)
        gate = self.expert_weights(m).to(x.dtype).expand(x.shape[0], -1)  # (N, E), one modality per forward
        return y + moda_delta(self.dropout(x), self.lora_A.to(x.dtype), self.lora_B.to(x.dtype), gate, self.scaling)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, num_experts={self.num_experts}"


def apply_moda(model: nn.Module, *, target_modules: str, r: int, alpha: float, num_experts: int,
               dropout: float = 0.0, gate_dim: int = 64) -> list[str]:
    """Replace every ``nn.Linear`` whose name matches ``target_modules`` (a regex, full match) by a
    :class:`MoDALinear`, freeze everything else; returns the replaced names.

    Raises:
        ValueError: the regex matches no Linear.
    """
    pattern = re.compile(target_modules)
    names = [n for n, mod in model.named_modules() if pattern.fullmatch(n) and isinstance(mod, nn.Linear)]
    if not names:
        raise ValueError(f"lora.target_modules={target_modules!r} matches no nn.Linear in {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoDALinear(getattr(parent, child), r=r, alpha=alpha, num_experts=num_experts,
                                          dropout=dropout, gate_dim=gate_dim))
    return names


@torch.no_grad()
def lora_weights_for(layer: MoDALinear, m: int) -> tuple[Tensor, Tensor]:
    """``(A', B')`` of the rank-r LoRA equal to ``layer`` under modality ``m``: ``A' [r, d_in]``,
    ``B' [d_out, r]``; ``alpha / r`` is unchanged, so ``scaling * B' A' = scaling * sum_e w_e B_e A_e``."""
    w = layer.expert_weights(m).float()  # (E,)
    a = layer.lora_A.float().reshape(-1, layer.lora_A.shape[-1])  # (E * r/E, d_in)
    b = torch.cat([w[e] * layer.lora_B[e].float() for e in range(layer.num_experts)], dim=1)  # (d_out, r)
    return a, b



def moda_layers(model: nn.Module) -> dict[str, MoDALinear]:
    """``{module name: MoDALinear}`` in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoDALinear)}


def save_moda(model: nn.Module, out_dir: str | Path) -> dict[str, Any]:
    """Write ``moda_config.json`` and ``moda.safetensors`` (the adapters of every MoDA layer) into ``out_dir``.

    Raises:
        ValueError: ``model`` has no MoDA layer.
    """
    from safetensors.torch import save_file

    layers = moda_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoDA layer to save")
    first = next(iter(layers.values()))
    config = {"r": first.r, "alpha": first.alpha, "num_experts": first.num_experts,
              "dropout": float(getattr(first.dropout, "p", 0.0)), "gate_dim": first.modality_embedding.embedding_dim,
              "modules": sorted(layers)}
    tensors = {f"{name}.{k}": v.detach().to("cpu").contiguous() for name, layer in layers.items()
               for k, v in layer.state_dict().items() if not k.startswith("base.")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    save_file(tensors, str(out / WEIGHTS_NAME))
    return config


def strip_moda(model: nn.Module) -> int:
    """Put every MoDA layer's base Linear back in its place (in place); returns how many were replaced."""
    layers = moda_layers(model)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    return len(layers)


def load_moda(model: nn.Module, model_dir: str | Path) -> list[str]:
    """Re-apply the MoDA adapters saved by :func:`save_moda` in ``model_dir`` onto ``model`` (in place).

    Raises:
        RuntimeError: a saved module or tensor has no counterpart in ``model`` (a different base model).
    """
    from safetensors.torch import load_file

    d = Path(model_dir)
    config = json.loads((d / CONFIG_NAME).read_text())
    names = list(config["modules"])
    missing = [n for n in names if not isinstance(_find(model, n), nn.Linear)]
    if missing:
        raise RuntimeError(f"{d / CONFIG_NAME} adapts {len(missing)} modules that are not Linear layers of "
                           f"{type(model).__name__}, e.g. {missing[:3]}; load it onto the base model it was trained on")
    apply_moda(model, target_modules="|".join(re.escape(n) for n in names), r=config["r"], alpha=config["alpha"],
               num_experts=config["num_experts"], dropout=config["dropout"], gate_dim=config.get("gate_dim", 64))
    params = dict(model.named_parameters())
    tensors = load_file(str(d / WEIGHTS_NAME))
    unknown = sorted(set(tensors) - set(params))
    absent = sorted(n for name in names for n in (f"{name}.lora_A", f"{name}.lora_B") if n not in tensors)
    if unknown or absent:
        raise RuntimeError(f"{d / WEIGHTS_NAME} does not match {d / CONFIG_NAME}: unknown tensors {unknown[:3]}, "
                           f"missing {absent[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    return names


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
