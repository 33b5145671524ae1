"""VLM2Rec's prompts (arXiv 2603.17450, section 2.2.1): separate text and image prompts, items at index 0.

External fusion encodes a history twice. The text prompt P_T lists the titles and the image prompt P_V
lists the images, each entry numbered ``i)`` in chronological order, followed by a one-word summarisation
instruction whose last token's final hidden state is the embedding (PromptEOL-style)::

    P_T:  0) <title_0> 1) <title_1> ...\\nDescribe this item text sequence in one word:
    P_V:  0) <image_0> 1) <image_1> ...\\nDescribe this item image sequence in one word:

An item is the same template restricted to index 0 (``0) <title>`` / ``0) <image>``), so items and
histories live in one space. The interleaved variant (internal fusion, the paper's baseline) pairs each
image with its title in one prompt: ``0) <image_0> <title_0> 1) ...\\nDescribe this item sequence in one
word:``.

The functions return a chat message *content* (a string for text-only prompts, a list of
``{"type": "text"|"image"}`` parts otherwise); :func:`render_prompt` wraps it as the user turn of the
backbone's chat template with the generation prompt appended, which is what the encoder tokenises.

Titles are cleaned: whitespace collapsed, chat/special-token markup (``<|...|>``) removed so a title can
never inject image placeholders or turn markers, and optionally cut to ``max_title_chars``.
"""

from __future__ import annotations

import re
from typing import Any

TEXT_SEQUENCE_INSTRUCTION = "Describe this item text sequence in one word:"
IMAGE_SEQUENCE_INSTRUCTION = "Describe this item image sequence in one word:"
INTERLEAVED_SEQUENCE_INSTRUCTION = "Describe this item sequence in one word:"

Content = str | list[dict[str, str]]

_SPECIAL = re.compile(r"<\|[^<>|]*\|>")
_SPACE = re.compile(r"\s+")

__all__ = [
    "IMAGE_SEQUENCE_INSTRUCTION",
    "INTERLEAVED_SEQUENCE_INSTRUCTION",
    "TEXT_SEQUENCE_INSTRUCTION",
    "clean_title",
    "image_item_prompt",
    "image_sequence_prompt",
    "interleaved_item_prompt",
    "interleaved_sequence_prompt",
    "render_prompt",
    "text_item_prompt",
    "text_sequence_prompt",
]


def clean_title(title: str, max_chars: int | None = None) -> str:
    """One line of plain text: special-token markup removed, whitespace collapsed, optionally truncated."""
    if not isinstance(title, str):
        raise TypeError(f"item title must be a string, got {type(title).__name__}: {title!r}")
    text = _SPACE.sub(" ", _SPECIAL.sub("", title)).strip()
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars].rstrip()
    return text


def _index(i: int) -> str:
    return f"{i}) " if i == 0 else f" {i}) "


def text_sequence_prompt(titles: list[str], *, max_title_chars: int | None = None) -> str:
    """P_T: ``0) <t0> 1) <t1> ...`` then the text instruction.

    Example: ``["Red mug", "Blue  lamp"]`` ->
    ``"0) Red mug 1) Blue lamp\\nDescribe this item text sequence in one word:"``.
    """
    if not titles:
        raise ValueError("a text sequence prompt needs at least one title; got an empty history")
    listing = "".join(_index(i) + clean_title(t, max_title_chars) for i, t in enumerate(titles))
    return f"{listing}\n{TEXT_SEQUENCE_INSTRUCTION}"


def image_sequence_prompt(n_images: int) -> list[dict[str, str]]:
    """P_V: ``0) <image> 1) <image> ...`` then the image instruction, as chat content parts."""
    if n_images < 1:
        raise ValueError(f"an image sequence prompt needs at least one image; got n_images={n_images}")
    parts: list[dict[str, str]] = []
    for i in range(n_images):
        parts += [{"type": "text", "text": _index(i)}, {"type": "image"}]
    parts.append({"type": "text", "text": f"\n{IMAGE_SEQUENCE_INSTRUCTION}"})
    return parts


def interleaved_sequence_prompt(titles: list[str], *, max_title_chars: int | None = None) -> list[dict[str, str]]:
    """Internal fusion (baseline): ``0) <image> <t0> 1) <image> <t1> ...`` then the joint instruction."""
    if not titles:
        raise ValueError("an interleaved prompt needs at least one item; got an empty history")
    parts: list[dict[str, str]] = []
    for i, t in enumerate(titles):
        parts += [{"type": "text", "text": _index(i)}, {"type": "image"},
                  {"type": "text", "text": " " + clean_title(t, max_title_chars)}]
    parts.append({"type": "text", "text": f"\n{INTERLEAVED_SEQUENCE_INSTRUCTION}"})
    return parts


def text_item_prompt(title: str, *, max_title_chars: int | None = None) -> str:
    """An item's text prompt: P_T restricted to index 0."""
    return text_sequence_prompt([title], max_title_chars=max_title_chars)


def image_item_prompt() -> list[dict[str, str]]:
    """An item's image prompt: P_V restricted to index 0."""
    return image_sequence_prompt(1)


def interleaved_item_prompt(title: str, *, max_title_chars: int | None = None) -> list[dict[str, str]]:
    """An item's interleaved prompt: the internal-fusion template restricted to index 0."""
    return interleaved_sequence_prompt([title], max_title_chars=max_title_chars)


def render_prompt(processor: Any, content: Content) -> str:
    """The full model input text: ``content`` as the user turn of the chat template + generation prompt."""
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
