"""`apex`: condition-shift self-adversarial distillation, generator-side (APEX_METHOD.md).

The shift is the paper's (Eq. 9, c_fake = a*c + b); the generator signal has the form of the
released code, because the literal Eq. 20-25 never lets the gradient reach a generated sample
(see `apex_literal`). One step, with F the network:

1. generator   x_g = z - t0 * F(z, t0, c)                      (one step, with gradient)
2. re-noise    x_s = s*z' + (1-s)*sg(x_g),   s ~ U(s_min, s_max)
3. correction  G = clamp(F(x_s, s, c_fake) - F(x_s, s, c), -k, k)       (no gradient)
4. L_gen  = || F(z, t0, c) - sg(F(z, t0, c) - G) ||^2
            (its gradient moves x_g by t0*G: toward the real flow, away from the fake one)
5. L_fake = || F(x_s, s, c_fake) - (z' - sg(x_g)) ||^2         (fake branch learns the model's own flow)
6. L_real = flow matching on data with the true condition (anchor), t <= anchor_t_max; with
            guidance_ratio r > 0 (the released code's enhanced_ratio) its target is the guided field
            (z - x) + r*(v_ref(x_t, t, c) - v_ref(x_t, t, c_neg)), both velocities without gradient from
            the reference weights (the frozen base under LoRA, else the EMA)
   total  = lambda_g*L_gen + lambda_p*L_fake + lambda_r*L_real

All passes that need a gradient go through the network as one concatenated batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from apexdistill.config import ObjectiveConfig
from apexdistill.method.base import Batch, ShiftedObjective, cat_batches, mse, ramp, register, scalar_metrics
from apexdistill.method.flow import bcast, interpolate, sample_time, velocity_target


@register
class Apex(ShiftedObjective):
    name = "apex"

    def __init__(self, cfg: ObjectiveConfig) -> None:
        super().__init__(cfg)
        # the anchor's flow matching at t ~ 1 would pull F(z, t0, c) back to the teacher's blurry
        # mean, directly against the generator term: it stops at anchor_t_max
        t_max = min(cfg.time.max, cfg.apex.anchor_t_max)
        self.anchor_time = cfg.time.model_copy(update={"max": t_max, "min": min(cfg.time.min, t_max / 2)})

    def gradient_passes(self) -> tuple[int, ...]:
        # the generator pass (B), then the fake branch and the anchor batched together (2B)
        return (1, 2) if self.cfg.apex.lambda_r > 0 else (1, 1)

    def loss(self, model: nn.Module, batch: Batch, step: int = 0) -> tuple[Tensor, dict[str, float]]:
        p = self.cfg.apex
        x, c, mask = batch["x"], batch["text"], batch.get("text_mask")
        n = x.shape[0]
        c_fake = self.shift(c)

        # 1. one-step generator from pure noise (gradient flows through it)
        z = torch.randn_like(x)
        t0 = torch.full((n,), p.generator_t, device=x.device, dtype=x.dtype)
        # 2. re-noise the detached sample at s
        z2 = torch.randn_like(x)
        s = p.renoise_min + (p.renoise_max - p.renoise_min) * torch.rand(n, device=x.device, dtype=x.dtype)
        # 6. real-data anchor
        z3 = torch.randn_like(x)
        t_real = sample_time(n, self.anchor_time, x.device).to(x.dtype)
        x_real_t = interpolate(x, z3, t_real)

        # 6'. the anchor's target first: its guidance comes from the reference weights, which may be
        # swapped into the live parameters (the EMA), so no graph may exist yet
        target_real = self._real_target(model, x, z3, x_real_t, t_real, c, mask) if p.lambda_r > 0 else None

        # The generator output is needed before x_s exists, so the generator pass runs first;
        # the fake-branch and anchor passes then share one batched call.
        v_gen = model(z, t0, c, mask)
        x_g = (z - bcast(t0, z) * v_gen).detach()
        x_s = interpolate(x_g, z2, s)

        if p.lambda_r > 0:
            v_fake_s, v_real_x = _split(
                model(torch.cat([x_s, x_real_t]), torch.cat([s, t_real]), torch.cat([c_fake, c]), cat_batches(mask, mask)), n
            )
        else:  # no anchor: one gradient pass fewer (about a third of apex's training cost)
            v_fake_s, v_real_x = model(x_s, s, c_fake, mask), None
        with torch.no_grad():  # 3. correction from the two branches at the re-noised point
            v_real_s = model(x_s, s, c, mask)
            correction = (v_fake_s.detach() - v_real_s).clamp(-p.correction_clamp, p.correction_clamp)

        loss_gen = mse(v_gen, (v_gen - correction).detach()).mean()  # 4.
        loss_fake = mse(v_fake_s, velocity_target(x_g, z2)).mean()  # 5.
        if v_real_x is not None:  # 6.
            loss_real = mse(v_real_x, target_real).mean()
        else:
            loss_real = torch.zeros((), device=x.device)
        lambda_g = p.lambda_g * ramp(step, p.generator_warmup_steps, p.generator_ramp_steps)
        loss = lambda_g * loss_gen + p.lambda_p * loss_fake + p.lambda_r * loss_real
        return loss, scalar_metrics(
            loss=loss,
            loss_gen=loss_gen,
            loss_fake=loss_fake,
            loss_real=loss_real,
            correction_abs=correction.abs().mean(),
            lambda_g_eff=lambda_g,
            shift_a=self.shift.a,
            shift_b=self.shift.b,
        )


    def _real_target(self, model: nn.Module, x: Tensor, z: Tensor, x_t: Tensor, t: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        """The anchor's target: the data velocity, plus r times the reference model's guidance
        direction at the same noisy point when ``guidance_ratio`` r > 0."""
        target = velocity_target(x, z)
        r = float(self.cfg.apex.guidance_ratio or 0.0)
        if r <= 0:
            return target
        if getattr(self, "negative", None) is None or getattr(self, "reference", None) is None:
            raise RuntimeError("objective.apex.guidance_ratio > 0 needs the cached negative embedding and reference weights "
                               "(set_guidance was not called)")
        n = x.shape[0]
        neg, neg_mask = (v.to(x.device) for v in self.negative)
        neg = neg.to(c.dtype).expand(n, -1, -1)
        neg_mask = neg_mask.expand(n, -1).to(mask.dtype) if mask is not None else None
        with torch.no_grad(), self.reference():
            v_cond, v_uncond = _split(model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([c, neg]), cat_batches(mask, neg_mask)), n)
        return target + r * (v_cond - v_uncond).detach()


def _split(v: Tensor, n: int) -> tuple[Tensor, Tensor]:
    return v[:n], v[n:]
