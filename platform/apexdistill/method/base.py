"""The one interface every training objective has: ``loss(model, batch, step) -> (loss, metrics)``.

``model`` is a velocity network ``model(x, t, text, text_mask, target_t=None) -> v`` (a backbone
adapter from ``apexdistill.models``); ``batch`` is a dict with ``x`` (B, C, H, W) clean samples in
[-1, 1] (pixels or latents), ``text`` (B, L, D) text states and ``text_mask`` (B, L).
Objectives are ``nn.Module`` so that learnable pieces (the condition shift) are trained and saved
with them.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

from apexdistill.config import ObjectiveConfig
from apexdistill.method.shift import ConditionShift

Batch = dict[str, Tensor]


class Objective(nn.Module):
    name: str = "base"
    #: how many samples of a batch belong together (twinflow splits a batch into 4 groups)
    batch_multiple: int = 1

    def __init__(self, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def loss(self, model: nn.Module, batch: Batch, step: int = 0) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """Extra optimizer groups owned by the objective (e.g. the learnable shift)."""
        return []

    def gradient_passes(self) -> tuple[float, ...]:
        """The network calls of one step that keep their autograd graph until backward, each as a
        multiple of the batch size: their activations are held at once (``apexdistill plan``).
        Calls under ``torch.no_grad`` keep nothing and are not listed."""
        return (1,)

    def attach(self, backbone: nn.Module) -> None:
        """Called once with the plain backbone, before any parallel wrapping (DDP, FSDP2, DeepSpeed)
        and before a checkpoint is loaded: the place to copy a frozen teacher."""

    def set_guidance(self, negative: tuple[Tensor, Tensor] | None, reference: Any = None, guide: Any = None) -> None:
        """The dataset's negative (unconditional) text states (1, L, D), mask (1, L) (None when the cache
        has none), ``reference(source)``: a context manager factory under which the model computes
        the reference velocities, ``source`` one of auto / frozen / ema (see ``train.loop.reference_weights``),
        and ``guide(v_cond, v_uncond, t, ratio)``: the teacher's own CFG rule at the guidance ratio (the model
        family's ``guided_velocity``; default plain CFG, ``v_cond + ratio*(v_cond - v_uncond)``).
        Objectives that use neither guidance nor a reference ignore them."""
        self.negative, self.reference = negative, reference
        self.guide = guide or plain_cfg


def plain_cfg(v_cond: Tensor, v_uncond: Tensor, t: Tensor, ratio: float) -> Tensor:
    """Standard CFG with w = 1 + ratio, the released code's ``target += enhanced_ratio * (v_cond - v_uncond)``."""
    return v_cond + ratio * (v_cond - v_uncond)


class ShiftedObjective(Objective):
    """An objective with a condition shift c_fake = a*c + b (Eq. 9); a learnable shift gets its own
    optimizer group with its learning-rate multiplier."""

    def __init__(self, cfg: ObjectiveConfig) -> None:
        super().__init__(cfg)
        self.shift = ConditionShift(cfg.shift)

    def param_groups(self) -> list[dict[str, Any]]:
        if not self.shift.learnable:
            return []
        return [{"params": list(self.shift.parameters()), "lr_mult": self.shift.lr_mult, "name": "shift"}]


def ramp(step: int, warmup_steps: int, ramp_steps: int) -> float:
    """0 during warm-up, then a linear rise to 1 over ``ramp_steps`` steps (1 at once if 0)."""
    if step < warmup_steps:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - warmup_steps + 1) / ramp_steps)


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean over everything but the batch, per sample: shape (B,)."""
    return (a - b).pow(2).flatten(1).mean(1)


def scalar_metrics(**terms: Tensor | float) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in terms.items()}


_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    _REGISTRY[cls.name] = cls
    return cls


OBJECTIVE_NAMES = ("apex", "apex_literal", "twinflow", "fm", "regression")


def build_objective(cfg: ObjectiveConfig) -> Objective:
    """Objectives live in modules named after them (``method/<name>.py``); importing fills the registry."""
    if cfg.name not in OBJECTIVE_NAMES:
        raise ValueError(f"objective.name: unknown objective '{cfg.name}', expected one of {sorted(OBJECTIVE_NAMES)}")
    importlib.import_module(f"apexdistill.method.{cfg.name}")
    return _REGISTRY[cfg.name](cfg)


def available_objectives() -> list[str]:
    return list(OBJECTIVE_NAMES)


def cat_batches(*parts: Tensor | None) -> Tensor | None:
    if any(p is None for p in parts):
        return None
    return torch.cat(parts, 0)  # type: ignore[arg-type]
