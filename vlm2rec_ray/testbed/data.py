"""A prepared dataset held in memory for in-process training and evaluation (see :mod:`vlm2rec_ray.testbed`).

Images are fetched and decoded once, with the same :func:`vlm2rec_ray.data.images.fetch_image_bytes` and
:func:`decode_image` (size bounds included) as the training and embedding jobs. An item whose image fails is
an error here (the testbed is for synthetic or already-checked data): the message names the item and reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

__all__ = ["TestbedData", "load_testbed"]


@dataclass
class TestbedData:
    """The catalog (row order = item index) and the leave-one-out splits.

    Attributes:
        uri: where it was read from.
        item_ids, titles, images: ``[N]`` per catalog item; images are decoded RGB PIL images.
        index: item id -> row.
        splits: ``train`` / ``valid`` / ``test`` tables (``user_id``, ``history``, ``target``).
    """

    uri: str
    item_ids: list[str]
    titles: list[str]
    images: list[Any]
    index: dict[str, int]
    splits: dict[str, pa.Table]

    def rows(self, split: str) -> list[tuple[str, list[int], int]]:
        """``(user_id, history item rows, target row)`` for every row of ``split``."""
        t = self.splits[split]
        return [(u, [self.index[h] for h in hist], self.index[target]) for u, hist, target in
                zip(t.column("user_id").to_pylist(), t.column("history").to_pylist(), t.column("target").to_pylist(),
                    strict=True)]


def load_testbed(dataset_uri: str, *, min_pixels: int, max_pixels: int, endpoint: str | None = None) -> TestbedData:
    """Read catalog and splits of a prepared dataset (local dir or s3:// prefix) and decode every image.

    Raises:
        ValueError: an item's image cannot be fetched or decoded, or a split names an unknown item.
    """
    from vlm2rec_ray import storage
    from vlm2rec_ray.data.catalog import read_catalog, read_split, resolve_image_uri
    from vlm2rec_ray.data.images import decode_image, fetch_image_bytes

    catalog = read_catalog(dataset_uri, endpoint=endpoint)
    catalog_uri = storage.join(dataset_uri, "catalog.parquet")
    item_ids = catalog.column("item_id").to_pylist()
    titles = catalog.column("title").to_pylist()
    images = []
    for item, uri in zip(item_ids, catalog.column("image_uri").to_pylist(), strict=True):
        data, reason = fetch_image_bytes(resolve_image_uri(uri or "", catalog_uri), endpoint=endpoint)
        im = None
        if data is not None:
            im, reason = decode_image(data, min_pixels=min_pixels, max_pixels=max_pixels)
        if im is None:
            raise ValueError(f"item {item!r}: image {uri!r} failed ({reason}); the testbed needs every image")
        images.append(im)
    index = {item: i for i, item in enumerate(item_ids)}
    splits = {s: read_split(dataset_uri, s, endpoint=endpoint) for s in ("train", "valid", "test")}
    for name, t in splits.items():
        unknown = {x for h in t.column("history").to_pylist() for x in h} | set(t.column("target").to_pylist())
        unknown -= index.keys()
        if unknown:
            raise ValueError(f"split {name!r} of {dataset_uri} names {len(unknown)} items missing from the catalog, "
                             f"e.g. {sorted(unknown)[:3]}")
    return TestbedData(uri=dataset_uri, item_ids=item_ids, titles=titles, images=images, index=index, splits=splits)
