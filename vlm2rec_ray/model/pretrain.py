"""A pretrained-like tiny Qwen2.5-VL: the miniature "Vanilla" backbone the testbed starts from.

VLM2Rec fixes a failure of *pretrained* VLMs (arXiv 2603.17450, section 3): their text and image spaces are
already structured, text the stronger one, and contrastive SFT widens that gap. A random-init backbone has
no structure to lose, so it cannot show the failure. :func:`pretrain_backbone` gives the tiny backbone of
:mod:`vlm2rec_ray.model.tiny` a short, seeded, generic pre-training that knows nothing of users or
sequences, on a corpus **disjoint** from any evaluation catalog (items of the synthetic generator drawn with
another seed and id prefix; their attributes and pictures only, never users):

- every step, title <-> caption InfoNCE: a caption names what both the title and the picture show
  (``"a red striped star; Corvo compact ceramic mug"``), so the text space learns the title attributes;
- every step, a *set* term: a text prompt listing 2-10 random corpus titles against the title of one member
  (the model learns to summarise a list, as the sequence prompts need);
- every ``image_every``-th step, image <-> caption InfoNCE and the same set term over images: the picture
  attributes (shape, colour, texture) are learnt too, but from fewer updates, so vision ends up the weaker
  modality, as in the paper's Vanilla rows (Table 1).

Everything is trained (full fine-tuning, vision tower included) with AdamW. The tokenizer is the tiny
byte-level BPE trained offline on its base corpus plus the pre-training captions, as a real model's
tokenizer is trained on its pre-training text. The result is a normal ``save_pretrained`` directory (plus
``vlm2rec_pretrain.json``: recipe, corpus, losses, build time) that :func:`load_backbone` reads like any
checkpoint. :func:`ensure_pretrained_backbone` caches it by recipe under ``build/backbones/``.

The recipe (:class:`PretrainRecipe`) was fixed, and written down in benchmarks/TESTBED.md, before any SFT vs
VLM2Rec comparison ran on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PretrainRecipe", "caption", "ensure_pretrained_backbone", "pretrain_backbone", "recipe_hash"]

MARKER = "vlm2rec_pretrain.json"


@dataclass(frozen=True)
class PretrainRecipe:
    """The pre-training recipe; its hash names the cached checkpoint.

    Attributes:
        seed: weight initialisation, tokenizer corpus and batch order.
        corpus_seed: the synthetic generator's seed for the corpus items (evaluation catalogs use others).
        corpus_items: how many corpus items (ids ``P00000``...; never an evaluation item id).
        image_size: side of the rendered corpus pictures (the testbed catalog's size).
        steps: optimizer steps.
        batch_size: corpus items per step.
        lr: AdamW learning rate (cosine decay to 10% after a 5% warm-up).
        tau: InfoNCE temperature of every term.
        image_every: the image terms run every ``image_every``-th step (1 = every step).
        set_min, set_max: how many titles / images a set prompt lists.
        min_pixels, max_pixels: image size bounds of the processor (56x56 -> 4 vision tokens).
        shape: a key of :data:`vlm2rec_ray.model.tiny.SHAPES`.
        vocab_size: BPE vocabulary before special tokens.
    """

    seed: int = 0
    corpus_seed: int = 90_001
    corpus_items: int = 1200
    image_size: int = 32
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    tau: float = 0.1
    image_every: int = 8
    set_min: int = 2
    set_max: int = 10
    min_pixels: int = 56 * 56
    max_pixels: int = 56 * 56
    shape: str = "tiny"
    vocab_size: int = 512

    def __post_init__(self) -> None:
        checks = [
            (self.corpus_items >= self.batch_size, "corpus_items must be >= batch_size"),
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (InfoNCE needs in-batch negatives)"),
            (self.lr > 0 and self.tau > 0, "lr and tau must be > 0"),
            (self.image_every >= 1, "image_every must be >= 1"),
            (2 <= self.set_min <= self.set_max, "need 2 <= set_min <= set_max"),
            (0 < self.min_pixels <= self.max_pixels, "need 0 < min_pixels <= max_pixels"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid pretrain recipe: {msg} (got {self})")


def recipe_hash(recipe: PretrainRecipe) -> str:
    """12 hex digits of the recipe's canonical JSON (the cache key)."""
    blob = json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def caption(attrs: dict[str, str]) -> str:
    """What a picture-and-title caption says: ``"a {colour} {texture} {shape}; {brand} {adjective} {material}
    {category}"``."""
    return (f"a {attrs['colour']} {attrs['texture']} {attrs['shape']}; {attrs['brand']} {attrs['adjective']} "
            f"{attrs['material']} {attrs['category']}")


def _corpus(recipe: PretrainRecipe) -> tuple[list[dict[str, str]], list[Any]]:
    """The corpus items and their pictures, decoded as the embedding pipeline decodes images."""
    from vlm2rec_ray.data.images import decode_image, encode_image
    from vlm2rec_ray.data.synthetic import render_item, sample_items

    items = sample_items(recipe.corpus_items, seed=recipe.corpus_seed, prefix="P")
    images = []
    for k, it in enumerate(items):
        png = encode_image(render_item(it["shape"], it["colour"], it["texture"], size=recipe.image_size,
                                       rng=random.Random(recipe.corpus_seed * 1_000_003 + k)), "PNG")
        im, reason = decode_image(png, min_pixels=recipe.min_pixels, max_pixels=recipe.max_pixels)
        if im is None:  # our own renderer: cannot happen unless the image code regressed
            raise RuntimeError(f"corpus picture {k} failed to decode ({reason})")
        images.append(im)
    return items, images


def _build_tokenizer_and_model(recipe: PretrainRecipe, texts: list[str]) -> tuple[Any, Any, Any]:
    import torch
    from transformers import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlm2rec_ray.model.backbone import ImageOnlyQwen25VLProcessor
    from vlm2rec_ray.model.tiny import CHAT_TEMPLATE, build_tiny_tokenizer, tiny_config

    tok = build_tiny_tokenizer(recipe.seed, vocab_size=recipe.vocab_size, extra_corpus=texts)
    torch.manual_seed(recipe.seed)
    model = Qwen2_5_VLModel(tiny_config(tok, recipe.shape))
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=recipe.min_pixels, max_pixels=recipe.max_pixels,
        size={"shortest_edge": recipe.min_pixels, "longest_edge": recipe.max_pixels})
    processor = ImageOnlyQwen25VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    return tok, model, processor


def _clip_loss(a: Any, b: Any, tau: float, keys: list[str]) -> Any:
    """Symmetric InfoNCE between two ``[B, d]`` views; rows with equal ``keys`` are never negatives."""
    import torch

    from vlm2rec_ray.objectives import info_nce

    ids = torch.tensor([hash(k) for k in keys])
    mask = ids[None, :] != ids[:, None]
    return (info_nce(a, b, tau, mask) + info_nce(b, a, tau, mask)) / 2


def pretrain_backbone(path: str | os.PathLike[str], recipe: PretrainRecipe | None = None, *,
                      progress: Callable[[str], None] | None = None, log_every: int = 25) -> dict[str, Any]:
    """Pre-train the tiny backbone per ``recipe`` and save it (model, tokenizer, processor) to ``path``.

    ``losses`` are means over windows of 25 steps; ``progress`` gets one line every ``log_every`` steps.

    Returns:
        The summary also written to ``<path>/vlm2rec_pretrain.json``: ``recipe``, ``recipe_hash``,
        ``corpus`` (items, seed, id prefix), ``losses`` (every 25 steps), ``wall_s``.
    """
    import torch

    from vlm2rec_ray.model.encoder import VLM2RecEncoder

    recipe = recipe or PretrainRecipe()
    started = time.perf_counter()
    items, images = _corpus(recipe)
    captions = [caption(it) for it in items]
    titles = [it["title"] for it in items]
    _, model, processor = _build_tokenizer_and_model(recipe, captions + titles)
    torch.manual_seed(recipe.seed)
    encoder = VLM2RecEncoder(model, processor, max_history=recipe.set_max)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    warmup = max(1, recipe.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_frac = (step - warmup) / max(1, recipe.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = random.Random(recipe.seed)
    n = len(items)
    order: list[int] = []
    losses: list[dict[str, float]] = []
    window: dict[str, float] = {}
    for step in range(recipe.steps):
        if len(order) < recipe.batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[:recipe.batch_size], order[recipe.batch_size:]
        sets = []
        for i in batch:  # each set lists its member i among others, at a random position
            others = rng.sample([j for j in range(n) if j != i], rng.randint(recipe.set_min, recipe.set_max) - 1)
            others.insert(rng.randrange(len(others) + 1), i)
            sets.append(others)
        keys = [captions[i] for i in batch]
        e_title = encoder.encode_text_items([titles[i] for i in batch])  # (B, d)
        e_cap = encoder.encode_text_items(keys)  # (B, d)
        z_set = encoder.encode_text_sequences([[titles[j] for j in s] for s in sets])  # (B, d)
        parts = {"title_caption": _clip_loss(e_title, e_cap, recipe.tau, keys),
                 "text_set": _clip_loss(z_set, e_title, recipe.tau, keys)}
        if step % recipe.image_every == 0:
            e_img = encoder.encode_image_items([images[i] for i in batch])
            z_img_set = encoder.encode_image_sequences([[images[j] for j in s] for s in sets])
            parts["image_caption"] = _clip_loss(e_img, e_cap, recipe.tau, keys)
            parts["image_set"] = _clip_loss(z_img_set, e_img, recipe.tau, keys)
        loss = sum(parts.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        for k, v in parts.items():
            window[k] = window.get(k, 0.0) + float(v.detach())
            window[f"n_{k}"] = window.get(f"n_{k}", 0.0) + 1
        if (step + 1) % 25 == 0 or step + 1 == recipe.steps:
            row = {"step": step + 1, "wall_s": round(time.perf_counter() - started, 1)}
            row.update({k: round(window[k] / window[f"n_{k}"], 4) for k in window if not k.startswith("n_")})
            losses.append(row)
            window = {}
            if progress is not None and ((step + 1) % log_every == 0 or step + 1 == recipe.steps):
                progress("pretrain " + " ".join(f"{k}={v}" for k, v in row.items()))
    model.eval()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {"recipe": dataclasses.asdict(recipe), "recipe_hash": recipe_hash(recipe),
               "corpus": {"items": n, "seed": recipe.corpus_seed, "id_prefix": "P", "generator":
                          "vlm2rec_ray.data.synthetic.sample_items"},
               "losses": losses, "wall_s": round(time.perf_counter() - started, 1),
               "builder": "vlm2rec_ray.model.pretrain"}
    (out / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def ensure_pretrained_backbone(root: str | os.PathLike[str], recipe: PretrainRecipe | None = None, *,
                               progress: Callable[[str], None] | None = None, log_every: int = 25) -> Path:
    """The cached checkpoint ``<root>/pretrained-<recipe hash>``, built first if missing (atomically: a
    half-built directory is never reused)."""
    recipe = recipe or PretrainRecipe()
    final = Path(root) / f"pretrained-{recipe_hash(recipe)}"
    if (final / MARKER).exists():
        return final
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pretrain_backbone(tmp, recipe, progress=progress, log_every=log_every)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
