"""Math tests of apexdistill.method: exact autograd identities and closed forms on tiny toy models.

Everything runs on the CPU in a few seconds; the diffusers backbones are tested elsewhere.
"""

from __future__ import annotations

import contextlib

import math

import pytest
import torch
from torch import Tensor, nn

from apexdistill.config import build_config
from apexdistill.method.apex_literal import (
    endpoint_weight,
    mix_loss,
    mix_loss_velocity,
    sup_cons_loss,
    velocity_weight,
)
from apexdistill.method.base import build_objective, ramp
from apexdistill.method.ema import EMA
from apexdistill.method.flow import interpolate
from apexdistill.method.sampler import few_step_grid, sample_few_step
from apexdistill.method.shift import ConditionShift
from apexdistill.method.twinflow import MULTI_STEP_MAX_GAP, RCGM_DELTA_T, consistency_target, tan_time_weight

C, H, W = 2, 4, 4  # image shape of the toy batches
TEXT_LEN, TEXT_DIM = 3, 6
D = C * H * W  # elements per sample (mse averages over them)


# ----------------------------------------------------------------------------- toy models


class ToyVelocity(nn.Module):
    """A small conditional velocity net with the backbone signature (accepts target_t)."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.inp = nn.Conv2d(C, hidden, 3, padding=1)
        self.cond = nn.Linear(TEXT_DIM + 2, hidden)
        self.out = nn.Conv2d(hidden, C, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None, target_t: Tensor | None = None) -> Tensor:
        t = t.to(x.dtype).expand(x.shape[0])
        r = t if target_t is None else target_t.to(x.dtype).expand(x.shape[0])
        if text_mask is None:
            pooled = text.mean(1)
        else:
            m = text_mask.to(text.dtype).unsqueeze(-1)
            pooled = (text * m).sum(1) / m.sum(1).clamp_min(1.0)
        emb = self.cond(torch.cat([pooled, t[:, None], r[:, None]], 1))
        return self.out(torch.tanh(self.inp(x) + emb[:, :, None, None]))


class Recorder(nn.Module):
    """Wraps a model and records every call: inputs, output (with retained grad), grad mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[dict] = []

    def forward(self, x, t, text, text_mask=None, target_t=None):
        out = self.model(x, t, text, text_mask, target_t=target_t)
        if out.requires_grad:
            out.retain_grad()
        self.calls.append(dict(x=x, t=t.detach().clone(), text=text.detach().clone(), mask=None if text_mask is None else text_mask.clone(),
                               target_t=target_t, out=out, grad=torch.is_grad_enabled()))
        return out


class ReferenceSwitch(nn.Module):
    """Runs ``live``, or ``ref`` inside ``reference(source)`` (what set_guidance gets); records the sources asked for."""

    def __init__(self, live: nn.Module, ref: nn.Module) -> None:
        super().__init__()
        self.live, self.ref, self.active, self.sources = live, ref, live, []

    def forward(self, *args, **kw):
        return self.active(*args, **kw)

    @contextlib.contextmanager
    def reference(self, source):
        self.sources.append(source)
        self.active = self.ref
        try:
            yield
        finally:
            self.active = self.live


class SignBlind(nn.Module):
    """Ignores the sign of the times, so the negative-time flag of twinflow changes nothing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, t, text, text_mask=None, target_t=None):
        return self.model(x, t.abs(), text, text_mask, target_t=None if target_t is None else target_t.abs())


class ExactFlow(nn.Module):
    """The exact velocity field when the data is the single point x0: v(x, t) = (x - x0)/t.
    Its average velocity toward any earlier time is the same (the paths are straight lines)."""

    def __init__(self, x0: Tensor) -> None:
        super().__init__()
        self.register_buffer("x0", x0)

    def forward(self, x, t, text, text_mask=None, target_t=None):
        t = t.to(x.dtype).expand(x.shape[0]).abs().reshape(-1, 1, 1, 1)
        return (x - self.x0) / t


class BiasPlusText(nn.Module):
    """v = bias + P @ mean(text): a learnable bias plus a fixed condition-dependent offset."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(C, H, W, dtype=torch.float64))
        self.register_buffer("proj", 0.3 * torch.randn(C, TEXT_DIM, dtype=torch.float64))

    def forward(self, x, t, text, text_mask=None, target_t=None):
        offset = text.mean(1) @ self.proj.T
        return self.bias.expand(x.shape[0], -1, -1, -1) + offset[:, :, None, None]


# ----------------------------------------------------------------------------- helpers


def make_batch(n: int = 8, dtype: torch.dtype = torch.float64, same_text: bool = False) -> dict[str, Tensor]:
    text = torch.randn(1 if same_text else n, TEXT_LEN, TEXT_DIM, dtype=dtype).expand(n, -1, -1).clone()
    mask = torch.ones(n, TEXT_LEN)
    mask[::2, -1] = 0  # some padding
    return {"x": torch.randn(n, C, H, W, dtype=dtype).clamp(-1, 1), "text": text, "text_mask": mask}


#: apex's plain form, the library defaults before the recipe became them: no consistency target, every row in every term,
#: a generator warm-up. The unit tests check apex's terms one at a time on it (each test turns on what it checks); the
#: default recipe is checked whole in test_default_apex_is_the_recipe and the recipe guards
PLAIN_APEX = {"lambda_g": 0.2, "generator_warmup_steps": 100, "generator_ramp_steps": 200, "generator_fraction": 1.0,
              "consistency_weight": 0.0, "consistency_solver": "euler", "consistency_time_shift": 1.0,
              "consistency_renoise_t": 0.0, "consistency_renoise_fraction": 1.0, "consistency_renoise_source": "student",
              "consistency_bank_size": 0}


def make_objective(name: str, **sections):
    if name == "apex":
        sections["apex"] = {**PLAIN_APEX, **sections.get("apex", {})}
    cfg = build_config({"objective": {"name": name, **sections}, "model": {"target_time": True}, "train": {"batch_size": 8}})
    return build_objective(cfg.objective)


def grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def loss_and_grads(objective, model: nn.Module, batch, step: int = 0, seed: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, metrics = objective.loss(model, batch, step)
    loss.backward()
    return loss.detach(), metrics, grads(model)


def all_close(a: list[Tensor], b: list[Tensor], **tol) -> bool:
    return all(torch.allclose(x, y, **tol) for x, y in zip(a, b, strict=True))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- Theorem 1 (apex_literal)


def _theorem_inputs():
    model = ToyVelocity().double()
    b = make_batch(6)
    x, c = b["x"], b["text"]
    z = torch.randn_like(x)
    t = torch.linspace(0.05, 0.95, x.shape[0], dtype=torch.float64)
    x_t = interpolate(x, z, t)
    with torch.no_grad():
        v_fake = model(x_t, t, -c)  # a fixed fake velocity (the shifted branch)
    return model, x, z, x_t, t, c, v_fake


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_theorem1_mix_gradient_equals_sup_cons_gradient(lam):
    model, x, z, x_t, t, c, v_fake = _theorem_inputs()

    model.zero_grad()
    l_mix = mix_loss(model(x_t, t, c), x, z, x_t, t, v_fake, lam, endpoint_weight)
    l_mix.backward()
    g_mix = grads(model)

    model.zero_grad()
    l_sc = sup_cons_loss(model(x_t, t, c), x, x_t, t, v_fake, lam, endpoint_weight)
    l_sc.backward()
    g_sc = grads(model)

    assert any(g.abs().max() > 1e-6 for g in g_mix)
    assert all_close(g_mix, g_sc, rtol=1e-10, atol=1e-13)
    if 0 < lam < 1:  # the losses differ by a constant, the gradients do not: the identity is not trivial
        assert not torch.allclose(l_mix, l_sc)


@pytest.mark.parametrize("kind", ["paper", "clamped", "uniform"])
def test_velocity_form_of_mix_loss_is_eq23(kind):
    """The objective's velocity-unit L_mix equals the endpoint form of Eq. 23 with weight w(t)/t^2."""
    model, x, z, x_t, t, c, v_fake = _theorem_inputs()
    v = model(x_t, t, c)
    w_v = lambda tt: velocity_weight(tt, kind, clamp=2.0)  # noqa: E731
    endpoint = mix_loss(v, x, z, x_t, t, v_fake, 0.4, lambda tt: w_v(tt) / tt**2)
    velocity = mix_loss_velocity(v, x, z, x_t, t, v_fake, 0.4, w_v)
    assert torch.allclose(endpoint, velocity, rtol=1e-10)
    if kind == "paper":  # t^3/(1-t) in velocity units is 1/omega(t) = t/(1-t) on endpoints
        assert torch.allclose(velocity_weight(t, "paper") / t**2, endpoint_weight(t), rtol=1e-12)


def test_mix_weights():
    t = torch.tensor([0.0, 0.5, 0.99, 1.0], dtype=torch.float64)
    paper = velocity_weight(t, "paper")
    assert torch.isfinite(paper).all() and paper[-1] > 1e4  # unbounded, guarded at t = 1
    assert paper[1].item() == pytest.approx(0.125 / 0.5)
    assert velocity_weight(t, "clamped", clamp=10.0).max().item() == pytest.approx(10.0)
    assert torch.equal(velocity_weight(t, "uniform"), torch.ones_like(t))


# ----------------------------------------------------------------------------- apex_literal


def test_apex_literal_lam0_is_flow_matching():
    model = ToyVelocity().double()
    batch = make_batch()
    fm = make_objective("fm")
    _, _, g_fm = loss_and_grads(fm, model, batch)

    literal = make_objective("apex_literal", apex_literal={"lam": 0.0, "lambda_p": 0.0, "weight": "uniform"})
    _, _, g_lit = loss_and_grads(literal, model, batch)
    assert all_close(g_fm, g_lit, rtol=1e-12, atol=1e-15)

    # warm-up: the adversarial terms are off whatever lam and lambda_p say
    warm = make_objective("apex_literal", apex_literal={"lam": 0.7, "lambda_p": 1.0, "weight": "uniform", "warmup_steps": 5})
    _, metrics, g_warm = loss_and_grads(warm, model, batch, step=2)
    assert metrics["lam_eff"] == 0.0 and metrics["lambda_p_eff"] == 0.0
    assert all_close(g_fm, g_warm, rtol=1e-12, atol=1e-15)

    # control: the time weighting of L_mix changes the gradient, so the comparison above can fail
    weighted = make_objective("apex_literal", apex_literal={"lam": 0.0, "lambda_p": 0.0, "weight": "clamped"})
    _, _, g_w = loss_and_grads(weighted, model, batch)
    assert not all_close(g_fm, g_w, rtol=1e-6)


def test_apex_literal_ramp():
    assert [ramp(s, 3, 4) for s in (0, 2, 3, 4, 6, 100)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert ramp(0, 0, 0) == 1.0
    obj = make_objective("apex_literal", apex_literal={"lam": 0.8, "lambda_p": 2.0, "warmup_steps": 3, "ramp_steps": 4})
    _, metrics = obj.loss(ToyVelocity().double(), make_batch(), step=4)
    assert metrics["lam_eff"] == pytest.approx(0.4) and metrics["lambda_p_eff"] == pytest.approx(1.0)


@pytest.mark.parametrize("detach", [True, False])
def test_apex_literal_fake_detach(detach):
    """With fake_detach the fake branch's input x_fake carries no gradient back to F(x_t, t, c)."""
    model = Recorder(ToyVelocity().double())
    obj = make_objective("apex_literal", apex_literal={"fake_detach": detach, "lambda_e": 0.0, "lam": 0.5})
    loss, _ = obj.loss(model, make_batch())
    loss.backward()
    real_call, fake_query, fake_branch = model.calls  # F(x_t,t,c); sg F(x_t,t,c_fake); F(x_t_fake,t,c_fake)
    assert not fake_query["grad"]
    assert fake_branch["x"].requires_grad is (not detach)
    grad_to_real = real_call["out"].grad  # L_mix has weight 0: only a path through x_fake reaches here
    if detach:
        assert grad_to_real is None or torch.count_nonzero(grad_to_real) == 0
    else:
        assert grad_to_real.abs().max() > 0


@pytest.mark.parametrize("lambda_p", [1.0, 0.0])
def test_apex_literal_mix_on_generated_is_eq23_at_the_generated_point(lambda_p):
    """mix_on=generated: L_mix is Eq. 23's endpoint loss at Eq. 12's point t*z + (1-t)*x_fake, v_fake queried there,
    and its gradient reaches the generated sample (the network's input there), which the written reading never does."""
    lam = 0.5
    model = Recorder(ToyVelocity().double())
    batch = make_batch()
    obj = make_objective("apex_literal", apex_literal={"mix_on": "generated", "lam": lam, "lambda_p": lambda_p, "weight": "paper"})
    loss, metrics = obj.loss(model, batch)
    loss.backward()
    # F(x_t,t,c); F(x_t_fake,t,c_fake) (the fake branch, whose output is also Eq. 14's v_fake there; without the fake
    # branch, that query alone, without gradient); F(x_t_fake,t,c)
    real, fake, mixed = model.calls
    assert fake["grad"] is (lambda_p > 0)
    x, t = batch["x"], real["t"]
    tb = t.reshape(-1, 1, 1, 1)
    z = (real["x"] - (1 - tb) * x) / tb
    x_fake = real["x"] - tb * real["out"].detach()  # Eq. 11
    point = tb * z + (1 - tb) * x_fake  # Eq. 12's point
    assert torch.allclose(mixed["x"], point, atol=1e-12) and torch.allclose(fake["x"], point, atol=1e-12)
    assert torch.equal(mixed["text"], batch["text"]) and not torch.equal(fake["text"], batch["text"])  # c, then c_fake
    v_fake = fake["out"].detach()
    target = (1 - lam) * x + lam * (point - tb * v_fake)  # Eq. 22
    pred = point - tb * mixed["out"].detach()
    weight = t / (1 - t)  # 1/omega(t), Eq. 23 with weight=paper
    expected = (weight * (pred - target).pow(2).flatten(1).mean(1)).mean()
    assert metrics["loss_mix"] == pytest.approx(expected.item(), rel=1e-9)
    assert mixed["x"].requires_grad and mixed["grad"]  # the gradient flows into the generated sample
    assert real["out"].grad.abs().max() > 0  # and through it back to the one-step output F(x_t, t, c)
    # control: as written, L_mix sits at the real point and no network input carries a gradient
    written = Recorder(ToyVelocity().double())
    w_obj = make_objective("apex_literal", apex_literal={"lam": lam, "lambda_p": 0.0, "weight": "paper"})
    w_obj.loss(written, batch)[0].backward()
    assert not any(c["x"].requires_grad for c in written.calls)
    assert obj.gradient_passes() == ((1, 1, 1) if lambda_p > 0 else (1, 1))


def test_apex_literal_learnable_shift_gets_gradient():
    obj = make_objective("apex_literal", shift={"learnable": True, "lr_mult": 3.0})
    (group,) = obj.param_groups()
    assert group["lr_mult"] == 3.0 and {id(p) for p in group["params"]} == {id(obj.shift.a), id(obj.shift.b)}
    loss, _ = obj.loss(ToyVelocity(), make_batch(dtype=torch.float32))
    loss.backward()
    assert obj.shift.a.grad.abs() > 0 and obj.shift.b.grad.abs() > 0
    assert make_objective("apex_literal").param_groups() == []


# ----------------------------------------------------------------------------- identity shift


IDENTITY = {"a": 1.0, "b": 0.0}


@pytest.mark.parametrize("name", ["apex", "apex_literal", "twinflow"])
def test_identity_shift_is_identity(name):
    obj = make_objective(name, shift=IDENTITY)
    c = torch.randn(4, TEXT_LEN, TEXT_DIM)
    assert torch.equal(obj.shift(c), c)
    assert not torch.equal(make_objective(name).shift(c), c)  # the default (a=-1) is not


def test_identity_shift_apex_correction_is_zero():
    model = ToyVelocity().double()
    _, metrics = make_objective("apex", shift=IDENTITY).loss(model, make_batch())
    assert metrics["correction_abs"] == 0.0
    _, metrics = make_objective("apex").loss(model, make_batch())
    assert metrics["correction_abs"] > 1e-4


def test_identity_shift_apex_literal_mix_target_is_self():
    """With c_fake = c, v_fake = sg(F) and L_mix(lam) = (1-lam)^2 * L_mix(0) on the same draw."""
    model, batch = ToyVelocity().double(), make_batch()

    def loss_mix(lam: float, shift: dict) -> float:
        torch.manual_seed(1)
        obj = make_objective("apex_literal", shift=shift, apex_literal={"lam": lam})
        return obj.loss(model, batch)[1]["loss_mix"]

    assert loss_mix(0.5, IDENTITY) == pytest.approx(0.25 * loss_mix(0.0, IDENTITY), rel=1e-10)
    assert loss_mix(0.5, {"a": -1.0, "b": 0.0}) != pytest.approx(0.25 * loss_mix(0.0, IDENTITY), rel=1e-3)


def test_identity_shift_twinflow_fake_branch_is_real_branch():
    rec = Recorder(ToyVelocity().double())
    batch = make_batch()
    _, metrics = make_objective("twinflow", shift=IDENTITY).loss(SignBlind(rec), batch)
    main = next(call for call in rec.calls if call["grad"])
    assert torch.equal(main["text"], batch["text"])  # the fake rows see the real condition
    assert metrics["correction_abs"] == 0.0
    _, metrics = make_objective("twinflow").loss(SignBlind(rec), batch)
    assert metrics["correction_abs"] > 1e-4


# ----------------------------------------------------------------------------- apex

NO_GENERATOR_WARMUP = {"generator_warmup_steps": 0, "generator_ramp_steps": 0}


def test_apex_guidance_ratio_guides_the_anchor_with_the_reference_weights():
    """guidance_ratio r: the anchor's target is (z - x) + r*(v_ref(x_t, t, c) - v_ref(x_t, t, c_neg)), both
    velocities from the reference weights (set_guidance's context) without gradient, at the anchor's point."""
    r, n = 2.0, 8
    obj = make_objective("apex", apex={"guidance_ratio": r, "lambda_g": 0.0, "lambda_p": 0.0, "lambda_r": 1.0})
    live, ref = ToyVelocity().double(), ToyVelocity().double()
    switch = ReferenceSwitch(live, ref)
    neg, neg_mask = torch.randn(1, TEXT_LEN, TEXT_DIM, dtype=torch.float64), torch.ones(1, TEXT_LEN)
    obj.set_guidance((neg, neg_mask), switch.reference)
    model, batch = Recorder(switch), make_batch(n)
    loss, _ = obj.loss(model, batch, step=0)
    assert switch.sources == ["auto"]
    guided = [c for c in model.calls if not c["grad"] and c["x"].shape[0] == 2 * n and torch.equal(c["text"][n:], neg.expand(n, -1, -1))]
    assert len(guided) == 1, "one batched no-gradient pass for v_cond and v_uncond"
    x_t, t = guided[0]["x"][:n], guided[0]["t"][:n]
    assert torch.equal(guided[0]["text"][:n], batch["text"]) and torch.equal(t, guided[0]["t"][n:])
    with torch.no_grad():
        guide = ref(x_t, t, batch["text"], batch["text_mask"]) - ref(x_t, t, neg.expand(n, -1, -1), neg_mask.expand(n, -1))
        live_guide = live(x_t, t, batch["text"], batch["text_mask"]) - live(x_t, t, neg.expand(n, -1, -1), neg_mask.expand(n, -1))
    z = (x_t - (1 - t)[:, None, None, None] * batch["x"]) / t[:, None, None, None]
    expected = (live(x_t, t, batch["text"], batch["text_mask"]) - ((z - batch["x"]) + r * guide)).pow(2).flatten(1).mean(1).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-9)
    from_live = (live(x_t, t, batch["text"], batch["text_mask"]) - ((z - batch["x"]) + r * live_guide)).pow(2).flatten(1).mean(1).mean()
    assert abs(float(loss) - float(from_live)) > 1e-6, "the guidance must come from the reference weights, not the live ones"
    assert switch.active is live


def test_apex_guidance_ratio_needs_reference_weights():
    with pytest.raises(Exception, match="frozen base|EMA"):
        build_config({}, ["objective.apex.guidance_ratio=1", "train.ema_decay=0"])
    obj = make_objective("apex", apex={"guidance_ratio": 1.0})
    with pytest.raises(RuntimeError, match="set_guidance"):
        obj.loss(ToyVelocity().double(), make_batch(), step=0)


def test_apex_generator_warmup_and_ramp():
    obj = make_objective("apex", apex={"generator_warmup_steps": 10, "generator_ramp_steps": 10, "lambda_g": 0.4})
    model, batch = ToyVelocity().double(), make_batch()
    assert obj.loss(model, batch, step=3)[1]["lambda_g_eff"] == 0.0
    assert obj.loss(model, batch, step=14)[1]["lambda_g_eff"] == pytest.approx(0.2)
    assert obj.loss(model, batch, step=50)[1]["lambda_g_eff"] == pytest.approx(0.4)


def test_apex_generator_moves_sample_along_correction():
    """One SGD step on L_gen moves x_g = z - t0*F(z, t0, c) by +t0*lr*2*G/D, G = v_fake - v_real."""
    model = BiasPlusText()
    batch = make_batch(4, same_text=True)
    obj = make_objective("apex", apex={"lambda_g": 1.0, "lambda_p": 0.0, "lambda_r": 0.0, **NO_GENERATOR_WARMUP})
    t0, lr = obj.cfg.apex.generator_t, 0.5
    c = batch["text"]
    with torch.no_grad():  # hand-computed correction: the bias cancels, only the condition matters
        G = (model(batch["x"], None, -c) - model(batch["x"], None, c)).clamp(-1, 1)
        z = torch.randn_like(batch["x"])
        x_before = z - t0 * model(z, None, c)
    assert G.abs().max() > 0.05

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss, metrics = obj.loss(model, batch)
    assert metrics["loss_gen"] == pytest.approx(G.pow(2).mean().item(), rel=1e-10)
    loss.backward()
    opt.step()
    with torch.no_grad():
        moved = (z - t0 * model(z, None, c)) - x_before
    assert torch.allclose(moved, t0 * lr * 2 * G / D, rtol=1e-10)
    assert (moved * G).sum() > 0  # toward the real flow, away from the fake one


def test_apex_no_gradient_through_correction_or_fake_target():
    rec = Recorder(ToyVelocity().double())
    obj = make_objective("apex", apex=NO_GENERATOR_WARMUP)
    p = obj.cfg.apex
    batch = make_batch()
    n = batch["x"].shape[0]
    loss, _ = obj.loss(rec, batch)
    loss.backward()
    gen, fake_and_real, real_at_xs = rec.calls
    assert gen["grad"] and fake_and_real["grad"] and not real_at_xs["grad"]
    assert not real_at_xs["out"].requires_grad

    v_gen, v_fake_s = gen["out"], fake_and_real["out"][:n]
    correction = (v_fake_s.detach() - real_at_xs["out"]).clamp(-p.correction_clamp, p.correction_clamp)
    # only L_gen reaches the generator output, with a constant-weight (GAN-form) gradient
    assert torch.allclose(v_gen.grad, 2 * p.lambda_g * correction / (n * D), rtol=1e-10, atol=1e-14)

    # the fake branch is pulled toward z' - sg(x_g) and nothing else
    t0 = p.generator_t
    x_g = gen["x"] - t0 * v_gen.detach()
    s = fake_and_real["t"][:n].reshape(-1, 1, 1, 1)
    z2 = (fake_and_real["x"][:n] - (1 - s) * x_g) / s
    expected = 2 * p.lambda_p * (v_fake_s.detach() - (z2 - x_g)) / (n * D)
    assert torch.allclose(fake_and_real["out"].grad[:n], expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("solver,calls_per_step", [("euler", 1), ("midpoint", 2)])
def test_apex_consistency_target_is_rcgm_from_the_reference_weights(solver, calls_per_step):
    """consistency_weight: F(z, t0, c) is pulled to F - clamp(R), R = (t0*F - D)/delta - (z - x), D the
    reference weights' K sub-steps of the solver from (z - delta*(z - x), t0 - delta) to 0, computed before
    any graph."""
    from apexdistill.method.twinflow import DISPLACEMENT_SOLVERS, RCGM_DELTA_T

    steps, n = 3, 8
    obj = make_objective("apex", apex={"consistency_weight": 1.0, "consistency_steps": steps, "consistency_solver": solver,
                                       "lambda_g": 0.0, "lambda_p": 0.0, "lambda_r": 0.0, **NO_GENERATOR_WARMUP})
    live, ref = ToyVelocity().double(), ToyVelocity().double()
    switch = ReferenceSwitch(live, ref)
    obj.set_guidance(None, switch.reference)
    rec, batch = Recorder(switch), make_batch(n)
    loss, metrics = obj.loss(rec, batch, step=0)
    assert switch.sources == ["frozen"] and switch.active is live
    k = steps * calls_per_step
    reference_calls = [c for c in rec.calls if not c["grad"]][:k]
    assert rec.calls[:k] == reference_calls, "the reference sub-steps run before the generator pass builds a graph"
    gen = rec.calls[k]
    assert gen["grad"] and torch.allclose(gen["t"], torch.full((n,), obj.cfg.apex.generator_t, dtype=torch.float64))
    z, t0 = gen["x"], gen["t"]
    v = z - batch["x"]
    d = DISPLACEMENT_SOLVERS[solver](lambda x_, t_, _r: ref(x_, t_, batch["text"], batch["text_mask"]), z - RCGM_DELTA_T * v,
                                     t0 - RCGM_DELTA_T, torch.zeros_like(t0), steps)
    with torch.no_grad():
        f = live(z, t0, batch["text"], batch["text_mask"])
    residual = ((t0.reshape(-1, 1, 1, 1) * f - d) / RCGM_DELTA_T - v).clamp(-1, 1)
    assert float(loss.detach()) == pytest.approx(float(residual.pow(2).flatten(1).mean(1).mean()), rel=1e-9)
    assert metrics["loss_cons"] == pytest.approx(float(loss.detach()), rel=1e-9)
    with pytest.raises(RuntimeError, match="consistency_weight"):
        make_objective("apex", apex={"consistency_weight": 1.0}).loss(ToyVelocity().double(), make_batch(n))


@pytest.mark.parametrize("family", ["sana", "qwenimage"])
def test_apex_guided_consistency_target_is_the_family_cfg_of_the_reference_calls(family):
    """guidance_ratio r > 0 (a pipeline with CFG): every sub-step of the consistency target takes the teacher's guided
    velocity, Family.combine_cfg at the scale of r applied to the reference's conditional and negative-prompt calls at
    the same points (one batched call each), so the student learns the field the teacher pipeline samples with.
    Qwen-Image's rule (per-token norm rescale) is not plain CFG, so the family's own rule is what is checked."""
    from apexdistill.method.twinflow import DISPLACEMENT_SOLVERS, RCGM_DELTA_T
    from apexdistill.models.family import get_family

    steps, n, r = 2, 8, 3.0
    fam = get_family(family)
    obj = make_objective("apex", apex={"guidance_ratio": r, "guidance_reference": "frozen", "consistency_weight": 1.0,
                                       "consistency_steps": steps, "consistency_solver": "midpoint", "lambda_g": 0.0,
                                       "lambda_p": 0.0, "lambda_r": 0.0, **NO_GENERATOR_WARMUP})
    live, ref = ToyVelocity().double(), ToyVelocity().double()
    switch = ReferenceSwitch(live, ref)
    neg, neg_mask = torch.randn(1, TEXT_LEN, TEXT_DIM, dtype=torch.float64), torch.ones(1, TEXT_LEN)
    obj.set_guidance((neg, neg_mask), switch.reference, guide=fam.guided_velocity)
    rec, batch = Recorder(switch), make_batch(n)
    text, mask = batch["text"], batch["text_mask"]
    loss, metrics = obj.loss(rec, batch, step=0)
    reference_calls = [c for c in rec.calls if not c["grad"]][: 2 * steps]
    assert rec.calls[: 2 * steps] == reference_calls, "the guided sub-steps run before any graph"
    for call in reference_calls:  # the conditional and the negative prompt at the same points, in one call
        assert call["x"].shape[0] == 2 * n and torch.equal(call["x"][:n], call["x"][n:]) and torch.equal(call["t"][:n], call["t"][n:])
        assert torch.equal(call["text"][:n], text) and torch.equal(call["text"][n:], neg.expand(n, -1, -1))
    gen = rec.calls[2 * steps]
    z, t0, v = gen["x"], gen["t"], gen["x"] - batch["x"]

    def guided(x_, t_, _r):
        cond = ref(x_, t_, text, mask)
        uncond = ref(x_, t_, neg.expand(n, -1, -1), neg_mask.expand(n, -1))
        return fam.combine_cfg(cond, uncond, fam.guidance_scale_of_ratio(r), t_)

    with torch.no_grad():
        d = DISPLACEMENT_SOLVERS["midpoint"](guided, z - RCGM_DELTA_T * v, t0 - RCGM_DELTA_T, torch.zeros_like(t0), steps)
        plain = DISPLACEMENT_SOLVERS["midpoint"](lambda x_, t_, _r: ref(x_, t_, text, mask), z - RCGM_DELTA_T * v,
                                                 t0 - RCGM_DELTA_T, torch.zeros_like(t0), steps)
        f = live(z, t0, text, mask)

    def expected(displacement):
        residual = ((t0.reshape(-1, 1, 1, 1) * f - displacement) / RCGM_DELTA_T - v).clamp(-1, 1)
        return float(residual.pow(2).flatten(1).mean(1).mean())

    assert float(loss.detach()) == pytest.approx(expected(d), rel=1e-9)
    assert abs(float(loss.detach()) - expected(plain)) > 1e-6, "the target must be the guided one, not the conditional"


@pytest.mark.parametrize("source,fraction", [("student", 1.0), ("data", 0.5)])
def test_apex_renoised_consistency_targets_the_reference_jump_from_the_renoised_rows(source, fraction):
    """consistency_renoise_t t2: the first fraction of the one-step rows, re-noised to t2 from the current weights'
    one-step samples (no gradient) or from the rows' data, get the same RCGM target from t2 to 0. Their reference
    sub-steps share the one-step target's calls (before any graph) and their rows join the generator's gradient
    pass; loss_cons adds the term."""
    from apexdistill.method.twinflow import DISPLACEMENT_SOLVERS, RCGM_DELTA_T

    steps, n, t2 = 2, 8, 0.6
    k = round(n * fraction)
    obj = make_objective("apex", apex={"consistency_weight": 1.0, "consistency_steps": steps, "consistency_solver": "midpoint",
                                       "consistency_renoise_t": t2, "consistency_renoise_fraction": fraction,
                                       "consistency_renoise_source": source, "lambda_g": 0.0, "lambda_p": 0.0, "lambda_r": 0.0,
                                       **NO_GENERATOR_WARMUP})
    live, ref = ToyVelocity().double(), ToyVelocity().double()
    switch = ReferenceSwitch(live, ref)
    obj.set_guidance(None, switch.reference)
    rec, batch = Recorder(switch), make_batch(n)
    text, mask = batch["text"], batch["text_mask"]
    loss, metrics = obj.loss(rec, batch, step=0)
    assert switch.sources == ["frozen"] and switch.active is live, "one reference context for both targets"
    extra = 1 if source == "student" else 0  # the no-gradient one-step pass over the k rows
    first_grad = next(i for i, c in enumerate(rec.calls) if c["grad"])
    assert first_grad == extra + 2 * steps, "the one-step pass and the shared reference sub-steps come before any graph"
    assert all(c["x"].shape[0] == n + k for c in rec.calls[extra:first_grad])
    gen = rec.calls[first_grad]
    assert gen["x"].shape[0] == n + k and sum(c["grad"] for c in rec.calls) == 2  # the generator pass (+ re-noised rows), fake
    t_gen = torch.cat([torch.full((n,), obj.cfg.apex.generator_t), torch.full((k,), t2)]).double()
    assert torch.allclose(gen["t"], t_gen)
    z, t0, x_2 = gen["x"][:k], gen["t"][:k], gen["x"][n:]
    if source == "student":
        assert not rec.calls[0]["grad"] and torch.equal(rec.calls[0]["x"], z)
        with torch.no_grad():
            x_src = z - t0.reshape(-1, 1, 1, 1) * live(z, t0, text[:k], mask[:k])
    else:
        x_src = batch["x"][:k]
    z2 = (x_2 - (1 - t2) * x_src) / t2  # x_t2 = (1 - t2)*x_src + t2*z'
    assert float(z2.std()) == pytest.approx(1.0, abs=0.35) and not torch.allclose(z2, z)
    v = z2 - x_src
    t_2 = torch.full((k,), t2, dtype=torch.float64)
    d = DISPLACEMENT_SOLVERS["midpoint"](lambda x_, t_, _r: ref(x_, t_, text[:k], mask[:k]), x_2 - RCGM_DELTA_T * v,
                                        t_2 - RCGM_DELTA_T, torch.zeros_like(t_2), steps)
    with torch.no_grad():
        f = live(x_2, t_2, text[:k], mask[:k])
    residual = ((t2 * f - d) / RCGM_DELTA_T - v).clamp(-1, 1)
    assert metrics["loss_cons_renoised"] == pytest.approx(float(residual.pow(2).flatten(1).mean(1).mean()), rel=1e-9)
    assert metrics["loss_cons"] == pytest.approx(float(loss.detach()), rel=1e-9)
    assert metrics["loss_cons"] > metrics["loss_cons_renoised"] > 0
    assert obj.gradient_passes() == (1 + fraction, 1)  # the generator with the re-noised rows, the fake branch (no anchor)


def test_apex_robust_loss_is_the_per_sample_charbonnier_of_every_term():
    """robust_eps (the released code's robust loss): each term is the mean over samples of sqrt(d^2 + eps^2) - eps,
    d^2 the sample's squared error, from the same network outputs as the plain terms."""
    eps = 0.05
    rec, batch = Recorder(ToyVelocity().double()), make_batch()
    n = batch["x"].shape[0]
    obj = make_objective("apex", apex={"robust_eps": eps, **NO_GENERATOR_WARMUP})
    _, metrics = obj.loss(rec, batch)
    gen, fake_and_real, real_at_xs = rec.calls
    v_gen, v_fake_s, v_real_x = gen["out"].detach(), fake_and_real["out"][:n].detach(), fake_and_real["out"][n:].detach()
    p = obj.cfg.apex

    def robust(d2):
        return float(((d2 + eps**2).sqrt() - eps).mean())

    correction = (v_fake_s - real_at_xs["out"]).clamp(-p.correction_clamp, p.correction_clamp)
    assert metrics["loss_gen"] == pytest.approx(robust(correction.pow(2).flatten(1).mean(1)), rel=1e-9)
    x_g = gen["x"] - p.generator_t * v_gen
    s = fake_and_real["t"][:n].reshape(-1, 1, 1, 1)
    z2 = (fake_and_real["x"][:n] - (1 - s) * x_g) / s
    assert metrics["loss_fake"] == pytest.approx(robust((v_fake_s - (z2 - x_g)).pow(2).flatten(1).mean(1)), rel=1e-8)
    t = fake_and_real["t"][n:].reshape(-1, 1, 1, 1)
    z3 = (fake_and_real["x"][n:] - (1 - t) * batch["x"]) / t
    assert metrics["loss_real"] == pytest.approx(robust((v_real_x - (z3 - batch["x"])).pow(2).flatten(1).mean(1)), rel=1e-8)


def test_apex_tan_time_weighting_scales_the_teacher_side_terms_by_their_jump():
    """time_weighting=tan on the recipe's terms, same noise: the anchor's instantaneous rows (r = t) weigh
    tan(pi/2.5) + 1 = 4.0777, the one-step consistency rows (0.999 -> 0) 1.0013, the re-noised ones (0.6 -> 0)
    1.5498; the generator and fake-branch terms are left alone."""
    recipe = {"consistency_weight": 1.0, "consistency_steps": 2, "consistency_solver": "midpoint", "generator_fraction": 0.5,
              "consistency_renoise_t": 0.6, "consistency_renoise_source": "data", "consistency_renoise_fraction": 0.5,
              "lambda_g": 1.0, **NO_GENERATOR_WARMUP}
    runs = {}
    for weighting in ("none", "tan"):
        obj = make_objective("apex", apex={**recipe, "time_weighting": weighting})
        torch.manual_seed(0)  # the same weights, batch and noise in both runs
        live, ref = ToyVelocity().double(), ToyVelocity().double()
        switch = ReferenceSwitch(live, ref)
        obj.set_guidance(None, switch.reference)
        runs[weighting] = obj.loss(switch, make_batch())[1]
    plain, tan = runs["none"], runs["tan"]
    assert tan["loss_real"] == pytest.approx(4.0777 * plain["loss_real"], rel=1e-4)
    assert tan["loss_cons_renoised"] == pytest.approx(1.5498 * plain["loss_cons_renoised"], rel=1e-4)
    one_step = plain["loss_cons"] - plain["loss_cons_renoised"]
    assert tan["loss_cons"] - tan["loss_cons_renoised"] == pytest.approx(1.0013 * one_step, rel=1e-4)
    assert tan["loss_gen"] == pytest.approx(plain["loss_gen"], rel=1e-12) and tan["loss_fake"] == pytest.approx(plain["loss_fake"], rel=1e-12)


def test_apex_generator_fraction_splits_the_batch_into_generator_and_anchor_rows():
    rec, batch = Recorder(ToyVelocity().double()), make_batch(8)
    obj = make_objective("apex", apex={"generator_fraction": 0.25, **NO_GENERATOR_WARMUP})
    loss, _ = obj.loss(rec, batch)
    gen, fake_and_real, real_at_xs = rec.calls
    assert gen["x"].shape[0] == 2 and real_at_xs["x"].shape[0] == 2 and fake_and_real["x"].shape[0] == 8
    assert torch.equal(gen["text"], batch["text"][:2]) and torch.equal(real_at_xs["text"], batch["text"][:2])
    assert torch.equal(fake_and_real["text"][2:], batch["text"][2:]), "the anchor takes the other six rows, true condition"
    assert torch.equal(fake_and_real["text"][:2], obj.shift(batch["text"][:2]))
    x_t, t = fake_and_real["x"][2:], fake_and_real["t"][2:].reshape(-1, 1, 1, 1)
    z3 = (x_t - (1 - t) * batch["x"][2:]) / t  # the anchor interpolates the anchor rows' own data
    assert torch.isfinite(z3).all() and float(z3.std()) > 0.5
    loss.backward()
    with pytest.raises(ValueError, match="generator_fraction"):
        obj.loss(rec, make_batch(1))


# ----------------------------------------------------------------------------- twinflow


def test_twinflow_groups_and_flags():
    rec = Recorder(ToyVelocity().double())
    steps = 3
    obj = make_objective("twinflow", twinflow={"consistency_steps": steps})
    batch = make_batch()
    n = batch["x"].shape[0] // 4
    obj.loss(rec, batch)

    grad_calls = [call for call in rec.calls if call["grad"]]
    assert len(grad_calls) == 1 and len(rec.calls) == steps + 3  # fake samples, main, RCGM sub-steps, rectify
    generate = rec.calls[0]
    assert torch.all(generate["t"] == 1) and torch.all(generate["target_t"] == 0)

    main = grad_calls[0]
    t, r, text = main["t"], main["target_t"], main["text"]
    one, multi, any_, fake = (slice(i * n, (i + 1) * n) for i in range(4))
    assert torch.all(t[one] == 1) and torch.all(r[one] == 0)
    assert torch.all(t[multi] - r[multi] >= 0) and torch.all(t[multi] - r[multi] <= MULTI_STEP_MAX_GAP * t[multi])
    assert torch.all(r[any_] >= 0) and torch.all(r[any_] <= t[any_])
    assert torch.all(t[fake] < 0) and torch.equal(r[fake], t[fake])  # the negative-time flag
    assert torch.equal(text[fake], -batch["text"][fake]) and torch.equal(text[:3 * n], batch["text"][:3 * n])

    rectify = rec.calls[-1]  # fake branch (flagged, shifted) then real branch at the same re-noised points
    s_fake, s_real = rectify["t"].chunk(2)
    assert torch.all(s_fake < 0) and torch.equal(s_fake, -s_real) and torch.equal(rectify["target_t"], rectify["t"])
    c_fake, c_real = rectify["text"].chunk(2)
    assert torch.equal(c_fake, -batch["text"][one]) and torch.equal(c_real, batch["text"][one])


def test_twinflow_target_guidance_queries_zero_condition():
    rec = Recorder(ToyVelocity().double())
    batch = make_batch()
    n = batch["x"].shape[0] // 4
    _, metrics = make_objective("twinflow", twinflow={"target_guidance": 2.0, "consistency_steps": 1}).loss(rec, batch)
    assert len(rec.calls) == 5  # fake samples, main, CFG (cond + uncond), 1 RCGM sub-step, rectify
    cfg_call = rec.calls[2]
    cond, uncond = cfg_call["text"].chunk(2)
    assert torch.equal(cond, batch["text"][: 3 * n]) and torch.count_nonzero(uncond) == 0
    assert torch.equal(cfg_call["target_t"], cfg_call["t"])  # instantaneous velocities
    assert not cfg_call["grad"]


def test_twinflow_rectify_moves_one_step_sample_along_correction():
    """The rectify term's gradient moves x_one = z - F(z, 1, c) along +G, G = v_fake - v_real."""
    model, batch = BiasPlusText(), make_batch(8, same_text=True)
    c = batch["text"]
    eps, weight = 1e-3, 0.5
    with torch.no_grad():  # the model ignores x and the time sign: G is fixed by the condition
        G = (model(batch["x"], None, -c) - model(batch["x"], None, c)).clamp(-1, 1)[0]

    def bias_grad(rectify_weight: float) -> Tensor:
        obj = make_objective("twinflow", twinflow={"rectify_weight": rectify_weight, "robust_eps": eps})
        return loss_and_grads(obj, model, batch, seed=3)[2][0]

    from_rectify = bias_grad(weight) - bias_grad(0.0)  # same draws: only the rectify term differs
    expected = weight * G / (D * (G.pow(2).mean() + eps**2).sqrt())  # d/dF of sqrt(mse(F, sg(F - G)) + eps^2)
    assert torch.allclose(from_rectify, expected, rtol=1e-8)
    # a descent step changes F by -lr*grad, so x_one = z - F moves by +lr*grad: along +G
    assert (from_rectify * G).sum() > 0


def test_twinflow_batch_not_divisible_by_4():
    obj = make_objective("twinflow")
    assert obj.batch_multiple == 4
    with pytest.raises(ValueError, match="multiple of 4"):
        obj.loss(ToyVelocity().double(), make_batch(6))


def test_twinflow_refuses_learnable_shift():
    with pytest.raises(ValueError, match="shift.learnable"):
        make_objective("twinflow", shift={"learnable": True})


def test_consistency_target_closed_form():
    """Constant model velocity a: a consistent F = a is its own target; an error e on F comes back
    as the residual (t - r)/delta_t * e (clamped), and short jumps fall back to flow matching."""
    a = torch.full((3, C, H, W), 0.3, dtype=torch.float64)
    velocity = lambda x, t, r: a[: x.shape[0]]  # noqa: E731
    x_t = torch.randn(3, C, H, W, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.4], dtype=torch.float64)
    r = torch.tensor([0.1, 0.3, 0.4 - RCGM_DELTA_T / 2], dtype=torch.float64)
    assert torch.allclose(consistency_target(velocity, a, a, x_t, t, r, steps=2), a, atol=1e-12)

    e = 1e-4
    target = consistency_target(velocity, a + e, a, x_t, t, r, steps=2)
    expected_residual = torch.tensor([(0.8 / RCGM_DELTA_T) * e, (0.2 / RCGM_DELTA_T) * e, e], dtype=torch.float64)
    assert torch.allclose((a + e - target)[:, 0, 0, 0], expected_residual, rtol=1e-6)
    big = consistency_target(velocity, a + 1.0, a, x_t, t, r, steps=2)  # residuals clamp to 1
    assert torch.allclose(big, a, atol=1e-12)


def test_displacement_solvers_on_a_linear_field():
    """dx/dt = a*x from t to r has x_r = x_t*exp(-a*(t - r)): Euler's error falls about 2x per doubling of the
    sub-steps (first order), the midpoint's about 4x (second order), and at equal calls (4 midpoint
    sub-steps, 8 Euler ones) the midpoint's error is less than half of Euler's."""
    from apexdistill.method.twinflow import euler_displacement, midpoint_displacement

    a = 1.5
    x = torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(3, 1, 2, 2)
    t, r = torch.tensor([1.0, 0.7, 0.4], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    exact = x * (1 - torch.exp(-a * (t - r))).reshape(-1, 1, 1, 1)

    def error(solver, steps):
        return float((solver(lambda x_, t_, r_: a * x_, x, t, r, steps) - exact).abs().max())

    assert 1.6 < error(euler_displacement, 8) / error(euler_displacement, 16) < 2.4
    assert 3.5 < error(midpoint_displacement, 8) / error(midpoint_displacement, 16) < 4.5
    assert error(midpoint_displacement, 4) < error(euler_displacement, 8) / 2


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_consistency_time_shift_moves_the_sub_step_boundaries(solver):
    """consistency_time_shift s warps the reference's sub-step boundaries as diffusers' flow-matching `shift` warps
    sigmas, on the interval t -> r: with u = 1 - i/K the boundary is r + (t - r)*s*u/(1 + (s - 1)*u). The solvers
    query the model at those times (the midpoint also halfway between them); s = 1 is the even split, bit for bit,
    and the objective hands its configured s to the solver."""
    from apexdistill.method.twinflow import DISPLACEMENT_SOLVERS, substep_time

    t, r = torch.tensor([0.989, 0.59], dtype=torch.float64), torch.tensor([0.0, 0.1], dtype=torch.float64)
    assert torch.allclose(substep_time(t, r, 1, 2, 2 / 3), torch.tensor([0.3956, 0.1 + 0.49 * 0.4]).double(), atol=1e-12)
    assert torch.equal(substep_time(t, r, 0, 2, 2 / 3), t) and torch.allclose(substep_time(t, r, 2, 2, 0.5), r)
    for s in (0.5, 2.0):  # monotone from t to r, shorter sub-steps near r when s < 1
        times = [substep_time(t, r, i, 4, s) for i in range(5)]
        assert all(bool((a > b).all()) for a, b in zip(times, times[1:]))
        assert bool(((times[3] - times[4]) < (times[0] - times[1])).all()) == (s < 1)

    x = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 1, 2, 2)

    def queried(*shift):
        seen = []

        def velocity(x_, t_, r_):
            seen.append(t_.clone())
            return x_ * t_.reshape(-1, 1, 1, 1)
        return DISPLACEMENT_SOLVERS[solver](velocity, x, t, r, 2, *shift), seen

    assert all(torch.equal(substep_time(t, r, i, 3), t + (r - t) * (i / 3)) for i in range(4))  # s = 1: the even split
    even, _ = queried()
    warped, warped_times = queried(2 / 3)
    split = substep_time(t, r, 1, 2, 2 / 3)
    expected = [t, split] if solver == "euler" else [t, (t + split) / 2, split, split / 2 + r / 2]
    assert len(warped_times) == len(expected) and all(torch.allclose(a, b, atol=1e-12) for a, b in zip(warped_times, expected))
    assert not torch.allclose(warped, even)

    obj = make_objective("apex", apex={"consistency_weight": 1.0, "consistency_steps": 2, "consistency_solver": solver,
                                       "consistency_time_shift": 2 / 3, "lambda_g": 0.0, "lambda_p": 0.0, "lambda_r": 0.0,
                                       **NO_GENERATOR_WARMUP})
    live = ToyVelocity().double()
    switch = ReferenceSwitch(live, ToyVelocity().double())
    obj.set_guidance(None, switch.reference)
    rec = Recorder(switch)
    obj.loss(rec, make_batch(4), step=0)
    t_mid = torch.full((4,), obj.cfg.apex.generator_t - 0.01, dtype=torch.float64)
    boundary = substep_time(t_mid, torch.zeros_like(t_mid), 1, 2, 2 / 3)
    reference_times = [c["t"] for c in rec.calls if not c["grad"]][: 2 if solver == "euler" else 4]
    assert torch.allclose(reference_times[1 if solver == "euler" else 2], boundary, atol=1e-6)


def test_tan_time_weight():
    w = tan_time_weight(torch.tensor([1.0, 0.5, 0.5]), torch.tensor([0.0, 0.5, 0.0]))
    assert w[0].item() == pytest.approx(1.0)
    assert w[1].item() == pytest.approx(math.tan(math.pi / 2.5) + 1)
    assert w[1] > w[2] > w[0]


# ----------------------------------------------------------------------------- all objectives


@pytest.mark.parametrize("name", ["fm", "apex", "apex_literal", "twinflow"])
def test_exact_model_is_a_fixed_point(name):
    """On single-point data, the exact flow makes every loss term vanish (signs, targets, RCGM)."""
    x0 = torch.randn(C, H, W, dtype=torch.float64)
    batch = make_batch()
    batch["x"] = x0.expand_as(batch["x"]).clone()
    sections = {"time": {"min": 0.05}}
    if name == "twinflow":
        sections["twinflow"] = {"target_guidance": 1.0, "consistency_steps": 2}
    if name == "apex_literal":
        sections["apex_literal"] = {"lam": 0.5}
    _, metrics = make_objective(name, **sections).loss(ExactFlow(x0), batch)
    for key, value in metrics.items():
        if key.startswith("loss") or key == "correction_abs":
            assert abs(value) < 1e-8, (key, value)


@pytest.mark.parametrize("name", ["apex", "apex_literal", "twinflow", "fm", "regression"])
def test_every_objective_trains(name):
    model = ToyVelocity()
    sections = {"regression": {"teacher_nfe": 4, "bank_size": 8}} if name == "regression" else {}
    obj = make_objective(name, **sections)
    loss, metrics = obj.loss(model, make_batch(8, dtype=torch.float32))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(math.isfinite(v) for v in metrics.values()) and "loss" in metrics
    loss.backward()
    gs = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in gs)
    assert sum(g.abs().sum() for g in gs) > 0


def test_regression_trains_on_a_synthesized_caches_stored_pairs():
    """A batch with ``z`` (a data.source=teacher cache): the target is the stored x from that z, no teacher call
    (the model is called once, on z at T_START); regression.pairs=teacher_ode solves the bank as before."""
    from apexdistill.method.sampler import T_START

    batch = make_batch(6, dtype=torch.float32)
    batch["z"] = torch.randn_like(batch["x"])
    calls = []

    class Counted(ToyVelocity):
        def forward(self, x, t, text, mask=None, target_t=None):
            calls.append(float(t[0]))
            return super().forward(x, t, text, mask)

    model = Counted()
    loss, metrics = make_objective("regression", regression={"teacher_nfe": 4, "bank_size": 8}).loss(model, batch)
    assert calls == [pytest.approx(T_START)] and metrics["bank_rows"] == 0
    with torch.no_grad():
        t = torch.full((6,), T_START)
        expected = ((batch["z"] - T_START * ToyVelocity.forward(model, batch["z"], t, batch["text"], batch["text_mask"]) - batch["x"]) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    calls.clear()
    _, metrics = make_objective("regression", regression={"teacher_nfe": 4, "bank_size": 8, "pairs": "teacher_ode"}).loss(model, batch)
    assert metrics["bank_rows"] == 6 and len(calls) == 4 + 1  # the teacher copy's 4 Euler steps into the bank, then the student


# ----------------------------------------------------------------------------- sampler and EMA


def test_few_step_grids():
    assert few_step_grid(1) == pytest.approx([0.999, 0.0])
    assert few_step_grid(2) == pytest.approx([0.999, 0.6, 0.0])
    # the released linspace-derived grid, not the rounded 0.833 / 0.667 (those moved 4-NFE samples by 5e-3)
    assert few_step_grid(4) == pytest.approx([0.999, 0.999 - 0.499 / 3, 0.999 - 2 * 0.499 / 3, 0.5, 0.0], abs=1e-12)
    assert few_step_grid(4)[1:3] == pytest.approx([0.83267, 0.66633], abs=1e-5)
    with pytest.raises(ValueError):
        few_step_grid(0)


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_sampler_recovers_point_with_exact_velocity(nfe):
    x0 = torch.randn(C, H, W, dtype=torch.float64)
    z = torch.randn(5, C, H, W, dtype=torch.float64)
    out = sample_few_step(ExactFlow(x0), z, torch.zeros(5, TEXT_LEN, TEXT_DIM), None, nfe=nfe)
    assert torch.allclose(out, x0.expand_as(out), atol=1e-10)


def test_ema_update():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].weight.requires_grad_(False)  # frozen weights (LoRA base) are not tracked
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.bias"}
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update(model)
    live = dict(model.named_parameters())
    for name, new in ema.shadow.items():
        assert torch.allclose(new, 0.9 * before[name] + 0.1 * live[name], atol=1e-6)
        assert torch.allclose(new, before[name] + 0.1, atol=1e-6)
    full = ema.full_state(model)  # frozen params and buffers come from the live model
    assert torch.equal(full["1.weight"], model[1].weight) and torch.equal(full["1.running_mean"], torch.full((4,), 2.0))
    assert torch.equal(full["0.weight"], ema.shadow["0.weight"])
    other = EMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(KeyError, match="lacks"):
        other.load_state_dict({})
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_condition_shift_values():
    shift = ConditionShift(build_config({"objective": {"shift": {"a": -0.5, "b": 0.25}}}).objective.shift)
    c = torch.randn(2, 3, 4)
    assert torch.allclose(shift(c), -0.5 * c + 0.25)


def test_apex_without_anchor_skips_its_pass():
    """lambda_r = 0 drops the real-anchor rows: 3n rows through the network instead of 4n, and the
    generator and fake terms are unchanged (same noise draws)."""
    rows: list[int] = []

    class Counting(BiasPlusText):
        def forward(self, x, t, text, text_mask=None, target_t=None):
            rows.append(x.shape[0])
            return super().forward(x, t, text, text_mask, target_t)

    torch.manual_seed(0)
    model, batch = Counting(), make_batch(8)
    with_anchor = make_objective("apex")
    without = make_objective("apex", apex={"lambda_r": 0.0})
    _, m_with, _ = loss_and_grads(with_anchor, model, batch, step=1000)
    assert sum(rows) == 4 * 8
    rows.clear()
    _, m_without, _ = loss_and_grads(without, model, batch, step=1000)
    assert sum(rows) == 3 * 8
    assert m_without["loss_real"] == 0.0
    for key in ("loss_gen", "loss_fake"):
        assert m_without[key] == pytest.approx(m_with[key], rel=1e-12)


def test_apex_consistency_bank_reuses_the_reference_targets_once_full():
    """consistency_bank_size: the first steps' one-step and re-noised rows fill a bank with their reference displacements;
    once it holds bank_size one-step rows, a step draws its generator rows (noise, prompt, target) from it and makes no
    reference call. The banked rows' targets are the reference's RCGM targets for those rows."""
    from apexdistill.method.twinflow import DISPLACEMENT_SOLVERS, RCGM_DELTA_T

    n, k, steps, t2 = 8, 4, 2, 0.6
    obj = make_objective("apex", apex={"consistency_weight": 1.0, "consistency_steps": steps, "consistency_solver": "midpoint",
                                       "consistency_renoise_t": t2, "consistency_renoise_fraction": 0.5,
                                       "consistency_renoise_source": "data", "consistency_bank_size": 2 * n,
                                       "lambda_g": 0.0, "lambda_p": 0.0, "lambda_r": 0.0, **NO_GENERATOR_WARMUP})
    live, ref = ToyVelocity().double(), ToyVelocity().double()
    switch = ReferenceSwitch(live, ref)
    obj.set_guidance(None, switch.reference)
    rec = Recorder(switch)
    assert obj.bank_fill_steps(n) == 2
    filled = []  # (batch, the generator pass's inputs) of the steps that fill the bank
    for step in range(2):
        batch = make_batch(n)
        obj.loss(rec, batch, step)
        assert len(rec.calls) == 2 * steps + 3  # the reference's sub-steps, the generator, the fake branch, the real query
        filled.append((batch, next(c for c in rec.calls if c["grad"])))
        rec.calls.clear()
    assert switch.sources == ["frozen", "frozen"]

    loss, metrics = obj.loss(rec, make_batch(n), 2)  # new prompts and data, unused: the bank is full
    assert switch.sources == ["frozen", "frozen"] and len(rec.calls) == 3, "no reference call once the bank is full"
    gen = rec.calls[0]
    assert gen["grad"] and gen["x"].shape[0] == n + k
    assert torch.allclose(gen["t"], torch.cat([torch.full((n,), obj.cfg.apex.generator_t), torch.full((k,), t2)]).double())

    def origin(row: Tensor, first: int, count: int) -> tuple[dict, int]:
        """The filling step's batch and row that a drawn generator input came from."""
        for batch, call in filled:
            for i in range(first, first + count):
                if torch.equal(call["x"][i], row):
                    return batch, i - first
        raise AssertionError("a drawn row is not one of the banked rows")

    def residuals(rows: range, first: int, count: int, t: float) -> Tensor:
        out = []
        for j in rows:
            batch, i = origin(gen["x"][j], first, count)
            assert torch.equal(gen["text"][j], batch["text"][i]), "a banked row keeps its prompt"
            x_t, x_src, text, mask = gen["x"][j : j + 1], batch["x"][i : i + 1], batch["text"][i : i + 1], batch["text_mask"][i : i + 1]
            v = (x_t - (1 - t) * x_src) / t - x_src if t < 1 - 1e-3 else x_t - x_src  # the row's data step z - x
            tt = torch.full((1,), t, dtype=torch.float64)
            d = DISPLACEMENT_SOLVERS["midpoint"](lambda x_, t_, _r: ref(x_, t_, text, mask), x_t - RCGM_DELTA_T * v,
                                                tt - RCGM_DELTA_T, torch.zeros_like(tt), steps)
            with torch.no_grad():
                f = live(x_t, tt, text, mask)
            out.append(((t * f - d) / RCGM_DELTA_T - v).clamp(-1, 1).pow(2).flatten(1).mean(1))
        return torch.cat(out)

    one = residuals(range(n), 0, n, obj.cfg.apex.generator_t)
    two = residuals(range(n, n + k), n, k, t2)
    assert metrics["loss_cons_renoised"] == pytest.approx(float(two.mean()), rel=1e-9)
    assert metrics["loss_cons"] == pytest.approx(float(one.mean() + two.mean()), rel=1e-9)


def test_apex_consistency_bank_keeps_each_prompt_once():
    """The bank stores each distinct (text states, mask) once, its rows an index into them: its bytes are the rows'
    columns plus the distinct prompts only, and every drawn row still gets the prompt and mask it was banked with."""
    n, k = 8, 4
    obj = make_objective("apex", apex={"consistency_weight": 1.0, "consistency_steps": 1, "consistency_renoise_t": 0.6,
                                       "consistency_renoise_fraction": 0.5, "consistency_renoise_source": "data",
                                       "consistency_bank_size": 2 * n, **NO_GENERATOR_WARMUP})
    switch = ReferenceSwitch(ToyVelocity().double(), ToyVelocity().double())
    obj.set_guidance(None, switch.reference)
    rec = Recorder(switch)
    banked = []  # the generator pass's inputs of the two steps that fill the bank
    for step in range(2):  # one prompt a batch; make_batch pads every second row, so two (text, mask) pairs a batch
        obj.loss(rec, make_batch(n, same_text=True), step)
        banked.append(next(c for c in rec.calls if c["grad"]))
        rec.calls.clear()
    latent, index, time = C * H * W * 8, 8, 8  # float64 columns, int64 text index
    one_rows = 2 * n * (3 * latent + index)  # noise, data step, displacement
    two_rows = 2 * k * (3 * latent + time + index)  # re-noised point, its time, data step, displacement
    prompts = 4 * (TEXT_LEN * TEXT_DIM * 8 + TEXT_LEN * 4)  # 2 batches x 2 (text, float32 mask) pairs
    assert obj.bank_bytes == one_rows + two_rows + prompts

    obj.loss(rec, make_batch(n), 2)  # drawn from the bank
    gen = rec.calls[0]
    for j in range(n + k):
        origin = [(c, i) for c in banked for i in range(n + k) if torch.equal(c["x"][i], gen["x"][j])]
        assert len(origin) == 1, "a drawn row is one banked row"
        call, i = origin[0]
        assert torch.equal(gen["text"][j], call["text"][i]) and torch.equal(gen["mask"][j], call["mask"][i])


def test_apex_consistency_bank_needs_a_frozen_reference_and_data_renoising():
    with pytest.raises(ValueError, match="consistency_reference=frozen"):
        make_objective("apex", apex={"consistency_weight": 1.0, "consistency_bank_size": 64, "consistency_reference": "ema"})
    with pytest.raises(ValueError, match="consistency_renoise_source=data"):
        make_objective("apex", apex={"consistency_weight": 1.0, "consistency_bank_size": 64, "consistency_renoise_t": 0.6,
                                     "consistency_renoise_source": "student"})
