"""Exponential moving average of trained weights; evaluation uses the EMA weights by default."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps a frozen copy of ``model`` whose parameters follow ``decay*ema + (1-decay)*param``."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            if name in ema_params:
                ema_params[name].lerp_(param.detach().to(ema_params[name].dtype), 1.0 - self.decay)
        ema_buffers = dict(self.model.named_buffers())
        for name, buf in model.named_buffers():
            if name in ema_buffers:
                ema_buffers[name].copy_(buf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
