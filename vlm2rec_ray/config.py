"""One validated config object per job, loaded from YAML plus dotted ``key=value`` CLI overrides.

Every job (train, embed, evaluate, nightly, demo) has one pydantic model built from small nested parts.
All checks run at construction, so a bad value fails on the submitting machine with a message naming the
setting, the value and the fix, never at step 4,000 on a worker:

    cfg = load_config(TrainJobConfig, "jobs/configs/train_tiny.yaml", ["train.lr=3e-5", "scaling.num_workers=2"])

Configs travel to Ray workers as plain dicts (``cfg.model_dump()``) and are rebuilt there with
``TrainJobConfig.model_validate(d)``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override is invalid; the message says what, the value, and the fix."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Part):
    """Which backbone, and how inputs are shaped for it."""

    name: str = Field(description="hub id, local save_pretrained dir, or object-store prefix (s3://...); the "
                      "backbone family (Qwen2.5-VL, Qwen2-VL) is read from its config.json")
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    attn_implementation: str | None = None
    min_pixels: int = Field(56 * 56, gt=0, description="image resize lower bound (pixels)")
    max_pixels: int = Field(224 * 224, gt=0, description="image resize upper bound (pixels)")
    max_history: int = Field(10, ge=1, le=64, description="history items per sequence (latest kept)")
    fusion: Literal["external", "internal"] = "external"

    @model_validator(mode="after")
    def _pixels(self) -> ModelConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"model.min_pixels={self.min_pixels} is larger than model.max_pixels={self.max_pixels}; "
                "set min_pixels <= max_pixels"
            )
        return self


class LoraConfig(_Part):
    """Adapters on the language model's attention projections (paper defaults r=16, alpha=32, dropout 0.2).

    ``kind``: ``lora`` (PEFT LoRA) or ``moda`` (SDA's Modality-Disentangled Adaptation: rank r split into
    ``num_experts`` experts mixed by a per-layer modality gate; :mod:`vlm2rec_ray.model.moda`).
    """

    enabled: bool = True
    kind: Literal["lora", "moda"] = "lora"
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    num_experts: int = Field(8, ge=1, description="MoDA experts (SDA paper: 8); lora.r must be a multiple")
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$"

    @model_validator(mode="after")
    def _experts(self) -> LoraConfig:
        if self.kind == "moda" and self.r % self.num_experts:
            raise ValueError(f"lora.kind=moda splits lora.r={self.r} over lora.num_experts={self.num_experts} "
                             "experts, which needs r divisible by num_experts; e.g. r=16 with num_experts=8 or 4")
        return self

    @field_validator("target_modules")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"lora.target_modules={v!r} is not a valid regex ({e}); fix the pattern") from e
        return v


#: The built-in variants; ``objective.variant`` is checked against the registry itself
#: (:data:`vlm2rec_ray.objectives.OBJECTIVES`), which :func:`~vlm2rec_ray.objectives.register_objective` extends.
OBJECTIVE_VARIANTS = ("sft", "vlm2rec", "wpcl", "no_stop_grad", "no_penalty", "no_crtr", "vlm2rec_teacher", "cmsa")


class ObjectiveConfig(_Part):
    """The training objective and the paper's Table 5 ablations.

    ``variant``: ``sft`` (plain fused InfoNCE), ``vlm2rec`` (WPCL + lambda * CRTR), ``wpcl`` / ``no_crtr``
    (WPCL alone), ``no_stop_grad`` (VLM2Rec without the stop-gradient on the strong modality),
    ``no_penalty`` (VLM2Rec with w_pen = 1, i.e. InfoNCE + CRTR); ``vlm2rec_teacher`` (not the paper's: CRTR
    one-way, each row's stronger modality a stop-gradient teacher); ``cmsa`` (SDA's Cross-Modal Structural
    Alignment on the items' text vs image embeddings, temperature ``tau_cmsa``, learnable by default).
    """

    variant: str = Field("vlm2rec", description="a registered objective (vlm2rec_ray.objectives.OBJECTIVES)")
    tau_wpcl: float = Field(0.1, gt=0.0, description="InfoNCE/WPCL temperature; paper grid {0.05,0.1,0.5,1}")
    tau_crtr: float = Field(0.1, gt=0.0, description="CRTR temperature; paper grid {0.001,0.01,0.1,1}")
    lam: float = Field(0.5, ge=0.0, description="CRTR weight lambda; paper grid {0.1,0.5,1}")
    alpha_init: float = Field(1.0, gt=0.0)
    beta_init: float = Field(1.0, gt=0.0)
    learnable_penalty: bool = True
    beta_min: float = Field(0.05, ge=0.0, description="floor on beta so the penalty cannot vanish")
    tau_cmsa: float = Field(3.0, gt=0.0, description="CMSA temperature (initial value when learnable; SDA: 3.0)")
    learnable_tau: bool = Field(True, description="learn tau_cmsa (SDA does)")
    cmsa_divergence: Literal["ce", "kl"] = Field("ce", description="ce (SDA's code) or kl (the paper's prose)")
    cmsa_detach_teacher: bool = Field(False, description="stop gradients into the CMSA teacher (SDA: no)")
    cmsa_normalize: bool = Field(False, description="L2-normalise before CMSA (SDA: no)")
    gather_negatives: bool = Field(True, description="gather in-batch negatives across workers")
    num_sampled_negatives: int = Field(0, ge=0, description="extra random catalog negatives per batch")

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str) -> str:
        from vlm2rec_ray.objectives import OBJECTIVES

        if v not in OBJECTIVES:
            raise ValueError(f"objective.variant={v!r} is not a registered objective; choose one of "
                             f"{sorted(OBJECTIVES)} or register it first (vlm2rec_ray.objectives.register_objective)")
        return v

    @model_validator(mode="after")
    def _penalty(self) -> ObjectiveConfig:
        if self.learnable_penalty and self.beta_init <= self.beta_min:
            raise ValueError(
                f"objective.beta_init={self.beta_init} must be larger than objective.beta_min={self.beta_min} "
                "when learnable_penalty is true (beta = beta_min + softplus(rho)); raise beta_init or lower beta_min"
            )
        return self


class StorageConfig(_Part):
    """The ``storage:`` section every job shares: which endpoint, and where a job may read images from."""

    endpoint_url: str | None = Field(None, description="object store endpoint (S3-compatible: MinIO, moto); "
                                     "default AWS_ENDPOINT_URL / AWS")
    allowed_roots: list[str] = Field(default_factory=list, description="where image_uri may point: store prefixes "
                                     "(s3://bucket/images/), local dirs, http(s)://host/path; [] = only the "
                                     "dataset's (catalog's) own prefix. http(s) URLs need an http(s) root here")
    allow_private_addresses: bool = Field(False, description="let http(s) image hosts on loopback, private or "
                                          "link-local addresses through (tests, on-prem mirrors); keep false on "
                                          "cloud nodes (cloud metadata lives at 169.254.169.254)")

    @field_validator("allowed_roots")
    @classmethod
    def _roots(cls, v: list[str]) -> list[str]:
        if any(not r.strip() for r in v):
            raise ValueError(f"allowed_roots={v} holds an empty entry; list prefixes like s3://bucket/images/")
        return v


def _legacy_storage(data: Any, moves: dict[str, str]) -> Any:
    """Move settings of the old layout (``endpoint_url`` in four sections, ``allowed_roots`` in two) into the one
    ``storage`` section; the same setting given twice with different values is an error naming both."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    store = dict(data.get("storage") or {})
    for old, new in moves.items():
        section, _, key = old.rpartition(".")
        holder = data if not section else data.get(section)
        if not isinstance(holder, dict) or key not in holder:
            continue
        if section:
            holder = data[section] = dict(holder)
        value = holder.pop(key)
        if value is None or value == []:
            continue
        if store.get(new) not in (None, [], value):
            raise ValueError(f"{old}={value!r} conflicts with storage.{new}={store[new]!r}; set it once, in "
                             f"storage.{new}")
        store[new] = value
    data["storage"] = store
    return data


_MODEL_ENDPOINT = {"model.endpoint_url": "endpoint_url"}


C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.lr=3e-5", "lora.enabled=false"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. train.lr=3e-5")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"override key {key!r} is not a dotted name like train.lr")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, ValueError):  # e.g. dt=2026-13-01: YAML's date constructor raises ValueError
            value = raw  # keep the text; the field's validator names the setting, the value and the fix
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _format_validation(cls: type[BaseModel], err: ValidationError, source: str) -> str:
    lines = [f"invalid {cls.__name__} from {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {where}: unknown setting (value {got!r}); check the spelling against the docs")
        elif e["type"] == "missing":
            lines.append(f"  - {where}: required setting is missing; add it to the YAML or pass {where}=...")
        else:
            shown = repr(got) if not isinstance(got, dict) else "{...}"
            lines.append(f"  - {where}: {msg} (got {shown})")
    return "\n".join(lines)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Build and validate a job config from an optional YAML file plus dotted overrides.

    Raises:
        ConfigError: unreadable YAML, a malformed override, or any invalid value (all problems listed).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML path, e.g. jobs/configs/*.yaml")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        except ValueError as e:  # a scalar YAML resolves but cannot build, e.g. `dt: 2026-13-01`
            raise ConfigError(f"config file {str(p)!r} holds a value YAML cannot read ({e}); check dates "
                              "(dt: YYYY-MM-DD) or quote the value") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at top level, got {type(loaded).__name__}")
        data = loaded
        source = str(p)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source += f" + overrides {overrides}"
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(cls, e, source)) from None


def _check_output_uri(v: str, *, example: str) -> str:
    """A job's ``output_uri``: non-empty, of a store a backend handles, well formed (an S3 URI names a bucket)."""
    from vlm2rec_ray import storage

    if not v.strip():
        raise ValueError(f"output_uri is empty; give a local dir or s3:// prefix, e.g. output_uri={example}")
    try:
        storage.check_uri(v)
    except ValueError as e:
        raise ValueError(f"output_uri={v!r} is not a valid location ({e}); write e.g. output_uri={example}") from None
    return v


def config_hash(cfg: BaseModel) -> str:
    """A stable short hash of a config's values (recorded in manifests and model cards)."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- evaluate (eval/) -------------------------------------------------------------------------------------


class Task2Config(_Part):
    """Task 2: SASRec / GRU4Rec (d=128) with ID-only vs our-embeddings (linear adapter) item tables."""

    enabled: bool = True
    models: list[Literal["sasrec", "gru4rec"]] = Field(default_factory=lambda: ["sasrec", "gru4rec"])
    dim: int = Field(128, gt=0, description="hidden size of the sequential models (paper: 128)")
    max_len: int = Field(10, ge=1, description="history items fed to the models")
    num_blocks: int = Field(2, ge=1, le=8, description="SASRec self-attention blocks")
    num_heads: int = Field(2, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    seed: int = 0
    embedding_column: Literal["emb_fused", "emb_text", "emb_image"] = "emb_fused"
    frequency_edges: list[int] = Field(default_factory=lambda: [1, 5, 10, 20], description="cold-start buckets by "
                                       "the target's training frequency: [1, 5, 10, 20] -> 0, 1-4, 5-9, 10-19, 20+")
    num_threads: int | None = Field(1, ge=1, description="torch CPU threads while training (tiny models run "
                                    "fastest on 1; raise for large catalogs; null = torch's default)")

    @field_validator("frequency_edges")
    @classmethod
    def _edges(cls, v: list[int]) -> list[int]:
        if not v or v != sorted(set(v)) or v[0] < 1:
            raise ValueError(f"task2.frequency_edges={v} must be increasing positive integers, e.g. [1, 5, 10, 20]")
        return v

    @model_validator(mode="after")
    def _heads(self) -> Task2Config:
        if self.dim % self.num_heads:
            raise ValueError(f"task2.dim={self.dim} is not divisible by task2.num_heads={self.num_heads}; "
                             "pick num_heads among the divisors of dim (e.g. 2 or 4)")
        return self


class EvalJobConfig(_Part):
    """``vlm2rec evaluate``: Task 1, modality dropout, geometry, Task 2 and the report for one run.

    Reads the run's item and sequence embeddings (the embed job's output; ``dt`` picks a snapshot, default
    the latest) and the dataset's splits; writes ``eval.json`` and ``report.html`` + PNGs to ``output_uri``.
    """

    name: str = Field("run", description="run name shown in tables and plots, e.g. VLM2Rec")
    dataset_uri: str = Field(description="prepared dataset (local dir or s3:// prefix) with splits/")
    item_embeddings_uri: str = Field(description="item embeddings written by `vlm2rec embed items`")
    sequence_embeddings_uri: str = Field(description="test-split sequence embeddings (`vlm2rec embed sequences`)")
    dt: str | None = Field(None, description="snapshot partition (dt=...) to read; default the latest")
    output_uri: str = Field(description="where eval.json and the report go (local dir or s3:// prefix)")
    training_metrics_uri: str | None = Field(None, description="per-step training metrics (JSONL/CSV file or "
                                             "the train output dir holding one) for the loss and alignment plots")
    num_negatives: int = Field(100, ge=1, description="sampled negatives per user (paper: 100)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="negative-sampling seeds")
    ks: list[int] = Field(default_factory=lambda: [10, 20], description="Hit@k / NDCG@k cut-offs")
    full_ranking: bool = Field(True, description="also rank against the whole catalog")
    dropout: bool = Field(True, description="modality dropout table (f2f, t2f, v2f)")
    geometry: bool = Field(True, description="geometry table (A_pos, A_neg, U, S per modality)")
    geometry_max_users: int = Field(2000, ge=2)
    geometry_max_items: int = Field(5000, ge=2)
    task2: Task2Config = Field(default_factory=Task2Config)
    report: bool = Field(True, description="write report.html + PNGs")
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}", v):
            raise ValueError(f"name={v!r} must be 1-64 letters, digits or _.+- (it names files and table rows)")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("seeds is empty; give at least one negative-sampling seed, e.g. seeds=[0]")
        return v

    @field_validator("ks")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v) or len(set(v)) != len(v):
            raise ValueError(f"ks={v} must be distinct positive cut-offs, e.g. [10, 20]")
        return v


# --- embed (embed/) ---------------------------------------------------------------------------------------

_DT_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


class IcebergConfig(_Part):
    """The ``iceberg:`` section of an embed job with ``output_format: iceberg`` (see vlm2rec_ray/embed/iceberg.py).

    ``catalog`` holds pyiceberg catalog properties (``type``, ``uri``, ``warehouse``...), merged over pyiceberg's
    own configuration for ``catalog_name`` (``~/.pyiceberg.yaml``, ``PYICEBERG_CATALOG__<NAME>__<KEY>`` env vars,
    where credentials belong). Empty everywhere = a SQL catalog on ``<output_uri>/iceberg_catalog.db`` (sqlite,
    local output only).
    """

    catalog_name: str = Field("vlm2rec", pattern=r"^[A-Za-z0-9_]+$", description="pyiceberg catalog name (its "
                              "config and env vars are looked up under this name)")
    namespace: str = Field("embeddings", pattern=r"^[A-Za-z0-9_]+$", description="tables are <namespace>.items "
                           "and <namespace>.sequences")
    catalog: dict[str, str] = Field(default_factory=dict, description="pyiceberg catalog properties, e.g. "
                                    "{type: rest, uri: https://polaris:8181/api/catalog, warehouse: prod}; no "
                                    "credentials (env vars / .pyiceberg.yaml / the pod's role)")

    @field_validator("catalog")
    @classmethod
    def _no_credentials(cls, v: dict[str, str]) -> dict[str, str]:
        secret = [k for k in v if any(w in k.lower() for w in ("secret", "password", "credential", "token",
                                                              "access-key", "session"))]
        if secret or any(re.search(r"://[^/@\s]+:[^/@\s]+@", str(x)) for x in v.values()):
            raise ValueError(f"iceberg.catalog holds credentials ({secret or 'a user:password@ in a URI'}); keep "
                             "them out of configs: set PYICEBERG_CATALOG__<NAME>__<KEY> env vars (a Kubernetes "
                             "secret) or ~/.pyiceberg.yaml, or use the node's IAM role")
        return v


class EmbedJobConfig(_Part):
    """``vlm2rec embed items|sequences``: stream a catalog (or a split's user histories) from object storage
    through model actors into Parquet embedding snapshots (``<output_uri>/<items|sequences>/dt=<dt>/``).

    Items read ``catalog_uri`` (a Parquet/JSONL file or prefix; default ``<dataset_uri>/catalog.parquet``);
    sequences read ``<dataset_uri>/splits/<split>.parquet`` and look titles and images up in that catalog.
    Rows that fail (missing or corrupt image, empty title) go to the run's errors table; the job fails if
    their share exceeds ``max_failure_fraction``. ``incremental`` encodes only new or changed rows (by
    ``content_hash``) and carries unchanged ones over from the previous snapshot.
    """

    model: ModelConfig
    model_version: str = Field(description="version of the model's weights (e.g. the training run id); written "
                               "in every row and part of content_hash, so a new version re-embeds everything")
    output_uri: str = Field(description="root for snapshots: <output_uri>/items/dt=... and <output_uri>/sequences/dt=...")
    catalog_uri: str | None = Field(None, description="catalog Parquet/JSONL file or prefix; default "
                                    "<dataset_uri>/catalog.parquet")
    dataset_uri: str | None = Field(None, description="prepared dataset (splits/ for sequences, catalog.parquet)")
    split: Literal["train", "valid", "test"] = Field("test", description="split whose histories `embed sequences` "
                                                      "encodes (one row per user)")
    dt: str | None = Field(None, description="snapshot date YYYY-MM-DD (dt= partition); default today (UTC)")
    batch_size: int = Field(32, ge=1, description="rows per model forward in each actor")
    num_actors: int = Field(1, ge=1, description="model actors (each holds one copy of the model)")
    gpus_per_actor: float | None = Field(None, ge=0.0, description="GPUs per actor: a fraction (<1) shares a GPU, "
                                         "a whole number >1 shards a large backbone; null = 1 on GPU clusters, 0 on CPU")
    cpus_per_actor: float = Field(1.0, gt=0.0, description="CPUs per model actor (also its torch threads on CPU)")
    preprocess_concurrency: int = Field(2, ge=1, description="concurrent CPU fetch/decode tasks")
    preprocess_batch_size: int = Field(64, ge=1, description="rows per fetch/decode task batch")
    preprocess_cpus: float = Field(0.5, gt=0.0, description="CPUs reserved per fetch/decode task (I/O bound)")
    fetch_threads: int = Field(8, ge=1, le=256, description="parallel image GETs inside each fetch task")
    max_image_bytes: int = Field(20_000_000, gt=0, description="images larger than this fail with too_large")
    max_failure_fraction: float = Field(0.05, ge=0.0, le=1.0, description="fail the job (no snapshot published) "
                                        "when failed rows / input rows exceeds this")
    incremental: bool = Field(False, description="encode only new/changed rows; carry unchanged rows over from "
                              "the latest snapshot on or before dt")
    deterministic: bool | None = Field(None, description="group rows of identical shape into unpadded sub-batches "
                                       "so an embedding never depends on its batch neighbours (bitwise-equal reruns "
                                       "on CPU); null = on for CPU actors, off for GPU actors (plain padded batches)")
    rows_per_file: int | None = Field(None, ge=1, description="rows per output Parquet file; default: about "
                                      "target_file_mib of embeddings")
    target_file_mib: int = Field(256, ge=1, le=4096, description="target output file size (DESIGN: 64-512 MiB)")
    cache_mib: int = Field(256, ge=0, description="per-actor LRU cache of embeddings by content, per modality "
                           "(identical titles/images are encoded once); 0 = dedup within a batch only")
    progress: bool = Field(True, description="Ray Data progress bars")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    output_format: Literal["parquet", "iceberg"] = Field("parquet", description="parquet: dt= snapshots with a "
                                                         "manifest; iceberg: one Iceberg table per kind (iceberg:)")
    iceberg: IcebergConfig = Field(default_factory=lambda: IcebergConfig())
    max_title_chars: int = Field(2000, ge=1, description="titles are cut to this many characters before "
                                 "tokenizing (a 100 KB title is ~75k tokens: ~45 s of one CPU core per forward "
                                 "with the 0.2M test model, and attention cost grows with its square)")
    inject_actor_exit_after_batches: int | None = Field(
        None, ge=1, description="testing only: a model actor exits hard (os._exit) once per run, after this many "
        "batches, to exercise actor restarts (Ray Data restarts it and retries the batch); leave unset")

    @model_validator(mode="before")
    @classmethod
    def _one_storage_section(cls, data: Any) -> Any:
        return _legacy_storage(data, {**_MODEL_ENDPOINT, "endpoint_url": "endpoint_url",
                                      "allowed_roots": "allowed_roots"})

    @field_validator("model_version", "dt", mode="before")
    @classmethod
    def _yaml_scalars(cls, v: Any) -> Any:
        # YAML reads `dt: 2026-11-22` as a date and `model_version: 3` as an int; both are meant as text.
        import datetime

        if isinstance(v, (datetime.date, int, float)) and not isinstance(v, bool):
            return v.isoformat() if isinstance(v, datetime.date) else str(v)
        return v

    @field_validator("model_version")
    @classmethod
    def _model_version(cls, v: str) -> str:
        if not v.strip() or len(v) > 200:
            raise ValueError(f"model_version={v!r} must be a non-empty string of at most 200 characters; use the "
                             "training run id or checkpoint tag, e.g. model_version=vlm2rec-2026-11-20")
        return v

    @field_validator("output_uri")
    @classmethod
    def _output_uri(cls, v: str) -> str:
        return _check_output_uri(v, example="s3://bucket/emb")

    @field_validator("dt")
    @classmethod
    def _dt(cls, v: str | None) -> str | None:
        if v is None:
            return v
        import datetime

        try:
            ok = bool(_DT_RE.fullmatch(v)) and datetime.date.fromisoformat(v).isoformat() == v
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"dt={v!r} is not a date YYYY-MM-DD; write e.g. dt=2026-11-22 (or leave it unset for today)")
        return v

    @field_validator("gpus_per_actor")
    @classmethod
    def _gpus(cls, v: float | None) -> float | None:
        if v is not None and v > 1 and v != int(v):
            raise ValueError(f"gpus_per_actor={v} is not valid: Ray gives an actor a fraction of one GPU (0 < x < 1) "
                             "or whole GPUs; set e.g. gpus_per_actor=0.5, 1 or 2")
        return v

    @model_validator(mode="after")
    def _inputs(self) -> EmbedJobConfig:
        if self.catalog_uri is None and self.dataset_uri is None:
            raise ValueError("neither catalog_uri nor dataset_uri is set; set catalog_uri=<catalog file or prefix> "
                             "(items) or dataset_uri=<prepared dataset> (items and sequences)")
        return self

    def with_absolute_paths(self, base: str | Path | None = None) -> EmbedJobConfig:
        """A copy whose local paths (a local ``model.name``, ``dataset_uri``, ``catalog_uri``, ``output_uri``)
        are absolute and whose S3 endpoint is explicit: the driver calls this before the config travels to Ray
        workers, which may run in another directory, with an environment older than the driver's."""
        from vlm2rec_ray import storage

        root = Path(base) if base is not None else Path.cwd()
        update: dict[str, Any] = {k: _absolute(getattr(self, k), root) for k in ("output_uri", "dataset_uri",
                                                                                  "catalog_uri") if getattr(self, k)}
        if _is_local_model(self.model.name, root):
            update["model"] = self.model.model_copy(update={"name": _absolute(self.model.name, root)})
        endpoint = storage.endpoint_url(self.storage.endpoint_url)
        if endpoint != self.storage.endpoint_url:  # only the environment's: pin it for the workers
            update["storage"] = self.storage.model_copy(update={"endpoint_url": endpoint})
        return self.model_copy(update=update, deep=True)


def _absolute(uri: str, root: Path) -> str:
    """``uri`` with a local path made absolute (relative ones under ``root``); object-store URIs unchanged."""
    from vlm2rec_ray import storage

    if storage.is_remote(uri):
        return uri
    p = Path(uri.removeprefix("file://")).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def _is_local_model(name: str, root: Path) -> bool:
    """``model.name`` names a local directory (a path, or an existing one), not a hub id or an object store."""
    from vlm2rec_ray import storage

    return not storage.is_remote(name) and (name.startswith(("/", "./", "../", "~", "file://"))
                                            or (root / name).exists())


# --- train (train/) ---------------------------------------------------------------------------------------


class TrainDataConfig(_Part):
    """Where training examples come from: a prepared dataset's split, joined to its catalog, images fetched
    from object storage in Ray Data CPU stages."""

    dataset_uri: str = Field(description="prepared dataset (local dir or s3:// prefix) with catalog.parquet and splits/")
    split: Literal["train", "valid"] = Field("train", description="split whose (history, target) rows are trained on")
    few_shot_users: int | None = Field(None, ge=1, description="train on K sampled users only (the paper's few-shot "
                                       "setting); null = all users")
    max_rows: int | None = Field(None, ge=1, description="cap on training rows after few-shot sampling (smoke runs)")
    seed: int = Field(0, description="seed of the few-shot user sample and the shuffle")
    check_images: bool = Field(True, description="the item pass (every referenced image fetched, decoded and resized "
                               "once per run, before training) drops rows whose target image fails and removes "
                               "history items whose image fails, all listed in <output_uri>/data_errors.parquet; "
                               "false: the same pass stops the run at the first failing image instead")
    max_image_bytes: int = Field(20_000_000, gt=0, description="images larger than this fail with too_large")
    cpus_per_task: float = Field(0.5, gt=0.0, description="CPUs reserved by each fetch/decode task of the item pass")
    task_batch_size: int = Field(16, ge=1, description="items per fetch/decode task batch of the item pass")
    shuffle_buffer_rows: int = Field(256, ge=0, description="per-worker local shuffle buffer (rows); 0 = no shuffle")

    @field_validator("dataset_uri")
    @classmethod
    def _dataset_uri(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("data.dataset_uri is empty; give a prepared dataset, e.g. data.dataset_uri=s3://bucket/beauty")
        return v


class TrainConfig(_Part):
    """Optimisation (paper 5.1.1 defaults: AdamW lr 1e-5, batch 8, 3 epochs, gradient checkpointing) and the
    DeepSpeed engine (ZeRO stage, offload, precision)."""

    lr: float = Field(1e-5, gt=0.0, description="AdamW learning rate (paper: 1e-5)")
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up over this many optimizer steps")
    epochs: int = Field(3, ge=1, description="passes over the training rows (paper: 3)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps in total")
    per_device_batch_size: int = Field(8, ge=1, description="rows per worker per micro-batch (paper: 8)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    grad_clip: float = Field(1.0, ge=0.0, description="gradient-norm clipping; 0 = off")
    zero_stage: int = Field(2, description="DeepSpeed ZeRO stage 0, 1, 2 or 3")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload optimizer states to CPU (stage >= 1)")
    offload_params: bool = Field(False, description="ZeRO-Infinity parameter offload to CPU (stage 3)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU; fp16 needs a GPU")
    gradient_checkpointing: bool = True
    train_vision: bool = Field(False, description="also train the vision tower (frozen by default)")
    full_finetune: bool = Field(False, description="train every language-model weight instead of LoRA")
    seed: int = 0
    log_every: int = Field(10, ge=1, description="report losses, margins, alpha, beta, samples/s every N steps")
    checkpoint_every: int = Field(100, ge=1, description="checkpoint every N optimizer steps (and at epoch ends)")
    checkpoint_at_epoch_end: bool = Field(True, description="also checkpoint after the last step of every epoch")
    diag_every: int = Field(50, ge=0, description="gradient-alignment diagnostic every M steps; 0 = off")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in storage (the latest ones)")
    cpu_shm_allreduce: bool = Field(True, description="CPU only: DeepSpeed's shared-memory allreduce op (JIT-built "
                                    "once, ~35 s, cached in TORCH_EXTENSIONS_DIR); false uses plain gloo")
    verify_export: bool = Field(True, description="check that the exported model reproduces the in-training "
                                "embeddings of a probe batch (max |diff| goes in the model card)")
    inject_failure_at_step: int | None = Field(None, ge=1, description="testing only: the last worker exits once "
                                               "after this optimizer step, to exercise failure recovery")

    @field_validator("zero_stage")
    @classmethod
    def _stage(cls, v: int) -> int:
        if v not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage={v} is not a DeepSpeed ZeRO stage; use 0, 1, 2 or 3 "
                             "(2 for LoRA on 3-7B backbones, 3 for 32B+)")
        return v

    @model_validator(mode="after")
    def _engine(self) -> TrainConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer=true needs ZeRO: set train.zero_stage to 1, 2 or 3 "
                             "(got train.zero_stage=0)")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"train.offload_params=true needs train.zero_stage=3 (got {self.zero_stage}); "
                             "parameter offload only exists in ZeRO-3")
        return self


class RayScalingConfig(_Part):
    """Ray Train workers: one DeepSpeed rank per worker."""

    num_workers: int = Field(2, ge=1, description="training workers (data-parallel ranks)")
    use_gpu: bool = Field(False, description="one or more GPUs per worker (NCCL); false = CPU workers (gloo)")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, gt=0.0, description="GPUs per worker when use_gpu (usually 1)")


class TrainJobConfig(_Part):
    """``vlm2rec train``: fine-tune a VLM into a VLM2Rec embedder with Ray Train + DeepSpeed.

    Writes the trained model (merged Hugging Face weights + processor at ``output_uri``, the LoRA adapter in
    ``output_uri/adapter``), ``README.md`` (model card), ``metrics.jsonl`` and ``train_summary.json`` (last).
    Checkpoints go to ``storage_path/run_name``; re-running the same command resumes from the latest one.
    """

    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    data: TrainDataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: RayScalingConfig = Field(default_factory=RayScalingConfig)
    output_uri: str = Field(description="where the trained model goes (local dir or s3:// prefix)")
    storage_path: str | None = Field(None, description="Ray Train storage for checkpoints (shared dir or s3://); "
                                     "default <output_uri>/checkpoints")
    run_name: str = Field("train", description="Ray Train run name; the same name + storage_path resumes")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint; -1 = unlimited")
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="before")
    @classmethod
    def _one_storage_section(cls, data: Any) -> Any:
        return _legacy_storage(data, {**_MODEL_ENDPOINT, "data.endpoint_url": "endpoint_url",
                                      "data.allowed_roots": "allowed_roots"})

    @field_validator("output_uri")
    @classmethod
    def _output_uri(cls, v: str) -> str:
        return _check_output_uri(v, example="s3://bucket/models/x")

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", v):
            raise ValueError(f"run_name={v!r} must be 1-128 letters, digits or _.- (it names a storage folder)")
        return v

    @model_validator(mode="after")
    def _combination(self) -> TrainJobConfig:
        t, s = self.train, self.scaling
        if t.precision == "fp16" and not s.use_gpu:
            raise ValueError("train.precision='fp16' is not supported on CPU (DeepSpeed: 'Type fp16 is not supported "
                             "on your device'); use train.precision=bf16 or fp32, or set scaling.use_gpu=true")
        global_batch = t.per_device_batch_size * s.num_workers
        if global_batch < 2:
            raise ValueError(f"train.per_device_batch_size * scaling.num_workers = {t.per_device_batch_size} * "
                             f"{s.num_workers} = {global_batch}: in-batch negatives need at least 2 rows per step; "
                             "raise train.per_device_batch_size (paper: 8)")
        if t.per_device_batch_size < 2 and not self.objective.gather_negatives:
            raise ValueError(f"train.per_device_batch_size={t.per_device_batch_size} with "
                             "objective.gather_negatives=false leaves no in-batch negative on a worker; raise "
                             "per_device_batch_size or set objective.gather_negatives=true")
        if t.full_finetune and self.lora.enabled and "enabled" in self.lora.model_fields_set:
            raise ValueError("train.full_finetune=true together with lora.enabled=true: pick one; full fine-tuning "
                             "trains the language model's weights directly (set lora.enabled=false)")
        if not t.full_finetune and not self.lora.enabled and not t.train_vision:
            raise ValueError("nothing to train: lora.enabled=false, train.full_finetune=false and "
                             "train.train_vision=false; enable LoRA (the paper's setting) or one of the others")
        if self.model.fusion == "internal" and self.objective.variant != "sft":
            raise ValueError(f"model.fusion='internal' with objective.variant={self.objective.variant!r}: the "
                             "interleaved prompt has no separate text and image embeddings for WPCL/CRTR; use "
                             "objective.variant=sft (the VLM_SFT_internal baseline) or model.fusion=external")
        if self.model.fusion == "internal" and self.uses_lora and self.lora.kind == "moda":
            raise ValueError("lora.kind=moda with model.fusion=internal: MoDA routes by modality and the interleaved "
                             "prompt mixes both; use model.fusion=external or lora.kind=lora")
        if self.model.fusion == "internal" and self.objective.num_sampled_negatives:
            raise ValueError("objective.num_sampled_negatives > 0 is supported with model.fusion=external only")
        return self

    @property
    def uses_lora(self) -> bool:
        """LoRA adapters are trained (the default; off for full fine-tuning)."""
        return self.lora.enabled and not self.train.full_finetune

    @property
    def precision(self) -> str:
        """The resolved precision: ``fp32``, ``bf16`` or ``fp16`` (``auto`` -> bf16 on GPU, fp32 on CPU)."""
        if self.train.precision == "auto":
            return "bf16" if self.scaling.use_gpu else "fp32"
        return self.train.precision

    def with_absolute_paths(self, base: str | Path | None = None) -> TrainJobConfig:
        """A copy whose local paths (``model.name`` when it names an existing directory or starts with ``/``,
        ``./``, ``../`` or ``~``; ``data.dataset_uri``, ``output_uri``, ``storage_path``) are absolute.

        The driver calls this before the config travels to Ray workers, whose working directory is not the
        driver's: a relative ``model.name: build/tiny_backbone`` would otherwise be looked up on the hub there.
        s3:// URIs and hub ids (``Qwen/Qwen2.5-VL-3B-Instruct``) are left as they are.

        Args:
            base: directory relative paths are taken from (default: the current working directory).
        """
        root = Path(base) if base is not None else Path.cwd()
        name = self.model.name
        # model_copy keeps which settings were given explicitly (the full_finetune/lora check reads that).
        update: dict[str, Any] = {
            "model": self.model.model_copy(update={"name": _absolute(name, root)}) if _is_local_model(name, root)
            else self.model,
            "data": self.data.model_copy(update={"dataset_uri": _absolute(self.data.dataset_uri, root)}),
            "output_uri": _absolute(self.output_uri, root),
        }
        if self.storage_path is not None:
            update["storage_path"] = _absolute(self.storage_path, root)
        return self.model_copy(update=update, deep=True)

    @property
    def resolved_storage_path(self) -> str:
        """Ray Train's storage path: ``storage_path`` or ``<output_uri>/checkpoints`` (local paths made absolute)."""
        from vlm2rec_ray import storage

        return storage.absolute(self.storage_path or f"{self.output_uri.rstrip('/')}/checkpoints")
