"""Condition shift c_fake = a*c + b (APEX Eq. 9), scalar a and b, preset or learnable."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from apexdistill.config import ShiftConfig


class ConditionShift(nn.Module):
    """Maps the real condition to the "fake" one. With ``learnable`` the two scalars are parameters
    (put in their own optimizer group with ``lr_mult``); otherwise they are fixed buffers."""

    def __init__(self, cfg: ShiftConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ShiftConfig()
        self.lr_mult = cfg.lr_mult
        self.learnable = cfg.learnable
        a, b = torch.tensor(float(cfg.a)), torch.tensor(float(cfg.b))
        if cfg.learnable:
            self.a = nn.Parameter(a)
            self.b = nn.Parameter(b)
        else:
            self.register_buffer("a", a)
            self.register_buffer("b", b)

    def forward(self, c: Tensor) -> Tensor:
        return self.a.to(c.dtype) * c + self.b.to(c.dtype)

    def extra_repr(self) -> str:
        return f"a={float(self.a):.3f}, b={float(self.b):.3f}, learnable={self.learnable}"
