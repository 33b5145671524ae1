"""Backbone loading: the tiny Qwen2.5-VL goes through the same from_pretrained path as real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2rec_ray.model.backbone import ImageOnlyQwen25VLProcessor, load_backbone, resolve_model_dir
from vlm2rec_ray.model.tiny import build_tiny_backbone


def _images(seed: int, sizes: tuple[int, ...]) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (s, s + 8, 3), dtype=np.uint8)) for s in sizes]


def _prompt(processor: ImageOnlyQwen25VLProcessor, n_images: int) -> str:
    content: list[dict] = []
    for i in range(n_images):
        content += [{"type": "text", "text": f"{i}) "}, {"type": "image"}, {"type": "text", "text": " "}]
    content.append({"type": "text", "text": "\nDescribe this item image sequence in one word:"})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def last_token_embeddings(model, processor, prompts: list[str], images: list[list[Image.Image]]) -> torch.Tensor:
    enc = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state  # (B, T, d)
    return hidden[:, -1]  # left padding: the last position is every row's last real token


def test_build_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_backbone(tmp_path / "a", seed=3)
    b = build_tiny_backbone(tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "tokenizer.json").read_text()) == json.loads((b / "tokenizer.json").read_text())


def test_load_local_and_batched_equals_single(tiny_backbone_dir: Path) -> None:
    model, processor = load_backbone(str(tiny_backbone_dir))
    assert type(model).__name__ == "Qwen2_5_VLModel"
    assert isinstance(processor, ImageOnlyQwen25VLProcessor)
    assert processor.tokenizer.padding_side == "left"
    assert next(model.parameters()).dtype == torch.float32  # fp32 on CPU
    # Rows with 3, 1 and 2 images of different sizes -> different lengths -> left padding in the batch.
    images = [_images(0, (56, 112, 80)), _images(1, (200,)), _images(2, (56, 150))]
    prompts = [_prompt(processor, len(imgs)) for imgs in images]
    batched = last_token_embeddings(model, processor, prompts, images)
    assert batched.shape == (3, 64)
    for i in range(3):
        single = last_token_embeddings(model, processor, [prompts[i]], [images[i]])
        torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=0)
    assert torch.isfinite(batched).all()


def test_missing_dir_and_bad_family(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        resolve_model_dir(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported backbone family 'llama'"):
        load_backbone(str(bad))


def test_read_model_config_without_weights(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    from vlm2rec_ray.embed.inputs import embedding_dim
    from vlm2rec_ray.model import read_model_config

    conf = read_model_config(str(tiny_backbone_dir))
    assert conf["model_type"] == "qwen2_5_vl" and conf == json.loads((tiny_backbone_dir / "config.json").read_text())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'.*empty' has no config\.json; point model\.name at a"):
        read_model_config(str(tmp_path / "empty"))
    # a hub id that is not in the cache (conftest sets HF_HUB_OFFLINE: no download is tried)
    with pytest.raises(FileNotFoundError, match=r"model\.name='nobody/no-such-model' is not a local directory"):
        read_model_config("nobody/no-such-model")

    class Cfg:  # what embedding_dim reads of an EmbedJobConfig
        model = type("M", (), {"name": str(tiny_backbone_dir)})
        storage = type("S", (), {"endpoint_url": None})

    assert embedding_dim(Cfg()) == (conf.get("text_config") or {}).get("hidden_size", conf.get("hidden_size"))
