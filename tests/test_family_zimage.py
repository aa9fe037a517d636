"""The Z-Image family against the stock ZImagePipeline (diffusers 0.42), on a tiny pipeline built
offline from the real classes and loaded back the way a user's checkpoint is loaded.

Measured on CPU (fp32): prompt and negative encodings equal ``pipe.encode_prompt`` exactly; the
teacher sampler equals ``pipe(..., output_type="latent")`` with max abs difference 0.0 (CFG on and
off, 1/2/4 steps, 32x32 and 24x24 px); the backbone on padded states equals the transformer on the
unpadded lists exactly. The asserted tolerances (1e-5 for sampling) leave room for other BLAS builds.
"""

from __future__ import annotations

import torch
import pytest

from apexdistill.models.family import PromptSettings, get_family
from apexdistill.models.zimage import ZImageBackbone

L = 48  # max_sequence_length for the tests (the pipeline's default is 512)
PROMPTS = ["a red cat", "two dogs on grass, photo"]  # character-level tokens: 23 and 36 with the template
SAMPLE_TOL = 1e-5


@pytest.fixture(scope="module")
def family():
    return get_family("zimage")


@pytest.fixture(scope="module")
def pipe(family, tmp_path_factory):
    from diffusers import DiffusionPipeline

    folder = family.build_tiny_pipeline(tmp_path_factory.mktemp("zimage") / "pipe", seed=0)
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def encoded(family, pipe):
    settings = PromptSettings(max_sequence_length=L)
    states, mask = family.encode_prompts(pipe, PROMPTS, settings)
    neg, neg_mask = family.encode_negative(pipe, settings)
    return states, mask, neg, neg_mask


def test_tiny_pipeline_is_the_stock_one(family, pipe):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    assert isinstance(pipe, ZImagePipeline)
    assert isinstance(pipe.transformer, ZImageTransformer2DModel)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.3611) and pipe.vae.config.shift_factor == pytest.approx(0.1159)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    cfg = dict(pipe.transformer.config)
    assert family.text_dim(cfg) == 16 and family.in_channels(cfg) == 16 and family.patch_size(cfg) == 2
    # the whole pipeline, decode included, at 32x32 px
    image = pipe(prompt="a cat", num_inference_steps=1, guidance_scale=0.0, height=32, width=32,
                 max_sequence_length=L, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_defaults_follow_the_pipeline(family):
    defaults = family.prompt_defaults()
    assert defaults.max_sequence_length == 512 and defaults.negative_prompt == ""
    assert family.default_guidance_scale == 5.0
    assert family.uses_cfg(5.0) and family.uses_cfg(0.5) and not family.uses_cfg(0.0)  # do_classifier_free_guidance: > 0
    assert family.guidance_ratio(5.0) == 5.0 and family.guidance_ratio(0.0) == 0.0  # pos + g(pos - neg) = CFG w = 1 + g


def test_encode_matches_pipeline(family, pipe, encoded):
    states, mask, neg, neg_mask = encoded
    ref, _ = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=L)
    assert states.shape == (2, L, 16) and states.dtype == torch.float32 and mask.dtype == torch.int64
    for i, r in enumerate(ref):
        n = r.shape[0]
        diff = (states[i, :n] - r.float()).abs().max().item()
        assert diff == 0.0, f"prompt {i}: valid tokens differ from pipe.encode_prompt by {diff} (tolerance 0: same computation)"
        assert mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all(), f"prompt {i}: mask is not {n} ones then zeros"
        assert states[i, n:].eq(0).all(), f"prompt {i}: padding is not zero"
    assert mask[0].sum() < mask[1].sum() < L  # different lengths, none truncated

    # a caption longer than L is cut at L tokens, like the pipeline's tokenizer call
    long_states, long_mask = family.encode_prompts(pipe, ["word " * 40], PromptSettings(max_sequence_length=L))
    long_ref, _ = pipe.encode_prompt(["word " * 40], do_classifier_free_guidance=False, max_sequence_length=L)
    assert long_ref[0].shape[0] == L and long_mask.sum() == L
    assert torch.equal(long_states[0], long_ref[0].float())
    assert family.token_count(pipe, ["word " * 40], PromptSettings(max_sequence_length=L))[0] > L


def test_negative_matches_pipeline(family, pipe, encoded):
    _, _, neg, neg_mask = encoded
    # the pipeline's negative branch with no negative prompt given (CFG on): ""
    _, ref = pipe.encode_prompt(["a red cat"], do_classifier_free_guidance=True, max_sequence_length=L)
    n = ref[0].shape[0]
    assert neg.shape == (1, L, 16) and neg_mask.shape == (1, L)
    diff = (neg[0, :n] - ref[0].float()).abs().max().item()
    assert diff == 0.0, f"negative differs from the pipeline's by {diff} (tolerance 0)"
    assert neg_mask[0, :n].eq(1).all() and neg_mask[0, n:].eq(0).all() and neg[0, n:].eq(0).all()

    custom, custom_mask = family.encode_negative(pipe, PromptSettings(max_sequence_length=L, negative_prompt="blurry, bad"))
    _, ref = pipe.encode_prompt(["a red cat"], do_classifier_free_guidance=True, negative_prompt="blurry, bad", max_sequence_length=L)
    n = ref[0].shape[0]
    assert custom_mask.sum() == n and torch.equal(custom[0, :n], ref[0].float())


@pytest.mark.parametrize("height,width", [(32, 32), (24, 24)])
@pytest.mark.parametrize("nfe", [1, 2, 4])
@pytest.mark.parametrize("guidance", [5.0, 0.0])
def test_teacher_sampler_matches_pipeline(family, pipe, encoded, nfe, guidance, height, width):
    states, mask, neg, neg_mask = encoded
    z = torch.randn(2, 16, height // 2, width // 2, generator=torch.Generator().manual_seed(nfe))
    ours = family.sample(ZImageBackbone(pipe.transformer), pipe.scheduler, z, states, mask, nfe, guidance, neg, neg_mask)
    ref = pipe(prompt=list(PROMPTS), latents=z.clone(), num_inference_steps=nfe, guidance_scale=guidance,
               output_type="latent", height=height, width=width, max_sequence_length=L).images
    diff = (ours - ref).abs().max().item()
    assert ours.shape == ref.shape
    assert diff <= SAMPLE_TOL, (f"teacher sampler vs pipe(): max abs diff {diff} > {SAMPLE_TOL} "
                                f"(nfe={nfe}, g={guidance}, {height}x{width}; measured 0.0 on CPU fp32)")
    assert (ref - z).abs().max() > 1e-3  # it did sample


def test_set_timesteps_and_model_time(family, pipe):
    timesteps = family.set_timesteps(pipe.scheduler, 4, (16, 16, 16), "cpu")
    sigmas = torch.linspace(1.0, 0.25, 4)
    shifted = 3.0 * sigmas / (1 + 2.0 * sigmas)  # shift 3, no dynamic shifting
    assert torch.allclose(timesteps, shifted * 1000, atol=1e-3)
    assert torch.allclose(family.model_time(pipe.scheduler, timesteps), shifted, atol=1e-6)


def test_backbone_padding_equals_unpadded_lists(pipe, encoded):
    states, mask, _, _ = encoded
    backbone = ZImageBackbone(pipe.transformer)
    x = torch.randn(2, 16, 12, 12, generator=torch.Generator().manual_seed(3))  # 36 image tokens: padded to 64
    t = torch.tensor([0.3, 0.8])
    caps = [states[i, : int(mask[i].sum())] for i in range(2)]
    timestep = (1000 - t * 1000) / 1000  # the pipeline's float32 (1000 - T)/1000 for T = sigma*1000
    with torch.no_grad():
        raw = pipe.transformer(list(x.unsqueeze(2).unbind(0)), timestep, caps, return_dict=False)[0]
        ref = -torch.stack(raw).squeeze(2)
        v = backbone(x, t, states, mask)
        # whatever sits at masked positions is ignored
        garbage = states + 100.0 * (1 - mask[..., None].float())
        v_garbage = backbone(x, t, garbage, mask)
    diff = (v - ref).abs().max().item()
    assert v.shape == x.shape
    assert diff <= 1e-6, f"padded/masked backbone vs transformer on unpadded lists: max abs diff {diff} > 1e-6 (measured 0.0)"
    assert torch.equal(v, v_garbage), "masked positions changed the output"
    # a batch of one text row broadcasts over the latents (the sampler's negative)
    with torch.no_grad():
        one = backbone(x, t, states[:1], mask[:1])
        ref_one = backbone(x, t, states[:1].expand(2, -1, -1), mask[:1].expand(2, -1))
    assert torch.equal(one, ref_one)


def test_combine_cfg_is_the_pipelines_rule_negated(family):
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    pos, neg = -cond, -uncond  # raw transformer outputs
    pipeline = -(pos + 5.0 * (pos - neg))
    ours = family.combine_cfg(cond, uncond, 5.0, torch.tensor([1.0, 0.2]))
    assert torch.equal(ours, pipeline)


def test_target_time_is_refused(family, pipe):
    with pytest.raises(ValueError, match="model.target_time is not supported for zimage"):
        ZImageBackbone(pipe.transformer, target_time=True)
    with pytest.raises(ValueError, match="model.target_time is not supported for zimage"):
        family.preset_config("tiny", 16, 16, 16, target_time=True)
    backbone = ZImageBackbone(pipe.transformer)
    with pytest.raises(ValueError, match="target-time"):
        backbone(torch.zeros(1, 16, 8, 8), torch.tensor([0.5]), torch.zeros(1, 4, 16), torch.ones(1, 4), target_t=torch.tensor([0.1]))


def test_lora_targets_exist(pipe):
    names = [n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in ZImageBackbone.default_lora_targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        assert hits, f"default LoRA target {target} matches no Linear of ZImageTransformer2DModel"
    # every block's attention and MLP: main layers, noise refiner and context refiner
    assert {n.split(".")[0] for n in names if n.endswith(".to_q")} == {"layers", "noise_refiner", "context_refiner"}


@pytest.mark.parametrize("preset,low,high", [("tiny", 0.8e6, 1.5e6), ("small", 3e6, 8e6)])
def test_presets(family, preset, low, high):
    torch.manual_seed(0)
    transformer = family.transformer_cls()(**family.preset_config(preset, 4, 16, 32))
    n = sum(p.numel() for p in transformer.parameters())
    assert low < n < high, f"{preset}: {n} parameters"
    backbone = ZImageBackbone(transformer)
    assert backbone.in_channels == 4 and backbone.text_dim == 32
    text, text_mask = torch.randn(2, 10, 32), torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    with torch.no_grad():
        v = backbone(torch.randn(2, 4, 16, 16), torch.tensor([0.1, 0.9]), text, text_mask)
    assert v.shape == (2, 4, 16, 16) and torch.isfinite(v).all()
