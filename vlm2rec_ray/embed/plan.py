"""The run plan: what an embed run decides on the driver before data moves: its inputs, the model's size, the
previous snapshot (incremental runs), the image roots and the resources. The :class:`RunPlan` hands the stages
plain values (``opts``: no config object travels to the tasks).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any

import ray

from vlm2rec_ray import storage
from vlm2rec_ray.config import EmbedJobConfig
from vlm2rec_ray.data.catalog import catalog_dir
from vlm2rec_ray.data.images import resolve_roots
from vlm2rec_ray.embed import incremental, inputs, snapshot
from vlm2rec_ray.runtime import connect_ray


def row_bytes(dim: int) -> int:
    """About what one output row weighs in memory: three ``dim``-float32 embeddings plus ids and metadata."""
    return 3 * 4 * dim + 200


@dataclass
class RunPlan:
    """What a run reads, where it writes (:attr:`run`), and how its stages are set up."""

    cfg: EmbedJobConfig
    kind: str
    run: snapshot.SnapshotRun
    dim: int
    fingerprint: str
    source_uri: str
    fmt: str
    files: list[str]
    catalog_files: list[str]
    image_roots: list[str]
    gpus: float
    torch_threads: int | None
    rows_per_file: int
    deterministic: bool
    previous: dict[str, Any] | None = None
    catalog_ref: Any = None  # ObjectRef of the sequences' CatalogLookup
    retries_at_start: dict[str, int] | None = None  # the job's S3 retries when the run began, by process
    table: Any = None  # output_format=iceberg: the pyiceberg Table (embed/iceberg.py)
    carry: bool = True  # an incremental run copies unchanged rows into the snapshot (not into an Iceberg table)

    @property
    def endpoint(self) -> str | None:
        return self.run.endpoint

    def opts(self, mode: str, **extra: Any) -> dict[str, Any]:
        """Options of the CPU stage (plain values + object refs)."""
        m, c = self.cfg.model, self.cfg
        return {"mode": mode, "dim": self.dim, "catalog_uri": self.files[0], "endpoint": self.endpoint,
                "sources": inputs.fs_paths(self.files, self.endpoint) if len(self.files) > 1 else {},
                "max_image_bytes": c.max_image_bytes, "allowed_roots": self.image_roots,
                "allow_private_addresses": c.storage.allow_private_addresses, "fetch_threads": c.fetch_threads,
                "min_pixels": m.min_pixels, "max_pixels": m.max_pixels, "max_history": m.max_history,
                "fingerprint": self.fingerprint, "catalog": [self.catalog_ref] if self.catalog_ref is not None else None,
                **extra}


def plan_run(cfg: EmbedJobConfig, kind: str) -> RunPlan:
    """Resolve inputs, model size, previous snapshot, image roots and resources for a run of ``kind``."""
    endpoint = cfg.storage.endpoint_url
    if kind == "items":
        source = cfg.catalog_uri or cfg.dataset_uri
        assert source is not None
        fmt, files = inputs.source_files(source, endpoint=endpoint)
        catalog_files, catalog = files, source
    else:
        if not cfg.dataset_uri:
            raise ValueError("embed sequences needs dataset_uri (a prepared dataset with splits/); set "
                             "dataset_uri=<dir or s3:// prefix>")
        source = storage.join(cfg.dataset_uri, "splits", f"{cfg.split}.parquet")
        fmt, files = inputs.source_files(source, endpoint=endpoint, default_file=None)
        catalog = cfg.catalog_uri or cfg.dataset_uri
        _, catalog_files = inputs.source_files(catalog, endpoint=endpoint)
    dim = inputs.embedding_dim(cfg)
    gpus = cfg.gpus_per_actor
    if gpus is None:
        connect_ray()  # the default needs the cluster's resources
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    root = snapshot.kind_uri(cfg.output_uri, kind)
    dt = cfg.dt or _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    return RunPlan(
        cfg=cfg, kind=kind, run=snapshot.SnapshotRun(root, dt, snapshot.new_run_id(), endpoint), dim=dim,
        fingerprint=incremental.encoder_fingerprint(cfg, kind), source_uri=source, fmt=fmt, files=files,
        catalog_files=catalog_files, image_roots=resolve_roots(cfg.storage.allowed_roots, catalog_dir(catalog)),
        gpus=float(gpus), torch_threads=None if gpus > 0 else max(1, int(cfg.cpus_per_actor)),
        rows_per_file=int(cfg.rows_per_file or max(1000, cfg.target_file_mib * (1 << 20) // row_bytes(dim))),
        deterministic=cfg.deterministic if cfg.deterministic is not None else gpus == 0,
        previous=snapshot.latest_manifest(root, on_or_before=dt, endpoint=endpoint) if cfg.incremental else None)


__all__ = ["RunPlan", "plan_run", "row_bytes"]
