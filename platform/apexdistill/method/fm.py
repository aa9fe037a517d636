"""Plain flow matching: L_FM = E || F(x_t, t, c) - (z - x) ||^2 (teacher pre-training; lam = 0)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from apexdistill.method.base import Batch, Objective, mse, register, scalar_metrics
from apexdistill.method.flow import interpolate, sample_time, velocity_target


def flow_matching_loss(model: nn.Module, batch: Batch, time_cfg, generator: torch.Generator | None = None) -> Tensor:
    x = batch["x"]
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    t = sample_time(x.shape[0], time_cfg, x.device, generator)
    v = model(interpolate(x, z, t), t, batch["text"], batch.get("text_mask"))
    return mse(v, velocity_target(x, z)).mean()


@register
class FlowMatching(Objective):
    name = "fm"

    def loss(self, model: nn.Module, batch: Batch, step: int = 0) -> tuple[Tensor, dict[str, float]]:
        loss = flow_matching_loss(model, batch, self.cfg.time)
        return loss, scalar_metrics(loss=loss, loss_fm=loss)
