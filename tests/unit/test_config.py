"""Config loading: YAML + dotted overrides, and errors that name the setting, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm2rec_ray.config import (
    ConfigError,
    IcebergConfig,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    config_hash,
    load_config,
    parse_overrides,
)


def test_yaml_plus_overrides(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("name: /models/tiny\nmax_history: 5\n")
    cfg = load_config(ModelConfig, f, ["max_history=7", "dtype=bf16"])
    assert cfg.name == "/models/tiny" and cfg.max_history == 7 and cfg.dtype == "bf16"
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=true"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": True}


def test_errors_name_setting_value_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_history: .*less than or equal to 64 \(got 999\)"):
        load_config(ModelConfig, None, ["name=x", "max_history=999"])
    with pytest.raises(ConfigError, match=r"nme: unknown setting \(value 'x'\)"):
        load_config(ModelConfig, None, ["nme=x"])
    with pytest.raises(ConfigError, match=r"name: required setting is missing"):
        load_config(ModelConfig, None, [])
    with pytest.raises(ConfigError, match=r"min_pixels=9000 is larger than model.max_pixels=100"):
        load_config(ModelConfig, None, ["name=x", "min_pixels=9000", "max_pixels=100"])
    with pytest.raises(ConfigError, match=r"not key=value"):
        load_config(ModelConfig, None, ["name"])
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(ModelConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping"):
        load_config(ModelConfig, bad)
    with pytest.raises(ConfigError, match=r"not a valid regex"):
        load_config(LoraConfig, None, ["target_modules=(q_proj"])
    with pytest.raises(ConfigError, match=r"variant: objective.variant='magic' is not a registered objective; choose one of \[.*'sft'.*\] or register it"):
        load_config(ObjectiveConfig, None, ["variant=magic"])


def test_hash_is_stable() -> None:
    a = ModelConfig(name="x")
    assert config_hash(a) == config_hash(ModelConfig(name="x"))
    assert config_hash(a) != config_hash(ModelConfig(name="y"))


def test_one_storage_section_and_the_old_keys_moving_there(tmp_path: Path) -> None:
    from vlm2rec_ray.config import EmbedJobConfig, TrainJobConfig

    base = ["model.name=m", "model_version=v", f"output_uri={tmp_path}", f"dataset_uri={tmp_path}"]
    cfg = load_config(EmbedJobConfig, None, [*base, "storage.endpoint_url=http://s3.local",
                                             'storage.allowed_roots=["s3://b/img/"]'])
    assert cfg.storage.endpoint_url == "http://s3.local" and cfg.storage.allowed_roots == ["s3://b/img/"]
    old = load_config(EmbedJobConfig, None, [*base, "model.endpoint_url=http://s3.local", "endpoint_url=http://s3.local",
                                             'allowed_roots=["s3://b/img/"]'])
    assert old.storage == cfg.storage  # the old keys (four sections before) land in the one section
    with pytest.raises(ConfigError, match=r"model.endpoint_url='http://a' conflicts with storage.endpoint_url="
                                          r"'http://b'; set it once, in storage.endpoint_url"):
        load_config(EmbedJobConfig, None, [*base, "model.endpoint_url=http://a", "storage.endpoint_url=http://b"])
    train = load_config(TrainJobConfig, None, ["model.name=m", f"data.dataset_uri={tmp_path}", f"output_uri={tmp_path}",
                                               "data.endpoint_url=http://s3.local", 'data.allowed_roots=["/imgs"]'])
    assert train.storage.endpoint_url == "http://s3.local" and train.storage.allowed_roots == ["/imgs"]
    with pytest.raises(ConfigError, match=r"model.family: unknown setting"):  # never read: removed
        load_config(EmbedJobConfig, None, [*base, "model.family=qwen2_vl"])
    with pytest.raises(ConfigError, match=r"output_uri='gs://b/x' is not a valid location \(no storage backend"):
        load_config(EmbedJobConfig, None, [*base, "output_uri=gs://b/x"])


def test_objective_variant_is_checked_against_the_registry() -> None:
    from vlm2rec_ray.objectives import OBJECTIVES, register_objective

    with pytest.raises(ConfigError, match=r"objective.variant='my_loss' is not a registered objective"):
        load_config(ObjectiveConfig, None, ["variant=my_loss"])
    register_objective("my_loss", OBJECTIVES["sft"], uses_penalty=False)
    try:
        assert load_config(ObjectiveConfig, None, ["variant=my_loss"]).variant == "my_loss"
    finally:
        del OBJECTIVES["my_loss"]


def test_iceberg_catalog_refuses_credentials(tmp_path: Path) -> None:
    def load(catalog: dict[str, str]) -> IcebergConfig:  # YAML: pyiceberg's keys have dots ("s3.region")
        f = tmp_path / "iceberg.yaml"
        f.write_text("catalog:\n" + "".join(f"  {k!r}: {v!r}\n" for k, v in catalog.items()))
        return load_config(IcebergConfig, f)

    ok = {"type": "rest", "uri": "https://polaris:8181/api/catalog", "warehouse": "prod", "s3.region": "eu-west-1"}
    assert load(ok).catalog == ok
    for key in ("s3.secret-access-key", "token", "credential", "s3.session-token", "password", "s3.access-key-id"):
        with pytest.raises(ConfigError, match=r"iceberg.catalog holds credentials .*PYICEBERG_CATALOG__"):
            load({"type": "rest", key: "x"})
    with pytest.raises(ConfigError, match=r"user:password@ in a URI"):
        load({"type": "sql", "uri": "postgresql+psycopg2://app:hunter2@db:5432/iceberg"})
    assert load({"type": "sql", "uri": "postgresql+psycopg2://db:5432/iceberg"}).catalog["type"] == "sql"
