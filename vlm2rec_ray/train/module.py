"""What DeepSpeed wraps: the encoder (backbone + processor) and the objective's parameters, in one module.

The engine must own every trainable tensor, LoRA weights and WPCL's learnable alpha/beta alike, so ZeRO
partitions them, reduces their gradients across workers and checkpoints them. :class:`TrainModule` only
groups the two; its ``forward`` returns embeddings (never a loss), and the step function in
:mod:`vlm2rec_ray.train.loop` applies ``module.objective`` to them.

Internal fusion (the VLM_SFT_internal baseline) encodes one interleaved prompt per sequence/item; its
embedding ``z`` is returned as ``z_t = z_v = z / 2`` so the fused sum is ``z`` and the SFT objective (the only
one the config allows with internal fusion) sees exactly ``InfoNCE(z, e)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from vlm2rec_ray.model.encoder import EncoderOutput, VLM2RecEncoder

__all__ = ["BACKBONE_PREFIX", "TrainModule"]

#: Parameter-name prefix of the backbone inside TrainModule (stripped to get the backbone's own names).
BACKBONE_PREFIX = "encoder.backbone."


class TrainModule(nn.Module):
    """``encoder`` (a :class:`VLM2RecEncoder`) plus ``objective`` (an ``nn.Module`` or None for inference).

    Args:
        encoder: the VLM2Rec encoder over the (possibly PEFT-wrapped) backbone.
        objective: the training objective from :func:`vlm2rec_ray.objectives.build_objective`.
        fusion: ``external`` (P_T and P_V encoded apart, paper 2.2.1) or ``internal`` (interleaved baseline).
    """

    def __init__(self, encoder: VLM2RecEncoder, objective: nn.Module | None, *, fusion: str = "external"):
        super().__init__()
        if fusion not in ("external", "internal"):
            raise ValueError(f"fusion must be 'external' or 'internal', got {fusion!r}")
        self.encoder = encoder
        self.objective = objective
        self.fusion = fusion

    def forward(self, seq_titles: Sequence[Sequence[str]], seq_images: Sequence[Sequence[Any]],
                item_titles: Sequence[str], item_images: Sequence[Any]) -> EncoderOutput:
        """``EncoderOutput(z_t, z_v, e_t, e_v)``: ``[B, d]`` sequences, ``[N, d]`` items. Item-level batches
        (SDA's stage 1: no sequence rows, ``B = 0``) encode the items only and return ``[0, d]`` sequences."""
        if self.fusion == "external":
            if not len(seq_titles):
                e_t, e_v = self.encoder.encode_items(item_titles, item_images)
                return EncoderOutput(e_t[:0], e_v[:0], e_t, e_v)
            return self.encoder(seq_titles, seq_images, item_titles, item_images)
        z = self.encoder.encode_interleaved(seq_titles, seq_images)
        e = self.encoder.encode_interleaved([[t] for t in item_titles], [[im] for im in item_images])
        return EncoderOutput(z / 2, z / 2, e / 2, e / 2)
