"""The VLM2Rec encoder: last-token embeddings of histories and items from any loaded VLM backbone.

arXiv 2603.17450, sections 2.2-2.3. A history of items (chronological, the last ``max_history`` kept,
default 10) is encoded twice, once through the text prompt P_T (titles) and once through the image
prompt P_V (images) of :mod:`vlm2rec_ray.model.prompts`; an item is the same template at index 0. The
embedding is the final layer's hidden state at the last token (``last_hidden_state[:, -1]`` with left
padding). External fusion is the element-wise sum :func:`fuse` (no parameters); the interleaved
(internal-fusion) baseline encodes titles and images in one prompt.

Each ``encode_*`` call is one processor call and one backbone forward for the whole batch. Embeddings are
raw hidden states (not normalised, in the backbone's dtype) and carry gradients: training calls the
encoder directly, inference wraps it in ``torch.inference_mode()``.

    backbone, processor = load_backbone(cfg.model.name, min_pixels=..., max_pixels=...)
    backbone = apply_lora(backbone, cfg.lora)              # optional (PeftModel)
    encoder = VLM2RecEncoder(backbone, processor, max_history=cfg.model.max_history)
    encoder.enable_gradient_checkpointing()                # optional, training
    z_t, z_v = encoder.encode_sequences(histories_titles, histories_images)
    e_t, e_v = encoder.encode_items(target_titles, target_images)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vlm2rec_ray.model import moda, prompts

__all__ = ["EncoderOutput", "VLM2RecEncoder", "fuse"]


def fuse(a: Tensor, b: Tensor) -> Tensor:
    """External fusion (paper 2.3): the element-wise sum, ``z = z_T + z_V`` and ``e = e_T + e_V``."""
    if a.shape != b.shape:
        raise ValueError(f"cannot fuse embeddings of shapes {tuple(a.shape)} and {tuple(b.shape)}; both must be [B,d]")
    return a + b


class EncoderOutput(NamedTuple):
    """Sequence and item embeddings of one training batch, each ``[B, d]``."""

    z_t: Tensor
    z_v: Tensor
    e_t: Tensor
    e_v: Tensor


class VLM2RecEncoder(nn.Module):
    """Last-token embedder over a VLM backbone (bare ``*VLModel``, a ``*ForConditionalGeneration``, or a PEFT
    model wrapping either).

    Args:
        backbone: the loaded model (see :func:`vlm2rec_ray.model.backbone.load_backbone`); may be a PeftModel.
        processor: its processor, already configured with the image size bounds by ``load_backbone``.
        max_history: keep only the last ``max_history`` items of every history (paper: 10).
        max_title_chars: cut titles longer than this many characters (None: keep whole titles).
    """

    def __init__(self, backbone: nn.Module, processor: Any, *, max_history: int = 10,
                 max_title_chars: int | None = None):
        super().__init__()
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        if max_title_chars is not None and max_title_chars < 1:
            raise ValueError(f"max_title_chars must be >= 1 or None, got {max_title_chars}")
        self.backbone = backbone
        self.processor = processor
        # Last-token pooling reads position -1, which is every row's last real token only with left padding.
        processor.tokenizer.padding_side = "left"
        self.max_history = int(max_history)
        self.max_title_chars = max_title_chars
        config = backbone.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.hidden_size = int(text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    # ------------------------------------------------------------------ training / inference helpers

    def enable_gradient_checkpointing(self) -> None:
        """Non-reentrant activation checkpointing on the backbone (works through PEFT), with input grads on so
        checkpointed blocks see a grad-requiring input even when the embeddings are frozen.

        transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old
        name warns); the new one is used when the backbone has it."""
        # context_fn replays the MoDA modality of the original forward when a layer is recomputed in backward.
        kwargs = {"use_reentrant": False, "context_fn": moda.checkpoint_context}
        if hasattr(self.backbone, "activation_checkpointing_enable"):
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.backbone.enable_input_require_grads()

    def forward(self, seq_titles: Sequence[Sequence[str]], seq_images: Sequence[Sequence[Any]],
                item_titles: Sequence[str], item_images: Sequence[Any]) -> EncoderOutput:
        """One training batch: ``(z_t, z_v)`` of the histories and ``(e_t, e_v)`` of the target items."""
        z_t, z_v = self.encode_sequences(seq_titles, seq_images)
        e_t, e_v = self.encode_items(item_titles, item_images)
        return EncoderOutput(z_t, z_v, e_t, e_v)

    # ------------------------------------------------------------------ sequences

    def _truncate(self, history: Sequence[Any]) -> list[Any]:
        return list(history)[-self.max_history:]

    def encode_text_sequences(self, titles: Sequence[Sequence[str]]) -> Tensor:
        """``[B, d]`` embeddings of P_T over each history's last ``max_history`` titles."""
        contents = [prompts.text_sequence_prompt(self._truncate(t), max_title_chars=self.max_title_chars)
                    for t in _rows(titles, "titles")]
        with moda.modality(moda.TEXT):  # routes MoDA adapters, if any
            return self._embed(contents)

    def encode_image_sequences(self, images: Sequence[Sequence[Any]]) -> Tensor:
        """``[B, d]`` embeddings of P_V over each history's last ``max_history`` images."""
        rows = [self._truncate(r) for r in _rows(images, "images")]
        contents = [prompts.image_sequence_prompt(len(r)) for r in rows]
        with moda.modality(moda.IMAGE):
            return self._embed(contents, [img for r in rows for img in r])

    def encode_sequences(self, titles: Sequence[Sequence[str]],
                         images: Sequence[Sequence[Any]]) -> tuple[Tensor, Tensor]:
        """``(z_t, z_v)``, each ``[B, d]``: the histories through P_T and through P_V."""
        _check_aligned(titles, images)
        return self.encode_text_sequences(titles), self.encode_image_sequences(images)

    def encode_interleaved(self, titles: Sequence[Sequence[str]], images: Sequence[Sequence[Any]]) -> Tensor:
        """``[B, d]``: internal fusion (baseline), each image followed by its title in one prompt."""
        _check_aligned(titles, images)
        t_rows = [self._truncate(t) for t in titles]
        i_rows = [self._truncate(r) for r in images]
        contents = [prompts.interleaved_sequence_prompt(t, max_title_chars=self.max_title_chars) for t in t_rows]
        return self._embed(contents, [img for r in i_rows for img in r])

    # ------------------------------------------------------------------ items

    def encode_text_items(self, titles: Sequence[str]) -> Tensor:
        """``[B, d]``: each title through P_T at index 0."""
        return self.encode_text_sequences([[t] for t in _items(titles, "titles")])

    def encode_image_items(self, images: Sequence[Any]) -> Tensor:
        """``[B, d]``: each image through P_V at index 0."""
        return self.encode_image_sequences([[img] for img in _items(images, "images")])

    def encode_items(self, titles: Sequence[str], images: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """``(e_t, e_v)``, each ``[B, d]``."""
        if len(titles) != len(images):
            raise ValueError(f"encode_items got {len(titles)} titles but {len(images)} images; pass one of each "
                             "per item")
        return self.encode_text_items(titles), self.encode_image_items(images)

    # ------------------------------------------------------------------ the forward pass

    def _embed(self, contents: list[prompts.Content], images: list[Any] | None = None) -> Tensor:
        texts = [prompts.render_prompt(self.processor, c) for c in contents]
        enc = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        mask = enc["attention_mask"]
        left_padded = bool(mask[:, -1].all())  # checked on the CPU copy: no device sync
        device, dtype = self.device, self.dtype
        inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                  for k, v in enc.items()}
        out = self.backbone(**inputs, use_cache=False, return_dict=True)
        hidden = getattr(out, "last_hidden_state", None)  # (B, T, d), after the final norm
        if hidden is None:
            raise TypeError(f"{type(self.backbone).__name__} returned no last_hidden_state; load the bare *VLModel "
                            "(vlm2rec_ray.model.backbone.load_backbone does), not a generation head")
        if left_padded:
            return hidden[:, -1]
        # Right-padded input (a processor configured otherwise): read each row's last real token.
        last = (mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)).to(device)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=device), last]


def _rows(batch: Sequence[Sequence[Any]], what: str) -> Sequence[Sequence[Any]]:
    if len(batch) == 0:
        raise ValueError(f"empty batch of {what}; pass at least one history")
    for i, row in enumerate(batch):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(f"{what}[{i}] must be a list (one history), got {type(row).__name__}")
        if len(row) == 0:
            raise ValueError(f"{what}[{i}] is an empty history; every sequence needs at least one item")
    return batch


def _items(batch: Sequence[Any], what: str) -> Sequence[Any]:
    if len(batch) == 0:
        raise ValueError(f"empty batch of item {what}; pass at least one item")
    return batch


def _check_aligned(titles: Sequence[Sequence[str]], images: Sequence[Sequence[Any]]) -> None:
    if len(titles) != len(images):
        raise ValueError(f"got {len(titles)} title histories but {len(images)} image histories; one each per user")
    for i, (t, v) in enumerate(zip(titles, images, strict=True)):
        if len(t) != len(v):
            raise ValueError(f"history {i} has {len(t)} titles but {len(v)} images; each item needs both (drop or "
                             "report items whose image failed to load before encoding)")
