"""Z-Image (``ZImagePipeline``): a Qwen3 text encoder, ``AutoencoderKL`` (16 channels, shift and
scale), ``ZImageTransformer2DModel`` (single-stream DiT; model time ``1 - sigma``, raw output
``x0 - noise``), FlowMatchEuler with a shift, CFG ``pos + g*(pos - neg)``.

What the stock pipeline does (diffusers 0.42, ``pipeline_z_image.py``): each prompt goes through the
tokenizer's chat template (one user message, generation prompt, ``enable_thinking=True``), is padded
to ``max_sequence_length`` (512), and ``text_encoder(...).hidden_states[-2]`` is cut to the valid
tokens: a list of (n_i, D) states per prompt. The transformer takes a list of (C, 1, H, W) latents,
``timestep = (1000 - t)/1000`` for the scheduler's t = sigma*1000, and the lists of caption states;
it returns a list of (C, 1, H, W) predictions ~ x0 - noise, which the pipeline negates. CFG is on
for ``guidance_scale > 0`` (default 5.0) with the empty negative prompt, ``pos + g*(pos - neg)``
per sample, optionally renormalised (``cfg_normalization``) and switched off where
``t_norm = 1 - sigma`` exceeds ``cfg_truncation``. Sigmas are ``linspace(1, 1/N, N)`` before the
scheduler's shift.

Caches hold the states padded with zeros to ``max_sequence_length`` with a mask; the backbone cuts
each sample back to its valid tokens, so the transformer sees exactly the pipeline's lists.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apexdistill.models.backbone import Backbone
from apexdistill.models.family import Family, PromptSettings, pad_to, register_family

#: the pipeline's timestep scale (``(1000 - t) / 1000``; hardcoded in ``ZImagePipeline.__call__``)
ZIMAGE_TIME_SCALE = 1000.0
#: the spatial patch size ``ZImagePipeline.__call__`` runs the transformer with (its ``forward`` default)
ZIMAGE_PATCH = 2
#: the scheduler of the tiny pipeline: Z-Image-Turbo's ``scheduler_config.json`` as we recall it
#: (FlowMatchEulerDiscreteScheduler, shift 3.0, no dynamic shifting; not verifiable offline).
#: diffusers' own Z-Image tests use the scheduler's defaults (shift 1.0) instead.
ZIMAGE_SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
#: a Qwen3-style chat template: what ``apply_chat_template(..., add_generation_prompt=True,
#: enable_thinking=True)`` gives for one user message (Qwen3 adds an empty think block only when
#: thinking is disabled)
ZIMAGE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]


def _pipeline_module():
    from diffusers.pipelines.z_image import pipeline_z_image

    return pipeline_z_image


class ZImageBackbone(Backbone):
    """ZImageTransformer2DModel behind our interface: (B, C, H, W) latents and padded text states in,
    the velocity ``noise - x0`` out. No target-time embedding (twinflow is not supported)."""

    family = "zimage"
    # attention (diffusers Attention: to_q/k/v, to_out.0) and SwiGLU MLP (w1, w2, w3) of every block:
    # the main layers, the noise refiner and the context refiner
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]

    def __init__(self, transformer: nn.Module, target_time: bool = False) -> None:
        if target_time:
            raise ValueError("model.target_time is not supported for zimage (ZImageTransformer2DModel has no "
                             "target-time embedding here); set model.target_time=false (twinflow cannot run on zimage)")
        super().__init__(transformer, target_time)
        patches = tuple(transformer.config.all_patch_size)
        self.patch = ZIMAGE_PATCH if ZIMAGE_PATCH in patches else int(patches[0])
        self.f_patch = int(tuple(transformer.config.all_f_patch_size)[patches.index(self.patch)])

    def blocks(self) -> list[nn.Module]:
        # single stream: the refiners run first (noise, then context), then the main layers
        tr = self.transformer
        return [*tr.noise_refiner, *tr.context_refiner, *tr.layers]

    def forward(self, x, t, text, text_mask=None, target_t=None):
        self._check_target(target_t)
        b = x.shape[0]
        dtype = self.transformer.dtype
        # the pipeline's float32 (1000 - T)/1000 for T = sigma*1000; t*1000 gives back T exactly
        t = t.to(device=x.device, dtype=torch.float32).expand(b)
        timestep = (ZIMAGE_TIME_SCALE - t * ZIMAGE_TIME_SCALE) / ZIMAGE_TIME_SCALE
        if text.shape[0] != b:
            text = text.expand(b, -1, -1)
            text_mask = text_mask.expand(b, -1) if text_mask is not None else None
        text = text.to(device=x.device, dtype=dtype)
        if text_mask is None:
            caps = list(text.unbind(0))
        else:
            keep = text_mask.to(x.device).bool()
            if keep.shape[0] != b:
                keep = keep.expand(b, -1)
            counts = keep.sum(1)
            if bool((counts == 0).any()):
                raise ValueError("zimage backbone: a text state with no valid tokens (mask all 0); Z-Image needs at "
                                 "least one caption token per sample (encode the empty prompt instead)")
            caps = [text[i][keep[i]] for i in range(b)]  # the pipeline's per-sample lists of valid tokens
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))  # (C, 1, H, W) each
        out = self.transformer(latents, timestep, caps, patch_size=self.patch, f_patch_size=self.f_patch, return_dict=False)[0]
        return (-torch.stack(out, 0).squeeze(2)).to(x.dtype)


@register_family
class ZImage(Family):
    name = "zimage"
    pipeline_class = "ZImagePipeline"
    transformer_class = "ZImageTransformer2DModel"
    backbone_class = ZImageBackbone
    default_lora_targets = ZImageBackbone.default_lora_targets
    guidance_argument = "guidance_scale"
    guidance_off = 0.0  # pos + g*(pos - neg): g = 0 is no guidance
    # ZImagePipeline.__call__ defaults to guidance_scale=5.0, while its own docstring example runs Z-Image-Turbo (the
    # distilled checkpoint whose scheduler this family's tiny preset mirrors) at guidance_scale=0.0: no default fits both
    guidance_must_be_stated = ("Z-Image-Turbo runs without CFG (guidance_scale=0.0, the ZImagePipeline docstring's "
                               "example), the Z-Image base model with CFG (ZImagePipeline.__call__'s default 5.0); "
                               "a teacher run at the wrong one gives the student the wrong field")

    def text_dim(self, transformer_config: dict[str, Any]) -> int:
        return int(transformer_config["cap_feat_dim"])

    def in_channels(self, transformer_config: dict[str, Any]) -> int:
        return int(transformer_config["in_channels"])

    def patch_size(self, transformer_config: dict[str, Any]) -> int:
        patches = tuple(transformer_config.get("all_patch_size", (ZIMAGE_PATCH,)))
        return ZIMAGE_PATCH if ZIMAGE_PATCH in patches else int(patches[0])

    # ---------------------------------------------------------------- prompts

    def prompt_defaults(self) -> PromptSettings:
        # max_sequence_length=512; negative_prompt defaults to None in __call__, and encode_prompt then
        # uses "" for every prompt
        return PromptSettings(max_sequence_length=int(self.call_default("max_sequence_length")), negative_prompt="")

    @staticmethod
    def _pad(embeds: list[Tensor], length: int) -> tuple[Tensor, Tensor]:
        states, masks = [], []
        for e in embeds:
            e = e.detach().float().cpu()[None]
            s, m = pad_to(e, torch.ones(e.shape[:2], dtype=torch.int64), length)
            states.append(s)
            masks.append(m)
        return torch.cat(states, 0), torch.cat(masks, 0)

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str], settings: PromptSettings) -> tuple[Tensor, Tensor]:
        settings = self.resolve_prompt_settings(settings)
        length = int(settings.max_sequence_length)
        device = next(pipe.text_encoder.parameters()).device
        # encode_prompt writes the templated prompts into the list it gets: hand it a copy
        embeds, _ = pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False, max_sequence_length=length)
        return self._pad(embeds, length)

    @torch.no_grad()
    def encode_negative(self, pipe: Any, settings: PromptSettings) -> tuple[Tensor, Tensor]:
        settings = self.resolve_prompt_settings(settings)
        length = int(settings.max_sequence_length)
        device = next(pipe.text_encoder.parameters()).device
        # the pipeline's own negative branch (one prompt; the positive one is discarded)
        _, neg = pipe.encode_prompt([""], device=device, do_classifier_free_guidance=True,
                                    negative_prompt=[settings.negative_prompt or ""], max_sequence_length=length)
        return self._pad(neg, length)

    def token_count(self, pipe: Any, prompts: list[str], settings: PromptSettings) -> list[int]:
        # the pipeline tokenizes the chat-templated prompt (as _encode_prompt builds it)
        templated = [
            pipe.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True)
            for p in prompts
        ]
        return super().token_count(pipe, templated, settings)

    # ---------------------------------------------------------------- guidance and sampling

    def uses_cfg(self, scale: float) -> bool:
        """``ZImagePipeline.do_classifier_free_guidance``: guidance_scale > 0."""
        return scale > 0.0

    def combine_cfg(self, cond: Tensor, uncond: Tensor, scale: float, t: Tensor | None = None) -> Tensor:
        """The pipeline's rule at its ``__call__`` defaults (``cfg_normalization``, ``cfg_truncation``),
        in our sign (velocities are the negated raw outputs; the rule is linear and the norms are
        sign-blind, so this is exactly the pipeline's result negated)."""
        normalization = self.call_default("cfg_normalization")
        truncation = self.call_default("cfg_truncation")
        b = cond.shape[0]
        g = torch.full((b,), float(scale), dtype=cond.dtype, device=cond.device)
        if t is not None and truncation is not None and float(truncation) <= 1:
            tt = t.to(device=cond.device, dtype=torch.float32).expand(b)
            t_norm = (ZIMAGE_TIME_SCALE - tt * ZIMAGE_TIME_SCALE) / ZIMAGE_TIME_SCALE  # the pipeline's t_norm
            g = torch.where(t_norm > float(truncation), torch.zeros_like(g), g)
        shape = (b,) + (1,) * (cond.dim() - 1)
        pred = cond + g.view(shape) * (cond - uncond)
        if normalization and float(normalization) > 0.0:
            out = []
            for j in range(b):
                if float(g[j]) <= 0:  # the pipeline skips CFG (and its renormalisation) at scale 0
                    out.append(pred[j])
                    continue
                pos_norm = torch.linalg.vector_norm(cond[j])
                new_norm = torch.linalg.vector_norm(pred[j])
                max_norm = pos_norm * float(normalization)
                out.append(pred[j] * (max_norm / new_norm) if new_norm > max_norm else pred[j])
            pred = torch.stack(out, 0)
        return pred

    def guidance_ratio(self, scale: float) -> float:
        """``pos + g*(pos - neg)`` is standard CFG with w = 1 + g: r = g."""
        return max(0.0, float(scale))

    def guidance_scale_of_ratio(self, ratio: float) -> float:
        return float(ratio)

    def set_timesteps(self, scheduler: Any, nfe: int, latent_shape: tuple[int, int, int], device: torch.device | str) -> Tensor:
        """As ``ZImagePipeline.__call__``: mu from the image token count, the default Z-Image sigmas,
        ``retrieve_timesteps`` (the pipeline module's own functions)."""
        zp = _pipeline_module()
        _, h, w = latent_shape
        image_seq_len = (h // 2) * (w // 2)
        config = scheduler.config
        mu = zp.calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = zp.get_default_z_image_sigmas(nfe) if hasattr(zp, "get_default_z_image_sigmas") else None
        timesteps, _ = zp.retrieve_timesteps(scheduler, nfe, device, sigmas=sigmas, mu=mu)
        return timesteps

    def model_time(self, scheduler: Any, timestep: Tensor) -> Tensor:
        """sigma = timestep / 1000 (the pipeline's hardcoded scale); the backbone passes 1 - sigma."""
        return timestep.float() / ZIMAGE_TIME_SCALE

    # ---------------------------------------------------------------- presets and tiny pipelines

    # Z-Image-Turbo's transformer (Tongyi-MAI/Z-Image-Turbo, transformer/config.json): 30 single-stream
    # layers of dim 3840 (30 heads x 128) after 2 noise- and 2 context-refiner layers, Qwen3-4B's
    # 2560-wide states, 16 latent channels in 2x2 patches, RoPE axes (32, 48, 48) over (1536, 512, 512)
    # positions. 6.15B parameters.
    published_presets = {
        "zimage-6b": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                          n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                          rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
    }
    vae_downsample = 8  # AutoencoderKL (FLUX's)

    def published_config(self, preset: str, target_time: bool = False) -> dict[str, Any]:
        if target_time:
            raise ValueError("model.target_time is not supported for zimage")
        return super().published_config(preset)

    def sized_preset_config(self, preset: str, in_channels: int, sample_size: int, text_dim: int, target_time: bool = False) -> dict[str, Any]:
        if target_time:
            raise ValueError("model.target_time is not supported for zimage")
        if sample_size % ZIMAGE_PATCH:
            raise ValueError(f"zimage needs latent sizes that are multiples of {ZIMAGE_PATCH} (got {sample_size})")
        # dim, heads, layers, refiner layers, rope axes (sum = head dim). The time embedder alone is
        # 256x1024 + 1024x min(dim, 256) (fixed in ZImageTransformer2DModel): tiny ~1.1M, small ~5.2M params (text_dim 384)
        dim, heads, layers, refiners, axes = {"tiny": (96, 4, 3, 1, [8, 8, 8]), "small": (192, 6, 6, 1, [16, 8, 8])}[preset]
        tokens = sample_size // ZIMAGE_PATCH
        return dict(
            all_patch_size=(ZIMAGE_PATCH,),
            all_f_patch_size=(1,),
            in_channels=in_channels,
            dim=dim,
            n_layers=layers,
            n_refiner_layers=refiners,
            n_heads=heads,
            n_kv_heads=heads,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=text_dim,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=axes,
            # axis 0 holds the caption positions (1..padded length) and then the frame; 1, 2 the patch grid
            axes_lens=[1024, max(64, tokens), max(64, tokens)],
        )

    def build_tiny_pipeline(self, folder: str | Path, *, seed: int = 0, text_dim: int | None = None) -> Path:
        """A 2-layer Qwen3Model (16 wide) with a character-level tokenizer and a Qwen3-style chat
        template, a 2-block AutoencoderKL (f2, 16 latent channels, scaling 0.3611 and shift 0.1159 as
        the real Z-Image VAE), a 2-layer ZImageTransformer2DModel (dim 32) and FlowMatchEuler with
        shift 3.0 (``ZIMAGE_SCHEDULER_CONFIG``). It samples at 32x32 px (16x16 latents, 64 image
        tokens); sizes must be multiples of 4 px."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        torch.manual_seed(seed)
        hidden = text_dim or 16
        tokenizer = _char_tokenizer()
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
        )).eval()
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[8, 16], layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=32,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        ).eval()
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=hidden, rope_theta=256.0, t_scale=1000.0,
            axes_dims=[8, 4, 4], axes_lens=[1024, 64, 64],
        ).eval()
        with torch.no_grad():  # non-zero pad tokens, so padding (to multiples of 32 tokens) is exercised
            transformer.x_pad_token.normal_(0.0, 0.5)
            transformer.cap_pad_token.normal_(0.0, 0.5)
        scheduler = FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER_CONFIG)
        pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
        folder = Path(folder)
        pipe.save_pretrained(str(folder))
        return folder


def _char_tokenizer() -> Any:
    """A character-level fast tokenizer (BPE with single characters and no merges, a whitespace
    pre-tokenizer) with Qwen's chat special tokens and a Qwen3-style chat template; pads with
    ``<|endoftext|>`` on the right, as Qwen's tokenizer does."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set(string.whitespace))
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in _SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        padding_side="right", chat_template=ZIMAGE_CHAT_TEMPLATE,
    )
