"""Exponential moving average of trained weights; evaluation uses the EMA weights by default.

The EMA keeps a shadow tensor per *trainable* parameter (by name), so it works the same on a plain
module, on FSDP2-sharded parameters (the shadows are DTensor shards) and under LoRA (only the
adapters move; frozen weights are taken from the live model when the full weights are assembled).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            shadow = self.shadow.get(name)
            if shadow is not None:
                shadow.lerp_(param.detach().to(shadow.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} trained parameter(s), e.g. {missing[:3]}")
        with torch.no_grad():
            for name, shadow in self.shadow.items():
                shadow.copy_(state[name].to(shadow.dtype))

    def full_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's whole state dict with the EMA values for the trained parameters."""
        state = model.state_dict()
        state.update({k: v for k, v in self.shadow.items() if k in state})
        return state

    def copy_to(self, model: nn.Module) -> nn.Module:
        model.load_state_dict(self.full_state(model))
        return model
