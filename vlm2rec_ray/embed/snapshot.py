"""Embedding snapshots on storage: layout, the manifest written last, the atomic day swap, and the reader.

Layout under ``<output_uri>/<kind>/`` (``kind`` is ``items`` or ``sequences``), on any store::

    dt=2026-11-22/_manifest.json                       the snapshot: written LAST, names the run and its files
    dt=2026-11-22/run=<run_id>/part-00000.parquet      embeddings (schema in embed/schema.py)
    dt=2026-11-22/run=<run_id>/_errors/part-00000.parquet   failed rows with their reason
    dt=2026-11-22/run=<run_id>/_staging/...            scratch of an incremental run (deleted at the end)
    dt=2026-11-22/run=<run_id>/_status.json            only for a run that failed (why; not a snapshot)

A run (:class:`SnapshotRun`) writes under its own ``run=<run_id>/`` and then replaces ``_manifest.json``
(atomic on every store): a reader sees the old snapshot or the new one, never a mix; a same-day re-run then
deletes the run the old manifest named. pyarrow skips ``_`` paths, so ``pq.read_table(<output_uri>/items)``
sees data files only (mid-swap maybe two runs; :func:`read_embeddings` follows the manifest). Partitions
without a manifest holding Parquet files are read as plain snapshots (tables written by other tools).
"""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlm2rec_ray import storage

if TYPE_CHECKING:
    import pyarrow as pa

MANIFEST_FILE = "_manifest.json"
STATUS_FILE = "_status.json"
MANIFEST_FORMAT = "vlm2rec-embeddings/1"

__all__ = ["MANIFEST_FILE", "MANIFEST_FORMAT", "Snapshot", "SnapshotRun", "kind_uri", "latest_manifest", "list_snapshots",
           "manifest_uri", "new_run_id", "partition_uri", "read_embeddings", "read_errors", "read_manifest",
           "snapshot_files"]


def kind_uri(output_uri: str, kind: str) -> str:
    """``<output_uri>/items`` or ``<output_uri>/sequences``: what ``vlm2rec evaluate`` takes."""
    return storage.join(output_uri, kind)


def partition_uri(root: str, dt: str) -> str:
    return storage.join(root, f"dt={dt}")


def manifest_uri(root: str, dt: str) -> str:
    return storage.join(partition_uri(root, dt), MANIFEST_FILE)


def new_run_id(now: _dt.datetime | None = None) -> str:
    """Sortable and unique: ``20261122T101500123Z-1a2b3c4d``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-{uuid.uuid4().hex[:8]}"


def read_manifest(root: str, dt: str, *, endpoint: str | None = None) -> dict[str, Any] | None:
    """The published manifest of ``dt``, or ``None`` when there is none."""
    try:
        return json.loads(storage.read_text(manifest_uri(root, dt), endpoint=endpoint))
    except storage.StorageError as e:
        if e.reason == "missing":
            return None
        raise


@dataclass(frozen=True)
class SnapshotRun:
    """One run of the ``dt`` snapshot under ``root``: where it writes (``run=<run_id>/``), and how it publishes
    (manifest last) or gives up (a status file; the next publish of the day removes it)."""

    root: str
    dt: str
    run_id: str
    endpoint: str | None = None

    @property
    def partition(self) -> str:
        return partition_uri(self.root, self.dt)

    @property
    def uri(self) -> str:
        return storage.join(self.partition, f"run={self.run_id}")

    @property
    def errors_uri(self) -> str:
        return storage.join(self.uri, "_errors")

    def staging(self, name: str = "") -> str:
        """Scratch space of the run (an incremental run's scan), deleted before it publishes or gives up."""
        return storage.join(self.uri, "_staging", name)

    def relative(self, uri: str) -> str:
        """A URI of this run as the manifest names it (relative to the partition)."""
        part = self.partition.rstrip("/") + "/"
        if not uri.startswith(part):
            raise AssertionError(f"{uri} is not under {part}")
        return uri[len(part):]

    def publish(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Drop the staging, make ``manifest`` the day's snapshot (written atomically, last), then delete the
        run it replaced, runs marked failed and runs that started before this one and never finished (a killed
        driver); returns the replaced manifest (or ``None``).

        Raises:
            FileNotFoundError: a file the manifest names is gone (a newer run of the day published meanwhile).
        """
        storage.delete_prefix(self.staging(), endpoint=self.endpoint)
        for f in manifest.get("files", []):
            if not storage.exists(storage.join(self.partition, f["path"]), endpoint=self.endpoint):
                raise FileNotFoundError(f"{f['path']} of run {self.run_id} is gone (a newer run of dt={self.dt} "
                                        "published and removed it?); nothing published by this run; re-run the job")
        old = read_manifest(self.root, self.dt, endpoint=self.endpoint)
        body = json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"
        storage.write_text(manifest_uri(self.root, self.dt), body, endpoint=self.endpoint)
        for run_id, failed in self._runs().items():
            if run_id != self.run_id and (failed or run_id < self.run_id or (old or {}).get("run_id") == run_id):
                storage.delete_prefix(storage.join(self.partition, f"run={run_id}"), endpoint=self.endpoint)
        return old

    def fail(self, info: dict[str, Any]) -> str:
        """Record why the run failed in ``run=<id>/_status.json`` (its errors table stays for inspection) and drop
        its staging. Returns the status file's URI."""
        uri = storage.join(self.uri, STATUS_FILE)
        storage.write_text(uri, json.dumps({"state": "failed", **info}, indent=2, sort_keys=True, default=str) + "\n",
                           endpoint=self.endpoint)
        storage.delete_prefix(self.staging(), endpoint=self.endpoint)
        return uri

    def _runs(self) -> dict[str, bool]:
        """``{run_id: marked failed}`` of every ``run=<id>/`` holding files in the partition."""
        base = storage.absolute(self.partition).rstrip("/") + "/"
        out: dict[str, bool] = {}
        for f in storage.list_uris(self.partition, endpoint=self.endpoint):
            rel = f[len(base):] if f.startswith(base) else f
            first = rel.split("/", 1)[0]
            if first.startswith("run="):
                out[first[4:]] = out.get(first[4:], False) or rel == f"{first}/{STATUS_FILE}"
        return out


@dataclass
class Snapshot:
    """One readable snapshot: its ``dt`` ("" for an unpartitioned table), data files (absolute URIs), and the
    manifest when the embed job wrote it."""

    dt: str
    files: list[str]
    manifest: dict[str, Any] | None = None
    error_files: list[str] = field(default_factory=list)


def list_snapshots(uri: str, *, endpoint: str | None = None) -> tuple[dict[str, Snapshot], list[str]]:
    """``({dt: Snapshot}, incomplete dts)`` under ``uri`` (one listing). A ``dt=`` partition with a manifest
    is what the manifest says; one with ``run=`` folders but no manifest is incomplete (a run in progress or
    a failed one) and not a snapshot; one with Parquet files directly inside is a plain snapshot."""
    root = storage.absolute(uri).rstrip("/")
    snaps: dict[str, Snapshot] = {}
    manifests: set[str] = set()
    runs: set[str] = set()
    plain: dict[str, list[str]] = {}
    for f in storage.list_uris(uri, endpoint=endpoint):
        rel = f[len(root) + 1:] if f.startswith(root + "/") else f.rsplit("/", 1)[-1]
        parts = rel.split("/")
        dt = parts[0][3:] if len(parts) > 1 and parts[0].startswith("dt=") else ""
        inner = parts[1:] if dt else parts
        if dt and inner == [MANIFEST_FILE]:
            manifests.add(dt)
        elif dt and inner and inner[0].startswith("run="):
            runs.add(dt)
        elif f.endswith(".parquet") and not any(p.startswith((".", "_")) or "error" in p.lower() for p in parts):
            plain.setdefault(dt, []).append(f)
    for dt in manifests:
        m = read_manifest(uri, dt, endpoint=endpoint)
        if m is None:  # deleted between listing and reading
            continue
        part = partition_uri(uri, dt)
        snaps[dt] = Snapshot(dt, [storage.join(part, e["path"]) for e in m.get("files", [])], m,
                             [storage.join(part, e["path"]) for e in m.get("error_files", [])])
    for dt, fs in plain.items():
        snaps.setdefault(dt, Snapshot(dt, sorted(fs)))
    return snaps, sorted(runs - set(snaps))


def latest_manifest(root: str, *, on_or_before: str | None = None, endpoint: str | None = None) -> dict[str, Any] | None:
    """The newest published manifest with ``dt <= on_or_before`` (all when ``None``), or ``None``."""
    snaps, _ = list_snapshots(root, endpoint=endpoint)
    dts = sorted(d for d, s in snaps.items() if s.manifest is not None and (on_or_before is None or d <= on_or_before))
    if not dts:
        return None
    m = dict(snaps[dts[-1]].manifest or {})
    m["_files"] = snaps[dts[-1]].files  # absolute URIs, for the carry-over pass
    return m


def snapshot_files(uri: str, dt: str | None = None, *, endpoint: str | None = None) -> Snapshot:
    """The snapshot ``dt`` (default: the latest) under ``uri``.

    Raises:
        FileNotFoundError: nothing there, or no such ``dt`` (the message lists what is available).
    """
    try:
        snaps, incomplete = list_snapshots(uri, endpoint=endpoint)
    except storage.StorageError as e:
        raise FileNotFoundError(f"no embeddings at {uri}: {e}; run `vlm2rec embed` first or fix the URI") from e
    if not snaps:
        extra = f" (dt={', '.join(incomplete)} has a run in progress or a failed run, no manifest yet)" if incomplete else ""
        raise FileNotFoundError(f"no embeddings at {uri} (no snapshot){extra}; run `vlm2rec embed` first or fix the URI")
    if dt is None:
        dt = max(snaps)
    if dt not in snaps:
        why = " (a run in progress or a failed run, no manifest)" if dt in incomplete else ""
        raise FileNotFoundError(f"no snapshot dt={dt} under {uri}{why}; available: {sorted(k for k in snaps if k)}")
    return snaps[dt]


def _read_files(snap: Snapshot, files: list[str], *, errors: bool, endpoint: str | None,
                columns: list[str] | None = None) -> pa.Table:
    """``files`` as one table; none (a run that wrote no such rows): the manifest's schema, empty."""
    import pyarrow as pa

    from vlm2rec_ray.embed.schema import errors_schema, output_schema

    if files:
        tables = [storage.read_parquet(f, endpoint=endpoint, columns=columns) for f in files]
        return pa.concat_tables(tables, promote_options="default")
    m = snap.manifest or {}  # a snapshot without a manifest is made of the files found, so has some
    kind = m["kind"]
    schema = errors_schema(kind) if errors else output_schema(kind, int(m["schema"]["embedding_dim"]))
    return pa.schema([schema.field(c) for c in columns or schema.names]).empty_table()


def read_embeddings(uri: str, dt: str | None = None, *, endpoint: str | None = None,
                    columns: list[str] | None = None, catalog: dict[str, str] | str | None = None) -> pa.Table:
    """The snapshot ``dt`` (default: the latest) of ``<output_uri>/items`` or ``/sequences`` as one table,
    following its manifest (only ``columns`` when given). With ``catalog`` (pyiceberg properties or a catalog
    name), ``uri`` is an Iceberg table (``embeddings.items``) and ``dt`` its tag: see ``embed/iceberg.py``.

    Raises:
        FileNotFoundError: no snapshot at ``uri`` or no such ``dt``.
    """
    if catalog is not None:
        from vlm2rec_ray.embed import iceberg

        return iceberg.read_embeddings(uri, dt, catalog=catalog, columns=columns)
    snap = snapshot_files(uri, dt, endpoint=endpoint)
    return _read_files(snap, snap.files, errors=False, endpoint=endpoint, columns=columns)


def read_errors(uri: str, dt: str | None = None, *, endpoint: str | None = None) -> pa.Table:
    """The errors table of a published snapshot (empty when nothing failed)."""
    snap = snapshot_files(uri, dt, endpoint=endpoint)
    if snap.manifest is None:
        raise FileNotFoundError(f"snapshot dt={snap.dt} under {uri} has no manifest, hence no errors table")
    return _read_files(snap, snap.error_files, errors=True, endpoint=endpoint)
