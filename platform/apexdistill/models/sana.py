"""Sana (``SanaPipeline``): Gemma2 text encoder, ``AutoencoderDC`` (f32), ``SanaTransformer2DModel``
(linear self-attention, cross-attention to the text states), DPM-Solver with flow sigmas.

What the stock pipeline does (diffusers 0.42, DIFFUSERS_NOTES.md): prompts are lowercased and
stripped, ``__call__`` prepends an 8-line "complex human instruction", pads to
``max_sequence_length`` (300) with the tokenizer's pad token, takes ``text_encoder(...)[0]`` and keeps
BOS plus the last L-1 positions; the negative prompt ("" by default) is encoded without the
instruction. The transformer takes ``timestep = sigma * 1000 * timestep_scale``; CFG is
``u + g*(c - u)`` for g > 1 (default 4.5).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apexdistill.models.backbone import TIMESTEP_SCALE, Backbone
from apexdistill.models.family import Family, PromptSettings, register_family


class SanaBackbone(Backbone):
    """SanaTransformer2DModel. The target time (twinflow) goes through Sana's own guidance embedding;
    a checkpoint without one gets a zero-initialised one (``add_sana_guidance_embedding``), so it
    starts unchanged."""

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

    def forward(self, x, t, text, text_mask=None, target_t=None):
        self._check_target(target_t)
        scale = TIMESTEP_SCALE * float(self.transformer.config.get("timestep_scale", 1.0) or 1.0)
        # float32 whatever the latents' dtype, as SanaPipeline passes its scheduler's timesteps (in bf16 0.999 would be 1.0)
        t = t.float().expand(x.shape[0]) * scale
        guidance = None
        if self.target_time:
            guidance = (t if target_t is None else target_t.float().expand(x.shape[0]) * scale)
        out = self.transformer(
            hidden_states=x,
            encoder_hidden_states=text.to(x.dtype),
            timestep=t,
            guidance=guidance,
            encoder_attention_mask=text_mask,
            return_dict=False,
        )[0]
        if out.shape[1] == 2 * x.shape[1]:  # a learned-sigma head: the pipeline keeps the first half
            out = out[:, : x.shape[1]]
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


@register_family
class Sana(Family):
    name = "sana"
    pipeline_class = "SanaPipeline"
    transformer_class = "SanaTransformer2DModel"
    backbone_class = SanaBackbone
    default_lora_targets = SanaBackbone.default_lora_targets
    guidance_argument = "guidance_scale"
    step_uses_generator = True
    exact_call_kwargs = {"use_resolution_binning": False}

    def text_dim(self, transformer_config: dict[str, Any]) -> int:
        return int(transformer_config["caption_channels"])

    def in_channels(self, transformer_config: dict[str, Any]) -> int:
        return int(transformer_config["in_channels"])

    def patch_size(self, transformer_config: dict[str, Any]) -> int:
        return int(transformer_config.get("patch_size", 1) or 1)

    def prompt_defaults(self) -> PromptSettings:
        base = super().prompt_defaults()
        return PromptSettings(
            max_sequence_length=base.max_sequence_length,
            negative_prompt=base.negative_prompt,
            complex_human_instruction=list(self.call_default("complex_human_instruction")),
        )

    def call_kwargs(self, settings: PromptSettings) -> dict[str, Any]:
        """Also the complex human instruction (``[]`` for none): ``SanaPipeline.__call__`` prepends its own otherwise."""
        return {**super().call_kwargs(settings), "complex_human_instruction": list(settings.complex_human_instruction or [])}

    def _encode(self, pipe: Any, prompts: list[str], settings: PromptSettings, negative: bool) -> tuple[Tensor, ...]:
        device = next(pipe.text_encoder.parameters()).device
        return pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=negative,
            negative_prompt=settings.negative_prompt or "",
            device=device,
            clean_caption=False,
            max_sequence_length=int(settings.max_sequence_length),
            complex_human_instruction=settings.complex_human_instruction or None,
        )

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str], settings: PromptSettings) -> tuple[Tensor, Tensor]:
        embeds, mask, _, _ = self._encode(pipe, prompts, settings, negative=False)
        return embeds.float().cpu(), mask.long().cpu()

    @torch.no_grad()
    def encode_negative(self, pipe: Any, settings: PromptSettings) -> tuple[Tensor, Tensor]:
        _, _, neg, neg_mask = self._encode(pipe, [""], settings, negative=True)
        return neg.float().cpu(), neg_mask.long().cpu()

    def token_count(self, pipe: Any, prompts: list[str], settings: PromptSettings) -> list[int]:
        # the pipeline lowercases and strips before tokenizing; the instruction is not the caption's
        cleaned = pipe._text_preprocessing(prompts, clean_caption=False)
        return super().token_count(pipe, cleaned, settings)

    # The published Sana transformers, as diffusers' scripts/convert_sana_to_diffusers.py builds them
    # (SanaMS_600M_P1_D28 and SanaMS_1600M_P1_D20 at 1024 px): linear self-attention with 32-wide
    # heads, softmax cross-attention to Gemma-2-2B's 2304-wide states, the DC-AE's 32 latent channels
    # (f32: 1024 px = 32x32 latents), patch 1. 591.7M and 1604.5M parameters.
    published_presets = {
        "sana-0.6b": dict(in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
                          num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
                          caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1,
                          norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None),
        "sana-1.6b": dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                          num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                          caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1,
                          norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None),
    }
    vae_downsample = 32  # AutoencoderDC f32c32

    def published_config(self, preset: str, target_time: bool = False) -> dict[str, Any]:
        return {**self.published_presets[preset], "guidance_embeds": target_time}

    def sized_preset_config(self, preset: str, in_channels: int, sample_size: int, text_dim: int, target_time: bool = False) -> dict[str, Any]:
        # heads, head_dim, layers, patch: tiny is sized for 16x16 digits on 2 CPU cores (4x4 patches)
        heads, head_dim, layers, patch = {"tiny": (4, 32, 4, 4), "small": (6, 48, 6, 2)}[preset]
        patch = min(patch, sample_size)
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

    def build_tiny_pipeline(self, folder: str | Path, *, seed: int = 0, text_dim: int | None = None) -> Path:
        """Gemma2 (1 layer, character-level GemmaTokenizer), AutoencoderDC with two 8-wide blocks
        (f2, 4 latent channels), a 2-layer SanaTransformer2DModel, and the DPM-Solver flow scheduler
        of Sana's conversion script (flow_shift 3)."""
        from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
        from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

        torch.manual_seed(seed)
        hidden = text_dim or 16
        tokenizer = GemmaTokenizer(vocab=_char_vocab(), merges=[], add_bos_token=True)
        text_encoder = Gemma2Model(Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=2048, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        )).eval()
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            downsample_block_type="conv", upsample_block_type="interpolate",
            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
        ).eval()
        transformer = SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=hidden,
            mlp_ratio=2.5, sample_size=16, patch_size=2,
        ).eval()
        scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
        pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
        folder = Path(folder)
        pipe.save_pretrained(str(folder))
        return folder


def _char_vocab() -> dict[str, int]:
    """A character-level vocabulary (Gemma's special tokens first, then printable ASCII and the
    metaspace): any prompt tokenizes, with no merges to learn."""
    chars = ["<pad>", "<eos>", "<bos>", "<unk>"] + sorted(set(string.printable) - set(" \t\n\r\x0b\x0c")) + ["\u2581", "\n"]
    return {c: i for i, c in enumerate(chars)}
