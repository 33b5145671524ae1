"""The pretrained-like tiny backbone (model/pretrain.py): recipe checks, determinism, the corpus kept apart from
evaluation catalogs, the cache, and that the generic objectives actually train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlm2rec_ray.model.backbone import load_backbone
from vlm2rec_ray.model.pretrain import (
    PretrainRecipe,
    caption,
    ensure_pretrained_backbone,
    pretrain_backbone,
    recipe_hash,
)

SMALL = {"corpus_items": 48, "batch_size": 8, "set_max": 4}


def test_caption_names_title_and_picture_attributes() -> None:
    attrs = {"colour": "red", "texture": "striped", "shape": "star", "brand": "Corvo", "adjective": "compact",
             "material": "ceramic", "category": "mug"}
    assert caption(attrs) == "a red striped star; Corvo compact ceramic mug"


@pytest.mark.parametrize(("field", "value", "match"), [
    ("image_every", 0, "image_every must be >= 1"),
    ("batch_size", 1, "batch_size must be >= 2"),
    ("set_min", 1, "2 <= set_min <= set_max"),
    ("corpus_items", 4, "corpus_items must be >= batch_size"),
])
def test_bad_recipes_fail_with_the_rule(field: str, value: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PretrainRecipe(**{field: value})


def test_recipe_hash_is_stable_and_names_the_cache(tmp_path: Path) -> None:
    r = PretrainRecipe(steps=2, **SMALL)
    assert recipe_hash(r) == recipe_hash(PretrainRecipe(steps=2, **SMALL)) != recipe_hash(PretrainRecipe(steps=3, **SMALL))
    calls: list[str] = []
    first = ensure_pretrained_backbone(tmp_path, r, progress=calls.append)
    assert first.name == f"pretrained-{recipe_hash(r)}" and calls  # built
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    calls.clear()
    assert ensure_pretrained_backbone(tmp_path, r, progress=calls.append) == first and not calls  # reused
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob("*.tmp*"))  # no half-built directory left behind


def test_same_recipe_same_weights_and_a_normal_checkpoint(tmp_path: Path) -> None:
    r = PretrainRecipe(steps=3, **SMALL)
    a = pretrain_backbone(tmp_path / "a", r)
    pretrain_backbone(tmp_path / "b", r)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    meta = json.loads((tmp_path / "a" / "vlm2rec_pretrain.json").read_text())
    assert meta["recipe_hash"] == recipe_hash(r) == a["recipe_hash"] and meta["corpus"]["id_prefix"] == "P"
    # Loads through the production path, tokenizer and processor included.
    model, processor = load_backbone(str(tmp_path / "a"))
    assert type(model).__name__ == "Qwen2_5_VLModel" and processor.tokenizer.padding_side == "left"


def test_tokenizer_learns_the_corpus_words() -> None:
    """With the pre-training text in its corpus, the BPE keeps caption words whole (the base corpus lacks them)."""
    from vlm2rec_ray.model.tiny import build_tiny_tokenizer

    lines = ["a red striped star; Corvo compact ceramic mug"] * 300
    assert len(build_tiny_tokenizer(0, vocab_size=512).tokenize(" ceramic")) > 1
    assert build_tiny_tokenizer(0, vocab_size=512, extra_corpus=lines).tokenize(" ceramic Corvo") == ["Ġceramic", "ĠCorvo"]


def test_corpus_is_disjoint_from_the_evaluation_catalog() -> None:
    from vlm2rec_ray.data.synthetic import build_synthetic, sample_items

    r = PretrainRecipe()
    corpus = sample_items(r.corpus_items, seed=r.corpus_seed, prefix="P")
    catalog = build_synthetic(num_items=240, num_users=20, seed=0)["items"]
    assert not {c["item_id"] for c in corpus} & {i["item_id"] for i in catalog}
    assert r.corpus_seed != 0


def test_the_generic_objectives_train(tmp_path: Path) -> None:
    """50 steps: the title-caption term falls well below its chance level log(8) = 2.08 and keeps falling."""
    summary = pretrain_backbone(tmp_path / "m", PretrainRecipe(steps=50, image_every=2, **SMALL))
    first, last = summary["losses"][0], summary["losses"][-1]
    assert set(last) >= {"title_caption", "text_set", "image_caption", "image_set"}
    assert last["title_caption"] < first["title_caption"] < 2.0
    assert summary["wall_s"] > 0
