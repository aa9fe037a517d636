"""Qwen-Image (``QwenImagePipeline``): Qwen2.5-VL text encoder, ``AutoencoderKLQwenImage`` (f8, 16
channels, per-channel mean/std), ``QwenImageTransformer2DModel`` (MMDiT, 2x2 packed latents, 3-axis
RoPE), FlowMatchEuler with dynamic shifting, true CFG with a norm rescale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apexdistill.models.backbone import TIMESTEP_SCALE, Backbone
from apexdistill.models.family import Family, PromptSettings, pad_to, register_family

#: Qwen-Image's published scheduler config (FlowMatchEulerDiscreteScheduler, dynamic shifting)
QWEN_SCHEDULER_CONFIG: dict[str, Any] = dict(
    base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False, time_shift_type="exponential",
    use_beta_sigmas=False, use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False,
)


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

    def forward(self, x, t, text, text_mask=None, target_t=None):
        self._check_target(target_t)
        b, c, h, w = x.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        tokens = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        text, text_mask = trim_text_padding(text, text_mask)
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



def trim_text_padding(text: Tensor, text_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Give the transformer the text states the pipeline gives it: without the trailing positions that
    are padding in every row of the batch, and no mask when what is left is all ones.

    What padding does in diffusers 0.42's QwenImageTransformer2DModel (measured on the tiny pipeline,
    tests/test_family_qwenimage.py): nothing beyond rounding. The text RoPE positions are
    ``max_vid_index + i`` for text token i (``QwenEmbedRope``: ``pos_freqs[max_vid_index :
    max_vid_index + text_len]``), so padding appended after the prompt shifts no real token's
    position, and ``encoder_hidden_states_mask`` masks the padded keys out of the joint attention
    (padded queries only produce text-stream outputs, which the image output never reads back); the
    output differs from the unpadded call by ~5e-7 in fp32, from the masked vs unmasked attention
    kernels. Trimming makes the call the pipeline's own (the pipeline pads a batch to its longest
    prompt and passes ``mask=None`` when nothing is padding), so the teacher reproduces it exactly,
    and it saves the attention over up to max_sequence_length (512) padded positions per call."""
    if text_mask is None:
        return text, None
    keep = text_mask.bool().any(0)
    n = int(keep.nonzero().max()) + 1 if bool(keep.any()) else 1
    text, text_mask = text[:, :n], text_mask[:, :n]
    if bool(text_mask.bool().all()):
        return text, None
    return text, text_mask


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

    # Qwen-Image's transformer (Qwen/Qwen-Image, transformer/config.json; also QwenImageTransformer2DModel's
    # defaults): 60 MMDiT blocks of 24 heads x 128, Qwen2.5-VL-7B's 3584-wide states, 16 latent
    # channels packed 2x2 into 64, RoPE axes (16, 56, 56). 20.43B parameters. The target time (twinflow)
    # is the backbone's own embedding, not part of this config.
    published_presets = {
        "qwenimage-20b": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    }
    vae_downsample = 8  # AutoencoderKLQwenImage

    def sized_preset_config(self, preset: str, in_channels: int, sample_size: int, text_dim: int, target_time: bool = False) -> dict[str, Any]:
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

    # ---------------------------------------------------------------- prompts

    def prompt_defaults(self) -> PromptSettings:
        # max_sequence_length: the __call__ default (512). The negative prompt: __call__ defaults to None
        # and then runs no CFG at all (it only encodes a negative prompt when one is given); Qwen-Image's
        # model card passes negative_prompt=" ", so " " is the unconditional branch users actually run.
        return PromptSettings(max_sequence_length=int(self.call_default("max_sequence_length")), negative_prompt=" ")

    def _encode(self, pipe: Any, prompts: list[str], settings: PromptSettings) -> tuple[Tensor, Tensor]:
        """``pipe.encode_prompt`` -> (B, n, D) with n = the longest prompt's token count (after the
        34-token template prefix is dropped, cut at L) and its mask (None when all ones), padded here to
        exactly L positions: float32 CPU states, zero past each prompt, int64 mask."""
        length = int(settings.max_sequence_length)
        device = next(pipe.text_encoder.parameters()).device
        embeds, mask = pipe.encode_prompt(list(prompts), device=device, max_sequence_length=length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return pad_to(embeds.float().cpu(), mask.long().cpu(), length)

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str], settings: PromptSettings) -> tuple[Tensor, Tensor]:
        return self._encode(pipe, prompts, settings)

    @torch.no_grad()
    def encode_negative(self, pipe: Any, settings: PromptSettings) -> tuple[Tensor, Tensor]:
        negative = " " if settings.negative_prompt is None else settings.negative_prompt
        return self._encode(pipe, [negative], settings)

    # ---------------------------------------------------------------- guidance and sampling

    def uses_cfg(self, scale: float) -> bool:
        """true CFG runs for true_cfg_scale > 1, given a negative prompt (``encode_negative`` always
        provides one: " " by default)."""
        return scale > 1.0

    def combine_cfg(self, cond: Tensor, uncond: Tensor, scale: float, t: Tensor | None = None) -> Tensor:
        """The pipeline's true CFG: ``comb = u + g*(c - u)``, then each token rescaled to the norm of the
        conditional prediction's token (``comb * |c| / |comb|``). A token is one 2x2 patch of all
        channels (the 4*C packed vector the transformer outputs), so the norms are taken on the
        pipeline's own packing (``_pack_latents``) and the result unpacked back to (B, C, H, W)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

        b, c, h, w = cond.shape
        cond_p = QwenImagePipeline._pack_latents(cond, b, c, h, w)
        uncond_p = QwenImagePipeline._pack_latents(uncond, b, c, h, w)
        comb = uncond_p + scale * (cond_p - uncond_p)
        cond_norm = torch.norm(cond_p, dim=-1, keepdim=True)
        noise_norm = torch.norm(comb, dim=-1, keepdim=True)
        out = comb * (cond_norm / noise_norm)
        # _unpack_latents takes pixel sizes and the VAE factor; with factor 1 the sizes are the latent's
        return QwenImagePipeline._unpack_latents(out, h, w, 1).reshape(b, c, h, w)

    def scheduler_step(self, scheduler: Any, v: Tensor, timestep: Tensor, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """The pipeline steps on packed tokens and lets a stochastic scheduler draw its noise from the
        global RNG in that packed shape: do the same, so a seeded run draws the same noise."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

        b, c, h, w = x.shape
        out = scheduler.step(QwenImagePipeline._pack_latents(v, b, c, h, w), timestep,
                             QwenImagePipeline._pack_latents(x, b, c, h, w), return_dict=False)[0]
        return QwenImagePipeline._unpack_latents(out, h, w, 1).reshape(b, c, h, w)

    def set_timesteps(self, scheduler: Any, nfe: int, latent_shape: tuple[int, int, int], device: torch.device | str) -> Tensor:
        """As ``QwenImagePipeline.__call__``: sigmas = linspace(1, 1/N, N), mu from the pipeline module's
        ``calculate_shift`` at image_seq_len = the packed token count (H/2)*(W/2) and the scheduler's
        config, then the module's ``retrieve_timesteps(..., sigmas=sigmas, mu=mu)``. The scheduler then
        applies its exponential time shift with mu and stretches the sigmas so the last is
        ``shift_terminal`` (0.02 in Qwen-Image's config) before appending the final 0."""
        import numpy as np
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

        _, h, w = latent_shape
        sigmas = np.linspace(1.0, 1 / nfe, nfe)
        image_seq_len = (h // 2) * (w // 2)
        mu = calculate_shift(
            image_seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, nfe, device, sigmas=sigmas, mu=mu)
        if not bool(torch.isfinite(scheduler.sigmas).all()):
            # nfe=1 with shift_terminal (Qwen-Image's config): sigmas = [1.0], and the stretch
            # 1 - (1 - s) / ((1 - s[-1]) / (1 - shift_terminal)) is 0/0. The stock pipeline then samples
            # NaN too (pipe(..., num_inference_steps=1)); say so instead of returning NaN latents.
            raise ValueError(f"this scheduler's schedule for {nfe} step(s) is not finite (sigmas {scheduler.sigmas.tolist()}): "
                             f"QwenImagePipeline's own schedule with shift_terminal={scheduler.config.get('shift_terminal')} "
                             "needs at least 2 steps")
        return timesteps

    def model_time(self, scheduler: Any, timestep: Tensor) -> Tensor:
        # the pipeline passes timestep / 1000 to the transformer (a literal 1000, whatever the config says)
        return timestep.float() / 1000.0

    # ---------------------------------------------------------------- tiny pipelines

    def build_tiny_pipeline(self, folder: str | Path, *, seed: int = 0, text_dim: int | None = None) -> Path:
        """A tiny QwenImagePipeline from the real classes (random weights), saved with ``save_pretrained``:

        - tokenizer: a word-level ``tokenizers.Tokenizer`` (spaces dropped, newlines and punctuation kept
          as tokens, the chat-template special tokens added) wrapped in ``PreTrainedTokenizerFast``: the
          pipeline's system/user template comes out as exactly ``prompt_template_encode_start_idx``
          (34) tokens before the prompt, as with the real Qwen tokenizer, so the pipeline's drop removes
          the template and nothing else; unknown words map to ``<unk>``;
        - text encoder: ``Qwen2_5_VLForConditionalGeneration``, 2-layer 16-wide text model (M-RoPE
          sections [1, 1, 2]), 1-layer vision tower;
        - VAE: ``AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4])``: spatial factor 4
          (the pipeline's ``vae_scale_factor`` = 2**len(temperal_downsample) = 4), so 32x32 pixels are
          8x8x4 latents = 4x4 packed tokens of 16; sizes must be multiples of 8 pixels;
        - transformer: 2-layer ``QwenImageTransformer2DModel`` (in_channels 16 = 4*z_dim, 2 heads of 16,
          RoPE axes (8, 4, 4), joint_attention_dim = the text encoder's hidden size);
        - scheduler: FlowMatchEulerDiscreteScheduler with Qwen-Image's published config."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        hidden = int(text_dim or 16)
        tokenizer = _tiny_qwen_tokenizer()
        vocab = len(tokenizer)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIAL_TOKENS}
        torch.manual_seed(seed)
        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1000000.0,
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            ),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(
            base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.1, -0.2, 0.0, 0.05], latents_std=[1.5, 0.8, 1.0, 1.2],
        ).eval()
        torch.manual_seed(seed + 2)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=hidden, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        ).eval()
        scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG)
        pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
        folder = Path(folder)
        pipe.save_pretrained(str(folder))
        return folder


#: Qwen2.5-VL's special tokens (the chat template's, padding, and the vision placeholders the config names)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>", "<unk>"]
#: the words of the pipeline's template, then a few caption words (anything else is <unk>)
_TINY_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text spatial "
    "relationships of objects and background a an in on with big small red green blue yellow black white cat dog "
    "bird tree house car sky sun photo painting digit zero one two three four five six seven eight nine"
).split()


def _tiny_qwen_tokenizer() -> Any:
    """A word-level tokenizer built offline. Pre-tokenization drops spaces and isolates newlines and
    punctuation, so the pipeline's template is 34 tokens before the prompt like the real Qwen BPE's
    (``<|im_start|>`` system \\n Describe ... background : ``<|im_end|>`` \\n ``<|im_start|>`` user \\n)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(_SPECIAL_TOKENS + ["\n"] + list(",.:;!?'\"-()") + _TINY_WORDS + [str(i) for i in range(10)]))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Punctuation("isolated"),
    ])
    backend.add_special_tokens(_SPECIAL_TOKENS)
    # not Qwen2Tokenizer: in transformers 5 it always builds its own byte-level BPE (from vocab/merges),
    # which would drop this word-level model; the generic fast tokenizer keeps it (saved as tokenizer.json,
    # reloaded by the pipeline as TokenizersBackend)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None)
