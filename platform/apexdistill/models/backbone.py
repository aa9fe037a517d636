"""Backbone adapters: one interface over diffusers transformers.

``Backbone.forward(x, t, text, text_mask, target_t=None) -> v`` with ``x`` (B, C, H, W), ``t`` (B,)
in [0, 1] (t = 1 is noise; negative t is allowed, twinflow flags its fake branch that way), ``text``
(B, L, D) text states, ``text_mask`` (B, L) with 1 for real tokens. The wrapped diffusers module is
``backbone.transformer``; it is saved and loaded with diffusers' own ``save_pretrained`` /
``from_pretrained``, so a real checkpoint and a tiny preset go through the same code.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

TIMESTEP_SCALE = 1000.0  # diffusers embeds timesteps on a 0..1000 scale
#: weights outside the diffusers transformer (Qwen's target-time embedding), next to its config.json
TARGET_TIME_WEIGHTS = "target_time.safetensors"


class Backbone(nn.Module):
    family: str = "base"
    #: module-name suffixes LoRA targets by default (attention and MLP projections)
    default_lora_targets: list[str] = []

    def __init__(self, transformer: nn.Module, target_time: bool = False) -> None:
        super().__init__()
        self.transformer = transformer
        self.target_time = target_time

    @property
    def in_channels(self) -> int:
        """Latent channels it denoises, as its family reads them from the transformer's config."""
        from apexdistill.models.family import get_family

        return get_family(self.family).in_channels(dict(self.transformer.config))

    @property
    def text_dim(self) -> int:
        """Width of the text states it takes, as its family reads it from the transformer's config."""
        from apexdistill.models.family import get_family

        return get_family(self.family).text_dim(dict(self.transformer.config))

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None, target_t: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The transformer's repeated blocks, in call order: what FSDP2 shards one by one, what
        activation checkpointing recomputes, and what the memory plan measures per block."""
        return list(self.transformer.transformer_blocks)

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of every block through diffusers' own switch: under autograd each
        block runs inside ``torch.utils.checkpoint`` (non-reentrant, so frozen inputs under LoRA and
        FSDP2's per-block hooks work), keeps only its inputs and recomputes the rest in backward."""
        self.transformer.enable_gradient_checkpointing()

    def target_time_modules(self) -> dict[str, nn.Module]:
        """The modules that embed the target time, by backbone-relative name (empty without one).
        They train even under LoRA: a pretrained model has never seen a target time."""
        return {}

    def extra_state_dict(self) -> dict[str, Tensor]:
        """Weights that live outside ``self.transformer`` (diffusers' ``save_pretrained`` does not
        see them); saved as ``target_time.safetensors`` next to the transformer's config."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("transformer.")}

    def _check_target(self, target_t: Tensor | None) -> None:
        if target_t is not None and not self.target_time:
            raise ValueError(f"this {self.family} backbone was built without a target-time embedding (model.target_time=false)")


def load_target_time(backbone: Backbone, file: str | Path) -> None:
    """Load backbone-relative weights (``target_time.safetensors``); every key must belong to it."""
    from safetensors.torch import load_file

    state = load_file(str(file))
    _, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(
            f"{file}: weights {unexpected[:5]} do not belong to this {backbone.family} backbone "
            f"(it was saved with a target-time embedding: set model.target_time=true)"
        )
