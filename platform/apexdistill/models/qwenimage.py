"""Qwen-Image (``QwenImagePipeline``): Qwen2.5-VL text encoder, ``AutoencoderKLQwenImage`` (f8, 16
channels, per-channel mean/std), ``QwenImageTransformer2DModel`` (MMDiT, 2x2 packed latents, 3-axis
RoPE), FlowMatchEuler with dynamic shifting, true CFG with a norm rescale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from apexdistill.models.backbone import TIMESTEP_SCALE, Backbone
from apexdistill.models.family import Family, register_family


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



@register_family
class QwenImage(Family):
    name = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    transformer_class = "QwenImageTransformer2DModel"
    backbone_class = QwenImageBackbone
    default_lora_targets = QwenImageBackbone.default_lora_targets
    guidance_argument = "true_cfg_scale"

    def text_dim(self, transformer_config: dict[str, Any]) -> int:
        return int(transformer_config["joint_attention_dim"])

    def in_channels(self, transformer_config: dict[str, Any]) -> int:
        return int(transformer_config["out_channels"])

    def patch_size(self, transformer_config: dict[str, Any]) -> int:
        return int(transformer_config.get("patch_size", 2) or 2)

    def preset_config(self, preset: str, in_channels: int, sample_size: int, text_dim: int, target_time: bool = False) -> dict[str, Any]:
        heads, head_dim, layers, patch = {"tiny": (4, 32, 4, 4), "small": (6, 48, 6, 2)}[preset]
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
