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
            (z - x) + (CFG_r(v_ref(x_t, t, c), v_ref(x_t, t, c_neg)) - v_ref(x_t, t, c)), both velocities without
            gradient from the reference weights (the frozen base under LoRA, else the EMA), CFG_r the teacher's own
            rule at r (plain CFG: r*(v_c - v_u); Qwen-Image rescales each token to the conditional norm)
7. L_cons (``consistency_weight`` lambda_c > 0; the released code's RCGM target on its one-step group):
            F(z, t0, c) is pulled to sg(F - clamp(R)), R = (t0*F - D)/delta - (z - x), D the reference weights'
            ``consistency_steps`` sub-steps of ``consistency_solver`` (the released code's Euler, or explicit
            midpoint: two calls a sub-step, second order; boundaries placed by ``consistency_time_shift``) from
            (z - delta*(z - x), t0 - delta) to 0, delta = 0.01,
            x the row's data (the released code's random pairing). From the frozen teacher its fixed point is the teacher's
            few-step ODE sample; ``consistency_decay_steps`` hands over to the correction afterwards.
            With ``guidance_ratio`` r > 0 (a pipeline with CFG: the teacher's own guidance by default) every sub-step
            takes the teacher's guided velocity, its CFG rule at r on the conditional and the negative-prompt calls, so
            the one-step student bakes in the guidance the teacher is sampled with.
   With ``consistency_renoise_t`` t2 > 0 the same target is also applied at t2 to the one-step samples re-noised
            there (x_one from the current weights without gradient, or with ``consistency_renoise_source=data`` the
            rows' own data; a fresh z'), on the first ``consistency_renoise_fraction`` of the group's rows:
            F(x_t2, t2, c) learns the jump to the reference's ODE endpoint, which the 2-NFE sampler's second query
            (t2 = 0.6) takes. Its reference sub-steps share the one-step target's calls and its rows join the
            generator's gradient pass.
   With ``consistency_bank_size`` N > 0 (7'', frozen reference) the first steps' one-step and re-noised rows fill a bank
            of N rows per worker with their targets (the regression baseline's pair bank); afterwards each step draws
            its generator rows (noise, prompt, data step, target) from it and makes no reference call. The bank is in host
            memory, each distinct prompt's text states kept once.
   total  = lambda_g*L_gen + lambda_p*L_fake + lambda_r*L_real + lambda_c*L_cons
   Two more options of the released code: ``robust_eps`` > 0 makes every term its per-sample Charbonnier
   sqrt(d^2 + eps^2) - eps of the sample's squared error d^2, and ``time_weighting=tan`` weights the rows of
   L_real and L_cons by tan((1 - (t - r)) * pi / 2.5) + 1 (t the row's time, r its target time).

Rows: with ``generator_fraction`` f < 1 the first f of the batch drive steps 1-5 and 7 and the rest is
the anchor (the released code's grouping: about one gradient pass per row); with f = 1 every row does
all of them. The gradient passes go through the network in two calls (the generator, then the fake
branch and the anchor as one concatenated batch); the reference queries (guidance, consistency) run
first, before any graph exists.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from apexdistill.config import ObjectiveConfig
from apexdistill.method.base import Batch, ShiftedObjective, cat_batches, mse, plain_cfg, ramp, register, scalar_metrics
from apexdistill.method.flow import bcast, interpolate, sample_time, velocity_target
from apexdistill.method.twinflow import charbonnier, consistency_displacement, consistency_from_displacement, tan_time_weight


@register
class Apex(ShiftedObjective):
    name = "apex"

    def __init__(self, cfg: ObjectiveConfig) -> None:
        super().__init__(cfg)
        # the anchor's flow matching at t ~ 1 would pull F(z, t0, c) back to the teacher's blurry
        # mean, directly against the generator term: it stops at anchor_t_max
        t_max = min(cfg.time.max, cfg.apex.anchor_t_max)
        self.anchor_time = cfg.time.model_copy(update={"max": t_max, "min": min(cfg.time.min, t_max / 2)})
        self._bank = _TargetBank(cfg.apex.consistency_bank_size)

    @property
    def bank_bytes(self) -> int:
        """Host memory the consistency bank holds (``consistency_bank_size``; 0 without one)."""
        return self._bank.nbytes()

    def bank_fill_steps(self, batch_size: int) -> int:
        """Steps that call the reference before the consistency bank is full (0 without a bank)."""
        p = self.cfg.apex
        if not p.consistency_bank_size or not p.consistency_weight:
            return 0
        gen, _ = self._groups(batch_size)
        return -(-p.consistency_bank_size // (gen.stop - gen.start))

    def gradient_passes(self) -> tuple[float, ...]:
        # the generator pass (its group, fB), then the fake branch (fB) and the anchor (the other rows, or
        # all of them at f = 1) batched together
        p = self.cfg.apex
        f, anchored = p.generator_fraction, p.lambda_r > 0
        if f >= 1.0:
            passes = (1, 2) if anchored else (1, 1)
        else:
            passes = (f, 1.0) if anchored else (f, f)
        if p.consistency_weight > 0 and p.consistency_renoise_t > 0:  # the re-noised rows join the generator's pass
            passes = (passes[0] * (1 + p.consistency_renoise_fraction), *passes[1:])
        return passes

    def loss(self, model: nn.Module, batch: Batch, step: int = 0) -> tuple[Tensor, dict[str, float]]:
        p = self.cfg.apex
        x, c, mask = batch["x"], batch["text"], batch.get("text_mask")
        gen, anchor = self._groups(x.shape[0])
        x_a, c_g, c_a, m_g, m_a = x[anchor], c[gen], c[anchor], _rows(mask, gen), _rows(mask, anchor)
        n = c_g.shape[0]

        lambda_c = p.consistency_weight * (1.0 - ramp(step, 0, p.consistency_decay_steps) if p.consistency_decay_steps else 1.0)
        k = min(n, max(1, round(n * p.consistency_renoise_fraction))) if lambda_c > 0 and p.consistency_renoise_t > 0 else 0
        # 7''. with consistency_bank_size, once its bank is full the one-step rows (noise, prompt, target) come from it
        key = _shape_key(x, c, mask)
        banked = self._bank.draw(key, n, k, x.device) if lambda_c > 0 and self._bank.full(key) else None
        # 1. one-step generator from pure noise (gradient flows through it)
        if banked:
            (z, v_data, d_one, c_g, m_g), renoised = banked
        else:
            z = torch.randn_like(x[gen])
        t0 = torch.full((n,), p.generator_t, device=x.device, dtype=x.dtype)
        # 2. re-noise the detached sample at s
        z2 = torch.randn_like(z)
        s = p.renoise_min + (p.renoise_max - p.renoise_min) * torch.rand(n, device=x.device, dtype=x.dtype)
        # 6. real-data anchor
        z3 = torch.randn_like(x_a)
        t_real = sample_time(x_a.shape[0], self.anchor_time, x.device).to(x.dtype)
        x_real_t = interpolate(x_a, z3, t_real)

        # 6'. and 7'. the targets that need the reference weights come first: those may be swapped into the
        # live parameters (the EMA, the kept teacher), so no graph may exist yet
        target_real = self._real_target(model, x_a, z3, x_real_t, t_real, c_a, m_a) if p.lambda_r > 0 else None
        if not banked:
            v_data = velocity_target(x[gen], z)  # the consistency target's small data step (a random data pairing)
        # the generator pass's inputs: the one-step rows, then (7') the first k of them re-noised to t2
        x_in, t_in, v_in, c_in, m_in = z, t0, v_data, c_g, m_g
        if k:
            if banked:
                x_2, t_2, v_2, d_two, c_k, m_k = renoised
            else:
                c_k, m_k = c_g[:k], _rows(m_g, slice(0, k))
                x_2, t_2, v_2 = self._renoised_points(model, z[:k], x[gen][:k], t0[:k], c_k, m_k)
            x_in, t_in, v_in = torch.cat([z, x_2]), torch.cat([t0, t_2]), torch.cat([v_data, v_2])
            c_in, m_in = torch.cat([c_g, c_k]), cat_batches(m_g, m_k)
        if banked:
            displacement = torch.cat([d_one, d_two]) if k else d_one
        elif lambda_c > 0:  # one batched set of reference sub-steps for all of them
            displacement = self._consistency_displacement(model, x_in, v_in, t_in, c_in, m_in)
            if p.consistency_bank_size:
                self._bank.add(key, (z, v_data, displacement[:n], c_g, m_g), (x_2, t_2, v_2, displacement[n:], c_k, m_k) if k else None)
        else:
            displacement = None

        # The generator output is needed before x_s exists, so the generator pass runs first;
        # the fake-branch and anchor passes then share one batched call.
        v_gen, f_2 = _split(model(x_in, t_in, c_in, m_in), n)
        x_g = (z - bcast(t0, z) * v_gen).detach()
        x_s = interpolate(x_g, z2, s)
        c_fake = self.shift(c_g)

        if p.lambda_r > 0:
            v_fake_s, v_real_x = _split(
                model(torch.cat([x_s, x_real_t]), torch.cat([s, t_real]), torch.cat([c_fake, c_a]), cat_batches(m_g, m_a)), n
            )
        else:  # no anchor: one gradient pass fewer
            v_fake_s, v_real_x = model(x_s, s, c_fake, m_g), None
        with torch.no_grad():  # 3. correction from the two branches at the re-noised point
            v_real_s = model(x_s, s, c_g, m_g)
            correction = (v_fake_s.detach() - v_real_s).clamp(-p.correction_clamp, p.correction_clamp)

        loss_gen = self._error(v_gen, (v_gen - correction).detach()).mean()  # 4.
        loss_fake = self._error(v_fake_s, velocity_target(x_g, z2)).mean()  # 5.
        zero = torch.zeros((), device=x.device)
        loss_real = (self._error(v_real_x, target_real) * self._time_weight(t_real, t_real)).mean() if v_real_x is not None else zero  # 6.
        if displacement is not None:  # 7. the released code's RCGM consistency target on the one-step group
            target_c = consistency_from_displacement(v_gen, displacement[:n], v_data, t0, torch.zeros_like(t0), clamp=p.correction_clamp)
            loss_cons = (self._error(v_gen, target_c) * self._time_weight(t0, torch.zeros_like(t0))).mean()
        else:
            loss_cons = zero
        if k:  # 7'. the same target at consistency_renoise_t on the re-noised rows
            target_2 = consistency_from_displacement(f_2, displacement[n:], v_2, t_2, torch.zeros_like(t_2), clamp=p.correction_clamp)
            loss_cons2 = (self._error(f_2, target_2) * self._time_weight(t_2, torch.zeros_like(t_2))).mean()
            loss_cons = loss_cons + loss_cons2
        lambda_g = p.lambda_g * ramp(step, p.generator_warmup_steps, p.generator_ramp_steps)
        loss = lambda_g * loss_gen + p.lambda_p * loss_fake + p.lambda_r * loss_real + lambda_c * loss_cons
        metrics = scalar_metrics(
            loss=loss,
            loss_gen=loss_gen,
            loss_fake=loss_fake,
            loss_real=loss_real,
            loss_cons=loss_cons,
            correction_abs=correction.abs().mean(),
            lambda_g_eff=lambda_g,
            lambda_c_eff=lambda_c,
            shift_a=self.shift.a,
            shift_b=self.shift.b,
        )
        if k:  # logged only when on
            metrics["loss_cons_renoised"] = float(loss_cons2.detach())
        return loss, metrics

    def _error(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-sample error of a term: the squared error, or its Charbonnier form with ``robust_eps`` > 0: (B,)."""
        eps = self.cfg.apex.robust_eps
        return charbonnier(pred, target, eps) if eps > 0 else mse(pred, target)

    def _time_weight(self, t: Tensor, target_t: Tensor) -> Tensor | float:
        """Per-row weight of a teacher-side term: the released tan weighting, or 1."""
        return tan_time_weight(t, target_t) if self.cfg.apex.time_weighting == "tan" else 1.0

    def _groups(self, n: int) -> tuple[slice, slice]:
        """Rows of the generator/fake group and of the anchor: all rows for both at generator_fraction 1,
        else the first share of the batch and the rest."""
        f = self.cfg.apex.generator_fraction
        if f >= 1.0:
            return slice(0, n), slice(0, n)
        if n < 2:
            raise ValueError(f"objective.apex.generator_fraction={f} splits each batch into a generator and an anchor group: "
                             f"train.batch_size must be at least 2, got {n}")
        k = min(n - 1, max(1, round(n * f)))
        return slice(0, k), slice(k, n)

    def _consistency_displacement(self, model: nn.Module, z: Tensor, v_data: Tensor, t0: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        """D of the consistency target: the reference weights' sub-steps from t0 - delta to 0 (per row)."""
        p = self.cfg.apex
        r = float(p.guidance_ratio or 0.0)
        if r > 0:  # a guided teacher: each sub-step takes the velocity the teacher pipeline samples with (its CFG rule at r)
            neg, neg_mask = self._negative(z.shape[0], c, mask, "objective.apex.guidance_ratio > 0")
            both_c, both_mask = torch.cat([c, neg]), cat_batches(mask, neg_mask)

            def velocity(x_: Tensor, t_: Tensor, _r: Tensor) -> Tensor:
                v_cond, v_uncond = _split(model(torch.cat([x_, x_]), torch.cat([t_, t_]), both_c, both_mask), x_.shape[0])
                return self.guide(v_cond, v_uncond, t_, r)
        else:
            def velocity(x_: Tensor, t_: Tensor, _r: Tensor) -> Tensor:
                return model(x_, t_, c, mask)
        with torch.no_grad(), self._reference(p.consistency_reference, "objective.apex.consistency_weight > 0"):
            return consistency_displacement(velocity, z, v_data, t0, torch.zeros_like(t0), p.consistency_steps,
                                            solver=p.consistency_solver, shift=p.consistency_time_shift)

    def _negative(self, n: int, c: Tensor, mask: Tensor | None, why: str) -> tuple[Tensor, Tensor | None]:
        """The cached negative (unconditional) text states and mask, one row per batch row, in ``c``'s dtype and device."""
        if getattr(self, "negative", None) is None:
            raise RuntimeError(f"{why} needs the cached negative embedding (set_guidance was not called with one)")
        neg, neg_mask = (v.to(c.device) for v in self.negative)
        neg = neg.to(c.dtype).expand(n, -1, -1)
        return neg, (neg_mask.expand(n, -1).to(mask.dtype) if mask is not None else None)

    def _renoised_points(self, model: nn.Module, z: Tensor, x: Tensor, t0: Tensor, c: Tensor, mask: Tensor | None):
        """(x_t2, t2, v): the re-noised rows of 7' and their velocity z' - x_src, x_src the one-step samples of the
        current weights (no gradient) or the rows' data (``consistency_renoise_source``), z' fresh noise."""
        if self.cfg.apex.consistency_renoise_source == "student":
            with torch.no_grad():
                x = z - bcast(t0, z) * model(z, t0, c, mask)
        z2 = torch.randn_like(z)
        t2 = torch.full_like(t0, self.cfg.apex.consistency_renoise_t)
        return interpolate(x, z2, t2), t2, velocity_target(x, z2)

    def _reference(self, source: str, why: str):
        if getattr(self, "reference", None) is None:
            raise RuntimeError(f"{why} needs reference weights (set_guidance was not called)")
        return self.reference(source)

    def _real_target(self, model: nn.Module, x: Tensor, z: Tensor, x_t: Tensor, t: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        """The anchor's target: the data velocity, plus r times the reference model's guidance
        direction at the same noisy point when ``guidance_ratio`` r > 0."""
        target = velocity_target(x, z)
        r = float(self.cfg.apex.guidance_ratio or 0.0)
        if r <= 0:
            return target
        n = x.shape[0]
        neg, neg_mask = self._negative(n, c, mask, "objective.apex.guidance_ratio > 0")
        with torch.no_grad(), self._reference(self.cfg.apex.guidance_reference, "objective.apex.guidance_ratio > 0"):
            v_cond, v_uncond = _split(model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([c, neg]), cat_batches(mask, neg_mask)), n)
            # the teacher's own CFG rule (Qwen-Image's per-token norm rescale, Z-Image's normalisation and truncation):
            # the data velocity moved by what guidance adds to the conditional one
            guided = getattr(self, "guide", plain_cfg)(v_cond, v_uncond, t, r)
        return target + (guided - v_cond).detach()


class _TargetBank:
    """``consistency_bank_size``: the frozen reference's consistency targets kept with their rows (noise, data step,
    displacement, prompt; the re-noised rows apart) and reused once ``size`` one-step rows are in, one bank per row shape
    (buckets). The regression baseline's pair bank, for the consistency target: the first ``size / n`` steps pay the
    reference's calls, the rest none. It lives in host memory (a draw moves its rows to the batch's device), and each
    distinct prompt's text states (with their mask) are kept once, the rows holding an index into them. Not
    checkpointed: a resumed run fills it again."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.one: dict[tuple, list[tuple]] = {}  # (columns..., text index) per shape key
        self.two: dict[tuple, list[tuple]] = {}
        self.texts: dict[tuple, _TextTable] = {}

    def rows(self, key: tuple) -> int:
        return sum(part[0].shape[0] for part in self.one.get(key, []))

    def full(self, key: tuple) -> bool:
        return self.size > 0 and self.rows(key) >= self.size

    def add(self, key: tuple, one: tuple, two: tuple | None) -> None:
        """``one`` and ``two``: (columns..., text, mask) of the one-step and the re-noised rows."""
        if self.rows(key) >= self.size:
            return
        table = self.texts.setdefault(key, _TextTable())
        for bank, part in ((self.one, one), (self.two, two)):
            if part is not None:
                *columns, text, mask = (None if t is None else t.detach().cpu() for t in part)
                bank.setdefault(key, []).append((*columns, table.add(text, mask)))
        if self.rows(key) >= self.size:  # full: one tensor per column from now on, so a draw copies only its rows
            for bank in (self.one, self.two):
                if key in bank:
                    bank[key] = [tuple(torch.cat(col) for col in zip(*bank[key]))]
            table.join()

    def draw(self, key: tuple, n: int, k: int, device: torch.device) -> tuple[tuple, tuple | None]:
        """n one-step and k re-noised rows, drawn uniformly with replacement, as (columns..., text, mask) on ``device``."""
        table = self.texts[key]

        def rows(columns: tuple, count: int) -> tuple:
            idx = torch.randint(0, columns[0].shape[0], (count,))
            *picked, text_idx = (col[idx] for col in columns)
            return tuple(None if t is None else t.to(device) for t in (*picked, *table.rows(text_idx)))

        return rows(self.one[key][0], n), (rows(self.two[key][0], k) if k else None)

    def nbytes(self) -> int:
        """Host memory it holds: the rows' columns and the distinct text states."""
        columns = sum(_bytes(t) for bank in (self.one, self.two) for parts in bank.values() for part in parts for t in part)
        return columns + sum(table.nbytes() for table in self.texts.values())


class _TextTable:
    """A bank's distinct (text states, mask) rows, each kept once (rows are told apart by their bytes)."""

    def __init__(self) -> None:
        self.index: dict[bytes, int] = {}
        self.kept: list[tuple[Tensor, Tensor | None]] = []
        self.text: Tensor | None = None
        self.mask: Tensor | None = None

    def add(self, text: Tensor, mask: Tensor | None) -> Tensor:
        """The table index of each of ``text``'s rows, adding the rows it has not seen."""
        idx = []
        for i in range(text.shape[0]):
            row = (text[i], None if mask is None else mask[i])
            digest = hashlib.blake2b(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in row if t is not None),
                                     digest_size=16).digest()
            if digest not in self.index:
                self.index[digest] = len(self.kept)
                self.kept.append(tuple(None if t is None else t.clone() for t in row))  # not a view of the batch's storage
            idx.append(self.index[digest])
        return torch.tensor(idx, dtype=torch.int64)

    def join(self) -> None:
        self.text = torch.stack([row[0] for row in self.kept])
        self.mask = None if self.kept[0][1] is None else torch.stack([row[1] for row in self.kept])
        self.kept = []

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.text[idx], (None if self.mask is None else self.mask[idx])

    def nbytes(self) -> int:
        return sum(_bytes(t) for t in (self.text, self.mask)) + sum(_bytes(t) for row in self.kept for t in row)


def _bytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _shape_key(x: Tensor, c: Tensor, mask: Tensor | None) -> tuple:
    return tuple(x.shape[1:]), tuple(c.shape[1:]), None if mask is None else tuple(mask.shape[1:])


def _rows(mask: Tensor | None, rows: slice) -> Tensor | None:
    return None if mask is None else mask[rows]


def _split(v: Tensor, n: int) -> tuple[Tensor, Tensor]:
    return v[:n], v[n:]
