"""The straight flow path of APEX_METHOD.md: x_t = t*z + (1-t)*x, t = 1 is pure noise, v = z - x."""

from __future__ import annotations

import torch
from torch import Tensor

from apexdistill.config import TimeConfig


def bcast(t: Tensor, like: Tensor) -> Tensor:
    """Shape a per-sample time (B,) so it broadcasts against ``like`` (B, C, H, W)."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """x_t = t*z + (1-t)*x."""
    tb = bcast(t, x)
    return tb * z + (1 - tb) * x


def velocity_target(x: Tensor, z: Tensor) -> Tensor:
    return z - x


def endpoint_x(v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """f_x(F, x_t, t) = x_t - t*F: the predicted clean sample."""
    return x_t - bcast(t, x_t) * v


def endpoint_z(v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """f_z = x_t + (1-t)*F: the predicted noise."""
    return x_t + (1 - bcast(t, x_t)) * v


def sample_time(n: int, cfg: TimeConfig, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """Training times t in [cfg.min, cfg.max] from the configured distribution."""
    if cfg.dist == "uniform":
        u = torch.rand(n, device=device, generator=generator)
    elif cfg.dist == "logit_normal":
        u = torch.sigmoid(cfg.mean + cfg.std * torch.randn(n, device=device, generator=generator))
    else:  # beta
        u = torch.distributions.Beta(cfg.alpha, cfg.beta).sample((n,)).to(device)
    return cfg.min + (cfg.max - cfg.min) * u
