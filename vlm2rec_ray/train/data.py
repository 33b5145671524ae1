"""The training stream: (history, target) rows of item ids, and an item table each catalog image enters once.

Driver side (:func:`prepare_training_rows`, :func:`ensure_item_table`, :func:`build_train_dataset`):

1. Read ``<dataset>/splits/<split>.parquet`` and the catalog; keep K sampled users (``data.few_shot_users``,
   the paper's few-shot setting) and at most ``data.max_rows`` rows; shuffle the rows once (seeded).
2. Join every history item and target to its catalog index and title. Unknown items are errors.
3. One Ray Data pass over the distinct referenced items (:func:`_check_batch`, ``data.cpus_per_task`` CPU tasks)
   fetches (``fetch_image_bytes``: s3://, local, http), validates and decodes/resizes (``decode_image``) each
   image once per run, into the **item table** (:data:`ITEMS_SCHEMA`: item index, id, title, raw RGB bytes,
   width, height, reason). Its blocks stay in the object store where the pass wrote them: the driver holds
   their ObjectRefs and passes them to the workers (``train_loop_config["run"]["items"]``), which read them
   zero-copy (one shared-memory copy per node, spilled to disk by Ray under memory pressure).
   With ``data.check_images`` (default) the pass runs inside :func:`prepare_training_rows` and is the check:
   rows whose target fails are dropped, history items whose image fails are removed (a history left empty
   drops its row). Every drop is a row of the errors table (``item_id``, ``user_id``, ``image_uri``,
   ``reason``, ``action``) that the trainer writes to ``<output_uri>/data_errors.parquet``, and the counts go
   in the run summary: nothing is dropped silently. Knowing the exact row count before training also gives
   every worker the same number of steps per epoch, which collectives need. With ``data.check_images=false``
   the same pass runs in :func:`ensure_item_table`, before training, and a failing image stops the run there
   (the catalog is asserted clean; nothing is dropped).
4. ``ray.data.from_arrow(rows)``: ids and titles only. Ray Train shards it to the workers
   (``get_dataset_shard("train")``, ``streaming_split(equal=True)``). Object-storage GETs per run are the
   distinct images (plus retries), not rows x (history + 1 + negatives) x epochs.
5. Item-level objectives (``cmsa``, SDA's stage 1) train on items alone: the rows become every distinct item of
   the kept rows once (:func:`_item_rows`), and the loop does not encode sequences.

Worker side: :class:`ItemTable` reads the item table once; :func:`to_train_batch` turns one pyarrow
micro-batch of ids into PIL images, titles and the integer target ids that mask duplicate targets out of the
negatives.

With ``objective.num_sampled_negatives = k``, each row also gets k items drawn uniformly on the worker from the
item table's usable items (never its own target); they are extra candidates after the in-batch ones.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from PIL import Image

if TYPE_CHECKING:
    import ray
    import ray.data
    import torch

    from vlm2rec_ray.config import TrainJobConfig

__all__ = [
    "ERRORS_SCHEMA",
    "ITEMS_SCHEMA",
    "ItemTable",
    "TrainBatch",
    "TrainingRows",
    "build_train_dataset",
    "ensure_item_table",
    "load_item_table",
    "pack_image",
    "prepare_training_rows",
    "steps_per_epoch",
    "to_train_batch",
    "unpack_image",
]

ERRORS_SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("user_id", pa.string()),
    ("image_uri", pa.string()),
    ("reason", pa.string()),
    ("action", pa.string()),  # dropped_row | dropped_history_item
])

ROWS_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("target_id", pa.string()),
    ("target_index", pa.int64()),
    ("target_title", pa.string()),
    ("history_ids", pa.list_(pa.string())),
    ("history_indices", pa.list_(pa.int64())),
    ("history_titles", pa.list_(pa.string())),
])

ITEMS_SCHEMA = pa.schema([
    ("item_index", pa.int64()),  # catalog row
    ("item_id", pa.string()),
    ("title", pa.string()),
    ("image", pa.binary()),  # raw RGB, width * height * 3 bytes; null when the image failed
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("reason", pa.string()),  # data.images.REASONS code, null when the image is usable
])


@dataclass
class TrainingRows:
    """The joined training rows (:data:`ROWS_SCHEMA`), the items they reference, the errors table
    (:data:`ERRORS_SCHEMA`) and counts for the run summary.

    ``items`` lists ``(item_index, item_id, title, image_uri)`` of every referenced catalog item (the input of
    the item pass); ``item_refs`` holds the ObjectRefs of the item table's blocks once the pass ran (with
    ``data.check_images``; else :func:`ensure_item_table` runs it).
    """

    rows: pa.Table
    items: list[tuple[int, str, str, str]]
    errors: pa.Table
    counts: dict[str, Any]
    item_refs: list[ray.ObjectRef] | None = None


# ------------------------------------------------------------------------------------------------ driver side


def prepare_training_rows(cfg: TrainJobConfig) -> TrainingRows:
    """Read, sample, join and (with ``data.check_images``) preprocess + check the items on the driver (see
    module doc).

    Raises:
        ValueError: the split is empty after sampling and checks, or it references items missing from the
            catalog only (nothing left to train on).
    """
    from vlm2rec_ray.data.catalog import read_catalog, read_split, resolve_image_uri
    from vlm2rec_ray.storage import join

    d = cfg.data
    endpoint = cfg.storage.endpoint_url
    catalog_uri = join(d.dataset_uri, "catalog.parquet")
    catalog = read_catalog(d.dataset_uri, endpoint=endpoint)
    split = read_split(d.dataset_uri, d.split, endpoint=endpoint)
    counts: dict[str, Any] = {"split_rows": split.num_rows}

    item_ids = catalog.column("item_id").to_pylist()
    titles = catalog.column("title").to_pylist()
    uris = [resolve_image_uri(u or "", catalog_uri) for u in catalog.column("image_uri").to_pylist()]
    index = {item: i for i, item in enumerate(item_ids)}

    records = split.to_pylist()
    if d.few_shot_users is not None:
        users = sorted({r["user_id"] for r in records})
        if d.few_shot_users < len(users):
            keep = set(random.Random(d.seed).sample(users, d.few_shot_users))
            records = [r for r in records if r["user_id"] in keep]
        counts["few_shot_users"] = min(d.few_shot_users, len(users))
    random.Random(d.seed).shuffle(records)
    if d.max_rows is not None:
        records = records[: d.max_rows]

    errors: list[dict[str, Any]] = []
    referenced = {r["target"] for r in records} | {h for r in records for h in r["history"]}
    bad: dict[str, str] = {item: "unknown_item" for item in referenced if item not in index}
    known = sorted(index[item] for item in referenced if item in index)
    items = [(i, item_ids[i], titles[i], uris[i]) for i in known]
    item_refs = None
    if d.check_images:
        item_refs, failed = _preprocess_items(items, cfg)
        bad.update(failed)

    out: dict[str, list[Any]] = {name: [] for name in ROWS_SCHEMA.names}
    for r in records:
        user, target = r["user_id"], r["target"]
        if target in bad:
            errors.append(_error(target, user, uris[index[target]] if target in index else "", bad[target],
                                 "dropped_row"))
            continue
        history = []
        for h in r["history"]:
            if h in bad:
                errors.append(_error(h, user, uris[index[h]] if h in index else "", bad[h], "dropped_history_item"))
            else:
                history.append(h)
        if not history:
            errors.append(_error(target, user, uris[index[target]], "empty_history", "dropped_row"))
            continue
        t = index[target]
        out["user_id"].append(user)
        out["target_id"].append(target)
        out["target_index"].append(t)
        out["target_title"].append(titles[t])
        out["history_ids"].append(history)
        out["history_indices"].append([index[h] for h in history])
        out["history_titles"].append([titles[index[h]] for h in history])
    rows = pa.table(out, schema=ROWS_SCHEMA)
    from vlm2rec_ray.objectives import ITEM_LEVEL

    if cfg.objective.variant in ITEM_LEVEL and rows.num_rows:
        rows = _item_rows(rows, d.seed)
        counts["item_level"] = True
    if rows.num_rows == 0:
        raise ValueError(f"no training rows left in {d.dataset_uri} split {d.split!r} ({len(records)} sampled, "
                         f"{len(errors)} dropped: see the reasons in data_errors.parquet); check the catalog's "
                         "image_uri values and storage.allowed_roots")
    err_table = pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA)
    reasons: dict[str, int] = {}
    for e in errors:
        reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    counts.update({"rows": rows.num_rows, "users": len(set(out["user_id"])), "sampled_rows": len(records),
                   "dropped_rows": sum(e["action"] == "dropped_row" for e in errors),
                   "dropped_history_items": sum(e["action"] == "dropped_history_item" for e in errors),
                   "bad_items": len(bad), "error_reasons": reasons, "items": len(items)})
    return TrainingRows(rows=rows, items=items, errors=err_table, counts=counts, item_refs=item_refs)


def _item_rows(rows: pa.Table, seed: int) -> pa.Table:
    """Item-level rows for objectives that train on items alone (SDA's stage 1): every distinct item of the
    kept rows (targets and histories, after the drops) once, in a seeded order. Each row's history is the item
    itself, a placeholder the training loop does not encode."""
    order: dict[int, tuple[str, str]] = {}
    for cols in zip(rows.column("target_index").to_pylist(), rows.column("target_id").to_pylist(),
                    rows.column("target_title").to_pylist(), strict=True):
        order.setdefault(cols[0], cols[1:])
    for indices, ids, titles in zip(rows.column("history_indices").to_pylist(), rows.column("history_ids").to_pylist(),
                                    rows.column("history_titles").to_pylist(), strict=True):
        for i, item, title in zip(indices, ids, titles, strict=True):
            order.setdefault(i, (item, title))
    keys = sorted(order)
    random.Random(seed).shuffle(keys)
    return pa.table({"user_id": [""] * len(keys), "target_id": [order[i][0] for i in keys], "target_index": keys,
                     "target_title": [order[i][1] for i in keys], "history_ids": [[order[i][0]] for i in keys],
                     "history_indices": [[i] for i in keys], "history_titles": [[order[i][1]] for i in keys]},
                    schema=ROWS_SCHEMA)


def _error(item: str, user: str, uri: str, reason: str, action: str) -> dict[str, Any]:
    return {"item_id": item, "user_id": user, "image_uri": uri, "reason": reason, "action": action}


def _preprocess_items(items: list[tuple[int, str, str, str]], cfg: TrainJobConfig
                      ) -> tuple[list[ray.ObjectRef], dict[str, str]]:
    """The item pass (one Ray Data pass, each image fetched and decoded once): the ObjectRefs of the item
    table's blocks and ``{item_id: reason}`` for the items whose image cannot be fetched or decoded."""
    import ray
    import ray.data

    if not items:
        return [], {}
    ds = ray.data.from_items([{"item_index": i, "item_id": item, "title": title, "image_uri": uri}
                              for i, item, title, uri in items])
    ds = ds.map_batches(_check_batch, fn_kwargs=_image_kwargs(cfg), batch_size=cfg.data.task_batch_size,
                        batch_format="pyarrow", num_cpus=cfg.data.cpus_per_task)
    refs = list(ds.materialize().to_arrow_refs())
    failed: dict[str, str] = {}
    for block in ray.get(refs):  # zero-copy views of the blocks; only two small columns are read
        for item, reason in zip(block.column("item_id").to_pylist(), block.column("reason").to_pylist(), strict=True):
            if reason is not None:
                failed[item] = reason
    return refs, failed


def ensure_item_table(prepared: TrainingRows, cfg: TrainJobConfig) -> list[ray.ObjectRef]:
    """The item table's block refs: the check's (``data.check_images``), else the same pass run now, strict.

    Raises:
        RuntimeError: ``data.check_images=false`` and some referenced image cannot be fetched or decoded.
    """
    if prepared.item_refs is None:
        refs, failed = _preprocess_items(prepared.items, cfg)
        if failed:
            shown = ", ".join(f"{k} ({v})" for k, v in sorted(failed.items())[:5])
            raise RuntimeError(f"{len(failed)} referenced images failed to load with data.check_images=false: "
                               f"{shown}{' ...' if len(failed) > 5 else ''}; fix or remove them from the catalog, "
                               "or set data.check_images=true to drop their rows (listed in data_errors.parquet)")
        prepared.item_refs = refs
    return prepared.item_refs


def load_item_table(prepared: TrainingRows, cfg: TrainJobConfig) -> ItemTable:
    """The item table built in this process, without Ray (tests, tools): the same per-item preprocessing."""
    table = pa.table({"item_index": [i for i, _, _, _ in prepared.items],
                      "item_id": [item for _, item, _, _ in prepared.items],
                      "title": [title for _, _, title, _ in prepared.items],
                      "image_uri": [uri for _, _, _, uri in prepared.items]})
    return ItemTable([_check_batch(table, **_image_kwargs(cfg))])


def _image_kwargs(cfg: TrainJobConfig) -> dict[str, Any]:
    from vlm2rec_ray.data.images import resolve_roots

    return {"endpoint": cfg.storage.endpoint_url, "min_pixels": cfg.model.min_pixels, "max_pixels": cfg.model.max_pixels,
            "max_bytes": cfg.data.max_image_bytes,
            "allowed_roots": resolve_roots(cfg.storage.allowed_roots, cfg.data.dataset_uri),
            "allow_private_addresses": cfg.storage.allow_private_addresses}


def _check_batch(batch: pa.Table, **image_kw: Any) -> pa.Table:
    """Ray Data UDF of the item pass: ``image_uri`` -> ``image``/``width``/``height`` (raw RGB, resized to the
    model's pixel range) or ``reason``; the other input columns pass through."""
    images: list[bytes | None] = []
    widths: list[int | None] = []
    heights: list[int | None] = []
    reasons: list[str | None] = []
    for uri in batch.column("image_uri").to_pylist():
        packed, reason = _load(uri, **image_kw)
        images.append(packed[0] if packed else None)
        widths.append(packed[1] if packed else None)
        heights.append(packed[2] if packed else None)
        reasons.append(reason)
    cols = {name: batch.column(name) for name in batch.column_names if name != "image_uri"}
    cols.update({"image": pa.array(images, pa.binary()), "width": pa.array(widths, pa.int32()),
                 "height": pa.array(heights, pa.int32()), "reason": pa.array(reasons, pa.string())})
    return pa.table(cols)


def steps_per_epoch(num_rows: int, cfg: TrainJobConfig) -> int:
    """Optimizer steps per epoch, the same on every worker: each worker gets ``num_rows // num_workers`` rows
    (``streaming_split(equal=True)``), full micro-batches only, full accumulation windows only.

    Raises:
        ValueError: fewer rows than one optimizer step needs.
    """
    t, workers = cfg.train, cfg.scaling.num_workers
    micro = (num_rows // workers) // t.per_device_batch_size
    steps = micro // t.grad_accum
    if steps < 1:
        need = workers * t.per_device_batch_size * t.grad_accum
        raise ValueError(f"{num_rows} training rows are fewer than one optimizer step needs (scaling.num_workers * "
                         f"train.per_device_batch_size * train.grad_accum = {need}); lower those or use more data")
    return steps


def build_train_dataset(prepared: TrainingRows, cfg: TrainJobConfig) -> ray.data.Dataset:
    """The Ray Dataset of training rows (ids and titles; the images come from the item table)."""
    import ray.data

    return ray.data.from_arrow(prepared.rows)


# ------------------------------------------------------------------------------------ the item pass (tasks)


def pack_image(im: Image.Image) -> tuple[bytes, int, int]:
    """RGB image -> ``(raw bytes, width, height)``, the form images travel in through the object store."""
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    return rgb.tobytes(), rgb.size[0], rgb.size[1]


def unpack_image(data: bytes | memoryview, width: int, height: int) -> Image.Image:
    return Image.frombytes("RGB", (int(width), int(height)), data)


def _load(uri: str, *, endpoint: str | None, min_pixels: int, max_pixels: int, max_bytes: int,
          allowed_roots: list[str] | None, allow_private_addresses: bool = False
          ) -> tuple[tuple[bytes, int, int] | None, str | None]:
    """Fetch + decode + resize one image: ``(packed, None)`` or ``(None, reason)``."""
    from vlm2rec_ray.data.images import decode_image, fetch_image_bytes

    data, reason = fetch_image_bytes(uri, endpoint=endpoint, max_bytes=max_bytes, allowed_roots=allowed_roots,
                                     allow_private_addresses=allow_private_addresses)
    if data is None:
        return None, reason
    im, reason = decode_image(data, min_pixels=min_pixels, max_pixels=max_pixels)
    if im is None:
        return None, reason
    return pack_image(im), None


def _sample_negatives(pool: Sequence[int], target_index: int, k: int, rng: random.Random) -> list[int]:
    """``k`` item indices drawn uniformly from ``pool``, never ``target_index``."""
    n = len(pool)
    picks: list[int] = []
    for _ in range(50 * k):  # rejection of the row's own target; bounded for tiny pools
        if len(picks) == k:
            break
        j = pool[rng.randrange(n)] if n else target_index
        if j != target_index:
            picks.append(j)
    if len(picks) < k:
        raise ValueError(f"cannot sample {k} negatives other than the target from a pool of {n} items; lower "
                         "objective.num_sampled_negatives")
    return picks


# ------------------------------------------------------------------------------------------------ worker side


class ItemTable:
    """A worker's view of the item table: catalog index -> PIL image and title.

    The blocks are read once (``ray.get`` maps them from the node's shared memory; no per-worker copy of the
    image bytes); each access builds the image from its raw bytes (a copy of width x height x 3 bytes).
    """

    def __init__(self, blocks: Sequence[pa.Table]) -> None:
        self._images: list[pa.BinaryArray] = []
        self._where: dict[int, tuple[int, int]] = {}
        self._size: dict[int, tuple[int, int]] = {}
        self._title: dict[int, str] = {}
        usable = []
        for block in blocks:
            for chunk in block.to_batches():
                c = len(self._images)
                self._images.append(chunk.column(chunk.schema.get_field_index("image")))
                cols = chunk.select(["item_index", "title", "width", "height", "reason"]).to_pydict()
                for o, (i, title, w, h, reason) in enumerate(zip(cols["item_index"], cols["title"], cols["width"],
                                                                  cols["height"], cols["reason"], strict=True)):
                    self._title[i] = title
                    if reason is None:
                        self._where[i] = (c, o)
                        self._size[i] = (w, h)
                        usable.append(i)
        self.usable: list[int] = sorted(usable)  # the candidates for sampled negatives

    @classmethod
    def from_refs(cls, refs: Sequence[ray.ObjectRef]) -> ItemTable:
        import ray

        return cls(ray.get(list(refs)))

    def __len__(self) -> int:
        return len(self._where)

    def title(self, index: int) -> str:
        return self._title[index]

    def image(self, index: int) -> Image.Image:
        try:
            c, o = self._where[index]
        except KeyError:
            raise KeyError(f"item {index} has no usable image in the item table (its image failed the item pass, "
                           "or it is not referenced by the training rows)") from None
        return unpack_image(self._images[c][o].as_buffer(), *self._size[index])


@dataclass
class TrainBatch:
    """One micro-batch on a worker: histories and targets as titles + PIL images, and integer item ids.

    ``item_titles``/``item_images``/``item_ids`` hold the B targets first, then any sampled negatives.
    """

    seq_titles: list[list[str]]
    seq_images: list[list[Image.Image]]
    item_titles: list[str]
    item_images: list[Image.Image]
    target_ids: torch.Tensor  # (B,) int64 catalog index of each row's target
    item_ids: torch.Tensor  # (B + sampled,) int64 catalog index of every candidate item

    def __len__(self) -> int:
        return len(self.seq_titles)


def to_train_batch(batch: pa.Table, items: ItemTable, *, num_negatives: int = 0,
                   rng: random.Random | None = None) -> TrainBatch:
    """A pyarrow micro-batch of training rows (:data:`ROWS_SCHEMA`) -> :class:`TrainBatch`, images from
    ``items``; ``num_negatives`` sampled negatives per row from ``items.usable`` (after the B targets)."""
    import torch

    cols = batch.select(["target_index", "target_title", "history_indices", "history_titles"]).to_pydict()
    seq_images = [[items.image(i) for i in hist] for hist in cols["history_indices"]]
    item_titles = list(cols["target_title"])
    ids = list(cols["target_index"])
    item_images = [items.image(i) for i in ids]
    if num_negatives:
        rng = rng or random.Random()
        for t in cols["target_index"]:
            picks = _sample_negatives(items.usable, t, num_negatives, rng)
            item_titles += [items.title(j) for j in picks]
            item_images += [items.image(j) for j in picks]
            ids += picks
    return TrainBatch(seq_titles=[list(t) for t in cols["history_titles"]], seq_images=seq_images,
                      item_titles=item_titles, item_images=item_images,
                      target_ids=torch.tensor(cols["target_index"], dtype=torch.long),
                      item_ids=torch.tensor(ids, dtype=torch.long))
