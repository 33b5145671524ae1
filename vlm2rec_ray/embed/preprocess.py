"""CPU stages of the embed pipeline (Ray Data function UDFs over ``pyarrow.Table`` batches).

:func:`prepare_items` / :func:`prepare_sequences` validate rows, fetch image bytes concurrently
(``fetch_threads`` per task; each distinct URI once per batch, only under the run's allowed roots), hash them,
decode and resize each distinct image once, and emit one row of the contract (:mod:`.schema`) per input row:
``encode`` (titles, pixels, cache keys, ``content_hash``) or ``failed`` with its reason. In ``scan`` mode
(pass 1 of an incremental run) they fetch and hash, no decode, and classify rows against the last snapshot.
Items are one-item histories: items and sequences share one code path.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from vlm2rec_ray.data.catalog import resolve_image_uri
from vlm2rec_ray.data.images import decode_image, fetch_image_bytes
from vlm2rec_ray.data.schemas import conform_catalog, conform_split
from vlm2rec_ray.embed import incremental
from vlm2rec_ray.embed.schema import rows as make_rows
from vlm2rec_ray.model.prompts import clean_title

Item = tuple[str | None, str | None, str | None]  # (item_id, title, absolute image uri)


def _map(fn: Any, values: list[Any], threads: int) -> list[Any]:
    """``fn`` over ``values`` on up to ``threads`` threads (inline for one value)."""
    if len(values) <= 1 or threads <= 1:
        return [fn(v) for v in values]
    with ThreadPoolExecutor(min(threads, len(values)), thread_name_prefix="vlm2rec-fetch") as pool:
        return list(pool.map(fn, values))


def conform_batch(batch: pa.Table, *, kind: str) -> pa.Table:
    """Cast a raw catalog (items) or split (sequences) block to its schema; keeps Ray's ``path`` column."""
    table = conform_catalog(batch) if kind == "items" else conform_split(batch)
    if "path" in batch.column_names:
        table = table.append_column("path", batch.column("path").cast(pa.string()))
    return table


def _blank(v: str | None) -> bool:
    return v is None or not v.strip()


@dataclass(slots=True)
class _Row:
    """One input row on its way to the model: its items or why it failed (and on which item)."""

    key: str | None
    history: list[str] | None
    items: list[Item] = field(default_factory=list)
    reason: str | None = None
    detail: str | None = None
    failed_item: Item = (None, None, None)

    def fail(self, reason: str, detail: str, item: Item = (None, None, None)) -> None:
        if self.reason is None:
            self.reason, self.detail, self.failed_item = reason, detail, item


def _finish(rows: list[_Row], opts: dict[str, Any], kind: str) -> pa.Table:
    """Fetch, hash, (decode,) classify and build the batch's rows."""
    def fetch(uri: str) -> tuple[bytes | None, str | None]:
        return fetch_image_bytes(uri, endpoint=opts["endpoint"], max_bytes=opts["max_image_bytes"],
                                 allowed_roots=opts["allowed_roots"],
                                 allow_private_addresses=opts["allow_private_addresses"])

    def decode(data: bytes) -> tuple[tuple[bytes, int, int] | None, str | None]:
        im, reason = decode_image(data, min_pixels=opts["min_pixels"], max_pixels=opts["max_pixels"])
        return ((im.tobytes(), im.size[0], im.size[1]), None) if im is not None else (None, reason)

    def check(results: dict[str, Any], key: Any, fallback: str) -> None:
        for r in rows:
            for item in r.items if r.reason is None else []:
                value, reason = results[key(item[2])]
                if value is None:
                    r.fail(reason or fallback, f"image {item[2]}: {reason}", item)
                    break

    threads, encode = opts["fetch_threads"], opts["mode"] == "encode"
    uris = list(dict.fromkeys(u for r in rows if r.reason is None for (_, _, u) in r.items))
    fetched = dict(zip(uris, _map(fetch, uris, threads), strict=True))
    digests = {u: incremental.image_digest(d) for u, (d, _) in fetched.items() if d is not None}
    check(fetched, lambda u: u, "io_error")
    decoded: dict[str, Any] = {}
    if encode:
        blobs = {digests[u]: fetched[u][0] for r in rows if r.reason is None for (_, _, u) in r.items}
        decoded = dict(zip(blobs, _map(decode, list(blobs.values()), threads), strict=True))
        check(decoded, lambda u: digests[u], "corrupt")
    ok = [r.reason is None for r in rows]
    hashes = [incremental.content_hash(opts["fingerprint"], [t for _, t, _ in r.items], [digests[u] for *_, u in r.items])
              if o else None for r, o in zip(rows, ok, strict=True)]
    keys = [r.key for r in rows]
    if opts["mode"] == "scan":  # pass 1 of an incremental run: compare with the previous snapshot
        changes, found = incremental.classify(incremental.resolve_ref(opts.get("prev_index")), keys, hashes)
    elif opts.get("change_column") is not None:  # pass 2: the scan's verdict travels with the row
        changes, found = opts["change_column"], opts["in_prev_column"]
    else:  # a full run compares with nothing
        changes, found = [""] * len(rows), [False] * len(rows)
    shown = [r.items[0] if kind == "items" and r.items else r.failed_item for r in rows]  # errors table / pass 2
    cols: dict[str, Any] = {
        "key": keys, "history": [r.history for r in rows], "content_hash": hashes, "in_prev": [bool(f) for f in found],
        "reason": [r.reason for r in rows], "detail": [r.detail for r in rows],
        "title": [s[1] for s in shown], "image_uri": [s[2] for s in shown],
        "failed_item_id": [r.failed_item[0] for r in rows]}
    if not encode:
        return make_rows(opts["dim"], len(rows), status=[c if o else "failed" for c, o in zip(changes, ok, strict=True)],
                         **cols)
    pix = [[decoded[digests[u]][0] for *_, u in r.items] if o else None for r, o in zip(rows, ok, strict=True)]
    titles = [[t for _, t, _ in r.items] if o else None for r, o in zip(rows, ok, strict=True)]
    return make_rows(
        opts["dim"], len(rows), **cols, status=["encode" if o else "failed" for o in ok],
        change=[c if o else "" for c, o in zip(changes, ok, strict=True)], titles=titles,
        pixels=[[p[0] for p in ps] if ps else None for ps in pix], widths=[[p[1] for p in ps] if ps else None for ps in pix],
        heights=[[p[2] for p in ps] if ps else None for ps in pix],
        text_key=[incremental.text_key([clean_title(t) for t in ts]) if ts else None for ts in titles],
        image_key=[incremental.image_key([digests[u] for *_, u in r.items]) if o else None
                   for r, o in zip(rows, ok, strict=True)])


def prepare_items(batch: pa.Table, *, opts: dict[str, Any]) -> pa.Table:
    """Catalog rows (``item_id``, ``title``, ``image_uri`` [, ``path``]) -> rows to encode (or scan rows).
    ``opts``: :meth:`~vlm2rec_ray.embed.plan.RunPlan.opts` (``sources``: Ray's ``path`` -> catalog URI, to resolve
    relative image URIs; scan mode: ``prev_index``, ``[ObjectRef]`` of the last snapshot's :class:`KeyIndex`)."""
    ids, titles, uris = (batch.column(c).to_pylist() for c in ("item_id", "title", "image_uri"))
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else [None] * len(ids)
    rows = []
    for item_id, title, uri, path in zip(ids, titles, uris, paths, strict=True):
        r = _Row(item_id, None)
        rows.append(r)
        source = opts.get("sources", {}).get(path, opts["catalog_uri"])
        resolved = None if _blank(uri) else resolve_image_uri(uri, source)
        r.items = [(item_id, title or "", resolved or "")]
        if _blank(item_id):
            r.fail("empty_item_id", f"item_id is {item_id!r}", (item_id, title, resolved))
        elif _blank(title):
            r.fail("empty_title", f"title is {title!r}", (item_id, title, resolved))
        elif resolved is None:
            r.fail("missing", "image_uri is empty", (item_id, title, uri))
    return _finish(rows, opts, "items")


def prepare_sequences(batch: pa.Table, *, opts: dict[str, Any]) -> pa.Table:
    """Split rows (``user_id``, ``history``) -> rows to encode over each history's last ``max_history`` items,
    with titles and image URIs looked up in the catalog (``opts['catalog']``: ``[ObjectRef]`` of a
    :class:`CatalogLookup`)."""
    lookup: CatalogLookup = incremental.resolve_ref(opts["catalog"])
    n = opts["max_history"]
    rows = []
    for user, hist in zip(batch.column("user_id").to_pylist(), batch.column("history").to_pylist(), strict=True):
        tail = list(hist or [])[-n:]
        r = _Row(user, tail)
        rows.append(r)
        if _blank(user):
            r.fail("empty_item_id", f"user_id is {user!r}")
        elif not tail:
            r.fail("empty_history", "history is empty")
        for item_id, found in zip(tail, lookup.find(tail), strict=True) if r.reason is None else ():
            title, uri = found or (None, None)
            if found is None:
                r.fail("unknown_item", f"history item {item_id!r} is not in the catalog", (item_id, None, None))
            elif _blank(title):
                r.fail("empty_title", f"history item {item_id!r} has title {title!r}", (item_id, title, uri))
            elif _blank(uri):
                r.fail("missing", f"history item {item_id!r} has no image_uri", (item_id, title, uri))
            if r.reason is not None:
                break
            r.items.append((item_id, title, uri))
    return _finish(rows, opts, "sequences")


def prepare_from_scan(batch: pa.Table, *, opts: dict[str, Any], kind: str) -> pa.Table:
    """Pass 2 of an incremental run: re-read the new/changed rows the scan found and prepare them for the
    model (their scan verdict, ``new``/``changed``, is kept)."""
    opts = dict(opts, mode="encode", prev_index=None, change_column=batch.column("status").to_pylist(),
                in_prev_column=batch.column("in_prev").to_pylist())
    if kind == "items":
        return prepare_items(pa.table({"item_id": batch.column("key"), "title": batch.column("title"),
                                       "image_uri": batch.column("image_uri")}), opts=opts)
    return prepare_sequences(pa.table({"user_id": batch.column("key"), "history": batch.column("history")}), opts=opts)


class CatalogLookup:
    """``item_id -> (title, absolute image_uri)`` for sequence preprocessing, built once per run in a Ray task
    and shared through the object store (sorted ``uint64`` keys + Arrow columns; ``np.searchsorted``)."""

    def __init__(self, ids: list[str], titles: list[str | None], uris: list[str | None]) -> None:
        keys = incremental.id_keys(ids)
        order = np.argsort(keys, kind="stable")
        self.keys = np.ascontiguousarray(keys[order])
        self.ids, self.titles, self.uris = (pa.array(v, pa.string()).take(pa.array(order)) for v in (ids, titles, uris))

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, item_ids: list[str]) -> list[tuple[str | None, str | None] | None]:
        if not len(self.keys):
            return [None] * len(item_ids)
        q = incremental.id_keys(item_ids)
        out: list[tuple[str | None, str | None] | None] = []
        for item_id, p, k in zip(item_ids, np.searchsorted(self.keys, q), q, strict=True):
            hit, p = None, int(p)
            while p < len(self.keys) and self.keys[p] == k:  # walk equal keys (a 64-bit collision)
                if self.ids[p].as_py() == item_id:
                    hit = (self.titles[p].as_py(), self.uris[p].as_py())
                    break
                p += 1
            out.append(hit)
        return out


def carry_filter(batch: pa.Table, *, opts: dict[str, Any], dim: int) -> pa.Table:
    """Previous snapshot rows whose item is unchanged in this run (``opts['unchanged']``: ``[ObjectRef]`` of a
    :class:`KeyIndex` of the scan's unchanged rows), as ``carried`` rows."""
    index: incremental.KeyIndex = incremental.resolve_ref(opts["unchanged"])
    key = "item_id" if "item_id" in batch.column_names else "user_id"
    found, cur = index.lookup(incremental.id_keys(batch.column(key).to_pylist()))
    kept = batch.filter(pa.array(np.asarray(found & (cur == incremental.hash_keys(
        batch.column("content_hash").to_pylist())))))
    n = kept.num_rows
    return make_rows(dim, n, key=kept.column(key), history=kept.column("history") if key == "user_id" else None,
                     **{c: kept.column(c) for c in ("emb_text", "emb_image", "emb_fused", "content_hash", "embedded_at")},
                     status=["carried"] * n, change=["unchanged"] * n, in_prev=[True] * n)


__all__ = ["CatalogLookup", "carry_filter", "conform_batch", "prepare_from_scan", "prepare_items", "prepare_sequences"]
