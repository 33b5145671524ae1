"""VLM2Rec objectives (arXiv 2603.17450): pure losses, the variant registry, and the learnable penalty.

``build_objective(cfg.objective)`` looks the variant up in :data:`OBJECTIVES` (name -> loss function; no
``if loss_type == ...`` anywhere in a trainer) and wraps it with its temperatures, lambda and the WPCL
parameters alpha, beta in a small ``nn.Module``::

    objective = build_objective(cfg.objective)          # an nn.Module; put it in the optimizer too
    out = objective(z_t, z_v, e_t, e_v, neg_mask)       # LossOutput
    engine.backward(out.total); log(out.metrics())      # includes alpha and beta

Variants (the paper's Table 5): ``sft`` (plain fused InfoNCE, eq. 3), ``vlm2rec`` (WPCL + lambda CRTR,
eq. 14), ``wpcl`` / ``no_crtr`` (WPCL alone), ``no_stop_grad`` (VLM2Rec without the sg on the strong
margin), ``no_penalty`` (VLM2Rec with w_pen = 1). Not the paper's: ``vlm2rec_teacher`` (VLM2Rec whose CRTR
term is one-way, the stronger modality of each row a stop-gradient teacher; see ``crtr_loss``). From SDA:
``cmsa`` (Cross-Modal Structural Alignment on the items, learnable temperature; :mod:`.cmsa`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm2rec_ray.objectives.cmsa import cmsa_loss, cmsa_objective
from vlm2rec_ray.objectives.contrastive import (
    LossOutput,
    build_neg_mask,
    crtr_loss,
    info_nce,
    modality_margin,
    vlm2rec_loss,
    weak_modality_penalty,
    wpcl_loss,
)
from vlm2rec_ray.objectives.distributed import gather_with_grad, is_distributed

if TYPE_CHECKING:
    from vlm2rec_ray.config import ObjectiveConfig

__all__ = [
    "ITEM_LEVEL",
    "OBJECTIVES",
    "LossOutput",
    "PenaltyParameters",
    "Temperature",
    "VLM2RecObjective",
    "build_neg_mask",
    "build_objective",
    "cmsa_loss",
    "cmsa_objective",
    "crtr_loss",
    "gather_with_grad",
    "info_nce",
    "is_distributed",
    "modality_margin",
    "register_objective",
    "vlm2rec_loss",
    "weak_modality_penalty",
    "wpcl_loss",
]

LossFn = Callable[..., LossOutput]

#: Variant name -> loss function with the signature of :func:`vlm2rec_loss` minus the ablation switches.
OBJECTIVES: dict[str, LossFn] = {
    "sft": partial(vlm2rec_loss, use_penalty=False, use_crtr=False),
    "vlm2rec": partial(vlm2rec_loss),
    "wpcl": partial(vlm2rec_loss, use_crtr=False),
    "no_crtr": partial(vlm2rec_loss, use_crtr=False),
    "no_stop_grad": partial(vlm2rec_loss, stop_grad=False),
    "no_penalty": partial(vlm2rec_loss, use_penalty=False),
    "vlm2rec_teacher": partial(vlm2rec_loss, crtr_teacher=True),
    "cmsa": cmsa_objective,
}

#: Variants whose loss depends on alpha/beta (the others keep them frozen, so no parameter goes unused).
_USES_PENALTY = {"vlm2rec", "wpcl", "no_crtr", "no_stop_grad", "vlm2rec_teacher"}

#: Variants with their own temperature ``tau`` (``objective.tau_cmsa``, learnable with ``learnable_tau``) and
#: the config options they take.
_TEMPERATURE = {"cmsa"}
_OPTIONS: dict[str, Callable[[ObjectiveConfig], dict[str, object]]] = {
    "cmsa": lambda c: {"divergence": c.cmsa_divergence, "detach_teacher": c.cmsa_detach_teacher,
                       "normalize": c.cmsa_normalize},
}

#: Variants that train on items alone (SDA's stage 1): rows can be items, sequences are not encoded.
ITEM_LEVEL = {"cmsa"}


def register_objective(name: str, fn: LossFn, *, uses_penalty: bool = True) -> None:
    """Add a variant to the registry (``fn`` takes :func:`vlm2rec_loss`'s arguments and returns LossOutput)."""
    if name in OBJECTIVES:
        raise ValueError(f"objective variant {name!r} is already registered; pick another name")
    OBJECTIVES[name] = fn
    if uses_penalty:
        _USES_PENALTY.add(name)


def _inverse_softplus(y: float) -> float:
    """x with softplus(x) = y, for y > 0 (stable for large and small y)."""
    if y <= 0:
        raise ValueError(f"inverse softplus needs y > 0, got {y}")
    return y + math.log(-math.expm1(-y))


class PenaltyParameters(nn.Module):
    """WPCL's alpha and beta, optionally learnable (paper eq. 9: ``w = 1 + beta * softplus(alpha * Delta)``).

    Parametrisation: ``alpha = softplus(rho_alpha) > 0`` and ``beta = beta_min + softplus(rho_beta) >= beta_min``.

    Why the floor: ``Delta >= 0`` and w multiplies the negatives, so ``dL/dbeta >= 0`` and ``dL/dalpha >= 0``
    on every step. Minimising L therefore only ever *lowers* beta and alpha; left free, beta would drift to 0
    and WPCL would silently become plain InfoNCE. ``beta_min`` (config ``objective.beta_min``, default 0.05)
    is a hard floor the optimiser cannot cross, and the softplus on alpha keeps w increasing in Delta (alpha
    can only approach 0, where the penalty becomes a constant ``1 + beta log 2``). Both values travel in
    every :class:`LossOutput` and ``LossOutput.metrics()`` so a run exposes the drift; with
    ``learnable=False`` they stay at their initial values (buffers, not parameters).

    Args:
        alpha_init: initial alpha (> 0).
        beta_init: initial beta (> beta_min when learnable, >= 0 otherwise).
        learnable: make rho_alpha, rho_beta ``nn.Parameter`` s.
        beta_min: floor on beta (>= 0).
    """

    def __init__(self, alpha_init: float, beta_init: float, *, learnable: bool = True, beta_min: float = 0.0):
        super().__init__()
        if alpha_init <= 0:
            raise ValueError(f"alpha_init must be > 0 (alpha = softplus(rho) > 0), got {alpha_init}")
        if beta_min < 0:
            raise ValueError(f"beta_min must be >= 0, got {beta_min}")
        self.learnable = learnable
        self.beta_min = float(beta_min) if learnable else 0.0
        if learnable and beta_init <= beta_min:
            raise ValueError(
                f"beta_init={beta_init} must be larger than beta_min={beta_min} when the penalty is learnable "
                "(beta = beta_min + softplus(rho)); raise objective.beta_init or lower objective.beta_min"
            )
        if not learnable and beta_init < 0:
            raise ValueError(f"beta_init must be >= 0, got {beta_init}")
        # Shape [1] (not 0-d) so ZeRO partitioning and flattening treat them like any other parameter.
        rho_alpha = torch.tensor([_inverse_softplus(alpha_init)], dtype=torch.float32)
        if learnable:
            rho_beta = torch.tensor([_inverse_softplus(beta_init - beta_min)], dtype=torch.float32)
            self.rho_alpha = nn.Parameter(rho_alpha)
            self.rho_beta = nn.Parameter(rho_beta)
        else:
            self.register_buffer("rho_alpha", rho_alpha)
            self.register_buffer("fixed_beta", torch.tensor([float(beta_init)], dtype=torch.float32))

    @property
    def alpha(self) -> Tensor:
        """0-d float32 tensor, alpha > 0."""
        return F.softplus(self.rho_alpha.float()).reshape(())

    @property
    def beta(self) -> Tensor:
        """0-d float32 tensor, beta >= beta_min."""
        if self.learnable:
            return (self.beta_min + F.softplus(self.rho_beta.float())).reshape(())
        return self.fixed_beta.float().reshape(())

    def forward(self) -> tuple[Tensor, Tensor]:
        """``(alpha, beta)``. Called as a module inside the objective's forward so ZeRO-3's hooks gather the
        (partitioned) parameters first; the properties are for logging outside a forward pass."""
        return self.alpha, self.beta

    def extra_repr(self) -> str:
        return f"learnable={self.learnable}, beta_min={self.beta_min}"


class Temperature(nn.Module):
    """A positive temperature ``tau = softplus(rho)``, learnable or fixed (SDA learns CMSA's tau from 3.0; its
    code keeps tau raw, the softplus only keeps it > 0 without changing the starting point)."""

    def __init__(self, init: float, *, learnable: bool = True):
        super().__init__()
        rho = torch.tensor([_inverse_softplus(init)], dtype=torch.float32)  # [1]: ZeRO-friendly, as above
        if learnable:
            self.rho = nn.Parameter(rho)
        else:
            self.register_buffer("rho", rho)

    def forward(self) -> Tensor:
        """0-d float32 tau (called as a module so ZeRO-3 gathers ``rho`` first)."""
        return F.softplus(self.rho.float()).reshape(())


class VLM2RecObjective(nn.Module):
    """One registered loss with its hyper-parameters and penalty parameters.

    ``forward(z_t, z_v, e_t, e_v, neg_mask=None) -> LossOutput``. Inputs in fp16/bf16 are up-cast to fp32
    (softmax over cosine/tau is too coarse in bf16); float32/float64 inputs keep their dtype.
    """

    def __init__(self, name: str, loss_fn: LossFn, *, tau_wpcl: float, tau_crtr: float, lam: float,
                 penalty: PenaltyParameters, temperature: Temperature | None = None,
                 options: dict[str, object] | None = None):
        super().__init__()
        if tau_wpcl <= 0 or tau_crtr <= 0:
            raise ValueError(f"temperatures must be > 0, got tau_wpcl={tau_wpcl}, tau_crtr={tau_crtr}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.name = name
        self.loss_fn = loss_fn
        self.tau_wpcl = float(tau_wpcl)
        self.tau_crtr = float(tau_crtr)
        self.lam = float(lam)
        self.penalty = penalty
        self.temperature = temperature
        self.options = dict(options or {})
        self.item_level = name in ITEM_LEVEL

    @property
    def alpha(self) -> Tensor:
        return self.penalty.alpha

    @property
    def beta(self) -> Tensor:
        return self.penalty.beta

    def forward(self, z_t: Tensor, z_v: Tensor, e_t: Tensor, e_v: Tensor,
                neg_mask: Tensor | None = None) -> LossOutput:
        z_t, z_v, e_t, e_v = (_upcast(x) for x in (z_t, z_v, e_t, e_v))
        return self.loss_fn(z_t, z_v, e_t, e_v, neg_mask=neg_mask, **self.loss_kwargs(e_t))

    def loss_kwargs(self, like: Tensor, *, detach: bool = False) -> dict[str, object]:
        """The keyword arguments of ``loss_fn`` besides the embeddings and mask: temperatures, lambda, alpha and
        beta (and tau for variants with their own temperature) on ``like``'s device and dtype; ``detach`` holds
        the learnable ones constant (the gradient-alignment probe)."""
        alpha, beta = self.penalty()
        params = {"alpha": alpha, "beta": beta}
        if self.temperature is not None:
            params["tau"] = self.temperature()
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        params = {k: (v.detach() if detach else v).to(device=like.device, dtype=dtype) for k, v in params.items()}
        return {"tau_wpcl": self.tau_wpcl, "tau_crtr": self.tau_crtr, "lam": self.lam, **self.options, **params}

    def extra_repr(self) -> str:
        return f"variant={self.name!r}, tau_wpcl={self.tau_wpcl}, tau_crtr={self.tau_crtr}, lam={self.lam}"


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def build_objective(cfg: ObjectiveConfig) -> VLM2RecObjective:
    """Build the training objective named by ``cfg.variant`` (see :data:`OBJECTIVES`).

    Args:
        cfg: :class:`vlm2rec_ray.config.ObjectiveConfig` (variant, tau_wpcl, tau_crtr, lam, alpha_init,
            beta_init, learnable_penalty, beta_min).

    Returns:
        A :class:`VLM2RecObjective`; its parameters (rho_alpha, rho_beta) exist only for variants that use the
        penalty with ``learnable_penalty=True``, CMSA's tau (``temperature.rho``) with ``learnable_tau=True``;
        they belong in the optimizer.
    """
    if cfg.variant not in OBJECTIVES:
        raise ValueError(f"unknown objective.variant {cfg.variant!r}; choose one of {sorted(OBJECTIVES)}")
    learnable = bool(cfg.learnable_penalty) and cfg.variant in _USES_PENALTY
    penalty = PenaltyParameters(cfg.alpha_init, cfg.beta_init, learnable=learnable, beta_min=cfg.beta_min)
    temperature = (Temperature(cfg.tau_cmsa, learnable=cfg.learnable_tau) if cfg.variant in _TEMPERATURE else None)
    options = _OPTIONS[cfg.variant](cfg) if cfg.variant in _OPTIONS else {}
    return VLM2RecObjective(cfg.variant, OBJECTIVES[cfg.variant], tau_wpcl=cfg.tau_wpcl, tau_crtr=cfg.tau_crtr,
                            lam=cfg.lam, penalty=penalty, temperature=temperature, options=options)
