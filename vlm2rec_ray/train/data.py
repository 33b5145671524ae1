"""The training stream: (history, target) rows joined to the catalog, images fetched in Ray Data CPU stages.

Driver side (:func:`prepare_training_rows`, :func:`build_train_dataset`):

1. Read ``<dataset>/splits/<split>.parquet`` and the catalog; keep K sampled users (``data.few_shot_users``,
   the paper's few-shot setting) and at most ``data.max_rows`` rows; shuffle the rows once (seeded).
2. Join every history item and target to its title and absolute image URI. Unknown items are errors.
3. With ``data.check_images`` (default) every referenced image is fetched and decoded once, in a Ray Data
   pass, before training: rows whose target fails are dropped, history items whose image fails are removed
   (a history left empty drops its row). Every drop is a row of the errors table (``item_id``, ``user_id``,
   ``image_uri``, ``reason``, ``action``) that the trainer writes to ``<output_uri>/data_errors.parquet``,
   and the counts go in the run summary: nothing is dropped silently. Knowing the exact row count before
   training also gives every worker the same number of steps per epoch, which collectives need.
4. ``ray.data.from_arrow(rows).map_batches(fetch_images, num_cpus=data.cpus_per_task)``: CPU tasks fetch
   (``fetch_image_bytes``: s3://, local, http) and decode/resize (``decode_image``) the images and ship them
   as raw RGB bytes plus ``(width, height)``. Ray Train shards the dataset to the workers
   (``get_dataset_shard("train")``, ``streaming_split(equal=True)``).

Worker side: :func:`to_train_batch` turns one pyarrow micro-batch into PIL images, titles and the integer
target ids that mask duplicate targets out of the negatives.

With ``objective.num_sampled_negatives = k``, each row also carries k catalog items drawn uniformly (never
its own target) in the fetch stage; they are extra candidates after the in-batch ones.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from PIL import Image

if TYPE_CHECKING:
    import ray.data
    import torch

    from vlm2rec_ray.config import TrainJobConfig

__all__ = [
    "ERRORS_SCHEMA",
    "TrainBatch",
    "TrainingRows",
    "build_train_dataset",
    "fetch_images",
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
    ("target_image_uri", pa.string()),
    ("history_ids", pa.list_(pa.string())),
    ("history_titles", pa.list_(pa.string())),
    ("history_image_uris", pa.list_(pa.string())),
])


@dataclass
class TrainingRows:
    """The joined training rows (:data:`ROWS_SCHEMA`), the candidate pool for sampled negatives, the
    errors table (:data:`ERRORS_SCHEMA`) and counts for the run summary."""

    rows: pa.Table
    pool: dict[str, list[Any]]  # item_index, title, image_uri of the items usable as candidates
    errors: pa.Table
    counts: dict[str, Any]


# ------------------------------------------------------------------------------------------------ driver side


def prepare_training_rows(cfg: TrainJobConfig) -> TrainingRows:
    """Read, sample, join and (optionally) image-check the training rows on the driver (see module doc).

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
    if d.check_images:
        known = sorted(item for item in referenced if item in index)
        bad.update(_check_images([(item, uris[index[item]]) for item in known], cfg))

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
        out["target_image_uri"].append(uris[t])
        out["history_ids"].append(history)
        out["history_titles"].append([titles[index[h]] for h in history])
        out["history_image_uris"].append([uris[index[h]] for h in history])
    rows = pa.table(out, schema=ROWS_SCHEMA)
    if rows.num_rows == 0:
        raise ValueError(f"no training rows left in {d.dataset_uri} split {d.split!r} ({len(records)} sampled, "
                         f"{len(errors)} dropped: see the reasons in data_errors.parquet); check the catalog's "
                         "image_uri values and storage.allowed_roots")
    # Candidates for sampled negatives: items whose image passed the check (all catalog items without it).
    usable = [i for i, item in enumerate(item_ids) if item in referenced and item not in bad] if d.check_images \
        else list(range(len(item_ids)))
    pool = {"item_index": usable, "title": [titles[i] for i in usable], "image_uri": [uris[i] for i in usable]}
    err_table = pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA)
    reasons: dict[str, int] = {}
    for e in errors:
        reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    counts.update({"rows": rows.num_rows, "users": len(set(out["user_id"])), "sampled_rows": len(records),
                   "dropped_rows": sum(e["action"] == "dropped_row" for e in errors),
                   "dropped_history_items": sum(e["action"] == "dropped_history_item" for e in errors),
                   "bad_items": len(bad), "error_reasons": reasons})
    return TrainingRows(rows=rows, pool=pool, errors=err_table, counts=counts)


def _error(item: str, user: str, uri: str, reason: str, action: str) -> dict[str, Any]:
    return {"item_id": item, "user_id": user, "image_uri": uri, "reason": reason, "action": action}


def _check_images(items: list[tuple[str, str]], cfg: TrainJobConfig) -> dict[str, str]:
    """``{item_id: reason}`` for the items whose image cannot be fetched or decoded (one Ray Data pass)."""
    import ray.data

    if not items:
        return {}
    ds = ray.data.from_items([{"item_id": i, "image_uri": u} for i, u in items])
    ds = ds.map_batches(_check_batch, fn_kwargs=_image_kwargs(cfg), batch_size=cfg.data.task_batch_size,
                        batch_format="pyarrow", num_cpus=cfg.data.cpus_per_task)
    failed = ds.filter(lambda r: r["reason"] is not None).take_all()
    return {r["item_id"]: r["reason"] for r in failed}


def _image_kwargs(cfg: TrainJobConfig) -> dict[str, Any]:
    from vlm2rec_ray.data.images import resolve_roots

    return {"endpoint": cfg.storage.endpoint_url, "min_pixels": cfg.model.min_pixels, "max_pixels": cfg.model.max_pixels,
            "max_bytes": cfg.data.max_image_bytes,
            "allowed_roots": resolve_roots(cfg.storage.allowed_roots, cfg.data.dataset_uri),
            "allow_private_addresses": cfg.storage.allow_private_addresses}


def _check_batch(batch: pa.Table, **image_kw: Any) -> pa.Table:
    reasons = [_load(uri, **image_kw)[1] for uri in batch.column("image_uri").to_pylist()]
    return pa.table({"item_id": batch.column("item_id"), "reason": pa.array(reasons, pa.string())})


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
    """The streaming Ray Dataset of training examples with decoded images (see module doc)."""
    import ray.data

    ds = ray.data.from_arrow(prepared.rows)
    kwargs = _image_kwargs(cfg)
    kwargs["num_negatives"] = cfg.objective.num_sampled_negatives
    kwargs["pool"] = prepared.pool if cfg.objective.num_sampled_negatives else None
    return ds.map_batches(fetch_images, fn_kwargs=kwargs, batch_size=cfg.data.task_batch_size,
                          batch_format="pyarrow", num_cpus=cfg.data.cpus_per_task)


# ------------------------------------------------------------------------------------------ CPU stage (tasks)

_CACHE_BYTES = 256 * 1024 * 1024
_cache: OrderedDict[tuple[str, int, int], tuple[bytes, int, int]] = OrderedDict()
_cache_size = 0


def pack_image(im: Image.Image) -> tuple[bytes, int, int]:
    """RGB image -> ``(raw bytes, width, height)``, the form images travel in through the object store."""
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    return rgb.tobytes(), rgb.size[0], rgb.size[1]


def unpack_image(data: bytes, width: int, height: int) -> Image.Image:
    return Image.frombytes("RGB", (int(width), int(height)), data)


def _load(uri: str, *, endpoint: str | None, min_pixels: int, max_pixels: int, max_bytes: int,
          allowed_roots: list[str] | None, allow_private_addresses: bool = False
          ) -> tuple[tuple[bytes, int, int] | None, str | None]:
    """Fetch + decode one image through a per-process LRU cache (histories repeat items a lot)."""
    global _cache_size
    from vlm2rec_ray.data.images import decode_image, fetch_image_bytes

    key = (uri, min_pixels, max_pixels)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit, None
    data, reason = fetch_image_bytes(uri, endpoint=endpoint, max_bytes=max_bytes, allowed_roots=allowed_roots,
                                     allow_private_addresses=allow_private_addresses)
    if data is None:
        return None, reason
    im, reason = decode_image(data, min_pixels=min_pixels, max_pixels=max_pixels)
    if im is None:
        return None, reason
    packed = pack_image(im)
    _cache[key] = packed
    _cache_size += len(packed[0])
    while _cache_size > _CACHE_BYTES and _cache:
        _, old = _cache.popitem(last=False)
        _cache_size -= len(old[0])
    return packed, None


def _must_load(uri: str, item: str, **image_kw: Any) -> tuple[bytes, int, int]:
    packed, reason = _load(uri, **image_kw)
    if packed is None:
        raise RuntimeError(f"image of item {item!r} at {uri} failed while streaming ({reason}); it passed the "
                           "pre-training check, so this is likely transient (the worker group restarts from the last "
                           "checkpoint). With data.check_images=false, bad images must be removed from the catalog.")
    return packed


def fetch_images(batch: pa.Table, *, num_negatives: int = 0, pool: dict[str, list[Any]] | None = None,
                 **image_kw: Any) -> pa.Table:
    """Ray Data UDF: replace the image URIs of a batch of rows with decoded images (raw RGB + size)."""
    rows = batch.to_pylist()
    out: dict[str, list[Any]] = {"user_id": [], "target_index": [], "target_title": [], "target_image": [],
                                 "target_size": [], "history_titles": [], "history_images": [], "history_sizes": []}
    if num_negatives:
        out.update({"neg_index": [], "neg_titles": [], "neg_images": [], "neg_sizes": []})
    rng = random.Random()
    for r in rows:
        img, w, h = _must_load(r["target_image_uri"], r["target_id"], **image_kw)
        hist = [_must_load(u, i, **image_kw) for u, i in zip(r["history_image_uris"], r["history_ids"], strict=True)]
        out["user_id"].append(r["user_id"])
        out["target_index"].append(r["target_index"])
        out["target_title"].append(r["target_title"])
        out["target_image"].append(img)
        out["target_size"].append([w, h])
        out["history_titles"].append(r["history_titles"])
        out["history_images"].append([p[0] for p in hist])
        out["history_sizes"].append([[p[1], p[2]] for p in hist])
        if num_negatives:
            assert pool is not None
            picks = _sample_negatives(pool, r["target_index"], num_negatives, rng)
            negs = [_must_load(pool["image_uri"][k], str(pool["item_index"][k]), **image_kw) for k in picks]
            out["neg_index"].append([pool["item_index"][k] for k in picks])
            out["neg_titles"].append([pool["title"][k] for k in picks])
            out["neg_images"].append([p[0] for p in negs])
            out["neg_sizes"].append([[p[1], p[2]] for p in negs])
    return pa.table(out)


def _sample_negatives(pool: dict[str, list[Any]], target_index: int, k: int, rng: random.Random) -> list[int]:
    n = len(pool["item_index"])
    picks: list[int] = []
    for _ in range(50 * k):  # rejection of the row's own target; bounded for tiny pools
        if len(picks) == k:
            break
        j = rng.randrange(n)
        if pool["item_index"][j] != target_index:
            picks.append(j)
    if len(picks) < k:
        raise ValueError(f"cannot sample {k} negatives other than the target from a pool of {n} items; lower "
                         "objective.num_sampled_negatives")
    return picks


# ------------------------------------------------------------------------------------------------ worker side


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


def to_train_batch(batch: pa.Table) -> TrainBatch:
    """Decode a pyarrow micro-batch produced by :func:`fetch_images`."""
    import torch

    cols = batch.to_pydict()
    seq_images = [[unpack_image(d, *s) for d, s in zip(imgs, sizes, strict=True)]
                  for imgs, sizes in zip(cols["history_images"], cols["history_sizes"], strict=True)]
    item_titles = list(cols["target_title"])
    item_images = [unpack_image(d, *s) for d, s in zip(cols["target_image"], cols["target_size"], strict=True)]
    ids = list(cols["target_index"])
    if "neg_index" in cols:
        for titles, imgs, sizes, idx in zip(cols["neg_titles"], cols["neg_images"], cols["neg_sizes"],
                                            cols["neg_index"], strict=True):
            item_titles += titles
            item_images += [unpack_image(d, *s) for d, s in zip(imgs, sizes, strict=True)]
            ids += idx
    return TrainBatch(seq_titles=[list(t) for t in cols["history_titles"]], seq_images=seq_images,
                      item_titles=item_titles, item_images=item_images,
                      target_ids=torch.tensor(cols["target_index"], dtype=torch.long),
                      item_ids=torch.tensor(ids, dtype=torch.long))
