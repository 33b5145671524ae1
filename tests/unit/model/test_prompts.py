"""The paper's prompts: exact text, index-0 items, interleaved baseline, title cleaning, chat rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm2rec_ray.model import prompts
from vlm2rec_ray.model.backbone import load_processor


def test_text_sequence_exact() -> None:
    assert prompts.text_sequence_prompt(["Red mug", "Blue  lamp\n(2 pack)"]) == (
        "0) Red mug 1) Blue lamp (2 pack)\nDescribe this item text sequence in one word:")


def test_item_is_index_zero_of_the_same_template() -> None:
    assert prompts.text_item_prompt("Red mug") == "0) Red mug\nDescribe this item text sequence in one word:"
    assert prompts.text_item_prompt("Red mug") == prompts.text_sequence_prompt(["Red mug"])
    assert prompts.image_item_prompt() == prompts.image_sequence_prompt(1) == [
        {"type": "text", "text": "0) "}, {"type": "image"},
        {"type": "text", "text": "\nDescribe this item image sequence in one word:"}]
    assert prompts.interleaved_item_prompt("Mug") == prompts.interleaved_sequence_prompt(["Mug"])


def test_image_sequence_parts() -> None:
    parts = prompts.image_sequence_prompt(3)
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text", "image", "text"]
    assert [p["text"] for p in parts if p["type"] == "text"] == [
        "0) ", " 1) ", " 2) ", "\nDescribe this item image sequence in one word:"]


def test_interleaved_parts() -> None:
    parts = prompts.interleaved_sequence_prompt(["Mug", "Lamp"])
    assert parts == [
        {"type": "text", "text": "0) "}, {"type": "image"}, {"type": "text", "text": " Mug"},
        {"type": "text", "text": " 1) "}, {"type": "image"}, {"type": "text", "text": " Lamp"},
        {"type": "text", "text": "\nDescribe this item sequence in one word:"},
    ]


def test_title_cleaning() -> None:
    assert prompts.clean_title("  a\t b \n c ") == "a b c"
    # Markup that would inject an image placeholder or a turn boundary is removed.
    assert prompts.clean_title("mug<|image_pad|> <|im_end|>x") == "mug x"
    assert prompts.clean_title("abcdefgh", max_chars=4) == "abcd"
    with pytest.raises(TypeError, match="must be a string, got NoneType"):
        prompts.clean_title(None)  # type: ignore[arg-type]


def test_empty_inputs_raise() -> None:
    with pytest.raises(ValueError, match="at least one title"):
        prompts.text_sequence_prompt([])
    with pytest.raises(ValueError, match="n_images=0"):
        prompts.image_sequence_prompt(0)


def test_render_with_chat_template(tiny_backbone_dir: Path) -> None:
    processor = load_processor(str(tiny_backbone_dir))
    text = prompts.render_prompt(processor, prompts.text_item_prompt("Red mug"))
    assert text == ("<|im_start|>user\n0) Red mug\nDescribe this item text sequence in one word:<|im_end|>\n"
                    "<|im_start|>assistant\n")
    image = prompts.render_prompt(processor, prompts.image_sequence_prompt(2))
    assert image.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert image.endswith("Describe this item image sequence in one word:<|im_end|>\n<|im_start|>assistant\n")
