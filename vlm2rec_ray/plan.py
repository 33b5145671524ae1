"""``vlm2rec plan``: per-GPU memory plan for fine-tuning a backbone with DeepSpeed ZeRO, and a recommendation.

For a backbone (a preset such as ``Qwen2.5-VL-32B`` or any ``config.json``), a GPU count and GPU memory,
it estimates per-GPU bytes of parameters, gradients, optimizer states and activations for ZeRO stages
0-3, LoRA or full fine-tuning, with or without CPU offload, and recommends the cheapest setting that fits.

Model states use DeepSpeed's own accounting (``estimate_zero2_model_states_mem_needs`` /
``estimate_zero3_model_states_mem_needs``: 2 bytes of 16-bit weights plus 18 bytes per trainable
parameter for 16-bit grads, fp32 grads, fp32 master weights and Adam's two moments); a test checks that
the full-fine-tuning numbers equal DeepSpeed's estimators. Under LoRA the frozen base weights cost 2 bytes
each (partitioned under ZeRO-3) and the 18-byte states apply to the adapter only.

Activations follow Korthikanti et al. (2022) for a transformer layer in 16-bit with fused (SDPA/flash)
attention: ``34 * T * h`` bytes per layer without checkpointing; with gradient checkpointing only each
layer's input ``2 * T * h`` is kept, plus one layer recomputed. One VLM2Rec training example runs four
sequences (history text prompt, history image prompt, target text, target image), all kept for backward.
These are estimates for planning (expect +-20%): leave the 15% headroom the recommendation keeps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30


@dataclass(frozen=True)
class Arch:
    """The shape numbers the plan needs (from a Qwen2(.5)-VL config.json)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_hidden: int = 1280
    vision_depth: int = 32
    vision_intermediate: int = 3420
    vision_out: int = 0  # defaults to hidden
    patch: int = 14
    merge: int = 2

    def text_layer_params(self) -> int:
        hd = self.hidden // self.heads
        q = self.hidden * self.hidden + self.hidden
        kv = 2 * (self.hidden * self.kv_heads * hd + self.kv_heads * hd)
        o = self.hidden * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return q + kv + o + mlp + 2 * self.hidden

    def vision_params(self) -> int:
        hv, iv = self.vision_hidden, self.vision_intermediate
        out = self.vision_out or self.hidden
        patch_embed = 3 * 2 * self.patch * self.patch * hv
        block = 3 * hv * hv + 3 * hv + hv * hv + hv + 3 * hv * iv + 2 * iv + hv + 2 * hv
        merged = hv * self.merge**2
        merger = hv + merged * merged + merged + merged * out + out
        return patch_embed + self.vision_depth * block + merger

    def total_params(self) -> int:
        return self.vocab * self.hidden + self.layers * self.text_layer_params() + self.hidden + self.vision_params()

    def largest_layer_params(self) -> int:
        return max(self.vocab * self.hidden, self.text_layer_params())

    def lora_params(self, r: int) -> int:
        """LoRA on q/k/v/o of every language-model layer: r * (in + out) per projection."""
        hd = self.hidden // self.heads
        kv_out = self.kv_heads * hd
        per_layer = r * (2 * self.hidden) * 2 + r * (self.hidden + kv_out) * 2
        return self.layers * per_layer


# Published Qwen2.5-VL shapes (config.json of the Instruct checkpoints).
PRESET_ARCHS: dict[str, Arch] = {
    "Qwen2.5-VL-3B": Arch("Qwen2.5-VL-3B", 2048, 36, 16, 2, 11008, 151936),
    "Qwen2.5-VL-7B": Arch("Qwen2.5-VL-7B", 3584, 28, 28, 4, 18944, 152064),
    "Qwen2.5-VL-32B": Arch("Qwen2.5-VL-32B", 5120, 64, 40, 8, 27648, 152064),
    "Qwen2.5-VL-72B": Arch("Qwen2.5-VL-72B", 8192, 80, 64, 8, 29568, 152064),
}


def resolve_arch(model: str) -> Arch:
    """A preset name (``Qwen2.5-VL-32B``, ``Qwen/Qwen2.5-VL-32B-Instruct``, ``32B``) or a config.json path/dir."""
    p = Path(model)
    if p.exists():
        cfg = json.loads((p / "config.json" if p.is_dir() else p).read_text())
        text = cfg.get("text_config") or cfg
        vis = cfg.get("vision_config", {})
        return Arch(
            name=str(model), hidden=text["hidden_size"], layers=text["num_hidden_layers"],
            heads=text["num_attention_heads"], kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            intermediate=text["intermediate_size"], vocab=text["vocab_size"],
            vision_hidden=vis.get("hidden_size", 1280), vision_depth=vis.get("depth", 32),
            vision_intermediate=vis.get("intermediate_size", 3420), vision_out=vis.get("out_hidden_size", 0),
            patch=vis.get("patch_size", 14), merge=vis.get("spatial_merge_size", 2),
        )
    key = model.split("/")[-1].removesuffix("-Instruct")
    for name, arch in PRESET_ARCHS.items():
        if key == name or key.upper() == name.rsplit("-", 1)[-1]:
            return arch
    raise ValueError(
        f"unknown model {model!r} for planning; use one of {sorted(PRESET_ARCHS)} or a path to a config.json"
    )


@dataclass(frozen=True)
class Workload:
    """What one training example costs in tokens (VLM2Rec: history of ``history`` items + one target)."""

    history: int = 10
    image_tokens: int = 64  # per image after 2x2 merge; 64 = 224x224 at patch 14
    title_tokens: int = 24
    prompt_tokens: int = 40

    def text_tokens(self) -> int:
        # history text prompt + history image prompt + target text + target image
        text = self.prompt_tokens + self.history * (self.title_tokens + 3)
        image = self.prompt_tokens + self.history * (self.image_tokens + 5)
        return text + image + (self.prompt_tokens + self.title_tokens) + (self.prompt_tokens + self.image_tokens)

    def vision_patches(self, merge: int) -> int:
        return (self.history + 1) * self.image_tokens * merge * merge


@dataclass
class PlanRow:
    zero_stage: int
    offload: str  # none | optimizer | optimizer+params
    params_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    total_gib: float
    cpu_gib: float
    fits: bool


def model_state_bytes(trainable: int, frozen: int, stage: int, gpus: int, largest_layer: int,
                      offload: str = "none") -> tuple[float, float, float, float]:
    """Per-GPU (params, grads, optimizer, cpu) bytes, DeepSpeed accounting (see module docstring).

    ``trainable`` parameters carry 2 bytes of 16-bit weights + 18 bytes of states; ``frozen`` ones 2 bytes.
    """
    n = max(gpus, 1)
    weights = 2.0 * (trainable + frozen)
    grads16, states = 2.0 * trainable, 16.0 * trainable  # states: fp32 grads 4 + fp32 params 4 + Adam 8
    if stage == 0:
        params, grads, opt = weights, grads16, states
    elif stage == 1:
        params, grads, opt = weights, grads16, states / n
    elif stage == 2:
        params, grads, opt = weights, grads16 / n, states / n
    elif stage == 3:
        params, grads, opt = weights / n + 4.0 * largest_layer, grads16 / n, states / n
    else:
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {stage}")
    cpu = 0.0
    if offload in ("optimizer", "optimizer+params"):
        if stage == 0:
            raise ValueError("optimizer offload needs ZeRO stage >= 1")
        cpu += (grads + opt) * n
        grads, opt = 0.0, 0.0
    if offload == "optimizer+params":
        if stage != 3:
            raise ValueError("parameter offload needs ZeRO stage 3")
        cpu += (params - 4.0 * largest_layer) * n
        params = 4.0 * largest_layer
    return params, grads, opt, cpu


def activation_bytes(arch: Arch, work: Workload, micro_batch: int, checkpointing: bool) -> float:
    t = work.text_tokens() * micro_batch
    v = work.vision_patches(arch.merge) * micro_batch
    if checkpointing:
        lm = 2.0 * t * arch.hidden * arch.layers + 34.0 * t * arch.hidden
        vis = 2.0 * v * arch.vision_hidden * arch.vision_depth + 34.0 * v * arch.vision_hidden
    else:
        lm = 34.0 * t * arch.hidden * arch.layers
        vis = 34.0 * v * arch.vision_hidden * arch.vision_depth
    return lm + vis


def plan(model: str, gpus: int, gpu_mem_gib: float, *, lora: bool = True, lora_r: int = 16,
         train_vision: bool = False, micro_batch: int = 8, checkpointing: bool = True,
         work: Workload | None = None, headroom: float = 0.85) -> dict:
    """Memory table for every ZeRO stage/offload setting and the recommended one.

    Returns:
        ``{"arch", "params", "trainable", "rows": [PlanRow...], "recommended": {...} | None}``.
    """
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if gpu_mem_gib <= 0:
        raise ValueError(f"--gpu-mem must be > 0 GiB, got {gpu_mem_gib}")
    arch = resolve_arch(model)
    work = work or Workload()
    total = arch.total_params()
    if lora:
        trainable = arch.lora_params(lora_r) + (arch.vision_params() if train_vision else 0)
        frozen = total - (arch.vision_params() if train_vision else 0)
    else:
        trainable, frozen = total, 0
    budget = gpu_mem_gib * headroom * GIB

    def rows_for(mb: int) -> list[PlanRow]:
        act = activation_bytes(arch, work, mb, checkpointing)
        out = []
        for stage, offload in [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (2, "optimizer"),
                               (3, "optimizer"), (3, "optimizer+params")]:
            p, g, o, cpu = model_state_bytes(trainable, frozen, stage, gpus, arch.largest_layer_params(), offload)
            tot = p + g + o + act
            out.append(PlanRow(stage, offload, p / GIB, g / GIB, o / GIB, act / GIB, tot / GIB, cpu / GIB,
                               tot <= budget))
        return out

    rows = rows_for(micro_batch)
    recommended = None
    # Prefer no offload and the lowest stage (least communication), then the largest micro-batch that fits.
    for mb in sorted({micro_batch, 8, 4, 2, 1}, reverse=True):
        if mb > micro_batch:
            continue
        fit = [r for r in rows_for(mb) if r.fits]
        if fit:
            best = min(fit, key=lambda r: (r.offload != "none", r.offload == "optimizer+params", r.zero_stage))
            recommended = {**asdict(best), "micro_batch": mb,
                           "grad_accum": max(1, micro_batch // mb)}
            break
    return {"arch": arch.name, "params": total, "trainable": trainable, "gpus": gpus, "gpu_mem_gib": gpu_mem_gib,
            "lora": lora, "micro_batch": micro_batch, "rows": rows, "recommended": recommended}


def format_plan(result: dict) -> str:
    lines = [
        f"{result['arch']}: {result['params'] / 1e9:.2f} B params, trainable {result['trainable'] / 1e6:.1f} M "
        f"({'LoRA' if result['lora'] else 'full'}), {result['gpus']} x {result['gpu_mem_gib']:g} GiB, "
        f"micro-batch {result['micro_batch']}",
        f"{'stage':>5} {'offload':<17}{'params':>8}{'grads':>8}{'optim':>8}{'activ':>8}{'total':>8}{'cpu':>8}  fits",
    ]
    for r in result["rows"]:
        lines.append(f"{r.zero_stage:>5} {r.offload:<17}{r.params_gib:>8.1f}{r.grads_gib:>8.1f}{r.optimizer_gib:>8.1f}"
                     f"{r.activations_gib:>8.1f}{r.total_gib:>8.1f}{r.cpu_gib:>8.1f}  {'yes' if r.fits else 'no'}")
    rec = result["recommended"]
    if rec is None:
        lines.append("recommended: nothing fits; add GPUs, use LoRA, or lower the image resolution / history")
    else:
        lines.append(f"recommended: ZeRO-{rec['zero_stage']}, offload {rec['offload']}, micro-batch "
                     f"{rec['micro_batch']} x grad_accum {rec['grad_accum']} ({rec['total_gib']:.1f} GiB per GPU, "
                     f"{rec['cpu_gib']:.0f} GiB CPU RAM in all for offload; 15% headroom kept)")
    return "\n".join(lines)
