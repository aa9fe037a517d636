"""`regression`: one-step regression to the teacher's multi-step ODE endpoint from the same noise.

The "regression-based distillation" baseline of the paper. The teacher is a frozen snapshot of the
model at the first call (students start from the teacher). Its Euler endpoints are expensive, so a
bank of (noise, condition, endpoint) triples is filled from the first batches and then reused:
``bank_size / batch`` steps pay ``teacher_nfe`` extra passes each, the rest cost one pass.

A synthesized cache (``data.source: teacher``, ``data/synthesize.py``) stores each row's initial noise ``z`` next
to the teacher's sample ``x`` it was solved into, with the teacher's own scheduler and CFG: with
``regression.pairs: auto`` those stored pairs are the targets (DiffSynth's "Direct Distill"), and no teacher
call is made in training at all.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from apexdistill.config import ObjectiveConfig
from apexdistill.method.base import Batch, Objective, mse, register, scalar_metrics
from apexdistill.method.sampler import T_START, sample_euler


@register
class Regression(Objective):
    name = "regression"

    def __init__(self, cfg: ObjectiveConfig) -> None:
        super().__init__(cfg)
        self._teacher: nn.Module | None = None
        self._bank: dict[str, list[Tensor]] = {"z": [], "text": [], "mask": [], "x": []}
        self._bank_rows = 0

    def attach(self, backbone: nn.Module) -> None:
        # the teacher is the model as it starts; a resumed run loads the saved teacher over it
        self._teacher = copy.deepcopy(backbone).eval().requires_grad_(False)

    def _teacher_of(self, model: nn.Module) -> nn.Module:
        if self._teacher is None:
            self.attach(model)
        return self._teacher

    @torch.no_grad()
    def _grow_bank(self, model: nn.Module, batch: Batch) -> None:
        teacher = self._teacher_of(model)
        x, c, mask = batch["x"], batch["text"], batch.get("text_mask")
        z = torch.randn_like(x)
        x_teacher = sample_euler(teacher, z, c, mask, nfe=self.cfg.regression.teacher_nfe)
        self._bank["z"].append(z)
        self._bank["text"].append(c)
        self._bank["mask"].append(mask if mask is not None else torch.ones(c.shape[:2], device=c.device))
        self._bank["x"].append(x_teacher)
        self._bank_rows += x.shape[0]

    def loss(self, model: nn.Module, batch: Batch, step: int = 0) -> tuple[Tensor, dict[str, float]]:
        n = batch["x"].shape[0]
        if "z" in batch and self.cfg.regression.pairs == "auto":  # the stored (z, x0) pairs of a synthesized cache
            z, target = batch["z"], batch["x"]
            t = torch.full((n,), T_START, device=z.device, dtype=z.dtype)
            loss = mse(z - T_START * model(z, t, batch["text"], batch.get("text_mask")), target).mean()
            return loss, scalar_metrics(loss=loss, loss_regression=loss, bank_rows=0)
        if self._bank_rows < self.cfg.regression.bank_size:
            self._grow_bank(model, batch)
        z, c, mask, target = (torch.cat(self._bank[k]) for k in ("z", "text", "mask", "x"))
        idx = torch.randint(0, z.shape[0], (n,), device=z.device)
        z, c, mask, target = z[idx], c[idx], mask[idx], target[idx]
        t = torch.full((n,), T_START, device=z.device, dtype=z.dtype)
        v = model(z, t, c, mask)
        x_one_step = z - T_START * v
        loss = mse(x_one_step, target).mean()
        return loss, scalar_metrics(loss=loss, loss_regression=loss, bank_rows=self._bank_rows)
