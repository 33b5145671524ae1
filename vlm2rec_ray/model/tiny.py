"""An offline, deterministic tiny Qwen2.5-VL for tests, CI and the demo.

``build_tiny_backbone(path, seed)`` trains a byte-level BPE tokenizer on a fixed corpus with
``tokenizers`` (no download), builds a random-init ``Qwen2_5_VLModel`` from config, and saves model,
tokenizer and image processor with ``save_pretrained``. The directory then loads through exactly the
same :func:`vlm2rec_ray.model.backbone.load_backbone` path that a real checkpoint uses.

Same ``seed`` -> bitwise-identical weights and tokenizer. About 0.2 M parameters, under 1 MB on disk.

``shape=`` builds the same offline backbone at other sizes for benchmarks (:data:`SHAPES`): ``small``
(17M parameters, a CPU benchmark whose forward bounds the pipeline) and ``3b`` (Qwen2.5-VL-3B's text and
vision towers layer for layer: the FLOPs per token of the real model; only the vocabulary is the tiny
tokenizer's, and an embedding lookup costs no FLOPs). Random weights, built on any device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Qwen2.5-VL's special tokens, in the order the real tokenizer has them.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A short Qwen-style chat template: each image becomes <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS_WORDS = (
    "describe this item text image sequence in one word user history title product red green blue "
    "yellow black white orange purple circle square triangle star striped dotted plain checked small "
    "large vintage modern classic sport casual cotton leather wool metal wooden glass shoe shirt lamp "
    "mug bag hat watch book toy chair table phone camera guitar 0 1 2 3 4 5 6 7 8 9 ) ( : , . - "
    "system assistant the a an of and with for"
).split()

# Small enough for CPU tests, shaped like the real thing (GQA, mRoPE, windowed vision attention).
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    # mrope_section must sum to head_dim / 2 = (64 / 4) / 2 = 8.
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
}
TINY_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "fullatt_block_indexes": [1],
    "window_size": 112,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
# A random Qwen2.5-VL heavy enough that its forward pass, not image fetching, bounds the embed pipeline on a
# CPU box: ~17M parameters, about 35 ms per item on one core (benchmarks/embed_pipeline.py).
SMALL_TEXT = {**TINY_TEXT, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 4,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 8, 8]}}
SMALL_VISION = {**TINY_VISION, "hidden_size": 256, "intermediate_size": 512, "depth": 4, "num_heads": 4,
                "out_hidden_size": 512, "fullatt_block_indexes": [3]}
# Qwen2.5-VL-3B-Instruct's config.json (text: 36 layers of 2048, GQA 16/2 heads, SwiGLU 11008; vision: 32
# blocks of 1280, windowed attention but for blocks 7/15/23/31, merger to 2048).
QWEN25VL_3B_TEXT = {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                    "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
                    "rms_norm_eps": 1e-6,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}
QWEN25VL_3B_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 2048, "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
SHAPES = {"tiny": (TINY_TEXT, TINY_VISION), "small": (SMALL_TEXT, SMALL_VISION),
          "3b": (QWEN25VL_3B_TEXT, QWEN25VL_3B_VISION)}
# 56x56 .. 224x224 images -> 4 .. 64 vision tokens each.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 224 * 224


def _corpus(seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(2000):
        lines.append(" ".join(rng.choice(_CORPUS_WORDS) for _ in range(rng.randint(3, 12))))
    return lines


def build_tiny_tokenizer(seed: int = 0, vocab_size: int = 400, extra_corpus: list[str] | None = None):
    """Train a byte-level BPE on a fixed corpus (plus ``extra_corpus`` lines, e.g. a pre-training corpus's
    text) and wrap it as a left-padding ``Qwen2Tokenizer``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(seed) + list(extra_corpus or []), vocab_size=vocab_size, min_frequency=2,
                            show_progress=False)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="left",  # must be in the constructor to be persisted (last-token pooling)
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(tok: Any, shape: str = "tiny") -> Any:
    """The ``Qwen2_5_VLConfig`` of :data:`SHAPES` ``[shape]`` with the tiny tokenizer ``tok``'s vocabulary and
    special-token ids."""
    from transformers import Qwen2_5_VLConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown backbone shape {shape!r}; pick one of {sorted(SHAPES)}")
    text, vision = SHAPES[shape]
    return Qwen2_5_VLConfig(
        text_config={
            **text,
            "vocab_size": (len(tok) + 63) // 64 * 64,
            "bos_token_id": None,
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tok.pad_token_id,
        },
        vision_config=dict(vision),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )


def build_tiny_backbone(path: str | os.PathLike[str], seed: int = 0, *, shape: str = "tiny",
                        device: str | None = None, dtype: Any = None) -> Path:
    """Write a deterministic random-init Qwen2.5-VL (model + tokenizer + image processor) to ``path``.

    Args:
        path: output directory (created).
        seed: fixes tokenizer training corpus and weight initialisation.
        shape: a key of :data:`SHAPES` (``tiny`` for tests; ``small`` / ``3b`` for benchmarks).
        device: where to initialise the weights (``cuda`` for ``3b``: 3.4B parameters); default CPU.
        dtype: a ``torch.dtype`` for the weights (e.g. ``torch.bfloat16``); default float32.

    Returns:
        The directory, loadable by :func:`vlm2rec_ray.model.backbone.load_backbone`.
    """
    import torch
    from transformers import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlm2rec_ray.model.backbone import ImageOnlyQwen25VLProcessor

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(seed)
    config = tiny_config(tok, shape)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = Qwen2_5_VLModel._from_config(config, dtype=dtype) if dtype is not None else Qwen2_5_VLModel(config)
    model.eval().save_pretrained(out)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=TINY_MIN_PIXELS,
        max_pixels=TINY_MAX_PIXELS,
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
    )
    processor = ImageOnlyQwen25VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    (out / "vlm2rec_tiny.json").write_text(json.dumps({"seed": seed, "shape": shape, "builder": "vlm2rec_ray.model.tiny"}))
    return out
