"""load_backbone from an s3:// prefix on a real moto S3 server (HTTP on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.model.test_backbone import _images, _prompt, last_token_embeddings
from vlm2rec_ray import storage
from vlm2rec_ray.model.backbone import load_backbone

pytestmark = pytest.mark.integration


def test_load_from_s3_matches_local(tiny_backbone_dir: Path, s3_bucket: str, tmp_path: Path) -> None:
    prefix = f"s3://{s3_bucket}/models/tiny"
    n = storage.upload_dir(tiny_backbone_dir, prefix)
    assert n >= 5
    local_model, processor = load_backbone(str(tiny_backbone_dir))
    s3_model, s3_processor = load_backbone(prefix, cache_dir=tmp_path / "cache")
    images = [_images(0, (56, 112, 80)), _images(1, (90,))]
    prompts = [_prompt(processor, len(i)) for i in images]
    a = last_token_embeddings(local_model, processor, prompts, images)
    b = last_token_embeddings(s3_model, s3_processor, prompts, images)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    for i in range(2):
        single = last_token_embeddings(s3_model, s3_processor, [prompts[i]], [images[i]])
        torch.testing.assert_close(b[i], single[0], atol=1e-5, rtol=0)
    # A second load reuses the cache (no re-download needed) and a missing prefix fails clearly.
    load_backbone(prefix, cache_dir=tmp_path / "cache")
    with pytest.raises(storage.StorageError, match="nothing found"):
        load_backbone(f"s3://{s3_bucket}/models/missing", cache_dir=tmp_path / "cache2")
