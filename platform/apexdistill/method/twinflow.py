"""`twinflow`: the released-code variant (TwinFlow's objective with a shifted-condition fake branch).

A reading of the official TwinFlow training step as APEX_METHOD.md describes it. Each batch of
4n samples is split into four equal groups that share one forward pass with gradient:

    group        time t               target time r                 trained on
    one_step     1                    0                             data
    multi_step   t ~ objective.time   t - u*t*MULTI_STEP_MAX_GAP    data            (u ~ U(0, 1))
    any_step     t ~ objective.time   t - u*t                       data
    fake         -t                   -t                            the model's own one-step samples

The network is F(x_t, t, c, target_t=r): the average velocity from t to r (r = t: the instantaneous
velocity). Rows of the fake group carry a NEGATIVE time and target time (the flag) and the shifted
condition c_fake = a*c + b (fixed; default a = -1, b = 0, i.e. the negated condition).

Targets (all without gradient; v = z - x is the data velocity):
1. training-time CFG (``target_guidance`` w > 0), real rows: v <- v + w*(F(x_t,t,c,t) - F(x_t,t,0,t)),
   the unconditional branch being an all-zero text condition;
2. RCGM consistency target, real rows: one small step x' = x_t - RCGM_DELTA_T*v to t' = max(t-RCGM_DELTA_T, r),
   then ``consistency_steps`` Euler sub-steps of the model from t' to r give the displacement D.
   A consistent model satisfies (t-r)*F = RCGM_DELTA_T*v + D; the residual
   R = ((t-r)*F - D)/RCGM_DELTA_T - v (R = F - v when t - r < RCGM_DELTA_T) gives the target F - clamp(R).
3. fake rows: plain flow matching on x_fake, target z - x_fake.
Loss: a per-sample Charbonnier loss sqrt(d^2 + eps^2) - eps (d^2 the sample's mean squared error),
weighted by tan((1 - (t - r)) * pi / TAN_WEIGHT_DIVISOR) + 1 on real rows (1 for a one-step jump,
~4.1 for an infinitesimal one) and by 1 on fake rows; plus ``rectify_weight`` times the rectify term:
the one-step samples are re-noised, x_s = s*z' + (1-s)*sg(x_one), s ~ objective.time, and
G = clamp(F(x_s, -s, c_fake, -s) - F(x_s, s, c, s), -k, k); the one-step velocity is pulled to
sg(F - G), which moves x_one = z - F by +G (the DMD direction: away from the fake flow).

Choices where the description is open (documented here, not hidden in the code):
- Target network: the online model under ``torch.no_grad`` answers the CFG, RCGM and rectify queries.
  The reference keeps a fast EMA for them; the platform's EMA lives in the training loop and is
  used for evaluation.
- The shift is applied by this objective (the backbone never negates anything itself); the negative
  time still flags the fake branch, so a backbone can tell the branches apart even with an identity
  shift. A learnable shift is refused: the released code's shift is fixed.
- The fake samples come from the one-step generator with the real condition (t = 1 -> r = 0), as in
  the reference; fake-row times are floored at MIN_FLAGGED_TIME so that -t stays negative.
- CFG is applied to every real row (the reference skips rows at exactly t = 1).
- The robust loss acts on the per-sample mean squared error (the reference's Barron reweighting is
  also per sample; its gradient is the Charbonnier gradient up to a constant factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from apexdistill.config import ObjectiveConfig, TwinflowConfig
from apexdistill.method.base import Batch, Objective, mse, register, scalar_metrics
from apexdistill.method.flow import bcast, endpoint_x, interpolate, sample_time, velocity_target
from apexdistill.method.shift import ConditionShift

GROUPS = ("one_step", "multi_step", "any_step", "fake")
#: the one-step group jumps from pure noise straight to data
ONE_STEP_T, ONE_STEP_TARGET_T = 1.0, 0.0
#: the multi-step group's target time lies at most this fraction of t below t (reference: 0.05)
MULTI_STEP_MAX_GAP = 0.05
#: size of the first, data-velocity step of the RCGM target; residuals are measured per this step (reference: 0.01)
RCGM_DELTA_T = 0.01
#: the RCGM residual is clamped to [-RCGM_RESIDUAL_CLAMP, RCGM_RESIDUAL_CLAMP] (reference: 1.0)
RCGM_RESIDUAL_CLAMP = 1.0
#: time weight tan((1 - (t - r)) * pi / TAN_WEIGHT_DIVISOR) + 1 (reference: 2.5)
TAN_WEIGHT_DIVISOR = 2.5
#: fake rows are flagged by -t; a time of exactly 0 would lose the flag (-0 == 0)
MIN_FLAGGED_TIME = 1e-3

VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, t, target_t) -> F


# ----------------------------------------------------------------------------- pure helpers


def charbonnier(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    """Per-sample robust loss sqrt(d^2 + eps^2) - eps with d^2 the sample's mean squared error: (B,)."""
    return (mse(pred, target) + eps**2).sqrt() - eps


def tan_time_weight(t: Tensor, target_t: Tensor) -> Tensor:
    """tan((1 - (t - r)) * pi / TAN_WEIGHT_DIVISOR) + 1: large for short jumps, 1 for t = 1 -> r = 0."""
    return torch.tan((1 - (t - target_t)) * math.pi / TAN_WEIGHT_DIVISOR) + 1


def substep_time(t: Tensor, target_t: Tensor, i: int, steps: int, shift: float = 1.0) -> Tensor:
    """The i-th of ``steps`` sub-step boundaries from t (i = 0) to r (i = steps): even in time at ``shift`` 1,
    else warped as diffusers' flow-matching schedulers warp sigmas, on the interval's own scale: with u = 1 - i/steps,
    the boundary is r + (t - r) * shift*u / (1 + (shift - 1)*u). shift < 1 makes the sub-steps near r shorter
    (2 sub-steps from 0.989 to 0 at shift 2/3: 0.989 -> 0.395 -> 0)."""
    if shift == 1.0:
        return t + (target_t - t) * (i / steps)
    u = 1.0 - i / steps
    return target_t + (t - target_t) * (shift * u / (1.0 + (shift - 1.0) * u))


@torch.no_grad()
def euler_displacement(velocity: VelocityFn, x: Tensor, t: Tensor, target_t: Tensor, steps: int, shift: float = 1.0) -> Tensor:
    """x_t - x_r predicted by ``steps`` Euler sub-steps of the model's average velocity from t to r (boundaries:
    ``substep_time``)."""
    total = torch.zeros_like(x)
    for i in range(steps):
        t_now = substep_time(t, target_t, i, steps, shift)
        t_next = substep_time(t, target_t, i + 1, steps, shift)
        step = bcast(t_now - t_next, x) * velocity(x, t_now, t_next)
        x = x - step
        total = total + step
    return total


@torch.no_grad()
def midpoint_displacement(velocity: VelocityFn, x: Tensor, t: Tensor, target_t: Tensor, steps: int, shift: float = 1.0) -> Tensor:
    """x_t - x_r predicted by ``steps`` explicit-midpoint sub-steps (two model calls each) of an
    instantaneous velocity field from t to r: x_mid = x - (h/2)*F(x, t), x <- x - h*F(x_mid, t - h/2).
    Second order: on the shipped digits teacher, 2 sub-steps (4 calls) land closer to its 50-step Euler
    sample than 8 Euler sub-steps (README, "The apex recipe"). Boundaries: ``substep_time``; each midpoint halfway in time."""
    total = torch.zeros_like(x)
    for i in range(steps):
        t_now = substep_time(t, target_t, i, steps, shift)
        t_next = substep_time(t, target_t, i + 1, steps, shift)
        t_half = (t_now + t_next) / 2
        x_half = x - bcast(t_now - t_half, x) * velocity(x, t_now, t_half)
        step = bcast(t_now - t_next, x) * velocity(x_half, t_half, t_next)
        x = x - step
        total = total + step
    return total


#: the reference's ODE solvers for the RCGM displacement, by name (``objective.apex.consistency_solver``)
DISPLACEMENT_SOLVERS = {"euler": euler_displacement, "midpoint": midpoint_displacement}


@torch.no_grad()
def consistency_displacement(velocity: VelocityFn, x_t: Tensor, v_target: Tensor, t: Tensor, target_t: Tensor, steps: int,
                             delta_t: float = RCGM_DELTA_T, solver: str = "euler", shift: float = 1.0) -> Tensor:
    """D of the RCGM target: a small step along ``v_target`` from (x_t, t) to t' = max(t - delta_t, r), then
    the model's own ``steps`` sub-steps of ``solver`` from t' to r (boundaries warped by ``shift``); D = x_t' - x_r."""
    t_mid = torch.maximum(t - delta_t, target_t)
    return DISPLACEMENT_SOLVERS[solver](velocity, x_t - delta_t * v_target, t_mid, target_t, steps, shift)


@torch.no_grad()
def consistency_from_displacement(f_current: Tensor, displacement: Tensor, v_target: Tensor, t: Tensor, target_t: Tensor,
                                  delta_t: float = RCGM_DELTA_T, clamp: float = RCGM_RESIDUAL_CLAMP) -> Tensor:
    """F - clamp(R): a consistent model satisfies (t-r)*F = delta_t*v_target + D, and the residual per
    ``delta_t`` is R = ((t-r)*F - D)/delta_t - v_target. Rows with t - r < delta_t have no room for the
    split and fall back to R = F - v_target (flow matching)."""
    f_current = f_current.detach()
    gap = t - target_t
    residual_far = (bcast(gap, f_current) * f_current - displacement) / delta_t - v_target
    residual_near = f_current - v_target
    near = (gap < delta_t).reshape(-1, *([1] * (f_current.dim() - 1)))
    residual = torch.where(near, residual_near, residual_far)
    return f_current - residual.clamp(-clamp, clamp)


@torch.no_grad()
def consistency_target(
    velocity: VelocityFn,
    f_current: Tensor,
    v_target: Tensor,
    x_t: Tensor,
    t: Tensor,
    target_t: Tensor,
    steps: int,
    delta_t: float = RCGM_DELTA_T,
    clamp: float = RCGM_RESIDUAL_CLAMP,
) -> Tensor:
    """RCGM target for F(x_t, t, target_t=r): F - clamp(R), R the consistency residual per ``delta_t``.

    Jumping from t to r must equal a small step along ``v_target`` followed by the model's own
    jump from t - delta_t to r: (t-r)*F = delta_t*v_target + D."""
    displacement = consistency_displacement(velocity, x_t, v_target, t, target_t, steps, delta_t)
    return consistency_from_displacement(f_current, displacement, v_target, t, target_t, delta_t, clamp)


@dataclass
class TwinflowInputs:
    """The prepared batch of one step, in group order (see ``GROUPS``); times carry the fake flag."""

    x_t: Tensor
    t: Tensor  # signed: negative on fake rows
    target_t: Tensor  # signed: negative on fake rows
    text: Tensor  # c on real rows, c_fake on fake rows
    target: Tensor  # z - x (z - x_fake on fake rows)


# ----------------------------------------------------------------------------- objective


@register
class TwinFlow(Objective):
    name = "twinflow"
    batch_multiple = 4

    def __init__(self, cfg: ObjectiveConfig) -> None:
        super().__init__(cfg)
        if cfg.shift.learnable:
            raise ValueError(
                "objective.name='twinflow' uses the released code's fixed condition shift: "
                "set objective.shift.learnable=false (or use apex / apex_literal for a learnable shift)"
            )
        self.shift = ConditionShift(cfg.shift)

    # -- step ------------------------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: Batch, step: int = 0) -> tuple[Tensor, dict[str, float]]:
        p: TwinflowConfig = self.cfg.twinflow
        x, c, mask = batch["x"], batch["text"], batch.get("text_mask")
        n = self._group_size(x.shape[0])
        real = slice(0, 3 * n)  # the fake group is the last quarter

        with torch.no_grad():
            inp = self._prepare_inputs(model, x, c, mask, n)
        f_all = model(inp.x_t, inp.t, inp.text, mask, target_t=inp.target_t)  # the one pass with gradient

        with torch.no_grad():
            target = inp.target.clone()
            target[real] = self._real_target(model, f_all[real], inp, c[real], _rows(mask, real), p)

        weight = torch.ones_like(inp.t)
        weight[real] = tan_time_weight(inp.t[real], inp.target_t[real])
        per_sample = charbonnier(f_all, target, p.robust_eps) * weight
        loss_main = per_sample.mean()

        f_one = f_all[:n]
        x_one = endpoint_x(f_one, inp.x_t[:n], inp.t[:n]).detach()
        correction = self._rectify_correction(model, x_one, c[:n], _rows(mask, slice(0, n)), p)
        loss_rectify = charbonnier(f_one, (f_one - correction).detach(), p.robust_eps).mean()

        loss = loss_main + p.rectify_weight * loss_rectify
        group_losses = {f"loss_{g}": per_sample[i * n : (i + 1) * n].mean() for i, g in enumerate(GROUPS)}
        return loss, scalar_metrics(
            loss=loss,
            loss_main=loss_main,
            loss_rectify=loss_rectify,
            **group_losses,
            correction_abs=correction.abs().mean(),
            target_delta_abs=(target[real] - inp.target[real]).abs().mean(),
            shift_a=self.shift.a,
            shift_b=self.shift.b,
        )

    # -- pieces ----------------------------------------------------------------------------------

    def _group_size(self, batch_size: int) -> int:
        if batch_size < self.batch_multiple or batch_size % self.batch_multiple:
            raise ValueError(
                f"objective 'twinflow' splits each batch into {self.batch_multiple} equal groups {GROUPS}: "
                f"the batch size must be a positive multiple of {self.batch_multiple}, got {batch_size} "
                f"(set train.batch_size accordingly)"
            )
        return batch_size // self.batch_multiple

    def _prepare_inputs(self, model: nn.Module, x: Tensor, c: Tensor, mask: Tensor | None, n: int) -> TwinflowInputs:
        """Times, target times and samples of the four groups (see the module docstring)."""
        dev, dt = x.device, x.dtype
        t = sample_time(4 * n, self.cfg.time, dev).to(dt)
        u = torch.rand(4 * n, device=dev, dtype=dt)
        one, multi, any_, fake = (slice(i * n, (i + 1) * n) for i in range(4))

        t[one] = ONE_STEP_T
        target_t = t.clone()
        target_t[one] = ONE_STEP_TARGET_T
        target_t[multi] = t[multi] - u[multi] * t[multi] * MULTI_STEP_MAX_GAP
        target_t[any_] = t[any_] - u[any_] * t[any_]

        # the fake group trains on the model's own one-step samples (real condition, 1 -> 0)
        samples = x.clone()
        samples[fake] = self._one_step_sample(model, torch.randn_like(x[fake]), c[fake], _rows(mask, fake))
        t[fake] = t[fake].clamp_min(MIN_FLAGGED_TIME)

        z = torch.randn_like(x)
        x_t = interpolate(samples, z, t)
        target = velocity_target(samples, z)

        text = c.clone()
        text[fake] = self.shift(c[fake])
        t[fake] = -t[fake]  # the flag: negative time (and target time) marks the fake branch
        target_t[fake] = t[fake]
        return TwinflowInputs(x_t=x_t, t=t, target_t=target_t, text=text, target=target)

    @staticmethod
    def _one_step_sample(model: nn.Module, z: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        t = torch.full((z.shape[0],), ONE_STEP_T, device=z.device, dtype=z.dtype)
        r = torch.full_like(t, ONE_STEP_TARGET_T)
        return endpoint_x(model(z, t, c, mask, target_t=r), z, t)

    def _real_target(self, model: nn.Module, f_real: Tensor, inp: TwinflowInputs, c: Tensor, mask: Tensor | None, p: TwinflowConfig) -> Tensor:
        """Guided (optional) and then RCGM-consistent target of the three real groups; no gradient."""
        rows = slice(0, c.shape[0])
        x_t, t, r, v = inp.x_t[rows], inp.t[rows], inp.target_t[rows], inp.target[rows]
        if p.target_guidance > 0:
            v = v + p.target_guidance * self._guidance_direction(model, x_t, t, c, mask)

        def velocity(x: Tensor, t_now: Tensor, t_to: Tensor) -> Tensor:
            return model(x, t_now, c, mask, target_t=t_to)

        return consistency_target(velocity, f_real, v, x_t, t, r, p.consistency_steps)

    @staticmethod
    def _guidance_direction(model: nn.Module, x_t: Tensor, t: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        """F(x_t, t, c) - F(x_t, t, 0): the CFG direction, instantaneous velocities (target time t)."""
        both = model(
            torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([c, torch.zeros_like(c)]), _cat_mask(mask), target_t=torch.cat([t, t])
        )
        cond, uncond = both.chunk(2)
        return cond - uncond

    def _rectify_correction(self, model: nn.Module, x_one: Tensor, c: Tensor, mask: Tensor | None, p: TwinflowConfig) -> Tensor:
        """G = clamp(v_fake - v_real) on re-noised one-step samples, without gradient."""
        with torch.no_grad():
            s = sample_time(x_one.shape[0], self.cfg.time, x_one.device).to(x_one.dtype).clamp_min(MIN_FLAGGED_TIME)
            x_s = interpolate(x_one, torch.randn_like(x_one), s)
            signed_s = torch.cat([-s, s])  # fake branch first, flagged by -s
            both = model(torch.cat([x_s, x_s]), signed_s, torch.cat([self.shift(c), c]), _cat_mask(mask), target_t=signed_s)
            v_fake, v_real = both.chunk(2)
            return (v_fake - v_real).clamp(-p.rectify_clamp, p.rectify_clamp)


def _rows(mask: Tensor | None, rows: slice) -> Tensor | None:
    return None if mask is None else mask[rows]


def _cat_mask(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else torch.cat([mask, mask])
