"""Inputs of an embed run: which files, what they hold (the census), the model's size, the catalog lookup.

All of it runs before any image is fetched: a missing file or column or a duplicate id fails the run in
seconds with nothing written. Rows are read by Ray Data's own readers (:func:`read_rows`).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from vlm2rec_ray import storage
from vlm2rec_ray.data.catalog import JSON_SUFFIXES
from vlm2rec_ray.embed import incremental
from vlm2rec_ray.embed.schema import KEY_COLUMN

if TYPE_CHECKING:  # census and catalog_lookup run in Ray tasks: their workers import only what they use
    import ray.data

    from vlm2rec_ray.config import EmbedJobConfig
    from vlm2rec_ray.embed.preprocess import CatalogLookup

REQUIRED = {"items": ("item_id", "title", "image_uri"), "sequences": ("user_id", "history", "target")}


def source_files(uri: str, *, endpoint: str | None = None, default_file: str | None = "catalog.parquet"
                 ) -> tuple[str, list[str]]:
    """``(format, files)`` of a catalog/split given as a file, a dataset dir/prefix (picks ``default_file``)
    or a prefix of Parquet or JSONL files.

    Raises:
        FileNotFoundError: nothing readable there.
        ValueError: a prefix that mixes Parquet and JSON files.
    """
    low = uri.lower()
    if low.endswith((".parquet", *JSON_SUFFIXES)):
        if not storage.exists(uri, endpoint=endpoint):
            raise FileNotFoundError(f"{uri} not found; check the path and the S3 endpoint")
        return ("parquet" if low.endswith(".parquet") else "json"), [uri]
    if default_file and storage.exists(storage.join(uri, default_file), endpoint=endpoint):
        return "parquet", [storage.join(uri, default_file)]
    try:
        listed = storage.list_uris(uri, endpoint=endpoint)
    except storage.StorageError as e:
        raise FileNotFoundError(f"cannot list {uri}: {e}") from e
    root = storage.absolute(uri).rstrip("/")
    visible = [f for f in listed if not any(p.startswith((".", "_")) for p in f[len(root):].split("/"))]
    parquet = [f for f in visible if f.lower().endswith(".parquet")]
    jsons = [f for f in visible if f.lower().endswith(JSON_SUFFIXES)]
    if parquet and jsons:
        raise ValueError(f"{uri} holds both Parquet and JSON files; point the URI at one format")
    if not parquet and not jsons:
        raise FileNotFoundError(f"no Parquet or JSONL files at {uri}; pass a catalog file, a dataset dir with "
                                f"{default_file}, or a prefix of Parquet/JSONL files")
    return ("parquet", parquet) if parquet else ("json", jsons)


def read_rows(files: list[str], fmt: str, *, endpoint: str | None, columns: list[str] | None = None,
              include_paths: bool = False) -> ray.data.Dataset:
    """A Ray Dataset of the files' rows (Ray Data's readers over the store's pyarrow filesystem; ``path`` is the
    file's path in that filesystem, see :func:`fs_paths`)."""
    import ray.data

    paths, fs = list(fs_paths(files, endpoint)), storage.pyarrow_filesystem(files[0], endpoint=endpoint)[0]
    kw: dict[str, Any] = {"filesystem": fs, "include_paths": include_paths, "partitioning": None,
                          "file_extensions": None}
    return ray.data.read_parquet(paths, columns=columns, **kw) if fmt == "parquet" else ray.data.read_json(paths, **kw)


def fs_paths(files: list[str], endpoint: str | None) -> dict[str, str]:
    """``{path in the store's pyarrow filesystem: URI}`` (what Ray Data's ``path`` column holds -> the file)."""
    return {storage.pyarrow_filesystem(f, endpoint=endpoint)[1]: f for f in files}


def census(files: list[str], fmt: str, kind: str, endpoint: str | None) -> dict[str, Any]:
    """Rows and duplicate keys of the input, reading only the key column after the first rows (runs in a Ray task).

    Raises:
        ValueError: a required column is missing or has the wrong type (names the file, the column and a value).
    """
    from vlm2rec_ray.data.schemas import conform_catalog, conform_split

    key = KEY_COLUMN[kind]

    def key_batches() -> Any:
        for f in files:
            if fmt == "parquet":
                with storage.open_parquet(f, endpoint=endpoint) as pf:
                    head = pa.Table.from_batches(list(itertools.islice(pf.iter_batches(batch_size=100), 1)),
                                                 schema=pf.schema_arrow)
                    try:  # the pipeline's own casts, on the first rows: a bad column fails before any fetch
                        (conform_catalog if kind == "items" else conform_split)(head)
                    except ValueError as e:
                        raise ValueError(f"{f}: {e}") from e
                    for b in pf.iter_batches(columns=[key], batch_size=65_536):
                        yield b.column(0).cast(pa.string()).to_pylist()
            elif kind != "items":
                raise ValueError(f"{f}: sequences read Parquet splits (<dataset>/splits/<split>.parquet)")
            else:
                from vlm2rec_ray.data.catalog import read_catalog

                yield read_catalog(f, endpoint=endpoint).column(key).to_pylist()  # names a bad row, column, value

    rows = 0
    keys: list[np.ndarray] = []
    for ids in key_batches():
        rows += len(ids)
        keys.append(incremental.id_keys(ids))
    allk = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    uniq, counts = np.unique(allk[allk != 0], return_counts=True)
    dup_keys = set(uniq[counts > 1].tolist())
    examples: dict[str, int] = {}
    for ids in key_batches() if dup_keys else ():
        for i, k in zip(ids, incremental.id_keys(ids).tolist(), strict=True):
            if k in dup_keys:
                examples[i] = examples.get(i, 0) + 1
    dups = sorted(k for k, v in examples.items() if v > 1)
    return {"rows": rows, "duplicates": len(dups), "duplicate_examples": dups[:5]}


def catalog_lookup(files: list[str], endpoint: str | None) -> CatalogLookup:
    """The catalog as a :class:`~vlm2rec_ray.embed.preprocess.CatalogLookup` (runs in a Ray task; shared
    through the object store)."""
    from vlm2rec_ray.data.catalog import read_catalog, resolve_image_uri
    from vlm2rec_ray.embed.preprocess import CatalogLookup

    ids: list[str] = []
    titles: list[str | None] = []
    uris: list[str | None] = []
    for f in files:
        t = read_catalog(f, endpoint=endpoint)
        ids += t.column("item_id").to_pylist()
        titles += t.column("title").to_pylist()
        uris += [None if (u is None or not u.strip()) else resolve_image_uri(u, f)
                 for u in t.column("image_uri").to_pylist()]
    return CatalogLookup(ids, titles, uris)


def embedding_dim(cfg: EmbedJobConfig) -> int:
    """The backbone's hidden size from its ``config.json`` (no weights loaded)."""
    from vlm2rec_ray.model import read_model_config

    conf = read_model_config(cfg.model.name, endpoint=cfg.storage.endpoint_url)
    dim = (conf.get("text_config") or {}).get("hidden_size") or conf.get("hidden_size")
    if not dim:
        raise ValueError(f"cannot find hidden_size in the config of model {cfg.model.name!r}")
    return int(dim)


__all__ = ["catalog_lookup", "census", "embedding_dim", "fs_paths", "read_rows", "source_files"]
