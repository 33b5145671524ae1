"""The model room: backbones (:mod:`.backbone`), prompts, the VLM2Rec encoder, LoRA / MoDA adapters.

:func:`read_model_config` stays here, import-light (no transformers for a directory or an object-store prefix),
for drivers that only need a backbone's sizes before any worker loads it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vlm2rec_ray import storage


def read_model_config(model: str, *, endpoint: str | None = None) -> dict[str, Any]:
    """A backbone's ``config.json`` without its weights: from a local directory or an object-store prefix (that
    one file), else for a hub id through transformers' ``AutoConfig`` (its cache, or the hub).

    Raises:
        FileNotFoundError: no ``config.json`` there, or a hub id that cannot be loaded here.
    """
    name = os.path.expanduser(model)
    if storage.is_remote(name) or os.path.isdir(name):
        try:
            return json.loads(storage.read_text(storage.join(name, "config.json"), endpoint=endpoint))
        except storage.StorageError as e:
            if e.reason != "missing":
                raise
            raise FileNotFoundError(f"model {model!r} has no config.json; point model.name at a save_pretrained "
                                    "directory (local or on the object store)") from e
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model).to_dict()
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"model.name={model!r} is not a local directory, an object-store prefix or a hub id "
                                f"that can be loaded here ({type(e).__name__}: {str(e).splitlines()[0]}); point "
                                "model.name at a save_pretrained directory") from e


__all__ = ["read_model_config"]
