"""TrainJobConfig: defaults (paper 5.1.1), validation errors that name the setting, the value and the fix,
absolute local paths before the config ships to workers, and build_deepspeed_config."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm2rec_ray.config import ConfigError, TrainJobConfig, load_config
from vlm2rec_ray.train.deepspeed_config import build_deepspeed_config

REPO = Path(__file__).resolve().parents[3]
BASE = ["model.name=/models/tiny", "data.dataset_uri=/data/synthetic", "output_uri=/runs/x"]


def _cfg(*overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, None, [*BASE, *overrides])


def test_paper_defaults() -> None:
    cfg = _cfg()
    t, lo = cfg.train, cfg.lora
    assert (lo.enabled, lo.r, lo.alpha, lo.dropout) == (True, 16, 32, 0.2)
    assert (t.lr, t.per_device_batch_size, t.epochs, t.gradient_checkpointing) == (1e-5, 8, 3, True)
    assert cfg.objective.variant == "vlm2rec" and not t.train_vision and cfg.uses_lora
    assert cfg.precision == "fp32"  # auto on CPU
    assert _cfg("scaling.use_gpu=true").precision == "bf16"  # auto on GPU
    assert cfg.resolved_storage_path == "/runs/x/checkpoints"
    assert _cfg("output_uri=s3://bkt/m").resolved_storage_path == "s3://bkt/m/checkpoints"


def test_tiny_yaml_and_presets_load() -> None:
    tiny = load_config(TrainJobConfig, REPO / "jobs" / "configs" / "train_tiny.yaml", ["train.zero_stage=3"])
    assert tiny.train.zero_stage == 3 and tiny.scaling.num_workers == 2 and not tiny.scaling.use_gpu
    for size in ("3b", "7b", "32b"):
        preset = load_config(TrainJobConfig, REPO / "cluster" / "presets" / f"qwen2_5_vl_{size}.yaml", [])
        assert preset.precision == "bf16"


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["train.zero_stage=4"], r"train\.zero_stage=4 is not a DeepSpeed ZeRO stage; use 0, 1, 2 or 3"),
    (["train.precision=fp16"], r"train\.precision='fp16' is not supported on CPU.*use train\.precision=bf16 or fp32"),
    (["train.offload_optimizer=true", "train.zero_stage=0"],
     r"offload_optimizer=true needs ZeRO: set train\.zero_stage to 1, 2 or 3 \(got train\.zero_stage=0\)"),
    (["train.offload_params=true", "train.zero_stage=2"], r"offload_params=true needs train\.zero_stage=3 \(got 2\)"),
    (["train.per_device_batch_size=1", "scaling.num_workers=1"],
     r"per_device_batch_size \* scaling\.num_workers = 1 \* 1 = 1.*raise train\.per_device_batch_size"),
    (["train.per_device_batch_size=1", "objective.gather_negatives=false"],
     r"per_device_batch_size=1 with objective\.gather_negatives=false.*set objective\.gather_negatives=true"),
    (["train.full_finetune=true", "lora.enabled=true"], r"pick one.*set lora\.enabled=false"),
    (["lora.enabled=false"], r"nothing to train: lora\.enabled=false.*enable LoRA"),
    (["model.fusion=internal"], r"model\.fusion='internal' with objective\.variant='vlm2rec'.*objective\.variant=sft"),
    (["run_name=a/b"], r"run_name='a/b' must be 1-128 letters"),
    (["output_uri=s3://x"], r"output_uri='s3://x' is not a valid location \(invalid S3 bucket .*\); write e.g. output_uri=s3://"),
    (["train.lr=0"], r"train\.lr: Input should be greater than 0 \(got 0\)"),
    (["train.epochs=0"], r"train\.epochs: Input should be greater than or equal to 1 \(got 0\)"),
    (["data.few_shot_users=0"], r"data\.few_shot_users: Input should be greater than or equal to 1 \(got 0\)"),
    (["train.zero_stag=2"], r"train\.zero_stag: unknown setting \(value 2\)"),
])
def test_errors_name_setting_value_and_fix(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        _cfg(*overrides)


def test_required_settings_are_named() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainJobConfig, None, [])
    for name in ("model: required", "data: required", "output_uri: required"):
        assert name in str(e.value)


def test_full_finetune_survives_the_trip_to_workers() -> None:
    """Workers rebuild the config from ``model_dump(exclude_unset=True)``; the lora/full-finetune check reads
    which settings were given, so the round trip must not turn a default into an explicit choice."""
    cfg = _cfg("train.full_finetune=true")
    assert not cfg.uses_lora
    again = TrainJobConfig.model_validate(cfg.with_absolute_paths().model_dump(mode="json", exclude_unset=True))
    assert again == cfg and not again.uses_lora


def test_with_absolute_paths(tmp_path: Path) -> None:
    (tmp_path / "build" / "tiny").mkdir(parents=True)
    cfg = load_config(TrainJobConfig, None, ["model.name=build/tiny", "data.dataset_uri=build/synthetic",
                                             "output_uri=runs/x", "storage_path=./ckpt"])
    out = cfg.with_absolute_paths(tmp_path)
    assert out.model.name == str(tmp_path / "build" / "tiny")
    assert out.data.dataset_uri == str(tmp_path / "build" / "synthetic")
    assert out.output_uri == str(tmp_path / "runs" / "x")
    assert out.storage_path == str(tmp_path / "ckpt")
    assert out.resolved_storage_path == str(tmp_path / "ckpt")
    assert cfg.model.name == "build/tiny"  # the original is unchanged
    hub = load_config(TrainJobConfig, None, ["model.name=Qwen/Qwen2.5-VL-3B-Instruct", "data.dataset_uri=s3://b/d",
                                             "output_uri=s3://bkt/m"]).with_absolute_paths(tmp_path)
    assert hub.model.name == "Qwen/Qwen2.5-VL-3B-Instruct"  # a hub id, not a local dir
    assert (hub.data.dataset_uri, hub.output_uri, hub.storage_path) == ("s3://b/d", "s3://bkt/m", None)
    s3_model = _cfg("model.name=s3://bkt/base").with_absolute_paths(tmp_path)
    assert s3_model.model.name == "s3://bkt/base"


def test_deepspeed_config_zero2_cpu_fp32() -> None:
    ds = build_deepspeed_config(_cfg("train.per_device_batch_size=4", "train.grad_accum=2", "scaling.num_workers=3",
                                     "train.grad_clip=0.5", "train.zero_stage=2"))
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 4 * 2 * 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is False
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert "bf16" not in ds and "fp16" not in ds  # fp32 on CPU
    assert ds["zero_allow_untested_optimizer"] and ds["zero_force_ds_cpu_optimizer"] is False


def test_deepspeed_config_zero3_offload_bf16_gpu() -> None:
    ds = build_deepspeed_config(_cfg("train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true",
                                     "scaling.use_gpu=true", "train.grad_clip=0"))
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_gather_16bit_weights_on_model_save"] is True
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert z["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert z["overlap_comm"] is True
    assert ds["bf16"] == {"enabled": True} and "gradient_clipping" not in ds


def test_deepspeed_config_stage0_and_precisions() -> None:
    ds = build_deepspeed_config(_cfg("train.zero_stage=0", "train.precision=bf16"))
    assert ds["zero_optimization"] == {"stage": 0} and ds["bf16"] == {"enabled": True}
    fp16 = build_deepspeed_config(_cfg("train.precision=fp16", "scaling.use_gpu=true"))
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and "bf16" not in fp16
    ds1 = build_deepspeed_config(_cfg("train.zero_stage=1", "train.offload_optimizer=true"))
    assert ds1["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
