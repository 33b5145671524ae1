"""CPU stages of the embed pipeline (Ray Data function UDFs over ``pyarrow.Table`` batches).

- :func:`conform_batch` casts raw catalog/split blocks to their schemas (a bad file fails the job loudly).
- :func:`prepare_items` / :func:`prepare_sequences` validate rows, fetch image bytes concurrently
  (``fetch_threads`` GETs per task; each distinct URI fetched once per batch), hash them, decode and
  resize each distinct image once, and emit one *encode row* per input row: the titles, the decoded RGB
  pixels, the cache keys and the ``content_hash``; or a failed row with its reason. Nothing is dropped.
- In ``scan`` mode (pass 1 of an incremental run) they fetch and hash but do not decode, and classify each
  row ``new`` / ``changed`` / ``unchanged`` against the previous snapshot's :class:`KeyIndex`.
- S3 retries travel with the rows in a ``storage_retries`` column (see :mod:`vlm2rec_ray.embed.reader`):
  each stage passes on the retries its input rows carried plus its own, so nothing is lost when rows are
  dropped (:func:`carry_filter` emits a ``stats`` row when it keeps none) and the sink's sum is the total.

Items are handled as one-item histories, so items and sequences share one code path down to the model.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vlm2rec_ray.data.images import decode_image, fetch_image_bytes
from vlm2rec_ray.embed import incremental
from vlm2rec_ray.embed.reader import RETRIES_COLUMN, retries_in, with_retries
from vlm2rec_ray.embed.schema import HISTORY_TYPE

STATS_STATUS = "stats"  # a sink row that only carries counters (see stats_row)

# Rows handed from the CPU stage to the model actors.
ENCODE_ROW_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("history", HISTORY_TYPE),  # sequences: the item ids encoded; items: null
    ("titles", pa.list_(pa.string())),
    ("pixels", pa.list_(pa.binary())),  # raw RGB bytes, row-major (H, W, 3)
    ("widths", pa.list_(pa.int32())),
    ("heights", pa.list_(pa.int32())),
    ("text_key", pa.string()),
    ("image_key", pa.string()),
    ("content_hash", pa.string()),
    ("status", pa.string()),  # "encode" | "failed"
    ("change", pa.string()),  # "new" | "changed" in incremental runs, "" otherwise
    ("in_prev", pa.bool_()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("title", pa.string()),  # for the errors table: the (failing) item's title and image URI
    ("image_uri", pa.string()),
    ("failed_item_id", pa.string()),
    # S3 retries, on the batch's first row (else 0): its image fetches plus those its input rows carried
    # (the reads of the catalog / split / staged scan files)
    ("storage_retries", pa.int32()),
])

# Rows of an incremental run's pass 1 (staged as Parquet, small: no pixels).
SCAN_ROW_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("history", HISTORY_TYPE),
    ("title", pa.string()),
    ("image_uri", pa.string()),  # items: the resolved absolute URI
    ("content_hash", pa.string()),
    ("status", pa.string()),  # "new" | "changed" | "unchanged" | "failed"
    ("in_prev", pa.bool_()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("failed_item_id", pa.string()),
    ("storage_retries", pa.int32()),  # as in ENCODE_ROW_SCHEMA; the scan sink adds it up and does not stage it
])

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vlm2rec-fetch")
        return pool


def conform_batch(batch: pa.Table, *, kind: str) -> pa.Table:
    """Cast a raw catalog (items) or split (sequences) block to its schema; keeps the ``path`` and
    ``storage_retries`` columns."""
    from vlm2rec_ray.data.schemas import conform_catalog, conform_split

    keep = {c: batch.column(c) for c in ("path", RETRIES_COLUMN) if c in batch.column_names}
    table = conform_catalog(batch) if kind == "items" else conform_split(batch)
    if "path" in keep:
        table = table.append_column("path", keep["path"].cast(pa.string()))
    if RETRIES_COLUMN in keep:
        table = table.append_column(RETRIES_COLUMN, keep[RETRIES_COLUMN].cast(pa.int32()))
    return table


def _blank(v: str | None) -> bool:
    return v is None or not v.strip()


def _abs_source(path: str | None, opts: dict[str, Any]) -> str:
    """The catalog file a row came from (Ray Data's ``path`` column lacks the ``s3://`` scheme)."""
    if path is None:
        return opts["catalog_uri"]
    return ("s3://" + path) if opts.get("source_is_s3") and not path.startswith("s3://") else path


def _fetch_many(uris: list[str], opts: dict[str, Any]) -> dict[str, tuple[bytes | None, str | None]]:
    def one(uri: str) -> tuple[bytes | None, str | None]:
        return fetch_image_bytes(uri, endpoint=opts.get("endpoint"), max_bytes=opts["max_image_bytes"],
                                 allowed_roots=opts.get("allowed_roots") or None)

    unique = list(dict.fromkeys(uris))
    if len(unique) <= 1 or opts["fetch_threads"] <= 1:
        return {u: one(u) for u in unique}
    return dict(zip(unique, _pool(opts["fetch_threads"]).map(one, unique), strict=True))


def _decode_many(blobs: dict[str, bytes], opts: dict[str, Any]) -> dict[str, tuple[tuple[bytes, int, int] | None, str | None]]:
    def one(data: bytes) -> tuple[tuple[bytes, int, int] | None, str | None]:
        im, reason = decode_image(data, min_pixels=opts["min_pixels"], max_pixels=opts["max_pixels"])
        if im is None:
            return None, reason
        return (im.tobytes(), im.size[0], im.size[1]), None

    keys = list(blobs)
    if len(keys) <= 1 or opts["fetch_threads"] <= 1:
        return {k: one(blobs[k]) for k in keys}
    return dict(zip(keys, _pool(opts["fetch_threads"]).map(lambda k: one(blobs[k]), keys), strict=True))


class _Row:
    """One input row on its way to an encode row: its items (id, title, uri) or why it failed."""

    __slots__ = ("detail", "failed_item", "history", "items", "key", "reason")

    def __init__(self, key: str | None, history: list[str] | None) -> None:
        self.key = key
        self.history = history
        self.items: list[tuple[str | None, str, str]] = []  # (item_id, title, absolute image uri)
        self.reason: str | None = None
        self.detail: str | None = None
        self.failed_item: tuple[str | None, str | None, str | None] | None = None

    def fail(self, reason: str, detail: str, item: tuple[str | None, str | None, str | None] | None = None) -> None:
        if self.reason is None:
            self.reason, self.detail, self.failed_item = reason, detail, item


def _finish(rows: list[_Row], opts: dict[str, Any], kind: str, carried_retries: int) -> pa.Table:
    """Fetch, hash, (decode,) and build the output table for validated rows; ``carried_retries`` (what the
    input rows' ``storage_retries`` add up to) plus the fetches' retries go on the first output row."""
    from vlm2rec_ray import storage

    mode = opts["mode"]
    retries_before = storage.retry_attempts()  # a Ray task worker runs one task at a time: the delta is ours
    fetched = _fetch_many([u for r in rows if r.reason is None for (_, _, u) in r.items], opts)
    retries = storage.retry_attempts() - retries_before + carried_retries
    digests = {u: incremental.image_digest(d) for u, (d, _) in fetched.items() if d is not None}
    for r in rows:
        if r.reason is not None:
            continue
        for item_id, title, uri in r.items:
            data, reason = fetched[uri]
            if data is None:
                r.fail(reason or "io_error", f"image {uri}: {reason}", (item_id, title, uri))
                break
    decoded: dict[str, tuple[tuple[bytes, int, int] | None, str | None]] = {}
    if mode == "encode":
        needed = {digests[u]: fetched[u][0] for r in rows if r.reason is None for (_, _, u) in r.items}
        decoded = _decode_many(needed, opts)  # type: ignore[arg-type]
        for r in rows:
            if r.reason is not None:
                continue
            for item_id, title, uri in r.items:
                pix, reason = decoded[digests[uri]]
                if pix is None:
                    r.fail(reason or "corrupt", f"image {uri}: {reason}", (item_id, title, uri))
                    break

    from vlm2rec_ray.model.prompts import clean_title

    fp = opts["fingerprint"]
    hashes: list[str | None] = []
    for r in rows:
        if r.reason is not None:
            hashes.append(None)
            continue
        hashes.append(incremental.content_hash(fp, [t for _, t, _ in r.items], [digests[u] for _, _, u in r.items]))

    keys = [r.key for r in rows]
    if mode == "scan":  # pass 1 of an incremental run: compare with the previous snapshot
        changes, found = incremental.classify(incremental.resolve_ref(opts.get("prev_index")), keys, hashes)
        in_prev = [bool(f) for f in found]
    elif opts.get("change_column") is not None:  # pass 2: the scan's verdict travels with the row
        changes, in_prev = list(opts["change_column"]), [bool(f) for f in opts["in_prev_column"]]
    else:  # a full run compares with nothing
        changes, in_prev = [""] * len(rows), [False] * len(rows)

    if mode == "scan":
        return pa.Table.from_pylist([
            {
                "key": r.key,
                "history": r.history,
                "title": r.items[0][1] if (kind == "items" and r.items) else None,
                "image_uri": r.items[0][2] if (kind == "items" and r.items) else None,
                "content_hash": h,
                "status": "failed" if r.reason is not None else ch,
                "in_prev": p,
                "reason": r.reason,
                "detail": r.detail,
                "failed_item_id": r.failed_item[0] if r.failed_item else None,
                "storage_retries": 0 if i else retries,
            }
            for i, (r, h, ch, p) in enumerate(zip(rows, hashes, changes, in_prev, strict=True))
        ], schema=SCAN_ROW_SCHEMA)

    out: list[dict[str, Any]] = []
    for r, h, change, p in zip(rows, hashes, changes, in_prev, strict=True):
        ok = r.reason is None
        row: dict[str, Any] = {"key": r.key, "history": r.history, "status": "encode" if ok else "failed",
                               "change": change if ok else "", "in_prev": p, "content_hash": h,
                               "reason": r.reason, "detail": r.detail, "storage_retries": 0 if out else retries}
        if ok:
            pix = [decoded[digests[u]][0] for _, _, u in r.items]
            row["titles"] = [t for _, t, _ in r.items]
            row["pixels"] = [p_[0] for p_ in pix]  # type: ignore[index]
            row["widths"] = [p_[1] for p_ in pix]  # type: ignore[index]
            row["heights"] = [p_[2] for p_ in pix]  # type: ignore[index]
            row["text_key"] = incremental.text_key([clean_title(t) for t in row["titles"]])
            row["image_key"] = incremental.image_key([digests[u] for _, _, u in r.items])
        else:
            item = r.failed_item or (None, None, None)
            row["failed_item_id"], row["title"], row["image_uri"] = item
            if kind == "items" and r.items:
                row["title"], row["image_uri"] = r.items[0][1], r.items[0][2]
        out.append(row)
    return pa.Table.from_pylist(out, schema=ENCODE_ROW_SCHEMA)


def prepare_items(batch: pa.Table, *, opts: dict[str, Any]) -> pa.Table:
    """Catalog rows (``item_id``, ``title``, ``image_uri`` [, ``path``]) -> encode rows (or scan rows).

    ``opts``: ``mode`` (``encode``/``scan``), ``catalog_uri``, ``source_is_s3``, ``endpoint``,
    ``max_image_bytes``, ``allowed_roots``, ``fetch_threads``, ``min_pixels``, ``max_pixels``,
    ``fingerprint``, ``prev_index`` (``[ObjectRef]`` of a :class:`KeyIndex`, scan mode).
    """
    from vlm2rec_ray.data.catalog import resolve_image_uri

    ids = batch.column("item_id").to_pylist()
    titles = batch.column("title").to_pylist()
    uris = batch.column("image_uri").to_pylist()
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else [None] * len(ids)
    rows = []
    for item_id, title, uri, path in zip(ids, titles, uris, paths, strict=True):
        r = _Row(item_id, None)
        rows.append(r)
        resolved = None if _blank(uri) else resolve_image_uri(uri, _abs_source(path, opts))
        r.items = [(item_id, title or "", resolved or "")]
        if _blank(item_id):
            r.fail("empty_item_id", f"item_id is {item_id!r}", (item_id, title, resolved))
        elif _blank(title):
            r.fail("empty_title", f"title is {title!r}", (item_id, title, resolved))
        elif resolved is None:
            r.fail("missing", "image_uri is empty", (item_id, title, uri))
    return _finish(rows, opts, "items", retries_in(batch))


def prepare_sequences(batch: pa.Table, *, opts: dict[str, Any]) -> pa.Table:
    """Split rows (``user_id``, ``history``) -> encode rows over each history's last ``max_history`` items,
    with titles and image URIs looked up in the catalog (``opts['catalog']``: ``[ObjectRef]`` of a
    :class:`CatalogLookup`)."""
    lookup: CatalogLookup = incremental.resolve_ref(opts["catalog"])
    n = opts["max_history"]
    users = batch.column("user_id").to_pylist()
    histories = batch.column("history").to_pylist()
    rows = []
    for user, hist in zip(users, histories, strict=True):
        tail = list(hist or [])[-n:]
        r = _Row(user, tail)
        rows.append(r)
        if _blank(user):
            r.fail("empty_item_id", f"user_id is {user!r}")
            continue
        if not tail:
            r.fail("empty_history", "history is empty")
            continue
        for item_id, found in zip(tail, lookup.find(tail), strict=True):
            if found is None:
                r.fail("unknown_item", f"history item {item_id!r} is not in the catalog", (item_id, None, None))
                break
            title, uri = found
            if _blank(title):
                r.fail("empty_title", f"history item {item_id!r} has title {title!r}", (item_id, title, uri))
                break
            if _blank(uri):
                r.fail("missing", f"history item {item_id!r} has no image_uri", (item_id, title, uri))
                break
            r.items.append((item_id, title, uri))
    return _finish(rows, opts, "sequences", retries_in(batch))


def prepare_from_scan(batch: pa.Table, *, opts: dict[str, Any], kind: str) -> pa.Table:
    """Pass 2 of an incremental run: re-read the new/changed rows the scan found and prepare them for the
    model (their scan verdict, ``new``/``changed``, is kept; so are the retries they carry)."""
    opts = dict(opts, mode="encode", prev_index=None, change_column=batch.column("status").to_pylist(),
                in_prev_column=batch.column("in_prev").to_pylist())
    if kind == "items":
        t = pa.table({"item_id": batch.column("key"), "title": batch.column("title"),
                      "image_uri": batch.column("image_uri")})
        return prepare_items(with_retries(t, retries_in(batch)), opts=opts)
    t = pa.table({"user_id": batch.column("key"), "history": batch.column("history")})
    return prepare_sequences(with_retries(t, retries_in(batch)), opts=opts)


class CatalogLookup:
    """``item_id -> (title, absolute image_uri)`` for sequence preprocessing, built once per run in a Ray task
    and shared through the object store (sorted ``uint64`` keys + Arrow columns; ``np.searchsorted``).
    ``storage_retries``: the S3 retries that reading the catalog for it took."""

    def __init__(self, ids: list[str], titles: list[str | None], uris: list[str | None], *,
                 storage_retries: int = 0) -> None:
        import numpy as np

        self.storage_retries = storage_retries
        keys = incremental.id_keys(ids)
        order = np.argsort(keys, kind="stable")
        self.keys = np.ascontiguousarray(keys[order])
        self.ids = pa.array(ids, pa.string()).take(pa.array(order))
        self.titles = pa.array(titles, pa.string()).take(pa.array(order))
        self.uris = pa.array(uris, pa.string()).take(pa.array(order))

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, item_ids: list[str]) -> list[tuple[str | None, str | None] | None]:
        import numpy as np

        if not len(self.keys):
            return [None] * len(item_ids)
        q = incremental.id_keys(item_ids)
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        out: list[tuple[str | None, str | None] | None] = []
        for item_id, p, k in zip(item_ids, pos, q, strict=True):
            p = int(p)
            # Walk equal keys (a 64-bit collision) and compare the ids themselves.
            hit = None
            while p < len(self.keys) and self.keys[p] == k:
                if self.ids[p].as_py() == item_id:
                    hit = (self.titles[p].as_py(), self.uris[p].as_py())
                    break
                p += 1
            out.append(hit)
        return out


def to_sink_rows(batch: pa.Table, *, source: str, dim: int) -> pa.Table:
    """Scan rows that failed (``source='failed'``) or previous snapshot rows carried over
    (``source='carried'``) in the sink's row format (see :func:`vlm2rec_ray.embed.predictor.sink_row_schema`);
    the retries the batch carries stay on its first row."""
    from vlm2rec_ray.embed.predictor import sink_row_schema

    schema = sink_row_schema(dim)
    n = batch.num_rows
    cols: dict[str, Any] = {RETRIES_COLUMN: pa.array([retries_in(batch)] + [0] * (n - 1) if n else [], pa.int32())}
    if source == "failed":
        cols |= {"key": batch.column("key"), "history": batch.column("history"),
                 "status": pa.array(["failed"] * n, pa.string()), "change": pa.array([""] * n, pa.string()),
                 "in_prev": batch.column("in_prev"), "reason": batch.column("reason"),
                 "detail": batch.column("detail"), "title": batch.column("title"),
                 "image_uri": batch.column("image_uri"), "failed_item_id": batch.column("failed_item_id")}
    elif source == "carried":
        key = "item_id" if "item_id" in batch.column_names else "user_id"
        cols |= {"key": batch.column(key),
                 "history": batch.column("history") if "history" in batch.column_names else pa.nulls(n, HISTORY_TYPE),
                 "emb_text": batch.column("emb_text"), "emb_image": batch.column("emb_image"),
                 "emb_fused": batch.column("emb_fused"), "content_hash": batch.column("content_hash"),
                 "embedded_at": batch.column("embedded_at"),
                 "status": pa.array(["carried"] * n, pa.string()), "change": pa.array(["unchanged"] * n, pa.string()),
                 "in_prev": pa.array([True] * n, pa.bool_())}
    else:
        raise ValueError(f"unknown sink row source {source!r}")
    arrays = []
    for f in schema:
        if f.name in cols:
            arrays.append(pc.cast(cols[f.name], f.type) if cols[f.name].type != f.type else cols[f.name])
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def stats_row(retries: int, dim: int) -> pa.Table:
    """One sink row with status ``stats``: no item, only counters (``storage_retries``) for the sink to add up,
    for a stage that keeps no row of a batch that carried retries."""
    from vlm2rec_ray.embed.predictor import sink_row_schema

    schema = sink_row_schema(dim)
    values = {"status": STATS_STATUS, "change": "", "in_prev": False, RETRIES_COLUMN: retries}
    return pa.Table.from_arrays([pa.array([values.get(f.name)], f.type) for f in schema], schema=schema)


def carry_filter(batch: pa.Table, *, opts: dict[str, Any], dim: int) -> pa.Table:
    """Previous snapshot rows whose item is unchanged in this run (``opts['unchanged']``: ``[ObjectRef]`` of
    a :class:`KeyIndex` of the scan's unchanged rows), as sink rows; the batch's retries stay on the first
    row kept, or on a :func:`stats_row` when none is."""
    import numpy as np

    index: incremental.KeyIndex = incremental.resolve_ref(opts["unchanged"])
    key = "item_id" if "item_id" in batch.column_names else "user_id"
    found, cur = index.lookup(incremental.id_keys(batch.column(key).to_pylist()))
    prev = incremental.hash_keys(batch.column("content_hash").to_pylist())
    keep = found & (cur == prev)
    retries = retries_in(batch)
    kept = batch.filter(pa.array(np.asarray(keep)))
    if kept.num_rows == 0:
        return stats_row(retries, dim) if retries else to_sink_rows(kept, source="carried", dim=dim)
    return to_sink_rows(with_retries(kept, retries), source="carried", dim=dim)


__all__ = [
    "ENCODE_ROW_SCHEMA",
    "SCAN_ROW_SCHEMA",
    "CatalogLookup",
    "carry_filter",
    "conform_batch",
    "prepare_from_scan",
    "prepare_items",
    "prepare_sequences",
    "stats_row",
    "to_sink_rows",
]
