"""Small catalogs with real image files for the embed tests (no Ray, no S3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlm2rec_ray.data.images import encode_image

WORDS = "red green blue black white shirt lamp mug bag hat watch book toy chair table".split()


def random_image(seed: int, h: int = 64, w: int | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w or h, 3), dtype=np.uint8))


def write_catalog(root: Path, n: int = 12, *, seed: int = 0) -> Path:
    """``root/catalog.parquet`` with images under ``root/images`` (relative URIs); sizes vary."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    ids, titles, uris = [], [], []
    for i in range(n):
        h, w = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        (root / "images" / f"{i}.png").write_bytes(encode_image(random_image(seed * 1000 + i, h, w)))
        ids.append(f"item{i:03d}")
        titles.append(" ".join(rng.choice(WORDS, int(rng.integers(1, 5)))))
        uris.append(f"images/{i}.png")
    pq.write_table(pa.table({"item_id": ids, "title": titles, "image_uri": uris}), root / "catalog.parquet")
    return root / "catalog.parquet"


def item_opts(catalog_uri: str, **extra: object) -> dict:
    """Options of the CPU stage as the pipeline builds them (see RunPlan.opts)."""
    from vlm2rec_ray.model.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS

    opts = {"mode": "encode", "dim": 64, "catalog_uri": catalog_uri, "sources": {}, "endpoint": None,
            "max_image_bytes": 20_000_000, "allowed_roots": [str(Path(catalog_uri).parent)],
            "allow_private_addresses": False, "fetch_threads": 4, "min_pixels": TINY_MIN_PIXELS,
            "max_pixels": TINY_MAX_PIXELS, "max_history": 10, "fingerprint": "fp-test", "catalog": None}
    opts.update(extra)
    return opts
