"""build_objective: every Table 5 variant reachable from config, the learnable penalty and its floor."""

from __future__ import annotations

import math

import pytest
import torch

from vlm2rec_ray.config import OBJECTIVE_VARIANTS, ConfigError, ObjectiveConfig, load_config
from vlm2rec_ray.objectives import (
    OBJECTIVES,
    PenaltyParameters,
    build_objective,
    cmsa_loss,
    crtr_loss,
    info_nce,
    register_objective,
    vlm2rec_loss,
)


def _batch(b=4, n=6, d=8):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(s, d, generator=g) for s in (b, b, n, n)]


def test_every_config_variant_is_registered() -> None:
    assert set(OBJECTIVE_VARIANTS) <= set(OBJECTIVES)


@pytest.mark.parametrize("variant", OBJECTIVE_VARIANTS)
def test_variants_match_the_pure_functions(variant: str) -> None:
    cfg = ObjectiveConfig(variant=variant, tau_wpcl=0.2, tau_crtr=0.1, lam=0.5, alpha_init=1.0, beta_init=1.0)
    obj = build_objective(cfg)
    z_t, z_v, e_t, e_v = _batch()
    out = obj(z_t, z_v, e_t, e_v)
    if variant == "cmsa":  # SDA's objective: items only, its own learnable temperature (init 3.0), no penalty
        assert out.total.item() == pytest.approx(cmsa_loss(e_t, e_v, 3.0).item(), rel=1e-5)
        assert out.alpha is None and out.tau.item() == pytest.approx(3.0, rel=1e-6)
        assert [n for n, _ in obj.named_parameters()] == ["temperature.rho"]
        return
    assert out.alpha.item() == pytest.approx(1.0, rel=1e-6) and out.beta.item() == pytest.approx(1.0, rel=1e-6)
    fused = info_nce(z_t + z_v, e_t + e_v, 0.2)
    crtr = crtr_loss(z_t, z_v, e_t, e_v, 0.1)
    full = vlm2rec_loss(z_t, z_v, e_t, e_v, tau_wpcl=0.2, tau_crtr=0.1, lam=0.5, alpha=1.0, beta=1.0)
    teacher = vlm2rec_loss(z_t, z_v, e_t, e_v, tau_wpcl=0.2, tau_crtr=0.1, lam=0.5, alpha=1.0, beta=1.0,
                           crtr_teacher=True)
    expected = {
        "sft": fused,
        "no_penalty": fused + 0.5 * crtr,
        "wpcl": full.wpcl,
        "no_crtr": full.wpcl,
        "vlm2rec": full.total,
        "no_stop_grad": full.total,
        "vlm2rec_teacher": teacher.total,
    }[variant]
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(out.metrics()) >= {"loss", "loss_wpcl", "loss_crtr", "penalty_mean", "margin_text", "margin_image",
                                  "alpha", "beta"}
    uses_penalty = variant in {"vlm2rec", "wpcl", "no_crtr", "no_stop_grad", "vlm2rec_teacher"}
    assert len(list(obj.parameters())) == (2 if uses_penalty else 0)  # no unused parameters for DDP/ZeRO


def test_variant_from_yaml_override() -> None:
    cfg = load_config(ObjectiveConfig, None, ["variant=no_stop_grad", "lam=1", "tau_crtr=0.01"])
    obj = build_objective(cfg)
    assert obj.name == "no_stop_grad" and obj.lam == 1.0 and obj.tau_crtr == 0.01


def test_beta_floor_and_config_check() -> None:
    with pytest.raises(ConfigError, match=r"beta_init=0.01 must be larger than objective.beta_min=0.05"):
        load_config(ObjectiveConfig, None, ["beta_init=0.01"])
    ObjectiveConfig(beta_init=0.01, learnable_penalty=False)  # fixed beta: no floor needed
    with pytest.raises(ValueError, match=r"beta_init=0.05 must be larger than beta_min=0.1"):
        PenaltyParameters(1.0, 0.05, beta_min=0.1)


def test_learnable_beta_cannot_collapse_below_floor() -> None:
    """dL/dbeta >= 0 always (w multiplies the negatives), so plain minimisation drives beta down; the floor
    beta_min holds however hard the optimiser pushes, and alpha stays > 0."""
    obj = build_objective(ObjectiveConfig(variant="vlm2rec", beta_init=1.0, beta_min=0.05, alpha_init=1.0))
    opt = torch.optim.SGD(obj.parameters(), lr=50.0)
    z_t, z_v, e_t, e_v = _batch()
    betas = []
    for _ in range(30):
        opt.zero_grad()
        out = obj(z_t, z_v, e_t, e_v)
        out.total.backward()
        assert obj.penalty.rho_beta.grad.item() >= 0 and obj.penalty.rho_alpha.grad.item() >= 0
        opt.step()
        betas.append(obj.beta.item())
    assert betas[-1] < 0.06 and min(betas) >= 0.05
    assert obj.alpha.item() > 0


def test_fixed_penalty_is_not_a_parameter() -> None:
    obj = build_objective(ObjectiveConfig(variant="vlm2rec", learnable_penalty=False, alpha_init=2.0, beta_init=0.5))
    assert list(obj.parameters()) == []
    assert obj.alpha.item() == pytest.approx(2.0, rel=1e-6) and obj.beta.item() == pytest.approx(0.5)
    assert {n for n, _ in obj.named_buffers()} == {"penalty.rho_alpha", "penalty.fixed_beta"}


def test_bf16_inputs_are_upcast() -> None:
    obj = build_objective(ObjectiveConfig())
    z_t, z_v, e_t, e_v = (x.bfloat16().requires_grad_(True) for x in _batch())
    out = obj(z_t, z_v, e_t, e_v)
    assert out.total.dtype == torch.float32 and math.isfinite(out.total.item())
    out.total.backward()
    assert z_t.grad is not None and z_t.grad.dtype == torch.bfloat16


def test_float64_path_and_state_dict_roundtrip() -> None:
    obj = build_objective(ObjectiveConfig(alpha_init=0.3, beta_init=2.0))
    out = obj(*(x.double() for x in _batch()))
    assert out.total.dtype == torch.float64
    again = build_objective(ObjectiveConfig())
    again.load_state_dict(obj.state_dict())
    assert again.alpha.item() == pytest.approx(0.3, rel=1e-6) and again.beta.item() == pytest.approx(2.0, rel=1e-6)


def test_register_objective() -> None:
    name = "test_only_variant"
    register_objective(name, OBJECTIVES["sft"], uses_penalty=False)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_objective(name, OBJECTIVES["sft"])
    finally:
        OBJECTIVES.pop(name)
