"""The embed job: a streaming Ray Data pipeline from a catalog (or user histories) to a Parquet snapshot.

Full run (``incremental: false``, or no previous snapshot)::

    read catalog (Parquet/JSONL, local or s3://)  ->  conform to the catalog schema
      -> prepare_items        CPU tasks: fetch image bytes (threads), hash, decode + resize once per image
      -> EmbedPredictor       actor pool holding the model: emb_text, emb_image, emb_fused (dedup + cache)
      -> SnapshotSink         run=<id>/part-*.parquet + run=<id>/_errors/part-*.parquet, counts
    then: check counts (ok + failed == input rows) and the failure share, write _manifest.json last,
    delete the run it replaced.

Incremental run (nightly): pass 1 *scans* every row (fetch + hash, no decode, no model) and classifies it
against the previous snapshot's ``content_hash`` (new / changed / unchanged / failed), staging small rows
by what pass 2 does with them (``encode``: new + changed, ``failed``, ``unchanged``).
Pass 2 streams three branches into one sink: new and changed rows through the model (their images fetched
again: only those), failed rows straight to the errors table, and unchanged rows copied from the previous
snapshot's files (filtered in CPU tasks against an index in the object store; the driver never holds the
previous snapshot). Deleted items are simply not carried. Nothing reaches the model when nothing changed.

S3 retries (``storage_retries`` in the summary) are counted wherever the run touches S3, all through
:mod:`vlm2rec_ray.storage`'s boto3 clients (Parquet included: ranged GETs in, spooled PUTs out; pyarrow's
own S3 client is not used): Ray Data reads and image fetches carry theirs in a ``storage_retries`` column
down to the sink (:mod:`vlm2rec_ray.embed.reader`), the sinks add their uploads, the census / index /
catalog tasks return theirs, and the driver adds its own (planning, footers, manifests, clean-up).

Nothing is materialized in the driver: data flows task to task through the object store, and the driver
only receives per-write-task counts and file names. Memory is flat in the catalog size except for one thing:
a write task starts once ``rows_per_file`` rows (about ``target_file_mib``) are ready, so up to one file's
rows wait in the object store (small blocks, e.g. a tiny model's batches, are first coalesced into >= 1 MiB
blocks, so that they do not wait in the driver's memory; see ``_write``).
Sequences run the same machinery with each user's
last ``max_history`` items looked up in the catalog (an index shared through the object store).

    summary = run_embed_items(load_config(EmbedJobConfig, "jobs/configs/embed_items.yaml"))
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlm2rec_ray import storage
from vlm2rec_ray.config import EmbedJobConfig, config_hash
from vlm2rec_ray.embed import incremental, reader, snapshot
from vlm2rec_ray.embed.schema import KEY_COLUMN, errors_schema, output_schema, schema_to_json
from vlm2rec_ray.runtime import returning_freed_memory

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

log = logging.getLogger(__name__)

_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
_REQUIRED = {"items": ("item_id", "title", "image_uri"), "sequences": ("user_id", "history", "target")}
_WRITE_CPUS = 0.25  # write tasks are I/O bound; keep CPUs for fetch/decode and the model actors
_MIN_WRITE_BLOCK_BYTES = 1 << 20  # rows reach the sinks in blocks of at least this size (see _write)
_COALESCE_TASKS = 2  # tasks that coalesce small blocks for the sinks at once, at least (see _write)
_TRIM_EVERY_S = 5.0  # the driver returns freed heap pages to the OS this often during a run (see _run)
_SCAN_ROW_BYTES = 300  # a staged scan row: key, hashes, status, title and URI (see preprocess.SCAN_ROW_SCHEMA)


class EmbedFailureError(RuntimeError):
    """Too many rows failed (or counts did not add up): nothing was published; the summary says why."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


# ---------------------------------------------------------------------------------------------- inputs


def source_files(uri: str, *, endpoint: str | None = None, default_file: str | None = "catalog.parquet"
                 ) -> tuple[str, list[str]]:
    """``(format, files)`` of a catalog/split given as a file, a dataset dir/prefix (picks ``default_file``)
    or a prefix of Parquet or JSONL files.

    Raises:
        FileNotFoundError: nothing readable there.
        ValueError: a prefix that mixes Parquet and JSON files.
    """
    low = uri.lower()
    if low.endswith(".parquet") or low.endswith(_JSON_SUFFIXES):
        if not storage.exists(uri, endpoint=endpoint):
            raise FileNotFoundError(f"{uri} not found; check the path and the S3 endpoint")
        return ("parquet" if low.endswith(".parquet") else "json"), [uri]
    if default_file:
        candidate = storage.join(uri, default_file)
        if storage.exists(candidate, endpoint=endpoint):
            return "parquet", [candidate]
    try:
        listed = storage.list_uris(uri, endpoint=endpoint) if storage.exists(uri, endpoint=endpoint) else []
    except storage.StorageError as e:
        raise FileNotFoundError(f"cannot list {uri}: {e}") from e
    root = uri.rstrip("/") if storage.is_s3(uri) else str(storage.resolve_local(uri))
    visible = [f for f in listed if not any(p.startswith((".", "_")) for p in f[len(root):].split("/"))]
    parquet = [f for f in visible if f.lower().endswith(".parquet")]
    jsons = [f for f in visible if f.lower().endswith(_JSON_SUFFIXES)]
    if parquet and jsons:
        raise ValueError(f"{uri} holds both Parquet and JSON files; point the URI at one format")
    if not parquet and not jsons:
        raise FileNotFoundError(f"no Parquet or JSONL files at {uri}; pass a catalog file, a dataset dir with "
                                f"{default_file}, or a prefix of Parquet/JSONL files")
    return ("parquet", parquet) if parquet else ("json", jsons)


def _census(files: list[str], fmt: str, kind: str, endpoint: str | None) -> dict[str, Any]:
    """Rows, blank keys and duplicate keys of the input, reading only the key column, and the S3 retries
    that took (runs in a Ray task: one at a time per worker, so the counter's delta is this task's)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    retries_before = storage.retry_attempts()
    key = KEY_COLUMN[kind]
    required = _REQUIRED[kind]

    def key_batches() -> Any:
        for f in files:
            if fmt == "parquet":
                with storage.open_input_file(f, endpoint=endpoint) as fh:
                    pf = pq.ParquetFile(fh)
                    names = pf.schema_arrow.names
                    missing = [c for c in required if c not in names]
                    if missing:
                        raise ValueError(f"{f} is missing required column(s) {missing}; it has {names}. "
                                         f"Expected columns: {list(required)}")
                    typ = pf.schema_arrow.field(key).type
                    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_dictionary(typ)):
                        raise ValueError(f"{f}: column {key!r} has type {typ}, expected string; write ids as strings")
                    for b in pf.iter_batches(columns=[key], batch_size=65_536):
                        yield f, b.column(0).cast(pa.string()).to_pylist()
            else:
                import gzip

                import pyarrow.json as pajson

                if kind != "items":
                    raise ValueError(f"{f}: sequences read Parquet splits (<dataset>/splits/<split>.parquet)")
                data = storage.read_bytes(f, endpoint=endpoint)
                if f.lower().endswith(".gz"):
                    data = gzip.decompress(data)
                opts = pajson.ParseOptions(explicit_schema=pa.schema([(key, pa.string())]),
                                           unexpected_field_behavior="ignore")
                try:
                    t = pajson.read_json(pa.BufferReader(data), parse_options=opts)
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    from vlm2rec_ray.data.catalog import read_catalog

                    read_catalog(f, endpoint=endpoint)  # raises a ValueError naming the row, column and value
                    raise
                yield f, t.column(key).to_pylist()

    rows = blank = 0
    keys: list[np.ndarray] = []
    for _, ids in key_batches():
        rows += len(ids)
        blank += sum(1 for i in ids if i is None or not i.strip())
        keys.append(incremental.id_keys(ids))
    allk = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    allk = allk[allk != 0]
    uniq, counts = np.unique(allk, return_counts=True)
    dup_keys = set(uniq[counts > 1].tolist())
    examples: dict[str, int] = {}
    if dup_keys:
        for _f, ids in key_batches():
            for i, k in zip(ids, incremental.id_keys(ids).tolist(), strict=True):
                if k in dup_keys:
                    examples[i] = examples.get(i, 0) + 1
        examples = {k: v for k, v in examples.items() if v > 1}
    return {"rows": rows, "blank_keys": blank, "duplicates": len(examples),
            "duplicate_examples": sorted(examples)[:5], "storage_retries": storage.retry_attempts() - retries_before}


def _catalog_lookup(files: list[str], endpoint: str | None) -> Any:
    """The catalog as a :class:`CatalogLookup` (runs in a Ray task; shared via the object store); its
    ``storage_retries`` are the S3 retries of reading the catalog."""
    from vlm2rec_ray.data.catalog import read_catalog, resolve_image_uri
    from vlm2rec_ray.embed.preprocess import CatalogLookup

    retries_before = storage.retry_attempts()
    ids: list[str] = []
    titles: list[str | None] = []
    uris: list[str | None] = []
    for f in files:
        t = read_catalog(f, endpoint=endpoint)
        ids += t.column("item_id").to_pylist()
        titles += t.column("title").to_pylist()
        uris += [None if (u is None or not u.strip()) else resolve_image_uri(u, f)
                 for u in t.column("image_uri").to_pylist()]
    return CatalogLookup(ids, titles, uris, storage_retries=storage.retry_attempts() - retries_before)


def _lookup_retries(lookup: Any) -> int:
    """The ``storage_retries`` of a :class:`CatalogLookup` (a task, so the driver never pulls the lookup)."""
    return int(lookup.storage_retries)


def embedding_dim(cfg: EmbedJobConfig) -> int:
    """The backbone's hidden size from its ``config.json`` (no weights loaded)."""
    name = cfg.model.name
    endpoint = cfg.model.endpoint_url or cfg.endpoint_url
    if storage.is_s3(name):
        conf = json.loads(storage.read_text(storage.join(name, "config.json"), endpoint=endpoint))
    elif os.path.isdir(os.path.expanduser(name)):
        path = os.path.join(os.path.expanduser(name), "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"model directory {name!r} has no config.json; point model.name at a "
                                    "save_pretrained directory")
        with open(path) as fh:
            conf = json.load(fh)
    else:
        from transformers import AutoConfig

        try:
            conf = AutoConfig.from_pretrained(name).to_dict()
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"model.name={name!r} is not a local directory, an s3:// prefix or a hub id that "
                                    f"can be loaded here ({type(e).__name__}: {str(e).splitlines()[0]}); point "
                                    "model.name at a save_pretrained directory") from e
    text = conf.get("text_config") or {}
    dim = text.get("hidden_size") or conf.get("hidden_size")
    if not dim:
        raise ValueError(f"cannot find hidden_size in the config of model {name!r}")
    return int(dim)


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class RunPlan:
    """Everything a run decides before data moves (built on the driver, cheap)."""

    cfg: EmbedJobConfig
    kind: str
    dt: str
    run_id: str
    root: str
    endpoint: str | None
    dim: int
    fingerprint: str
    source_uri: str
    fmt: str
    files: list[str]
    gpus: float
    torch_threads: int | None
    rows_per_file: int
    deterministic: bool
    previous: dict[str, Any] | None = None
    catalog_files: list[str] = field(default_factory=list)
    catalog_ref: Any = None
    retries_at_start: int = 0  # the driver's S3 retry counter when planning began
    retry_refs: list[Any] = field(default_factory=list)  # ObjectRefs of the index tasks' S3 retries

    @property
    def row_bytes(self) -> int:
        """About what one output row weighs in memory: three d-float embeddings plus ids and metadata."""
        return row_bytes(self.dim)

    @property
    def run_uri(self) -> str:
        return snapshot.run_uri(self.root, self.dt, self.run_id)

    @property
    def errors_uri(self) -> str:
        return snapshot.errors_uri(self.root, self.dt, self.run_id)

    def opts(self, mode: str, **extra: Any) -> dict[str, Any]:
        """Options of the CPU stage (plain values + object refs; no config object)."""
        m = self.cfg.model
        return {"mode": mode, "catalog_uri": self.files[0], "source_is_s3": storage.is_s3(self.files[0]),
                "endpoint": self.endpoint, "max_image_bytes": self.cfg.max_image_bytes,
                "allowed_roots": list(self.cfg.allowed_roots), "fetch_threads": self.cfg.fetch_threads,
                "min_pixels": m.min_pixels, "max_pixels": m.max_pixels, "max_history": m.max_history,
                "fingerprint": self.fingerprint, "catalog": [self.catalog_ref] if self.catalog_ref is not None else None,
                **extra}


def _absolute(uri: str) -> str:
    """A local path made absolute against the driver's working directory; s3:// (and other schemes) as is."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return str(storage.resolve_local(uri))


def resolve_paths(cfg: EmbedJobConfig) -> EmbedJobConfig:
    """The config with local paths absolute and the S3 endpoint explicit, fixed on the driver.

    Ray tasks and actors may run in another working directory (a job's runtime_env, a worker started before
    the driver changed directory) and with an environment that predates the driver's ``AWS_ENDPOINT_URL``,
    so relative ``dataset_uri`` / ``catalog_uri`` / ``output_uri`` / ``model.name`` (an existing local
    directory; hub ids stay as they are) and an implicit endpoint would mean something else there.
    """
    update: dict[str, Any] = {"output_uri": _absolute(cfg.output_uri)}
    for name in ("dataset_uri", "catalog_uri"):
        value = getattr(cfg, name)
        if value is not None:
            update[name] = _absolute(value)
    endpoint = storage.endpoint_url(cfg.data_endpoint)
    if endpoint and not cfg.endpoint_url:
        update["endpoint_url"] = endpoint
    name = cfg.model.name
    if not storage.is_s3(name) and "://" not in name and os.path.exists(os.path.expanduser(name)):
        update["model"] = cfg.model.model_copy(update={"name": _absolute(os.path.expanduser(name))})
    return cfg.model_copy(update=update, deep=True)


def ensure_ray() -> None:
    """Use the running Ray (a job on a cluster, a test fixture), else connect to ``RAY_ADDRESS``, else start
    a private local instance."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        from vlm2rec_ray.runtime import init_local_ray

        init_local_ray()


def row_bytes(dim: int) -> int:
    """About what one output row weighs in memory: three ``dim``-float32 embeddings plus ids and metadata."""
    return 3 * 4 * dim + 200


def plan_run(cfg: EmbedJobConfig, kind: str) -> RunPlan:
    """Resolve inputs, model size, previous snapshot and resources for a run of ``kind``."""
    import ray

    retries_at_start = storage.retry_attempts()
    endpoint = storage.endpoint_url(cfg.data_endpoint)
    if kind == "items":
        source = cfg.catalog_uri or cfg.dataset_uri
        assert source is not None
        fmt, files = source_files(source, endpoint=endpoint)
        catalog_files = files
    else:
        if not cfg.dataset_uri:
            raise ValueError("embed sequences needs dataset_uri (a prepared dataset with splits/); set "
                             "dataset_uri=<dir or s3:// prefix>")
        source = storage.join(cfg.dataset_uri, "splits", f"{cfg.split}.parquet")
        fmt, files = source_files(source, endpoint=endpoint, default_file=None)
        _, catalog_files = source_files(cfg.catalog_uri or cfg.dataset_uri, endpoint=endpoint)
    dim = embedding_dim(cfg)
    gpus = cfg.gpus_per_actor
    if gpus is None:
        ensure_ray()  # the default needs the cluster's resources
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    threads = None if gpus > 0 else max(1, int(cfg.cpus_per_actor))
    rows_per_file = cfg.rows_per_file or max(1000, cfg.target_file_mib * (1 << 20) // row_bytes(dim))
    root = snapshot.kind_uri(cfg.output_uri, kind)
    dt = cfg.dt or snapshot.today_utc()
    previous = snapshot.latest_manifest(root, on_or_before=dt, endpoint=endpoint) if cfg.incremental else None
    return RunPlan(cfg=cfg, kind=kind, dt=dt, run_id=snapshot.new_run_id(), root=root, endpoint=endpoint, dim=dim,
                   fingerprint=incremental.encoder_fingerprint(cfg, kind), source_uri=source, fmt=fmt, files=files,
                   gpus=float(gpus), torch_threads=threads, rows_per_file=int(rows_per_file),
                   deterministic=cfg.deterministic if cfg.deterministic is not None else gpus == 0, previous=previous,
                   catalog_files=catalog_files, retries_at_start=retries_at_start)


# ---------------------------------------------------------------------------------------------- datasets


def _input_dataset(plan: RunPlan) -> ray.data.Dataset:
    from vlm2rec_ray.embed.preprocess import conform_batch

    cols = list(_REQUIRED[plan.kind]) if plan.fmt == "parquet" else None
    ds = reader.read_files(plan.files, plan.fmt, endpoint=plan.endpoint, columns=cols,
                           include_paths=plan.kind == "items" and len(plan.files) > 1)
    ds = ds.map_batches(conform_batch, fn_kwargs={"kind": plan.kind}, batch_format="pyarrow", batch_size=None)
    # A catalog is often one file with one row group, i.e. one block: split it (streaming, no shuffle) so
    # that preprocess_concurrency fetch tasks run side by side.
    return ds.repartition(target_num_rows_per_block=plan.cfg.preprocess_batch_size)


def _prepare(plan: RunPlan, ds: ray.data.Dataset, mode: str, **extra: Any) -> ray.data.Dataset:
    import ray.data

    from vlm2rec_ray.embed import preprocess

    fn = preprocess.prepare_items if plan.kind == "items" else preprocess.prepare_sequences
    kwargs: dict[str, Any] = {"opts": plan.opts(mode, **extra)}
    if mode == "from_scan":
        fn = preprocess.prepare_from_scan  # type: ignore[assignment]
        kwargs = {"opts": plan.opts("encode"), "kind": plan.kind}
    return ds.map_batches(fn, fn_kwargs=kwargs, batch_size=plan.cfg.preprocess_batch_size, batch_format="pyarrow",
                          num_cpus=plan.cfg.preprocess_cpus,
                          compute=ray.data.TaskPoolStrategy(size=plan.cfg.preprocess_concurrency))


def _model_stage(plan: RunPlan, ds: ray.data.Dataset) -> ray.data.Dataset:
    import ray.data

    from vlm2rec_ray.embed.predictor import EmbedPredictor

    kwargs: dict[str, Any] = {}
    if plan.gpus > 0:
        kwargs["num_gpus"] = plan.gpus
    return ds.map_batches(
        EmbedPredictor,
        fn_constructor_kwargs={"config": plan.cfg.model_dump(mode="json"), "dim": plan.dim, "gpus": plan.gpus,
                               "torch_threads": plan.torch_threads, "deterministic": plan.deterministic,
                               "run_id": plan.run_id},
        batch_size=plan.cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.cfg.num_actors),
        num_cpus=plan.cfg.cpus_per_actor,
        **kwargs,
    )


def build_item_pipeline(plan: RunPlan) -> ray.data.Dataset:
    """The full-run dataset of sink rows: read -> prepare (CPU tasks) -> EmbedPredictor (actors).

    Also serves sequences (``plan.kind``). Lazy: nothing runs until it is written or iterated.
    """
    return _model_stage(plan, _prepare(plan, _input_dataset(plan), "encode"))


def _index_with_retries(files: list[str], key: str, endpoint: str | None) -> tuple[incremental.KeyIndex, int]:
    """``(KeyIndex of the files, S3 retries of reading them)`` (a Ray task: the delta is this task's)."""
    before = storage.retry_attempts()
    index = incremental.build_index_from_files(files, key, endpoint=endpoint)
    return index, storage.retry_attempts() - before


def _index_task() -> Any:
    """``.remote(files, key, endpoint)`` -> two refs: the index (for the CPU tasks) and its retries (for us)."""
    import ray

    return ray.remote(num_cpus=0.25, num_returns=2)(_index_with_retries)


def _storage_retries(plan: RunPlan, census: dict[str, Any], res: dict[str, Any], scan: dict[str, Any] | None) -> int:
    """Every S3 retry of the run so far: what the sinks added up (rows from reads, fetches; their uploads),
    the census, index and catalog tasks, and this driver since planning began."""
    import ray

    refs = list(plan.retry_refs)
    if plan.catalog_ref is not None:
        refs.append(ray.remote(num_cpus=0)(_lookup_retries).remote(plan.catalog_ref))
    return (int(res["counts"].get("storage_retries", 0)) + int((scan or {}).get("counts", {}).get("storage_retries", 0))
            + int(census.get("storage_retries", 0)) + sum(int(n) for n in ray.get(refs))
            + storage.retry_attempts() - plan.retries_at_start)


# ---------------------------------------------------------------------------------------------- run


def _summarize(plan: RunPlan, census: dict[str, Any], res: dict[str, Any], scan: dict[str, Any] | None,
               started: float, started_epoch: float) -> dict[str, Any]:
    c = res["counts"]
    timeline = res.get("timeline")  # the sink's EncodeTimeline (None when nothing was written)
    first_us = timeline.first_us if timeline is not None else None
    steady = timeline.steady_rows_per_s() if timeline is not None else None
    rows = int(census["rows"])
    failed = int(c.get("failed", 0))
    summary: dict[str, Any] = {
        "kind": plan.kind,
        "dt": plan.dt,
        "run_id": plan.run_id,
        "mode": "incremental" if scan is not None else "full",
        "input_rows": rows,
        "ok": int(c.get("ok", 0)),
        "failed": failed,
        "failure_fraction": (failed / rows) if rows else 0.0,
        "encoded": int(c.get("encoded", 0)),
        "carried": int(c.get("carried", 0)),
        "new": None, "changed": None, "unchanged": None, "deleted": None,
        "reasons": dict(sorted(res["reasons"].items())),
        "texts_encoded": int(c.get("texts_encoded", 0)),
        "images_encoded": int(c.get("images_encoded", 0)),
        "storage_retries": _storage_retries(plan, census, res, scan),
        "uri": plan.root,
        "partition": snapshot.partition_uri(plan.root, plan.dt),
        "errors_uri": plan.errors_uri if failed else None,
        "files": sum(1 for f in res["files"] if f["kind"] == "data"),
        "previous": ({"dt": plan.previous["dt"], "run_id": plan.previous["run_id"]} if plan.previous else None),
        "elapsed_s": round(time.perf_counter() - started, 3),
        # seconds from the start until the model's first batch was done (start-up), and the encoded rows/s from
        # the first batch to the last (the steady rate); from the encoded rows' embedded_at stamps
        "first_batch_s": round(first_us / 1e6 - started_epoch, 2) if first_us is not None else None,
        "encode_rows_per_s": round(steady, 2) if steady is not None else None,
    }
    summary["rows_per_s"] = round(rows / summary["elapsed_s"], 2) if summary["elapsed_s"] > 0 else None
    if scan is not None:
        sc = scan["counts"]
        prev_rows = int(plan.previous["num_rows"]) if plan.previous else 0
        summary.update(new=int(c.get("new", 0)), changed=int(c.get("changed", 0)), unchanged=int(c.get("carried", 0)),
                       deleted=max(0, prev_rows - int(sc.get("in_prev", 0))))
    return summary


def _check_counts(plan: RunPlan, census: dict[str, Any], res: dict[str, Any], scan: dict[str, Any] | None) -> str | None:
    """Nothing silently dropped: every input row is in the output or the errors table."""
    c = res["counts"]
    rows = int(census["rows"])
    if int(c.get("rows", 0)) != rows:
        return (f"the run wrote {c.get('rows', 0)} rows (ok {c.get('ok', 0)} + failed {c.get('failed', 0)}) for "
                f"{rows} input rows; the input changed during the run or rows were lost; re-run the job")
    if scan is not None and int(c.get("carried", 0)) != int(scan["counts"].get("unchanged", 0)):
        return (f"{scan['counts'].get('unchanged', 0)} rows were unchanged but {c.get('carried', 0)} were carried "
                "over: the previous snapshot changed during the run; re-run the job")
    return None


def _manifest(plan: RunPlan, census: dict[str, Any], res: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    part = snapshot.partition_uri(plan.root, plan.dt).rstrip("/") + "/"

    def rel(uri: str) -> str:
        if not uri.startswith(part):
            raise AssertionError(f"{uri} is not under {part}")
        return uri[len(part):]

    m = plan.cfg.model
    files = [{"path": rel(f["uri"]), "rows": f["rows"], "bytes": f["bytes"]} for f in res["files"] if f["kind"] == "data"]
    error_files = [{"path": rel(f["uri"]), "rows": f["rows"], "bytes": f["bytes"]} for f in res["files"]
                   if f["kind"] == "errors"]
    counts = {k: summary[k] for k in ("input_rows", "ok", "failed", "encoded", "carried", "new", "changed",
                                      "unchanged", "deleted", "texts_encoded", "images_encoded")}
    return {
        "format": snapshot.MANIFEST_FORMAT,
        "kind": plan.kind,
        "dt": plan.dt,
        "run_id": plan.run_id,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "mode": summary["mode"],
        "num_rows": summary["ok"],
        "files": files,
        "error_files": error_files,
        "counts": counts,
        "reasons": summary["reasons"],
        "schema": {"embedding_dim": plan.dim, "columns": schema_to_json(output_schema(plan.kind, plan.dim)),
                   "errors_columns": schema_to_json(errors_schema(plan.kind))},
        "model": {"model_id": m.name, "model_version": plan.cfg.model_version, "dtype": m.dtype, "fusion": m.fusion,
                  "min_pixels": m.min_pixels, "max_pixels": m.max_pixels, "max_history": m.max_history},
        "content_hash": {"scheme": incremental.HASH_SCHEME, "fingerprint": plan.fingerprint},
        "deterministic": plan.deterministic,
        "config_hash": config_hash(plan.cfg),
        "config": plan.cfg.model_dump(mode="json"),
        "source": {"uri": plan.source_uri, "files": plan.files, "rows": census["rows"]},
        "previous": summary["previous"],
    }


def _run(cfg: EmbedJobConfig, kind: str, progress: Callable[[str], None] | None) -> dict[str, Any]:
    import ray
    import ray.data

    from vlm2rec_ray.embed.sink import SnapshotSink

    say = progress or (lambda _m: None)
    started = time.perf_counter()
    started_epoch = time.time()  # wall clock, to compare with the actors' embedded_at stamps
    cfg = resolve_paths(cfg)
    plan = plan_run(cfg, kind)  # inputs and model checked before Ray starts: a bad URI fails in seconds
    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    saved_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = cfg.progress
    try:
        say(f"embed {kind}: {plan.source_uri} -> {snapshot.partition_uri(plan.root, plan.dt)} (run {plan.run_id}, "
            f"d={plan.dim}, {cfg.num_actors} actor(s) x {plan.gpus:g} GPU)")
        # The census (rows, blank and duplicate keys; reads only the key column) runs first: a catalog with
        # duplicate ids fails before any image is fetched or any model time is spent.
        census_ref = ray.remote(num_cpus=0.25)(_census).remote(plan.files, plan.fmt, kind, plan.endpoint)
        if kind == "sequences":
            plan.catalog_ref = ray.remote(num_cpus=0.25)(_catalog_lookup).remote(plan.catalog_files, plan.endpoint)
        try:
            census = ray.get(census_ref)
        except BaseException as e:
            root = _user_error(e)
            if root is not e:  # a ValueError raised in a Ray task reaches here wrapped; show the cause
                raise root from e
            raise
        if census["duplicates"]:
            raise ValueError(f"{plan.source_uri} has {census['duplicates']} duplicate {KEY_COLUMN[kind]} value(s), "
                             f"e.g. {census['duplicate_examples']}; each row needs a unique {KEY_COLUMN[kind]} "
                             "(deduplicate the input); nothing was embedded")
        sink = SnapshotSink(kind=kind, run_uri=plan.run_uri, errors_uri=plan.errors_uri, dim=plan.dim,
                            model_id=cfg.model.name, model_version=cfg.model_version, endpoint=plan.endpoint,
                            rows_per_file=plan.rows_per_file)
        write_args = {"num_cpus": _WRITE_CPUS}
        scan: dict[str, Any] | None = None
        try:
            # The executor's per-task native allocations, once freed, stay in glibc's arenas: hand them back as
            # the run goes, so that the driver's RSS follows what it uses now, not the most it ever held.
            with returning_freed_memory(_TRIM_EVERY_S):
                if cfg.incremental:
                    scan = _incremental(plan, sink, write_args, say)
                else:
                    _write(build_item_pipeline(plan), sink, write_args, row_bytes=plan.row_bytes,
                           tasks=_coalesce_tasks(plan))
        except BaseException as e:
            root = _user_error(e)
            _abandon(plan, f"{type(root).__name__}: {root}")
            if root is not e:  # a ValueError raised in a Ray task reaches here wrapped twice; show the cause
                raise root from e
            raise
        say(f"input: {census['rows']} rows in {len(plan.files)} file(s)")
        res = sink.result or {"counts": {}, "reasons": {}, "files": []}
        summary = _summarize(plan, census, res, scan, started, started_epoch)
        problem = _check_counts(plan, census, res, scan)
        if problem is None and summary["failure_fraction"] > cfg.max_failure_fraction:
            reasons = ", ".join(f"{k}={v}" for k, v in summary["reasons"].items())
            problem = (f"{summary['failed']} of {summary['input_rows']} rows failed "
                       f"({summary['failure_fraction']:.1%} > max_failure_fraction={cfg.max_failure_fraction:g}): "
                       f"{reasons}; failed rows are in {plan.errors_uri}; fix the inputs or raise max_failure_fraction")
        if problem is not None:
            summary["status_uri"] = snapshot.mark_run_failed(plan.root, plan.dt, plan.run_id,
                                                             {"error": problem, "summary": summary},
                                                             endpoint=plan.endpoint)
            storage.delete_prefix(snapshot.staging_uri(plan.root, plan.dt, plan.run_id, ""), endpoint=plan.endpoint)
            raise EmbedFailureError(f"embed {kind} failed, nothing published (the previous snapshot stays): {problem}",
                                    summary)
        storage.delete_prefix(snapshot.staging_uri(plan.root, plan.dt, plan.run_id, ""), endpoint=plan.endpoint)
        manifest = _manifest(plan, census, res, summary)
        replaced = snapshot.publish_manifest(plan.root, plan.dt, manifest, endpoint=plan.endpoint)
        summary["manifest_uri"] = snapshot.manifest_uri(plan.root, plan.dt)
        summary["replaced_run"] = replaced["run_id"] if replaced else None
        summary["storage_retries"] = _storage_retries(plan, census, res, scan)  # now with the publish's
        summary["elapsed_s"] = round(time.perf_counter() - started, 3)
        summary["rows_per_s"] = round(summary["input_rows"] / summary["elapsed_s"], 2) if summary["elapsed_s"] else None
        return summary
    finally:
        ctx.enable_progress_bars = saved_bars


def _user_error(e: BaseException) -> BaseException:
    """The user-facing error inside Ray's wrappers (RayTaskError -> UserCodeException -> ValueError)."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 10:
        if not type(cur).__module__.startswith("ray.") and isinstance(cur, (ValueError, FileNotFoundError,
                                                                             PermissionError, storage.StorageError)):
            return cur
        cur = getattr(cur, "cause", None) or cur.__cause__
        seen += 1
    # Ray Data re-raises a UDF's error as UserCodeException without the original object; its traceback text
    # still ends the original error's message, so rebuild a ValueError/FileNotFoundError from it.
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"^(ValueError|FileNotFoundError|StorageError): (.*?)(?:\n\n|\Z)", text, re.M | re.S)
    if m:
        return FileNotFoundError(m.group(2)) if m.group(1) == "FileNotFoundError" else ValueError(m.group(2))
    return e


def _abandon(plan: RunPlan, error: str) -> None:
    """Best effort after a crash: mark the run failed (so the next publish removes it) and drop its staging."""
    try:
        snapshot.mark_run_failed(plan.root, plan.dt, plan.run_id, {"error": error[:2000]}, endpoint=plan.endpoint)
        storage.delete_prefix(snapshot.staging_uri(plan.root, plan.dt, plan.run_id, ""), endpoint=plan.endpoint)
    except Exception as e:  # the original error matters more
        log.warning("could not mark run %s failed: %s", plan.run_id, e)


def _coalesce_tasks(plan: RunPlan) -> int:
    """Coalescing tasks a run lets run at once: one per model actor (their output rate), at least two."""
    return max(_COALESCE_TASKS, plan.cfg.num_actors)


def _coalesced(batch: pa.Table) -> pa.Table:
    """Identity: Ray Data hands it ``batch_size`` rows bundled from small blocks, and it returns them as one block."""
    return batch


def _write(ds: ray.data.Dataset, sink: Any, write_args: dict[str, Any], *, row_bytes: int,
           tasks: int = _COALESCE_TASKS) -> None:
    """Write ``ds`` through ``sink`` in blocks of at least :data:`_MIN_WRITE_BLOCK_BYTES` (or of one write task's
    rows, ``sink.min_rows_per_write``, when that is fewer).

    A sink's write task starts once it has a file's worth of rows (``min_rows_per_write``). Blocks under
    Ray's 100 KB inline limit (a batch of a small model's sink rows, or of scan rows) are kept in their
    owner's memory, the driver's, until then; coalesced (streaming, no shuffle) into blocks of >= 1 MiB they
    wait in the object store instead, which spills to disk when full.

    Coalescing is a ``map_batches`` of ``rows`` rows, not Ray Data's streaming ``repartition``, which (Ray 2.60)
    ran one task per input block, so it never combined small blocks, and asked for a whole CPU per task. With a
    whole CPU those tasks could not start while the model actor and the fetch/decode tasks held the CPUs: they
    queued in the driver until the input ran out, each holding its input block inlined in its task spec (the
    driver's memory grew with the catalog). These ask for the write tasks' CPU share. At most ``tasks`` run at
    once (the runs pass one per model actor, at least :data:`_COALESCE_TASKS`); a bounded task pool also keeps
    Ray Data from fusing them into the write tasks, whose input is a file's worth
    (tests/integration/test_embed_write.py checks both).
    """
    import ray.data

    rows = max(1, _MIN_WRITE_BLOCK_BYTES // max(1, row_bytes))
    if sink.min_rows_per_write:  # never hold rows back for more than one write task's worth (a small rows_per_file)
        rows = min(rows, int(sink.min_rows_per_write))
    (ds.map_batches(_coalesced, batch_size=rows, batch_format="pyarrow", num_cpus=write_args.get("num_cpus"),
                    compute=ray.data.TaskPoolStrategy(size=tasks))
     .write_datasink(sink, ray_remote_args=dict(write_args)))


def _incremental(plan: RunPlan, sink: Any, write_args: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """Pass 1 (scan + classify, staged) and pass 2 (encode new/changed, errors, carry unchanged)."""
    from vlm2rec_ray.embed import preprocess
    from vlm2rec_ray.embed.sink import SCAN_GROUPS, ScanSink

    key = KEY_COLUMN[plan.kind]
    prev = plan.previous
    prev_ref = None
    if prev is not None:
        prev_ref, retries = _index_task().remote(prev["_files"], key, plan.endpoint)
        plan.retry_refs.append(retries)
        say(f"previous snapshot: dt={prev['dt']} run {prev['run_id']} ({prev.get('num_rows', 0)} rows)")
    scan_sink = ScanSink(uri=snapshot.staging_uri(plan.root, plan.dt, plan.run_id, "scan"), endpoint=plan.endpoint,
                         schema=preprocess.SCAN_ROW_SCHEMA)
    scan_ds = _prepare(plan, _input_dataset(plan), "scan", prev_index=[prev_ref] if prev_ref is not None else None)
    _write(scan_ds, scan_sink, write_args, row_bytes=_SCAN_ROW_BYTES, tasks=_coalesce_tasks(plan))
    scan = scan_sink.result or {"counts": {}, "files": {g: [] for g in SCAN_GROUPS}}
    sc = scan["counts"]
    say("scan: " + ", ".join(f"{k}={sc.get(k, 0)}" for k in ("new", "changed", "unchanged", "failed")))

    branches: list[ray.data.Dataset] = []
    staged = scan["files"]  # {"encode": [...], "failed": [...], "unchanged": [...]} (see sink.SCAN_GROUPS)
    if staged["encode"]:
        rows = reader.read_files(staged["encode"], "parquet", endpoint=plan.endpoint)
        branches.append(_model_stage(plan, _prepare(plan, rows, "from_scan")))
    if staged["failed"]:
        rows = reader.read_files(staged["failed"], "parquet", endpoint=plan.endpoint)
        branches.append(rows.map_batches(preprocess.to_sink_rows, fn_kwargs={"source": "failed", "dim": plan.dim},
                                         batch_format="pyarrow", batch_size=None))
    if staged["unchanged"]:
        assert prev is not None
        unchanged_ref, retries = _index_task().remote(staged["unchanged"], "key", plan.endpoint)
        plan.retry_refs.append(retries)
        carry = reader.read_files(prev["_files"], "parquet", endpoint=plan.endpoint)
        branches.append(carry.map_batches(preprocess.carry_filter, fn_kwargs={"opts": {"unchanged": [unchanged_ref]},
                                                                              "dim": plan.dim},
                                          batch_format="pyarrow", batch_size=None, num_cpus=0.25))
    if branches:
        ds = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
        _write(ds, sink, write_args, row_bytes=plan.row_bytes, tasks=_coalesce_tasks(plan))
    return scan


def run_embed_items(cfg: EmbedJobConfig, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Embed the catalog into ``<output_uri>/items/dt=<dt>/`` and publish the snapshot; returns the summary.

    Raises:
        EmbedFailureError: the failure share exceeded ``max_failure_fraction`` or counts did not add up
            (nothing published; failed rows are in the run's errors table).
        ValueError / FileNotFoundError: bad input (duplicate ids, missing columns, nothing at the URI).
    """
    return _run(cfg, "items", progress)


def run_embed_sequences(cfg: EmbedJobConfig, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Embed each user's last ``model.max_history`` items of ``<dataset_uri>/splits/<split>.parquet`` through
    P_T and P_V into ``<output_uri>/sequences/dt=<dt>/``; returns the summary (see :func:`run_embed_items`)."""
    return _run(cfg, "sequences", progress)


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines for the CLI and job logs."""
    s = summary
    lines = [f"{s['kind']} dt={s['dt']} run={s['run_id']} ({s['mode']}): {s['ok']} ok, {s['failed']} failed of "
             f"{s['input_rows']} rows in {s['elapsed_s']:.1f} s ({s.get('rows_per_s') or 0:.1f} rows/s)"]
    if s["mode"] == "incremental":
        lines.append(f"  new={s['new']} changed={s['changed']} unchanged={s['unchanged']} deleted={s['deleted']} "
                     f"failed={s['failed']}")
    lines.append(f"  encoded {s['texts_encoded']} distinct texts and {s['images_encoded']} distinct images "
                 f"for {s['encoded']} rows; carried {s['carried']}")
    if s.get("first_batch_s") is not None:
        rate = s.get("encode_rows_per_s")
        lines.append(f"  model: first batch done {s['first_batch_s']:.1f} s after the start (start-up)"
                     + (f", then {rate:.1f} rows/s" if rate is not None else ""))
    if s.get("storage_retries"):
        lines.append(f"  storage: {s['storage_retries']} S3 retries (all absorbed)")
    if s["reasons"]:
        lines.append("  failures: " + ", ".join(f"{k}={v}" for k, v in s["reasons"].items())
                     + (f" (errors table: {s['errors_uri']})" if s.get("errors_uri") else ""))
    if s.get("manifest_uri"):
        lines.append(f"  snapshot: {s['manifest_uri']}  (read with vlm2rec_ray.embed.read_embeddings({s['uri']!r}))")
    return "\n".join(lines)


__all__ = [
    "EmbedFailureError",
    "RunPlan",
    "build_item_pipeline",
    "embedding_dim",
    "ensure_ray",
    "format_summary",
    "plan_run",
    "resolve_paths",
    "run_embed_items",
    "run_embed_sequences",
    "source_files",
]
