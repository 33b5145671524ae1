"""Config loading: YAML + dotted overrides, and errors that name the setting, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm2rec_ray.config import (
    ConfigError,
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
