"""Backbone adapters: one interface over diffusers transformers.

``Backbone.forward(x, t, text, text_mask, target_t=None) -> v`` with ``x`` (B, C, H, W), ``t`` (B,)
in [0, 1] (t = 1 is noise; negative t is allowed, twinflow flags its fake branch that way), ``text``
(B, L, D) text states, ``text_mask`` (B, L) with 1 for real tokens. The wrapped diffusers module is
``backbone.transformer``; it is saved and loaded with diffusers' own ``save_pretrained`` /
``from_pretrained``, so a real checkpoint and a tiny preset go through the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
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
        raise NotImplementedError

    @property
    def text_dim(self) -> int:
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None, target_t: Tensor | None = None) -> Tensor:
        raise NotImplementedError

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


class SanaBackbone(Backbone):
    """SanaTransformer2DModel: linear self-attention, cross-attention to the text states.
    The target time (twinflow) goes through Sana's own guidance embedding; a checkpoint without one
    gets a zero-initialised one (``add_sana_guidance_embedding``), so it starts unchanged."""

    family = "sana"
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point"]

    def __init__(self, transformer: nn.Module, target_time: bool = False) -> None:
        has_guidance = bool(transformer.config.get("guidance_embeds", False))
        if has_guidance and not target_time:
            # its time embedding cannot run without a guidance input
            raise ValueError("this Sana transformer has a guidance embedding (guidance_embeds=true): set model.target_time=true")
        if target_time and not has_guidance:
            transformer = add_sana_guidance_embedding(transformer)
        super().__init__(transformer, target_time)

    def target_time_modules(self) -> dict[str, nn.Module]:
        if not self.target_time:
            return {}
        return {"transformer.time_embed.guidance_embedder": self.transformer.time_embed.guidance_embedder}

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def text_dim(self) -> int:
        return int(self.transformer.config.caption_channels)

    def forward(self, x, t, text, text_mask=None, target_t=None):
        self._check_target(target_t)
        t = t.to(x.dtype).expand(x.shape[0]) * TIMESTEP_SCALE
        guidance = None
        if self.target_time:
            guidance = (t if target_t is None else target_t.to(x.dtype).expand(x.shape[0]) * TIMESTEP_SCALE)
        out = self.transformer(
            hidden_states=x,
            encoder_hidden_states=text.to(x.dtype),
            timestep=t,
            guidance=guidance,
            encoder_attention_mask=text_mask,
            return_dict=False,
        )[0]
        return out


def add_sana_guidance_embedding(transformer: nn.Module) -> nn.Module:
    """The same Sana model with a zero-initialised guidance (target-time) embedding.

    Without ``guidance_embeds`` Sana's time embedding is an ``AdaLayerNormSingle``; with it, a
    ``SanaCombinedTimestepGuidanceEmbeddings`` that holds the same timestep embedder under another
    name (``time_embed.emb.timestep_embedder`` -> ``time_embed.timestep_embedder``) and adds the
    guidance embedding before the shared ``linear``. With that addend zero the outputs are unchanged,
    so a pretrained checkpoint (the built-in teacher) starts twinflow exactly where it was."""
    param = next(transformer.parameters())
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    converted = type(transformer).from_config({**config, "guidance_embeds": True}).to(device=param.device, dtype=param.dtype)
    state = {k.replace("time_embed.emb.timestep_embedder.", "time_embed.timestep_embedder."): v for k, v in transformer.state_dict().items()}
    missing, unexpected = converted.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("time_embed.guidance_embedder.") for k in missing):
        raise ValueError(f"cannot add a guidance embedding to this Sana transformer (unexpected {unexpected[:3]}, missing {missing[:3]})")
    nn.init.zeros_(converted.time_embed.guidance_embedder.linear_2.weight)
    nn.init.zeros_(converted.time_embed.guidance_embedder.linear_2.bias)
    return converted.train(transformer.training)


class QwenImageBackbone(Backbone):
    """QwenImageTransformer2DModel (MMDiT, joint attention, 3-axis RoPE). The image is packed into
    patch tokens here, as the Qwen-Image pipeline does. The target time (twinflow) is a separate
    zero-initialised embedding added to the time embedding, so a pretrained model starts unchanged."""

    family = "qwenimage"
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "net.0.proj", "net.2"]

    def __init__(self, transformer: nn.Module, target_time: bool = False) -> None:
        super().__init__(transformer, target_time)
        self.patch = int(transformer.config.patch_size)
        self._target_emb: Tensor | None = None
        if target_time:
            from diffusers.models.embeddings import TimestepEmbedding, Timesteps

            dim = transformer.inner_dim
            self.target_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=TIMESTEP_SCALE)
            self.target_embed = TimestepEmbedding(256, dim)
            nn.init.zeros_(self.target_embed.linear_2.weight)
            nn.init.zeros_(self.target_embed.linear_2.bias)
            transformer.time_text_embed.register_forward_hook(self._add_target)

    def target_time_modules(self) -> dict[str, nn.Module]:
        return {"target_embed": self.target_embed} if self.target_time else {}

    def _add_target(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        if self._target_emb is None:
            return output
        return output + self._target_emb.to(output.dtype)

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.out_channels)

    @property
    def text_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    def forward(self, x, t, text, text_mask=None, target_t=None):
        self._check_target(target_t)
        b, c, h, w = x.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        tokens = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], device=x.device, dtype=torch.long)
        if self.target_time:
            tt = t if target_t is None else target_t
            self._target_emb = self.target_embed(self.target_proj(tt.to(x.dtype).expand(b)).to(x.dtype))
        try:
            out = self.transformer(
                hidden_states=tokens,
                encoder_hidden_states=text.to(x.dtype),
                encoder_hidden_states_mask=text_mask,
                timestep=t.to(x.dtype).expand(b),
                img_shapes=[(1, h // p, w // p)] * b,
                return_dict=False,
            )[0]
        finally:
            self._target_emb = None
        # (B, N, p*p*C) with the channel-major packing used above -> (B, C, H, W)
        return out.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


FAMILIES: dict[str, type[Backbone]] = {"sana": SanaBackbone, "qwenimage": QwenImageBackbone}
#: diffusers class name (``_class_name`` in a transformer's config.json) of each family
CLASS_NAMES: dict[str, str] = {"sana": "SanaTransformer2DModel", "qwenimage": "QwenImageTransformer2DModel"}


def family_of(class_name: str) -> str | None:
    return {v: k for k, v in CLASS_NAMES.items()}.get(class_name)


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


def transformer_class(family: str) -> type[nn.Module]:
    from diffusers import QwenImageTransformer2DModel, SanaTransformer2DModel

    return {"sana": SanaTransformer2DModel, "qwenimage": QwenImageTransformer2DModel}[family]


def preset_config(family: str, preset: str, in_channels: int, sample_size: int, text_dim: int, target_time: bool = False) -> dict[str, Any]:
    """Small configs that train on a CPU. ``tiny`` is the demo's model (~1M parameters)."""
    # heads, head_dim, layers, patch: tiny is sized for 16x16 digits on 2 CPU cores (4x4 patches)
    heads, head_dim, layers, patch = {"tiny": (4, 32, 4, 4), "small": (6, 48, 6, 2)}[preset]
    if family == "sana":
        return dict(
            in_channels=in_channels,
            out_channels=in_channels,
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            num_layers=layers,
            num_cross_attention_heads=heads,
            cross_attention_head_dim=head_dim,
            cross_attention_dim=heads * head_dim,
            caption_channels=text_dim,
            mlp_ratio=2.5,
            sample_size=sample_size,
            patch_size=patch,
            guidance_embeds=target_time,
        )
    if family == "qwenimage":
        frame = (head_dim // 4) // 2 * 2  # RoPE axes (frame, height, width), each even, summing to head_dim
        side = (head_dim - frame) // 2
        return dict(
            patch_size=patch,
            in_channels=in_channels * patch * patch,
            out_channels=in_channels,
            num_layers=max(2, layers - 1),
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=text_dim,
            axes_dims_rope=(frame, side, side),
        )
    raise ValueError(f"model.backbone: unknown family '{family}', expected one of {sorted(FAMILIES)}")
