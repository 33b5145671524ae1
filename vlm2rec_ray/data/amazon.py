"""Prepare the McAuley-lab Amazon Reviews dumps into a VLM2Rec dataset (``vlm2rec prepare amazon``).

Formats (detected from the first record of each file, or forced with ``fmt``):

- **2014** (McAuley et al., SIGIR'15): ``reviews_<Cat>[_5].json.gz`` with ``reviewerID``, ``asin``,
  ``unixReviewTime``; ``meta_<Cat>.json.gz`` whose lines are *Python literals* (``{'asin': ...}``, read
  with ``ast.literal_eval``) with ``title``, ``imUrl``, ``categories`` (list of paths), ``description``.
- **2018** (Ni et al., EMNLP'19): JSON lines; reviews as in 2014 (plus ``image``), metadata with ``title``,
  ``imageURLHighRes``/``imageURL`` lists, ``category`` list and ``description`` list.
- **2023** (Hou et al.): JSON lines; reviews with ``user_id``, ``parent_asin``, ``timestamp`` in
  *milliseconds*; metadata with ``parent_asin``, ``title``, ``images`` (list of ``{thumb, large, hi_res,
  variant}``), ``main_category``/``categories``, ``description`` list. Items are ``parent_asin``.

Pipeline (paper 5.1.1): reviews -> (user, item, time); items without metadata, title or image dropped
(counted); repeated (user, item) pairs kept once at the earliest time (counted); iterative k-core
(k=5); chronological sequences; leave-one-out splits with history <= 10; Table 3 stats. Malformed lines
are counted and the first few named by line number in ``report.json``, never silently skipped.
"""

from __future__ import annotations

import ast
import gzip
import html
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vlm2rec_ray import storage
from vlm2rec_ray.data.catalog import write_prepared
from vlm2rec_ray.data.schemas import CATALOG_SCHEMA, INTERACTIONS_SCHEMA
from vlm2rec_ray.data.splits import (
    build_sequences,
    compute_stats,
    dedupe_interactions,
    kcore_filter,
    leave_one_out,
)

log = logging.getLogger(__name__)

FORMATS = ("auto", "2014", "2018", "2023")
REPORT_FILE = "report.json"
_MAX_EXAMPLES = 5
_MAX_DESCRIPTION = 2000
_WS = re.compile(r"\s+")


@dataclass
class LineProblems:
    """Malformed input lines: a count per kind and the first few line numbers with the reason."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, uri: str, line_no: int, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{uri} line {line_no}: {kind}: {detail}")


def _iter_records(uri: str, problems: LineProblems, endpoint: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream (line number, record) from a JSON-lines or Python-literal-lines file, gzipped or not."""
    with storage.open_read(uri, endpoint=endpoint) as raw:
        head = raw.read(2)
        stream: io.BufferedIOBase = io.BufferedReader(_Prefixed(head, raw))  # type: ignore[arg-type]
        if head == b"\x1f\x8b":
            stream = gzip.GzipFile(fileobj=stream)  # type: ignore[assignment]
        for line_no, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8", errors="replace"), start=1):
            text = line.strip()
            if not text:
                continue
            obj: Any = None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                try:  # 2014 metadata: Python dict literals with single quotes
                    obj = ast.literal_eval(text)
                except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                    problems.add(uri, line_no, "unparseable", f"{type(e).__name__}: {text[:80]!r}")
                    continue
            if not isinstance(obj, dict):
                problems.add(uri, line_no, "not_an_object", f"{type(obj).__name__}")
                continue
            yield line_no, obj


class _Prefixed(io.RawIOBase):
    """A raw stream that replays ``head`` (bytes already read to sniff gzip) before the rest of ``raw``."""

    def __init__(self, head: bytes, raw: Any) -> None:
        self._head = head
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        chunk = self._raw.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)


def detect_review_format(record: dict[str, Any]) -> str:
    if "user_id" in record and "timestamp" in record:
        return "2023"
    if "reviewerID" in record:
        return "2018" if ("verified" in record or "image" in record or "style" in record) else "2014"
    raise ValueError(
        f"unrecognised review record keys {sorted(record)[:12]}; expected 2014/2018 (reviewerID, asin, "
        "unixReviewTime) or 2023 (user_id, parent_asin, timestamp); pass --format explicitly"
    )


def detect_meta_format(record: dict[str, Any]) -> str:
    if "parent_asin" in record or isinstance(record.get("images"), list):
        return "2023"
    if "imageURL" in record or "imageURLHighRes" in record or "category" in record:
        return "2018"
    if "imUrl" in record or "categories" in record or "asin" in record:
        return "2014"
    raise ValueError(f"unrecognised metadata record keys {sorted(record)[:12]}; pass --format explicitly")


def _clean(text: Any) -> str:
    if text is None:
        return ""
    if isinstance(text, list):
        text = " ".join(str(t) for t in text if t)
    return _WS.sub(" ", html.unescape(str(text))).strip()


def _first_url(values: Any) -> str:
    if isinstance(values, str):
        values = [values]
    for v in values or []:
        if isinstance(v, str) and v.strip().startswith(("http://", "https://")):
            return v.strip()
    return ""


def parse_review(record: dict[str, Any], fmt: str) -> tuple[str, str, int] | str:
    """(user_id, item_id, unix seconds), or a problem kind."""
    if fmt == "2023":
        user, item, ts = record.get("user_id"), record.get("parent_asin") or record.get("asin"), record.get("timestamp")
        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
            ts = int(ts) // 1000  # 2023 timestamps are milliseconds
    else:
        user, item, ts = record.get("reviewerID"), record.get("asin"), record.get("unixReviewTime")
    if not user or not item:
        return "missing_user_or_item"
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or ts < 0:
        return "bad_timestamp"
    return str(user), str(item), int(ts)


def parse_meta(record: dict[str, Any], fmt: str) -> dict[str, Any] | str:
    """A catalog row (item_id, title, image_uri, description, category), or a problem kind."""
    if fmt == "2023":
        item = record.get("parent_asin") or record.get("asin")
        images = record.get("images") or []
        main = [im for im in images if isinstance(im, dict) and im.get("variant") == "MAIN"]
        image = ""
        for im in main + [im for im in images if isinstance(im, dict)]:
            image = _first_url([im.get("large"), im.get("hi_res"), im.get("thumb")])
            if image:
                break
        cats = record.get("categories") or []
        category = " > ".join(map(str, cats)) if cats else _clean(record.get("main_category"))
    elif fmt == "2018":
        item = record.get("asin")
        image = _first_url(record.get("imageURLHighRes")) or _first_url(record.get("imageURL")) or _first_url(
            record.get("image")
        )
        category = " > ".join(map(str, record.get("category") or []))
    else:
        item = record.get("asin")
        image = _first_url(record.get("imUrl"))
        paths = record.get("categories") or []
        category = " > ".join(map(str, paths[0])) if paths and isinstance(paths[0], list) else ""
    if not item:
        return "missing_item_id"
    return {
        "item_id": str(item),
        "title": _clean(record.get("title")),
        "image_uri": image,
        "description": _clean(record.get("description"))[:_MAX_DESCRIPTION] or None,
        "category": _clean(category) or None,
    }


def _read_reviews(uri: str, fmt: str, endpoint: str | None, problems: LineProblems) -> tuple[pa.Table, str, int]:
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    lines = 0
    for line_no, rec in _iter_records(uri, problems, endpoint):
        lines += 1
        if lines % 1_000_000 == 0:
            log.info("reviews %s: %d lines read", uri, lines)
        if fmt == "auto":
            fmt = detect_review_format(rec)
            log.info("reviews %s: format %s", uri, fmt)
        parsed = parse_review(rec, fmt)
        if isinstance(parsed, str):
            problems.add(uri, line_no, parsed, json.dumps({k: rec.get(k) for k in list(rec)[:4]}, default=str)[:120])
            continue
        users.append(parsed[0])
        items.append(parsed[1])
        times.append(parsed[2])
    table = pa.table(
        {"user_id": pa.array(users, pa.string()), "item_id": pa.array(items, pa.string()),
         "timestamp": pa.array(times, pa.int64())},
        schema=INTERACTIONS_SCHEMA,
    )
    return table, fmt, lines


def _read_meta(uri: str, fmt: str, wanted: set[str], endpoint: str | None, problems: LineProblems) -> tuple[dict[str, dict[str, Any]], str, int]:
    rows: dict[str, dict[str, Any]] = {}
    lines = 0
    for line_no, rec in _iter_records(uri, problems, endpoint):
        lines += 1
        if fmt == "auto":
            fmt = detect_meta_format(rec)
            log.info("metadata %s: format %s", uri, fmt)
        raw_id = (rec.get("parent_asin") or rec.get("asin")) if fmt == "2023" else rec.get("asin")
        if raw_id is not None and str(raw_id) not in wanted:
            continue  # metadata for items nobody reviewed: not needed
        parsed = parse_meta(rec, fmt)
        if isinstance(parsed, str):
            problems.add(uri, line_no, parsed, str(sorted(rec)[:6]))
            continue
        if parsed["item_id"] in rows:
            problems.add(uri, line_no, "duplicate_metadata", parsed["item_id"])
            continue
        rows[parsed["item_id"]] = parsed
    return rows, fmt, lines


def prepare_amazon(
    reviews_uri: str,
    meta_uri: str,
    out_uri: str,
    *,
    fmt: str = "auto",
    k: int = 5,
    max_history: int = 10,
    endpoint: str | None = None,
    copy_images: bool = False,
    image_concurrency: int = 16,
    image_retries: int = 3,
) -> dict[str, Any]:
    """Prepare one Amazon Reviews category into ``out_uri`` (local dir or s3:// prefix).

    Args:
        reviews_uri, meta_uri: the category's review and metadata dumps (local or s3://, .gz or plain).
        fmt: ``auto`` (detect per file), ``2014``, ``2018`` or ``2023``.
        k: the k-core threshold for users and items (5 in the paper).
        max_history: history length kept in splits (10 in the paper).
        copy_images: fetch every surviving item's image into ``<out>/images/`` (bounded concurrency,
            retries); items whose image cannot be fetched or decoded are dropped like items without an
            image, counted by reason, and the k-core is re-applied.

    Returns:
        ``{"stats": Table 3 row, "report": counts of everything dropped and why}``; both are also written
        (``stats.json``, ``report.json``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    problems = LineProblems()
    interactions, review_fmt, review_lines = _read_reviews(reviews_uri, fmt, endpoint, problems)
    if interactions.num_rows == 0:
        raise ValueError(f"no usable reviews in {reviews_uri} ({review_lines} lines; problems {dict(problems.counts)})")
    reviewed = set(pc.unique(interactions.column("item_id")).to_pylist())
    meta, meta_fmt, meta_lines = _read_meta(meta_uri, fmt, reviewed, endpoint, problems)

    item_drops: Counter[str] = Counter()
    usable: dict[str, dict[str, Any]] = {}
    for item in reviewed:
        row = meta.get(item)
        if row is None:
            item_drops["no_metadata"] += 1
        elif not row["title"]:
            item_drops["no_title"] += 1
        elif not row["image_uri"]:
            item_drops["no_image"] += 1
        else:
            usable[item] = row
    mask = pc.is_in(interactions.column("item_id"), value_set=pa.array(sorted(usable), pa.string()))
    kept = interactions.filter(mask)
    report: dict[str, Any] = {
        "format": {"reviews": review_fmt, "meta": meta_fmt},
        "review_lines": review_lines,
        "meta_lines": meta_lines,
        "line_problems": dict(problems.counts),
        "line_problem_examples": problems.examples,
        "reviewed_items": len(reviewed),
        "dropped_items": dict(item_drops),
        "dropped_interactions_item_filter": interactions.num_rows - kept.num_rows,
    }
    kept, n_dupes = dedupe_interactions(kept)
    report["duplicate_interactions"] = n_dupes
    kept, core = kcore_filter(kept, k)
    report["kcore"] = {"k": k, **core}
    if copy_images and kept.num_rows:
        from vlm2rec_ray.data.prepare_images import copy_images as _copy

        survivors = sorted(set(pc.unique(kept.column("item_id")).to_pylist()))
        result = _copy(
            [(i, usable[i]["image_uri"]) for i in survivors],
            storage.join(out_uri, "images"),
            endpoint=endpoint,
            concurrency=image_concurrency,
            retries=image_retries,
        )
        for item, rel in result.uris.items():
            usable[item]["image_uri"] = f"images/{rel}"
        report["images"] = result.summary()
        if result.failures:
            ok = pa.array(sorted(set(survivors) - set(result.failures)), pa.string())
            kept, core2 = kcore_filter(kept.filter(pc.is_in(kept.column("item_id"), value_set=ok)), k)
            report["kcore_after_images"] = core2
    if kept.num_rows == 0:
        raise ValueError(
            f"nothing left after filtering ({json.dumps(report, default=str)}); check the files match one "
            f"category, or lower k (got k={k})"
        )
    sequences = build_sequences(kept)
    splits, split_info = leave_one_out(sequences, max_history=max_history)
    report.update(split_info)
    item_ids = sorted(set(pc.unique(kept.column("item_id")).to_pylist()))
    catalog = pa.Table.from_pylist([usable[i] for i in item_ids], schema=CATALOG_SCHEMA)
    stats = compute_stats(kept)
    storage.write_text(storage.join(out_uri, REPORT_FILE), json.dumps(report, indent=2, default=str) + "\n",
                       endpoint=endpoint)
    write_prepared(out_uri, catalog=catalog, interactions=kept, splits=splits, stats=stats, endpoint=endpoint)
    return {"stats": stats, "report": report}
