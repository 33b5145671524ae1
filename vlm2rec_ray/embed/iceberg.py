"""Embeddings as Apache Iceberg tables (``output_format: iceberg``): one table per kind, ``<namespace>.items`` and
``<namespace>.sequences``, that Spark, Trino, Snowflake and DuckDB (via pyiceberg -> Arrow) read atomically.

**What the table holds.** The current embeddings, one row per key: the output schema of :mod:`.schema` with the
``emb_*`` columns as ``list<float>`` (Iceberg has no fixed-size list; the dimension is the table property
``vlm2rec.embedding-dim``, and :func:`read_embeddings` casts back to ``fixed_size_list<float>[d]``) plus ``dt``, the
day of the run that wrote the row, the partition column (identity). Each run commits ONE snapshot: a full run
replaces every row (on a same-day re-run: that day's partition), an incremental run keeps the unchanged rows and
replaces the rest (new and changed rows added, changed, deleted and now-failing keys removed). The snapshot's
summary carries what the Parquet manifest carries (``vlm2rec.*``: run id, dt, mode, model id and version, config
hash, counts, errors URI), and it is tagged ``dt=<day>`` in the same commit, so yesterday's embeddings are a
time-travel query away (``FOR VERSION AS OF 'dt=2026-11-21'``).

**Commit mechanism: vetoing the commit.** The run's write tasks (the Parquet path's :class:`~.sink.RowSink`) write
the ok rows as Parquet data files with the table's field ids under the table's data location
(``<table>/data/dt=<dt>/run-<run_id>/``), and the failed rows to the errors Parquet of the run
(``<output_uri>/iceberg/_runs/<kind>/dt=<dt>/run=<id>/_errors/``: errors keep the existing Parquet format; the
snapshot's ``vlm2rec.errors-uri`` names it). No table metadata references these files until the driver, after the
checks of :func:`.publish.problem` (ok + failed = input rows, failure share under the limit), commits one
transaction: an OVERWRITE snapshot (drop the replaced data files, add the new ones) and the tag. A run that fails
its check or raises never commits: its files are orphans no reader can see, deleted best effort. The transaction
asserts the table's current snapshot is still the one the run started from (an incremental run's baseline), so a
concurrent writer makes the commit fail instead of losing rows.

Not a branch plus fast-forward: the staged snapshot would be visible to every engine that lists refs, and the
unchanged rows of an incremental run would need a copy on the branch. Not Ray's ``Dataset.write_iceberg``: it
commits in ``on_write_complete`` as soon as the write ends, before the counts can be checked, and writes one
dataset to one table (our failed rows go to the errors table in the same pass).

The catalog comes from pyiceberg's own configuration (:func:`catalog_properties`); the default is a SQL catalog
on a sqlite file next to a local output.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from vlm2rec_ray import storage
from vlm2rec_ray.config import EmbedJobConfig, config_hash
from vlm2rec_ray.embed import snapshot
from vlm2rec_ray.embed.schema import (
    EMBEDDING_COLUMNS,
    KEY_COLUMN,
    OK_STATUSES,
    embedding_type,
    errors_schema,
    errors_table,
    output_schema,
    output_table,
)
from vlm2rec_ray.embed.sink import Route, RowSink
from vlm2rec_ray.storage.retries import retries_since

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

    from vlm2rec_ray.embed.plan import RunPlan

DIM_PROPERTY = "vlm2rec.embedding-dim"
KIND_PROPERTY = "vlm2rec.kind"
TAG_PREFIX = "dt="
DEFAULT_SQLITE = "iceberg_catalog.db"
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")

__all__ = ["DIM_PROPERTY", "abort", "catalog_properties", "commit", "load_catalog", "open_table", "prepare",
           "read_embeddings", "snapshot_sink", "table_arrow_schema"]


def table_arrow_schema(kind: str, dim: int) -> pa.Schema:
    """The table's columns as Arrow: the output schema with ``emb_*`` as ``list<float not null>`` and ``dt``."""
    emb = pa.list_(pa.field("element", pa.float32(), nullable=False))
    fields = [pa.field(f.name, emb, nullable=False) if f.name in EMBEDDING_COLUMNS else f
              for f in output_schema(kind, dim)]
    return pa.schema([*fields, pa.field("dt", pa.string(), nullable=False)])


def _is_sql(props: dict[str, str]) -> bool:
    uri = props.get("uri", "")
    return props.get("type", "sql" if uri.split(":", 1)[0].split("+", 1)[0] in _SQL_SCHEMES else "") == "sql"


def catalog_properties(cfg: EmbedJobConfig) -> dict[str, str]:
    """pyiceberg properties of the job's catalog: pyiceberg's own config for ``iceberg.catalog_name``
    (``~/.pyiceberg.yaml``, ``PYICEBERG_CATALOG__<NAME>__<KEY>``), overridden by ``iceberg.catalog``; with neither
    a ``uri`` nor a ``type``, a SQL catalog on ``<output_uri>/iceberg_catalog.db``. Adds the storage endpoint
    (``s3.endpoint``) and region; credentials stay with pyarrow's default chain (env, role).

    Raises:
        ValueError: no catalog is configured and the output is remote (a sqlite file cannot live in a bucket).
    """
    from pyiceberg.utils.config import Config

    configured = {k: str(v) for k, v in (Config().get_catalog_config(cfg.iceberg.catalog_name) or {}).items()
                  if not isinstance(v, dict)}
    props = {**configured, **cfg.iceberg.catalog}
    if "uri" not in props and "type" not in props:
        if storage.is_remote(cfg.output_uri):
            raise ValueError(
                f"output_format=iceberg with output_uri={cfg.output_uri} needs a catalog: set iceberg.catalog "
                "(e.g. iceberg.catalog.uri=sqlite:////data/catalog.db, or type: rest + uri) or "
                f"PYICEBERG_CATALOG__{cfg.iceberg.catalog_name.upper()}__URI; the default sqlite catalog lives "
                "next to a local output only")
        root = storage.absolute(cfg.output_uri)
        os.makedirs(root, exist_ok=True)
        props.update(type="sql", uri=f"sqlite:///{os.path.join(root, DEFAULT_SQLITE)}")
    if _is_sql(props):
        props.setdefault("warehouse", storage.join(storage.absolute(cfg.output_uri), "iceberg"))
    if cfg.storage.endpoint_url:
        props.setdefault("s3.endpoint", cfg.storage.endpoint_url)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        props.setdefault("s3.region", region)
    return props


def load_catalog(cfg: EmbedJobConfig) -> Catalog:
    from pyiceberg.catalog import load_catalog as _load

    return _load(cfg.iceberg.catalog_name, **catalog_properties(cfg))


def open_table(cfg: EmbedJobConfig, kind: str, dim: int) -> Table:
    """``<namespace>.<kind>``, created on first use (partitioned by ``dt``, ``vlm2rec.embedding-dim`` = ``dim``).

    Raises:
        ValueError: the table holds embeddings of another size.
    """
    from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError

    cat = load_catalog(cfg)
    ident = (cfg.iceberg.namespace, kind)
    cat.create_namespace_if_not_exists(cfg.iceberg.namespace)
    try:
        table = cat.load_table(ident)
    except NoSuchTableError:
        location = storage.join(storage.absolute(cfg.output_uri), "iceberg", kind) if _is_sql(
            catalog_properties(cfg)) else None
        try:
            table = cat.create_table(ident, schema=table_arrow_schema(kind, dim), location=location,
                                     properties={DIM_PROPERTY: str(dim), KIND_PROPERTY: kind,
                                                 "write.parquet.compression-codec": "zstd"})
            with table.update_spec() as spec:
                spec.add_identity("dt")
        except TableAlreadyExistsError:  # a concurrent first run created it
            table = cat.load_table(ident)
    have = int(table.properties.get(DIM_PROPERTY, dim))
    if have != dim:
        raise ValueError(f"Iceberg table {'.'.join(ident)} holds {have}-dim embeddings but the model gives {dim}; "
                         "write to another table (iceberg.namespace=...) or drop the old one")
    return table


def _data_uri(plan: RunPlan) -> str:
    return storage.join(plan.table.location(), "data", f"dt={plan.run.dt}", f"run-{plan.run.run_id}")


def prepare(plan: RunPlan) -> None:
    """Point ``plan`` at the Iceberg table: open (create) it, keep the run's errors and scratch under
    ``<output_uri>/iceberg/_runs/<kind>/``, take the incremental baseline from the table's current snapshot, and
    do not carry unchanged rows (they stay in the table)."""
    cfg = plan.cfg
    plan.table = open_table(cfg, plan.kind, plan.dim)
    root = storage.join(cfg.output_uri, "iceberg", "_runs", plan.kind)
    plan.run = snapshot.SnapshotRun(root, plan.run.dt, plan.run.run_id, plan.endpoint)
    plan.carry = False
    plan.previous = _baseline(plan.table) if cfg.incremental else None


def _baseline(table: Table) -> dict[str, Any] | None:
    """The current snapshot as the incremental run's previous snapshot (``_files``: its data files)."""
    snap = table.current_snapshot()
    if snap is None:
        return None
    tasks = list(table.scan(snapshot_id=snap.snapshot_id).plan_files())
    if any(t.delete_files for t in tasks):
        raise ValueError(f"Iceberg table {table.name()} has delete files (merge-on-read writes by another engine); "
                         "the incremental run reads data files only: compact it (rewrite_data_files) or run a full run")
    props = snap.summary.additional_properties if snap.summary else {}
    return {"dt": props.get("vlm2rec.dt"), "run_id": props.get("vlm2rec.run-id"),
            "num_rows": sum(t.file.record_count for t in tasks), "_files": [t.file.file_path for t in tasks],
            "snapshot_id": snap.snapshot_id}


def _table_rows(batch: pa.Table, *, kind: str, dim: int, model_id: str, model_version: str, dt: str,
                schema: pa.Schema) -> pa.Table:
    t = output_table(batch, kind=kind, dim=dim, model_id=model_id, model_version=model_version)
    return t.append_column("dt", pa.array([dt] * t.num_rows, pa.string())).cast(schema)


def snapshot_sink(plan: RunPlan) -> RowSink:
    """The run's uncommitted data files (table schema with field ids) and its errors Parquet."""
    import datetime as _dt

    from pyiceberg.io.pyarrow import schema_to_pyarrow

    c, kind = plan.cfg, plan.kind
    schema = schema_to_pyarrow(plan.table.schema())
    failed_at = _dt.datetime.now(_dt.timezone.utc)
    return RowSink(name="EmbeddingIcebergFiles", endpoint=plan.endpoint, rows_per_file=plan.rows_per_file, routes={
        "data": Route(_data_uri(plan), OK_STATUSES, schema, partial(
            _table_rows, kind=kind, dim=plan.dim, model_id=c.model.name, model_version=c.model_version,
            dt=plan.run.dt, schema=schema)),
        "errors": Route(plan.run.errors_uri, ("failed",), errors_schema(kind),
                        partial(errors_table, kind=kind, model_version=c.model_version, failed_at=failed_at))})


def snapshot_properties(plan: RunPlan, summary: dict[str, Any]) -> dict[str, str]:
    """What the Parquet manifest carries, as snapshot summary properties (strings)."""
    m = plan.cfg.model
    counts = {k: summary[k] for k in ("input_rows", "ok", "failed", "encoded", "carried", "new", "changed",
                                      "unchanged", "deleted", "texts_encoded", "images_encoded")}
    props = {"run-id": plan.run.run_id, "dt": plan.run.dt, "kind": plan.kind, "mode": summary["mode"],
             "model-id": m.name, "model-version": plan.cfg.model_version, "config-hash": config_hash(plan.cfg),
             "embedding-dim": str(plan.dim), "fingerprint": plan.fingerprint, "counts": json.dumps(counts),
             "reasons": json.dumps(summary["reasons"]), "errors-uri": plan.run.errors_uri if summary["failed"] else "",
             "previous-run-id": (summary["previous"] or {}).get("run_id") or ""}
    return {f"vlm2rec.{k}": str(v) for k, v in props.items()}


def _keys(files: list[str], key: str, endpoint: str | None) -> pa.Array:
    chunks = [c.cast(pa.string()) for f in files
              for c in storage.read_parquet(f, endpoint=endpoint, columns=[key]).column(key).chunks]
    return pa.chunked_array(chunks, pa.string()).combine_chunks()


def commit(plan: RunPlan, summary: dict[str, Any], res: dict[str, Any], scan: dict[str, Any] | None) -> int:
    """Commit the checked run: one OVERWRITE snapshot plus the tag ``dt=<dt>``, in one transaction; returns the
    snapshot id. Full run: every current data file is replaced. Incremental: current files whose keys are all
    unchanged stay; the others are rewritten without the keys that are not unchanged (changed, deleted, failing
    now), copy-on-write; the encoded rows are added.

    Raises:
        pyiceberg.exceptions.CommitFailedException: the table changed since the run started (nothing committed).
    """
    from pyiceberg.io.pyarrow import ArrowScan, _dataframe_to_data_files, parquet_file_to_data_file
    from pyiceberg.table.update.snapshot import ManageSnapshots

    table = plan.table
    base = table.current_snapshot()
    tx = table.transaction()
    new = [parquet_file_to_data_file(table.io, tx.table_metadata, f["uri"]) for f in res["files"]["data"]]
    tasks = list(table.scan(snapshot_id=base.snapshot_id).plan_files()) if base is not None else []
    keep = None
    if scan is not None:
        keep = _keys([f["uri"] for f in scan["files"]["unchanged"]], "key", plan.endpoint)
    key = KEY_COLUMN[plan.kind]
    with tx.update_snapshot(snapshot_properties=snapshot_properties(plan, summary)).overwrite() as ow:
        counter = iter(range(1 << 30))
        for task in tasks:
            if keep is not None:
                in_keep = pc.is_in(_keys([task.file.file_path], key, plan.endpoint), value_set=keep)
                if pc.all(in_keep).as_py() is not False:
                    continue  # every row unchanged: the file stays
            ow.delete_data_file(task.file)
            if keep is not None and pc.any(in_keep).as_py():
                rows = ArrowScan(table_metadata=tx.table_metadata, io=table.io, projected_schema=table.schema(),
                                 row_filter=_always_true()).to_table(tasks=[task])
                for df in _dataframe_to_data_files(tx.table_metadata, rows.filter(pc.is_in(rows[key], value_set=keep)),
                                                   table.io, write_uuid=ow.commit_uuid, counter=counter):
                    ow.append_data_file(df)
        for df in new:
            ow.append_data_file(df)
    snapshot_id = tx.table_metadata.current_snapshot_id
    assert snapshot_id is not None and (base is None or snapshot_id != base.snapshot_id)
    tag = f"{TAG_PREFIX}{plan.run.dt}"
    tags = ManageSnapshots(tx)
    if tag in tx.table_metadata.refs:
        tags.remove_tag(tag)
    tags.create_tag(snapshot_id, tag).commit()
    tx.commit_transaction()
    return snapshot_id


def _always_true() -> Any:
    from pyiceberg.expressions import AlwaysTrue

    return AlwaysTrue()


def abort(plan: RunPlan) -> None:
    """Delete the failed run's uncommitted data files (best effort: no reader sees them anyway)."""
    if plan.table is None:
        return
    try:
        storage.delete_prefix(_data_uri(plan), endpoint=plan.endpoint)
    except Exception as e:  # orphans are harmless; the error that failed the run matters more
        logging.getLogger(__name__).warning("could not delete uncommitted files of run %s: %s", plan.run.run_id, e)


def finish(plan: RunPlan, census: dict[str, Any], res: dict[str, Any], scan: dict[str, Any] | None,
           started: float, started_epoch: float) -> dict[str, Any]:
    """:func:`.publish.finish` for a table: check, then commit (or mark the run failed and commit nothing).

    An incremental run does not rewrite unchanged rows (they stay in the table): they count as carried.

    Raises:
        EmbedFailureError: the counts check failed; the table is unchanged.
    """
    import time

    from vlm2rec_ray.embed import publish

    if scan is not None:  # the unchanged rows stay in the table: count them as carried, as the Parquet path does
        kept = int(scan["counts"].get("unchanged", 0))
        c = res["counts"]
        res = {**res, "counts": {**c, "carried": int(c.get("carried", 0)) + kept, "rows": int(c.get("rows", 0)) + kept}}
    summary = publish.summarize(plan, census, res, scan, started, started_epoch)
    why = publish.problem(plan, summary, res, scan)
    if why is not None:
        summary["status_uri"] = plan.run.fail({"error": why, "summary": summary})
        abort(plan)
        raise publish.EmbedFailureError(f"embed {plan.kind} failed, nothing committed to {plan.table.name()} (the "
                                        f"current snapshot stays): {why}", summary)
    summary["snapshot_id"] = commit(plan, summary, res, scan)
    storage.delete_prefix(plan.run.staging(), endpoint=plan.endpoint)
    summary.update(table=".".join(plan.table.name()), tag=f"{TAG_PREFIX}{plan.run.dt}",
                   storage_retries=retries_since(plan.retries_at_start), elapsed_s=round(time.perf_counter() - started, 3))
    summary["rows_per_s"] = round(summary["input_rows"] / summary["elapsed_s"], 2) if summary["elapsed_s"] else None
    return summary


def read_embeddings(table: str, dt: str | None = None, *, catalog: dict[str, str] | str,
                    columns: list[str] | None = None) -> pa.Table:
    """The table ``<namespace>.<kind>`` at the snapshot tagged ``dt=<dt>`` (default: the current one), with the
    output schema of :mod:`.schema` (``emb_*`` back to ``fixed_size_list<float>[d]``; no ``dt`` column unless
    asked for).

    Args:
        table: ``"embeddings.items"``.
        catalog: pyiceberg catalog properties (``{"uri": "sqlite:////data/emb/iceberg_catalog.db"}``), or a catalog
            name configured in ``~/.pyiceberg.yaml`` / ``PYICEBERG_CATALOG__<NAME>__...``.

    Raises:
        FileNotFoundError: no such table or tag.
    """
    from pyiceberg.catalog import load_catalog as _load
    from pyiceberg.exceptions import NoSuchTableError

    cat = _load(catalog) if isinstance(catalog, str) else _load(catalog.get("name", "vlm2rec"), **catalog)
    try:
        t = cat.load_table(table)
    except NoSuchTableError as e:
        raise FileNotFoundError(f"no Iceberg table {table} in the catalog; run `vlm2rec embed` with "
                                "output_format=iceberg first or fix the name") from e
    snapshot_id = None
    if dt is not None:
        ref = t.metadata.refs.get(f"{TAG_PREFIX}{dt}")
        if ref is None:
            tags = sorted(k for k in t.metadata.refs if k.startswith(TAG_PREFIX))
            raise FileNotFoundError(f"no snapshot tagged {TAG_PREFIX}{dt} in {table}; available: {tags}")
        snapshot_id = ref.snapshot_id
    dim = int(t.properties[DIM_PROPERTY])
    kind = t.properties.get(KIND_PROPERTY, table.rsplit(".", 1)[-1])
    out = output_schema(kind, dim)
    names = columns or out.names
    data = t.scan(snapshot_id=snapshot_id, selected_fields=tuple(names)).to_arrow()
    fields = [out.field(n) if n in out.names else pa.field(n, pa.string()) for n in names]
    target = pa.schema([pa.field(f.name, embedding_type(dim), nullable=False) if f.name in EMBEDDING_COLUMNS else f
                        for f in fields])
    return data.select(names).cast(target)
