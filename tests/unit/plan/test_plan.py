"""The memory planner agrees with DeepSpeed's own estimators and picks sensible settings."""

from __future__ import annotations

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from typer.testing import CliRunner

from vlm2rec_ray.cli import app
from vlm2rec_ray.plan import PRESET_ARCHS, model_state_bytes, plan, resolve_arch


@pytest.mark.parametrize("name", ["Qwen2.5-VL-3B", "Qwen2.5-VL-7B", "Qwen2.5-VL-32B"])
@pytest.mark.parametrize("gpus", [1, 4, 8])
def test_full_finetune_model_states_match_deepspeed(name: str, gpus: int) -> None:
    arch = PRESET_ARCHS[name]
    total, largest = arch.total_params(), arch.largest_layer_params()
    # ZeRO-2, no offload: DeepSpeed says 2P + 18P/N on the GPU.
    p, g, o, _ = model_state_bytes(total, 0, 2, gpus, largest)
    _, ds_gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=False)
    assert abs((p + g + o) - ds_gpu) <= 1
    # ZeRO-2 + optimizer offload: 2P on the GPU.
    p, g, o, _ = model_state_bytes(total, 0, 2, gpus, largest, "optimizer")
    _, ds_gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=True)
    assert abs((p + g + o) - ds_gpu) <= 1
    # ZeRO-3 + full offload: only the largest layer's gather buffer on the GPU.
    p, g, o, _ = model_state_bytes(total, 0, 3, gpus, largest, "optimizer+params")
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus)
    assert abs((p + g + o) - ds_gpu) <= 1
    # ZeRO-3 + optimizer offload: largest layer + 2P/N.
    p, g, o, _ = model_state_bytes(total, 0, 3, gpus, largest, "optimizer")
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus,
                                                         cpu_offload_params=False)
    assert abs((p + g + o) - ds_gpu) <= 1


def test_param_counts_match_published_sizes() -> None:
    # Published totals include the LM head (vocab x hidden), which an embedder does not load.
    published = {"Qwen2.5-VL-3B": 3.75e9, "Qwen2.5-VL-7B": 8.29e9, "Qwen2.5-VL-32B": 33.45e9}
    for name, total in published.items():
        a = PRESET_ARCHS[name]
        with_head = a.total_params() + (0 if name.endswith("3B") else a.vocab * a.hidden)  # 3B ties embeddings
        assert abs(with_head - total) / total < 0.01, (name, with_head)


def test_recommendations() -> None:
    small = plan("Qwen2.5-VL-3B", 8, 80)["recommended"]
    assert small["offload"] == "none" and small["micro_batch"] == 8
    big = plan("Qwen2.5-VL-32B", 8, 80)["recommended"]
    assert big["zero_stage"] == 3 and big["offload"] == "none"  # LoRA 32B: bf16 weights must be sharded
    full = plan("Qwen2.5-VL-32B", 8, 80, lora=False)["recommended"]
    assert full["zero_stage"] == 3 and full["offload"] != "none"
    # 72B full fine-tuning on one 24 GiB card only fits with everything offloaded and a smaller micro-batch.
    tight = plan("Qwen2.5-VL-72B", 1, 24, lora=False)["recommended"]
    assert tight["offload"] == "optimizer+params" and tight["micro_batch"] < 8 and tight["cpu_gib"] > 1000
    assert resolve_arch("Qwen/Qwen2.5-VL-7B-Instruct").hidden == 3584


def test_bad_inputs_and_cli(tiny_backbone_dir) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        plan("Llama-9B", 8, 80)
    with pytest.raises(ValueError, match="--gpus"):
        plan("3B", 0, 80)
    res = CliRunner().invoke(app, ["plan", "--model", "Qwen2.5-VL-32B", "--gpus", "8", "--gpu-mem", "80"])
    assert res.exit_code == 0, res.output
    assert "recommended: ZeRO-3" in res.output
    res = CliRunner().invoke(app, ["plan", "--model", str(tiny_backbone_dir), "--gpus", "1", "--gpu-mem", "1"])
    assert res.exit_code == 0 and "recommended" in res.output
    res = CliRunner().invoke(app, ["plan", "--model", "nope-1B"])
    assert res.exit_code == 2
