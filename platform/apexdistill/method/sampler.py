"""Samplers: the few-step UCGM-style sampler of the reference code and a multi-step Euler ODE sampler.

Both take a velocity model ``model(x, t, text, text_mask) -> v`` with t = 1 pure noise.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from apexdistill.method.flow import endpoint_x, endpoint_z

VelocityFn = Callable[..., Tensor]

# Time grids of the released sampler (APEX_METHOD.md, "Sampler"; DIFFUSERS_NOTES.md): the NFE times are
# 1 - linspace(0.001, 1 - gap, NFE), then 0, with the released per-NFE gap (`rfba_gap_steps`):
# 1 NFE 0.999 -> 0; 2 NFE (gap 0.6) 0.999 -> 0.6 -> 0; 4 NFE (gap 0.5) 0.999 -> 0.83267 -> 0.66633 -> 0.5 -> 0.
# Other NFEs get an even grid from T_START to 0.
T_START = 0.999
RELEASED_GAPS = {2: 0.6, 4: 0.5}


def released_grid(nfe: int, gap: float) -> list[float]:
    """1 - linspace(1 - T_START, 1 - gap, nfe), then 0: the released sampler's time grid, unrounded."""
    lo, hi = 1.0 - T_START, 1.0 - gap
    if nfe == 1:
        return [T_START, 0.0]
    return [1.0 - (lo + (hi - lo) * i / (nfe - 1)) for i in range(nfe)] + [0.0]


def few_step_grid(nfe: int) -> list[float]:
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if nfe == 1:
        return [T_START, 0.0]
    if nfe in RELEASED_GAPS:
        return released_grid(nfe, RELEASED_GAPS[nfe])
    return torch.linspace(T_START, 0.0, nfe + 1).tolist()


@torch.no_grad()
def sample_few_step(
    model: VelocityFn,
    z: Tensor,
    text: Tensor,
    text_mask: Tensor | None,
    nfe: int = 1,
    rho: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """UCGM few-step sampler: at each step predict x_hat = x - t*F and z_hat = x + (1-t)*F, then
    re-noise to the next time x <- (1-t')*x_hat + t'*(sqrt(1-rho)*z_hat + sqrt(rho)*eps)."""
    grid = few_step_grid(nfe)
    x = z
    for t_now, t_next in zip(grid[:-1], grid[1:]):
        t = torch.full((x.shape[0],), t_now, device=x.device, dtype=x.dtype)
        v = model(x, t, text, text_mask)
        x_hat, z_hat = endpoint_x(v, x, t), endpoint_z(v, x, t)
        if t_next <= 0.0:
            x = x_hat
        else:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            noise = (1 - rho) ** 0.5 * z_hat + rho**0.5 * eps
            x = (1 - t_next) * x_hat + t_next * noise
    return x


@torch.no_grad()
def sample_euler(model: VelocityFn, z: Tensor, text: Tensor, text_mask: Tensor | None, nfe: int = 50, t_start: float = 1.0) -> Tensor:
    """Multi-step Euler ODE from t_start to 0 (the teacher's reference sampler)."""
    ts = torch.linspace(t_start, 0.0, nfe + 1).tolist()
    x = z
    for t_now, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((x.shape[0],), t_now, device=x.device, dtype=x.dtype)
        x = x + (t_next - t_now) * model(x, t, text, text_mask)
    return x
