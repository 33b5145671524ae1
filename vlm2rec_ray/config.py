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

    name: str = Field(description="hub id, local save_pretrained dir, or s3:// prefix")
    family: Literal["auto", "qwen2_5_vl", "qwen2_vl"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    attn_implementation: str | None = None
    min_pixels: int = Field(56 * 56, gt=0, description="image resize lower bound (pixels)")
    max_pixels: int = Field(224 * 224, gt=0, description="image resize upper bound (pixels)")
    max_history: int = Field(10, ge=1, le=64, description="history items per sequence (latest kept)")
    fusion: Literal["external", "internal"] = "external"
    endpoint_url: str | None = None

    @model_validator(mode="after")
    def _pixels(self) -> ModelConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"model.min_pixels={self.min_pixels} is larger than model.max_pixels={self.max_pixels}; "
                "set min_pixels <= max_pixels"
            )
        return self


class LoraConfig(_Part):
    """PEFT LoRA on the language model's attention projections (paper defaults r=16, alpha=32, dropout 0.2)."""

    enabled: bool = True
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$"

    @field_validator("target_modules")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"lora.target_modules={v!r} is not a valid regex ({e}); fix the pattern") from e
        return v


OBJECTIVE_VARIANTS = ("sft", "vlm2rec", "wpcl", "no_stop_grad", "no_penalty", "no_crtr")


class ObjectiveConfig(_Part):
    """The training objective and the paper's Table 5 ablations.

    ``variant``: ``sft`` (plain fused InfoNCE), ``vlm2rec`` (WPCL + lambda * CRTR), ``wpcl`` / ``no_crtr``
    (WPCL alone), ``no_stop_grad`` (VLM2Rec without the stop-gradient on the strong modality),
    ``no_penalty`` (VLM2Rec with w_pen = 1, i.e. InfoNCE + CRTR).
    """

    variant: Literal["sft", "vlm2rec", "wpcl", "no_stop_grad", "no_penalty", "no_crtr"] = "vlm2rec"
    tau_wpcl: float = Field(0.1, gt=0.0, description="InfoNCE/WPCL temperature; paper grid {0.05,0.1,0.5,1}")
    tau_crtr: float = Field(0.1, gt=0.0, description="CRTR temperature; paper grid {0.001,0.01,0.1,1}")
    lam: float = Field(0.5, ge=0.0, description="CRTR weight lambda; paper grid {0.1,0.5,1}")
    alpha_init: float = Field(1.0, gt=0.0)
    beta_init: float = Field(1.0, gt=0.0)
    learnable_penalty: bool = True
    beta_min: float = Field(0.05, ge=0.0, description="floor on beta so the penalty cannot vanish")
    gather_negatives: bool = Field(True, description="gather in-batch negatives across workers")
    num_sampled_negatives: int = Field(0, ge=0, description="extra random catalog negatives per batch")

    @model_validator(mode="after")
    def _penalty(self) -> ObjectiveConfig:
        if self.learnable_penalty and self.beta_init <= self.beta_min:
            raise ValueError(
                f"objective.beta_init={self.beta_init} must be larger than objective.beta_min={self.beta_min} "
                "when learnable_penalty is true (beta = beta_min + softplus(rho)); raise beta_init or lower beta_min"
            )
        return self


class StorageConfig(_Part):
    endpoint_url: str | None = Field(None, description="S3 endpoint; default AWS_ENDPOINT_URL / AWS")
    allowed_roots: list[str] = Field(default_factory=list, description="image_uri prefixes allowed; [] = any")


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
        _set_dotted(tree, key, yaml.safe_load(raw) if raw.strip() else "")
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
    num_threads: int | None = Field(1, ge=1, description="torch CPU threads while training (tiny models run "
                                    "fastest on 1; raise for large catalogs; null = torch's default)")

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
    endpoint_url: str | None = Field(None, description="S3 endpoint for data and output; default AWS_ENDPOINT_URL")
    allowed_roots: list[str] = Field(default_factory=list, description="image_uri prefixes allowed; [] = any")

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
        if not v.strip():
            raise ValueError("output_uri is empty; give a local dir or s3:// prefix, e.g. output_uri=s3://bucket/emb")
        if v.startswith("s3://") and len(v[5:].split("/", 1)[0]) < 3:
            raise ValueError(f"output_uri={v!r} has no valid bucket; write s3://<bucket>/<prefix>")
        return v

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

    @field_validator("allowed_roots")
    @classmethod
    def _roots(cls, v: list[str]) -> list[str]:
        if any(not r.strip() for r in v):
            raise ValueError(f"allowed_roots={v} holds an empty entry; list prefixes like s3://bucket/images/")
        return v

    @model_validator(mode="after")
    def _inputs(self) -> EmbedJobConfig:
        if self.catalog_uri is None and self.dataset_uri is None:
            raise ValueError("neither catalog_uri nor dataset_uri is set; set catalog_uri=<catalog file or prefix> "
                             "(items) or dataset_uri=<prepared dataset> (items and sequences)")
        return self

    @property
    def data_endpoint(self) -> str | None:
        """The S3 endpoint for catalog, images and output (falls back to the model's)."""
        return self.endpoint_url or self.model.endpoint_url
