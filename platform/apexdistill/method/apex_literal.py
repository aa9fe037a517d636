"""`apex_literal`: APEX Eq. 9-25 exactly as the paper writes them (APEX_METHOD.md), for comparison.

One step, with F the network, z ~ N(0, I), t from ``objective.time``:

    c_fake   = a*c + b                                             (Eq. 9)
    x_t      = t*z + (1-t)*x
    x_fake   = x_t - t * F(x_t, t, c)                              (Eq. 11; gradient flows, unless fake_detach)
    L_fake   = || F(t'*z' + (1-t')*x_fake, t', c_fake) - (z' - x_fake) ||^2     (Eq. 12; z', t' = z, t
                                                                    unless fresh_noise)
    v_fake   = sg(F(x_t, t, c_fake))                               (Eq. 14)
    T_mix    = (1-lam)*x + lam * f_x(v_fake, x_t, t)               (Eq. 22)
    L_mix    = E[ (1/omega(t)) || f_x(F(x_t, t, c), x_t, t) - T_mix ||^2 ],  omega(t) = (1-t)/t   (Eq. 23)
    L_APEX   = lambda_p * L_fake + lambda_e * L_mix                (Eq. 25)

Choices where the paper is open (APEX_METHOD.md marks them):
- The training loss evaluates L_mix in velocity units, ``w(t) * ||F - ((1-lam)(z-x) + lam*v_fake)||^2``
  with ``w(t) = t^3/(1-t)`` for ``weight='paper'``. That is algebraically Eq. 23 (the endpoint error
  is t times the velocity error) but does not divide by t^2 near t = 0. ``mix_loss`` keeps the
  endpoint form for the Theorem 1 test; a test pins the two forms to each other.
- ``weight``: ``paper`` = t^3/(1-t) with 1-t floored at PAPER_WEIGHT_EPS (it diverges at t -> 1);
  ``clamped`` (default) = min(t^3/(1-t), weight_clamp); ``uniform`` = 1 (then lam = 0 is exactly
  plain flow matching).
- When x_fake is not detached the gradient reaches it through both the input and the target of
  Eq. 12, since the paper writes the loss without a stop-gradient.
- Warm-up: for ``warmup_steps`` steps lam and lambda_p are 0, so the loss is lambda_e * L_mix at
  lam = 0, i.e. flow matching under the configured weighting (plain L_FM with ``weight='uniform'``);
  then both rise linearly to their configured values over ``ramp_steps`` steps. Passes whose
  weight is zero are skipped.

Why this reading does not train a one-step generator on its own is explained in APEX_METHOD.md
("Why the literal reading fails"); `apex` is the working variant.

``mix_on='generated'`` is a second reading of the same equations, one where the gradient reaches a generated
sample (the paper's GAN-form gradient needs it): L_mix is evaluated at the point where Eq. 12 queries the fake
branch, the noised generated sample x_t_fake = t*z + (1-t)*x_fake, with x_fake = Eq. 11's endpoint carrying its
gradient back to F(x_t, t, c), and v_fake of Eq. 14 queried there too (the fake branch's own output at that point):

    L_mix = E[ w(t)/t^2 * || f_x(F(x_t_fake, t, c), x_t_fake, t) - sg(T_mix) ||^2 ],
    T_mix = (1-lam)*x + lam*f_x(v_fake, x_t_fake, t)           (x the real sample x_fake was made from)

in the endpoint form of Eq. 23 (w(t)/t^2 is ``weight``'s velocity weighting in endpoint units: t/(1-t) = 1/omega
for ``paper``; t^2 floored at 1e-4), so the gradient flows through x_t_fake both into the network's input and into
f_x. At lam = 1 the error is t*(v_fake - F(x_t_fake, t, c)): the sample is moved so that the real branch agrees
with the fake one, the opposite of `apex`'s generator step (which moves it by +t0*(v_fake - v_real)). In this
reading lam = 0 is not flow matching (L_mix asks the re-noised sample's endpoint to return to x), so neither is
the warm-up.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from apexdistill.config import ApexLiteralConfig
from apexdistill.method.base import Batch, ShiftedObjective, mse, ramp, register, scalar_metrics
from apexdistill.method.flow import endpoint_x, interpolate, sample_time, velocity_target

#: floor on 1 - t in the paper's weight t^3/(1-t), so that t -> 1 gives a large but finite weight
PAPER_WEIGHT_EPS = 1e-5
#: floor on t^2 where ``mix_on='generated'`` turns the velocity weighting into endpoint units
MIN_T_SQUARED = 1e-4

WeightFn = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- pure functions


def omega(t: Tensor) -> Tensor:
    """omega(t) = (1-t)/t, the paper's time weighting of the endpoint loss (Eq. 23 divides by it)."""
    return (1 - t) / t


def endpoint_weight(t: Tensor) -> Tensor:
    """1/omega(t) = t/(1-t): the weight of the endpoint-form L_mix (Eq. 23), guarded at t -> 1."""
    return t / (1 - t).clamp_min(PAPER_WEIGHT_EPS)


def velocity_weight(t: Tensor, kind: str = "clamped", clamp: float = 10.0) -> Tensor:
    """Weight of L_mix in velocity units: t^2 / omega(t) = t^3/(1-t) for ``paper``; bounded by
    ``clamp`` for ``clamped``; 1 for ``uniform``."""
    if kind == "uniform":
        return torch.ones_like(t)
    paper = t.pow(3) / (1 - t).clamp_min(PAPER_WEIGHT_EPS)
    if kind == "paper":
        return paper
    if kind == "clamped":
        return paper.clamp_max(clamp)
    raise ValueError(f"objective.apex_literal.weight: unknown weighting '{kind}', expected paper, clamped or uniform")


def mix_target(x: Tensor, x_t: Tensor, t: Tensor, v_fake: Tensor, lam: float) -> Tensor:
    """T_mix = (1-lam)*x + lam*f_x(v_fake, x_t, t) (Eq. 22), without gradient."""
    return ((1 - lam) * x + lam * endpoint_x(v_fake, x_t, t)).detach()


def mix_loss(v_real: Tensor, x: Tensor, z: Tensor, x_t: Tensor, t: Tensor, v_fake: Tensor, lam: float, weight_fn: WeightFn = endpoint_weight) -> Tensor:
    """L_mix in endpoint form (Eq. 23): E[ weight_fn(t) * || f_x(F, x_t, t) - T_mix ||^2 ] with
    ``weight_fn`` = 1/omega by default. ``z`` is unused here; it keeps the signature of
    ``mix_loss_velocity`` so the two forms are interchangeable."""
    del z
    pred = endpoint_x(v_real, x_t, t)
    return (weight_fn(t) * mse(pred, mix_target(x, x_t, t, v_fake, lam))).mean()


def mix_loss_velocity(v_real: Tensor, x: Tensor, z: Tensor, x_t: Tensor, t: Tensor, v_fake: Tensor, lam: float, weight_fn: WeightFn) -> Tensor:
    """L_mix in velocity units: E[ weight_fn(t) * || F - ((1-lam)(z-x) + lam*v_fake) ||^2 ].
    Equals ``mix_loss`` when this ``weight_fn`` is t^2 times that one (f_x error = t * velocity error).
    ``x_t`` is unused; it keeps the signature of ``mix_loss``."""
    del x_t
    target = ((1 - lam) * velocity_target(x, z) + lam * v_fake).detach()
    return (weight_fn(t) * mse(v_real, target)).mean()


def sup_cons_loss(v_real: Tensor, x: Tensor, x_t: Tensor, t: Tensor, v_fake: Tensor, lam: float, weight_fn: WeightFn = endpoint_weight) -> Tensor:
    """G = (1-lam)*L_sup + lam*L_cons (Theorem 1): the same weighted endpoint losses toward the data
    x (L_sup) and toward the fake branch's endpoint f_x(v_fake) (L_cons). Its gradient equals that
    of ``mix_loss``; the two losses differ by a term that does not depend on F."""
    pred = endpoint_x(v_real, x_t, t)
    w = weight_fn(t)
    loss_sup = (w * mse(pred, x.detach())).mean()
    loss_cons = (w * mse(pred, endpoint_x(v_fake, x_t, t).detach())).mean()
    return (1 - lam) * loss_sup + lam * loss_cons


# ----------------------------------------------------------------------------- objective


@register
class ApexLiteral(ShiftedObjective):
    name = "apex_literal"

    def schedule(self, step: int) -> tuple[float, float]:
        """(lam, lambda_p) at ``step`` after warm-up and ramp."""
        p: ApexLiteralConfig = self.cfg.apex_literal
        frac = ramp(step, p.warmup_steps, p.ramp_steps)
        return p.lam * frac, p.lambda_p * frac

    def gradient_passes(self) -> tuple[int, ...]:
        # F(x_t, t, c), then the fake branch once lambda_p is on, then (mix_on=generated) F(x_t_fake, t, c)
        p = self.cfg.apex_literal
        passes = (1, 1) if p.lambda_p > 0 else (1,)
        return (*passes, 1) if p.mix_on == "generated" else passes

    def loss(self, model: nn.Module, batch: Batch, step: int = 0) -> tuple[Tensor, dict[str, float]]:
        p: ApexLiteralConfig = self.cfg.apex_literal
        x, c, mask = batch["x"], batch["text"], batch.get("text_mask")
        n = x.shape[0]
        lam, lambda_p = self.schedule(step)

        # noise and time drawn in the same order as `fm`, so lam = 0 reproduces it with the same seed
        z = torch.randn(x.shape, device=x.device, dtype=x.dtype)
        t = sample_time(n, self.cfg.time, x.device).to(x.dtype)
        x_t = interpolate(x, z, t)
        v_real = model(x_t, t, c, mask)  # F(x_t, t, c)
        c_fake = self.shift(c)  # Eq. 9

        weight = partial(velocity_weight, kind=p.weight, clamp=p.weight_clamp)
        generated = p.mix_on == "generated"
        if not generated:  # Eq. 14 at the real point x_t
            v_fake = _fake_velocity(model, x_t, t, c_fake, mask, lam)
            loss_mix = mix_loss_velocity(v_real, x, z, x_t, t, v_fake, lam, weight)  # Eq. 22-23

        if lambda_p > 0 or generated:
            x_gen = endpoint_x(v_real, x_t, t)  # Eq. 11: one-step endpoint of a noised real sample, with its gradient
            # the official code's choice; the paper lets the gradient through
            x_fake = x_gen.detach() if p.fake_detach else x_gen
            if p.fresh_noise:
                z_f = torch.randn(x.shape, device=x.device, dtype=x.dtype)
                t_f = sample_time(n, self.cfg.time, x.device).to(x.dtype)
            else:
                z_f, t_f = z, t
        if lambda_p > 0:
            x_t_fake = interpolate(x_fake, z_f, t_f)  # Eq. 12: x_t_fake = t*z + (1-t)*x_fake
            v_fake_branch = model(x_t_fake, t_f, c_fake, mask)
            loss_fake = mse(v_fake_branch, velocity_target(x_fake, z_f)).mean()  # Eq. 12
        else:
            v_fake_branch = None
            loss_fake = torch.zeros((), device=x.device, dtype=x.dtype)

        if generated:  # L_mix at the noised generated sample, the gradient flowing through it (module docstring)
            x_t_gen = interpolate(x_gen, z_f, t_f)
            if v_fake_branch is not None:  # Eq. 14 at this point is the fake branch's own output there
                v_fake = v_fake_branch.detach()
            else:
                v_fake = _fake_velocity(model, x_t_gen, t_f, c_fake, mask, lam)
            pred = endpoint_x(model(x_t_gen, t_f, c, mask), x_t_gen, t_f)
            # the velocity weighting in endpoint units (f_x error = t * velocity error); t^2 floored, as the generated
            # sample's endpoint error does not vanish at t -> 0 (x_t_fake -> x_fake, not x)
            w_end = weight(t_f) / t_f.pow(2).clamp_min(MIN_T_SQUARED)
            loss_mix = (w_end * mse(pred, mix_target(x, x_t_gen, t_f, v_fake, lam))).mean()  # Eq. 22-23

        loss = lambda_p * loss_fake + p.lambda_e * loss_mix  # Eq. 25
        return loss, scalar_metrics(
            loss=loss,
            loss_fake=loss_fake,
            loss_mix=loss_mix,
            lam_eff=lam,
            lambda_p_eff=lambda_p,
            shift_a=self.shift.a,
            shift_b=self.shift.b,
        )


def _fake_velocity(model: nn.Module, x_t: Tensor, t: Tensor, c_fake: Tensor, mask: Tensor | None, lam: float) -> Tensor:
    """Eq. 14, v_fake = sg(F(x_t, t, c_fake)); zeros without a pass when lam = 0 multiplies it by zero."""
    if lam <= 0:
        return torch.zeros_like(x_t)
    with torch.no_grad():
        return model(x_t, t, c_fake, mask)
