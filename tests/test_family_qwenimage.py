"""The Qwen-Image family against the stock QwenImagePipeline (diffusers 0.42), on a tiny pipeline built
offline from the real classes and loaded back the way a user's checkpoint is loaded.

Measured on CPU (fp32): prompt encoding is identical (max |diff| 0); padding the text to
max_sequence_length changes the raw transformer output by ~5e-7 only (rounding of the masked vs
unmasked attention), and the backbone, which trims the all-padding tail as the pipeline's inputs
have it, matches the pipeline's call exactly (0); the teacher sampler matches ``pipe(...,
output_type="latent")`` exactly (0) with true CFG on and off.
"""

from __future__ import annotations

import pytest
import torch

from apexdistill.models.family import PromptSettings, get_family
from apexdistill.models.qwenimage import QwenImageBackbone

L = 24  # max_sequence_length in these tests (the family's default is the pipeline's 512)
SIZE = 32  # pixels: the tiny VAE is f4 (vae_scale_factor 4), so 8x8x4 latents, 4x4 packed tokens
PROMPTS = ["a red cat", "a big blue dog on a tree with the sun in the sky", "two"]
#: |ours - pipeline| bound for the sampler and the backbone (measured: 0.0 on CPU)
TOL = 1e-6


@pytest.fixture(scope="module")
def family():
    return get_family("qwenimage")


@pytest.fixture(scope="module")
def pipe(family, tmp_path_factory):
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging

    logging.set_verbosity_error()
    folder = family.build_tiny_pipeline(tmp_path_factory.mktemp("qwen-tiny") / "pipe", seed=0)
    loaded = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def settings(family):
    return family.resolve_prompt_settings(PromptSettings(max_sequence_length=L))


def test_defaults_and_tiny_pipeline(family, pipe):
    from diffusers import QwenImagePipeline

    assert isinstance(pipe, QwenImagePipeline) and family.pipeline_class == type(pipe).__name__
    defaults = family.prompt_defaults()
    assert defaults.max_sequence_length == 512 and defaults.negative_prompt == " "
    assert family.default_guidance_scale == 4.0 and family.guidance_ratio(4.0) == 3.0
    assert family.uses_cfg(4.0) and not family.uses_cfg(1.0)
    # the template really is a 34-token prefix, so the pipeline's drop removes it and nothing else
    drop = pipe.prompt_template_encode_start_idx
    assert drop == 34
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a red cat"))["input_ids"]
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[drop - 4:drop + 3] == ["\n", "<|im_start|>", "user", "\n", "a", "red", "cat"], tokens
    assert pipe.text_encoder.config.text_config.hidden_size == pipe.transformer.config.joint_attention_dim
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.z_dim and pipe.vae_scale_factor == 4
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift_terminal == 0.02


def test_encode_prompts_match_the_pipeline(family, pipe, settings):
    states, mask = family.encode_prompts(pipe, PROMPTS, settings)
    ref, ref_mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=L)
    n = ref.shape[1]
    assert states.shape == (len(PROMPTS), L, pipe.transformer.config.joint_attention_dim) and states.dtype == torch.float32
    assert mask.shape == (len(PROMPTS), L) and mask.dtype == torch.int64
    assert ref_mask is not None and n < L  # prompts of different lengths, all shorter than L
    lengths = ref_mask.sum(1)
    assert len(set(lengths.tolist())) == len(PROMPTS)
    for i, k in enumerate(lengths.tolist()):
        diff = (states[i, :k] - ref[i, :k].float()).abs().max().item()
        assert diff == 0.0, f"prompt {i}: valid tokens differ from pipe.encode_prompt by {diff} (tolerance 0: same call)"
        assert mask[i, :k].eq(1).all() and mask[i, k:].eq(0).all()
        assert states[i, k:].abs().max().item() == 0.0, "padding must be zeros"

    # a prompt longer than L is cut at L, as the pipeline cuts it (its mask is then all ones: None)
    long = " ".join(["a big red cat"] * 10)
    cut, cut_mask = family.encode_prompts(pipe, [long], settings)
    ref_cut, ref_cut_mask = pipe.encode_prompt([long], device="cpu", max_sequence_length=L)
    assert ref_cut.shape[1] == L and ref_cut_mask is None and cut_mask.eq(1).all()
    assert (cut - ref_cut).abs().max().item() == 0.0, "truncated prompt differs (tolerance 0)"


def test_encode_negative_matches_the_pipeline(family, pipe, settings):
    neg, neg_mask = family.encode_negative(pipe, settings)
    ref, ref_mask = pipe.encode_prompt(" ", device="cpu", max_sequence_length=L)
    k = ref.shape[1]
    assert ref_mask is None  # one prompt: the pipeline's mask is all ones -> None
    assert neg.shape == (1, L, ref.shape[2]) and neg_mask.shape == (1, L)
    assert neg_mask[0, :k].eq(1).all() and neg_mask[0, k:].eq(0).all()
    diff = (neg[:, :k] - ref.float()).abs().max().item()
    assert diff == 0.0, f"negative prompt states differ by {diff} (tolerance 0: same call)"
    assert neg[:, k:].abs().max().item() == 0.0


def test_padded_text_gives_the_unpadded_output(family, pipe, settings):
    """Text RoPE positions count up from the image's (padding appended after a prompt moves no real
    token) and the mask removes padded keys, so padding to L changes the raw transformer output only
    by rounding; the backbone trims the all-padding tail and gives the pipeline's call exactly."""
    transformer = pipe.transformer
    states, mask = family.encode_prompts(pipe, PROMPTS, settings)
    ref, ref_mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=L)
    torch.manual_seed(1)
    b, h = len(PROMPTS), SIZE // pipe.vae_scale_factor
    x = torch.randn(b, 4, h, h)
    t = torch.rand(b)
    tokens = pipe._pack_latents(x, b, 4, h, h)
    shapes = [[(1, h // 2, h // 2)]] * b

    def raw(text, text_mask):
        return transformer(hidden_states=tokens, encoder_hidden_states=text, encoder_hidden_states_mask=text_mask,
                           timestep=t, img_shapes=shapes, return_dict=False)[0]

    with torch.no_grad():
        unpadded = raw(ref, ref_mask)  # what the pipeline passes: padded to the batch's longest prompt
        padded = raw(states, mask)
        # each prompt alone, unpadded and unmasked, as the pipeline runs a single prompt
        alone = torch.cat([transformer(hidden_states=tokens[i:i + 1], encoder_hidden_states=states[i:i + 1, :k],
                                       timestep=t[i:i + 1], img_shapes=shapes[:1], return_dict=False)[0]
                           for i, k in enumerate(mask.sum(1).tolist())])
        unmasked_padding = raw(states, torch.ones_like(mask))  # padding treated as real (zero) tokens
        ours = QwenImageBackbone(transformer)(x, t, states, mask)
    d_pad = (padded - unpadded).abs().max().item()
    d_alone = (padded - alone).abs().max().item()
    assert d_pad <= 1e-5 and d_alone <= 1e-5, f"padding to L changed the output by {d_pad} / {d_alone} (tolerance 1e-5)"
    assert (unmasked_padding - unpadded).abs().max().item() > 1e-3, "the mask is what keeps padding out"
    expected = pipe._unpack_latents(unpadded, SIZE, SIZE, pipe.vae_scale_factor)[:, :, 0]
    d_backbone = (ours - expected).abs().max().item()
    assert d_backbone <= TOL, f"backbone on L-padded states vs the pipeline's call: {d_backbone} (tolerance {TOL})"


def test_combine_cfg_is_the_pipeline_rule(family, pipe):
    torch.manual_seed(2)
    cond, uncond = torch.randn(2, 4, 8, 6), torch.randn(2, 4, 8, 6)
    pc, pu = (pipe._pack_latents(v, 2, 4, 8, 6) for v in (cond, uncond))
    comb = pu + 4.0 * (pc - pu)
    ref = comb * (torch.norm(pc, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    ours = pipe._pack_latents(family.combine_cfg(cond, uncond, 4.0), 2, 4, 8, 6)
    assert (ours - ref).abs().max().item() <= 1e-6
    # per-token norms are the conditional prediction's
    assert torch.allclose(ours.norm(dim=-1), pc.norm(dim=-1), atol=1e-5)


@pytest.mark.parametrize("steps,scale", [(2, 4.0), (3, 4.0), (2, 1.0), (4, 1.0)])
def test_teacher_sampler_matches_the_pipeline(family, pipe, settings, steps, scale):
    text, mask = family.encode_prompts(pipe, PROMPTS, settings)
    neg, neg_mask = family.encode_negative(pipe, settings)
    b, h = len(PROMPTS), SIZE // pipe.vae_scale_factor
    z = torch.randn(b, 4, h, h, generator=torch.Generator().manual_seed(steps))
    backbone = QwenImageBackbone(pipe.transformer).eval()
    ours = family.sample(backbone, pipe.scheduler, z, text, mask, steps, scale, neg, neg_mask)
    our_sigmas = pipe.scheduler.sigmas.clone()

    negative = {"negative_prompt": " "} if scale > 1 else {}
    packed = pipe(prompt=PROMPTS, true_cfg_scale=scale, latents=pipe._pack_latents(z, b, 4, h, h), num_inference_steps=steps,
                  height=SIZE, width=SIZE, output_type="latent", max_sequence_length=L, **negative).images
    assert packed.shape == (b, (h // 2) ** 2, 16)  # output_type="latent" returns the packed tokens
    ref = pipe._unpack_latents(packed, SIZE, SIZE, pipe.vae_scale_factor)[:, :, 0]
    assert torch.equal(our_sigmas, pipe.scheduler.sigmas), (our_sigmas, pipe.scheduler.sigmas)
    assert our_sigmas[-2].item() == pytest.approx(0.02)  # shift_terminal
    diff = (ours - ref).abs().max().item()
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.1
    assert diff <= TOL, f"{steps} steps, true_cfg_scale {scale}: max |ours - pipeline| = {diff} (tolerance {TOL})"


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_one_step_schedule_is_refused(family, pipe):
    """Qwen-Image's schedule at 1 step is [1.0] stretched to shift_terminal: 0/0, so the stock pipeline
    samples NaN; the family says so instead."""
    packed = pipe(prompt=PROMPTS[:1], true_cfg_scale=1.0, num_inference_steps=1, height=SIZE, width=SIZE,
                  output_type="latent", max_sequence_length=L).images
    assert torch.isnan(packed).all()
    with pytest.raises(ValueError, match="at least 2 steps"):
        family.set_timesteps(pipe.scheduler, 1, (4, 8, 8), "cpu")


def test_guided_distillation_target_is_the_pipelines_guided_velocity(family, pipe, settings):
    """apex's guided anchor target at x_t is (z - x) + (CFG(v_c, v_u) - v_c): the conditional velocity moved to the
    guided one by the teacher's own rule. That guided velocity must be what the stock pipeline steps with at
    true_cfg_scale 4 (its per-token norm rescale included): read off a one-step pipe call from x_t to 0 under the
    Euler scheduler, x0 = x_t - t*v."""
    from contextlib import nullcontext

    from diffusers import FlowMatchEulerDiscreteScheduler

    from apexdistill.config import build_config
    from apexdistill.method.base import build_objective
    from apexdistill.method.flow import velocity_target
    from apexdistill.models.pipeline import STUDENT_SCHEDULER

    text, mask = family.encode_prompts(pipe, PROMPTS, settings)
    neg, neg_mask = family.encode_negative(pipe, settings)
    b, h, sigma = len(PROMPTS), SIZE // pipe.vae_scale_factor, 0.7
    g = torch.Generator().manual_seed(11)
    x, z = torch.randn(b, 4, h, h, generator=g), torch.randn(b, 4, h, h, generator=g)
    t = torch.full((b,), sigma)
    x_t = sigma * z + (1 - sigma) * x
    backbone = QwenImageBackbone(pipe.transformer).eval()
    cfg = build_config({}, ["model.backbone=qwenimage", f"objective.apex.guidance_ratio={family.guidance_ratio(4.0)}"])
    objective = build_objective(cfg.objective)
    objective.set_guidance((neg, neg_mask), lambda source: nullcontext(), guide=family.guided_velocity)
    with torch.no_grad():
        target = objective._real_target(backbone, x, z, x_t, t, text, mask)
        v_cond, v_uncond = backbone(x_t, t, text, mask), backbone(x_t, t, neg.expand(b, -1, -1), neg_mask.expand(b, -1))
    ours = target - velocity_target(x, z) + v_cond

    kept = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**{**STUDENT_SCHEDULER, "stochastic_sampling": False})
    try:
        packed = pipe(prompt=PROMPTS, negative_prompt=" ", true_cfg_scale=4.0, latents=pipe._pack_latents(x_t, b, 4, h, h),
                      sigmas=[sigma], height=SIZE, width=SIZE, output_type="latent", max_sequence_length=L).images
    finally:
        pipe.scheduler = kept
    stock = (x_t - pipe._unpack_latents(packed, SIZE, SIZE, pipe.vae_scale_factor)[:, :, 0]) / sigma
    diff = (ours - stock).abs().max().item()
    assert diff <= 1e-5, f"guided target vs the pipeline's guided velocity: {diff} (tolerance 1e-5)"
    plain = v_cond + family.guidance_ratio(4.0) * (v_cond - v_uncond)  # without the rescale: a stronger field
    assert (plain - stock).abs().max().item() > 1e-3
