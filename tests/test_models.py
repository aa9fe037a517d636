"""apexdistill.models on real diffusers / peft modules (tiny presets, CPU): backbones, every
objective through every backbone (full and LoRA), LoRA files, pipeline folders, VAEs and the real
MiniLM text encoder. No mocks; everything is built locally, nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch

from apexdistill.config import LoraConfig, ModelConfig, VaeConfig, build_config
from apexdistill.method.base import available_objectives, build_objective
from apexdistill.models.backbone import TARGET_TIME_WEIGHTS, Backbone
from apexdistill.models.build import build_backbone
from apexdistill.models.lora import apply_lora, count_parameters, has_lora, load_lora, merge_lora, save_lora
from apexdistill.models.pipeline import META_FILE, load_pipeline_parts, pipeline_model_config, save_pipeline
from apexdistill.models.text import TextEncoder, minilm_path
from apexdistill.models.vae import PixelSpace, Vae, build_vae, tiny_vae_config
from apexdistill.train.loop import wrap_with_reference
from apexdistill.train.strategy import build_strategy

FAMILIES = ["sana", "qwenimage"]
TEXT_DIM = 384
# (channels, side): digits in pixel space, and 4-channel latents of a 16x16 image
SHAPES = [(1, 16), (4, 8)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module on one torch thread (conftest's ``one_thread``)."""


def make_backbone(family: str, channels: int = 1, side: int = 16, target_time: bool = False, lora: bool = False, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=family, target_time=target_time, lora=LoraConfig(enabled=lora))
    return build_backbone(cfg, channels, side, TEXT_DIM)


def inputs(batch: int, channels: int, side: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, side, side, generator=g)
    t = torch.rand(batch, generator=g) * 0.9 + 0.05
    text = torch.randn(batch, 7, TEXT_DIM, generator=g)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[: batch // 2, 5:] = 0  # some padded captions
    return x, t, text, mask


def randomize(backbone: Backbone, *fragments: str) -> None:
    """Give zero-initialised pieces (LoRA B, Qwen's target-time output) random values, so that
    round trips compare something that matters."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if any(f in name for f in fragments):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("channels,side", SHAPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_shape_text_and_target_time(family, channels, side):
    backbone = make_backbone(family, channels, side, target_time=True).eval()
    x, t, text, mask = inputs(2, channels, side)
    with torch.no_grad():
        v = backbone(x, t, text, mask)
        assert v.shape == x.shape
        assert torch.isfinite(v).all()
        v_other_text = backbone(x, t, torch.randn_like(text), mask)
        assert (v - v_other_text).abs().max() > 1e-4, "output does not depend on the text condition"
        v_masked = backbone(x, t, text, torch.ones_like(mask))
        assert (v - v_masked).abs().max() > 1e-6, "output does not depend on the text mask"
        v_other_t = backbone(x, t * 0.5, text, mask)
        assert (v - v_other_t).abs().max() > 1e-4, "output does not depend on t"
        target_a = backbone(x, t, text, mask, target_t=torch.zeros_like(t))
        if family == "qwenimage":
            # zero-initialised: a pretrained model starts unchanged, whatever the target time
            assert torch.equal(target_a, backbone(x, t, text, mask, target_t=t * 0.3))
            randomize(backbone, "target_embed.linear_2")
            target_a = backbone(x, t, text, mask, target_t=torch.zeros_like(t))
        target_b = backbone(x, t, text, mask, target_t=t * 0.3)
        assert (target_a - target_b).abs().max() > 1e-4, "output does not depend on target_t"
        # target_t=None means target_t = t
        assert torch.equal(backbone(x, t, text, mask), backbone(x, t, text, mask, target_t=t))


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_without_target_time_refuses_target_t(family):
    backbone = make_backbone(family)
    x, t, text, mask = inputs(2, 1, 16)
    with pytest.raises(ValueError, match="target_time"):
        backbone(x, t, text, mask, target_t=t)


def test_backbone_image_not_divisible_by_patch_is_an_error():
    with pytest.raises(ValueError, match="patch size"):
        make_backbone("qwenimage")(torch.randn(1, 1, 18, 18), torch.rand(1), torch.randn(1, 3, TEXT_DIM))


# ----------------------------------------------------------------------------- objectives


OBJECTIVES = available_objectives()


def test_all_objectives_registered():
    assert {"apex", "apex_literal", "twinflow", "fm", "regression"} <= set(OBJECTIVES)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_objective_forward_backward(objective_name, family, lora):
    target_time = objective_name == "twinflow"
    cfg = build_config(
        {
            "model": {"backbone": family, "target_time": target_time, "lora": {"enabled": lora, "rank": 4}},
            "objective": {"name": objective_name, "regression": {"teacher_nfe": 2, "bank_size": 4}},
            "train": {"batch_size": 4},
        }
    )
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model, 1, 16, TEXT_DIM).train()
    objective = build_objective(cfg.objective)
    # as the worker loop does: the default apex recipe's consistency target comes from the frozen teacher
    wrap_with_reference(build_strategy(cfg, 0, 1, torch.device("cpu")), backbone, objective)
    x, _, text, mask = inputs(4, 1, 16)
    batch = {"x": x.clamp(-1, 1), "text": text, "text_mask": mask}

    loss, metrics = objective.loss(backbone, batch, step=0)
    assert loss.ndim == 0 and torch.isfinite(loss), metrics
    assert all(isinstance(v, float) for v in metrics.values())
    loss.backward()

    named = dict(backbone.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    with_grad = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, "no trainable parameter got a gradient"
    assert with_grad <= trainable
    if lora:
        lora_names = {n for n in named if ".lora_" in n}
        time_names = {n for n in named if any(n.startswith(k + ".") for k in backbone.target_time_modules())}
        assert lora_names and trainable == lora_names | time_names
        assert all(named[n].grad is None for n in named if n not in trainable), "a frozen base weight got a gradient"
        assert with_grad & lora_names, "no LoRA weight got a gradient"
        if target_time:
            assert with_grad & time_names, "the target-time embedding got no gradient"
    else:
        assert trainable == set(named)


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_freezes_base_and_round_trips(family, tmp_path):
    backbone = make_backbone(family, target_time=True, lora=True, seed=3)
    assert has_lora(backbone)
    trainable, total = count_parameters(backbone)
    expected = sum(p.numel() for n, p in backbone.named_parameters() if ".lora_" in n)
    expected += sum(p.numel() for m in backbone.target_time_modules().values() for p in m.parameters())
    assert 0 < trainable == expected < total
    randomize(backbone, "lora_B", "target_embed.linear_2", "guidance_embedder.linear_2")
    backbone.eval()
    x, t, text, mask = inputs(2, 1, 16)
    with torch.no_grad():
        v = backbone(x, t, text, mask, target_t=t * 0.5)
        assert (v - make_backbone(family, target_time=True, seed=3).eval()(x, t, text, mask, target_t=t * 0.5)).abs().max() > 1e-4

    save_lora(backbone, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "pytorch_lora_weights.safetensors" in files and TARGET_TIME_WEIGHTS in files

    # a fresh base model (same seed = same base weights) gets the adapter from the saved peft config
    fresh = make_backbone(family, target_time=True, seed=3)
    load_lora(fresh, tmp_path / "adapter")
    # a model that already has an adapter (resume: build_backbone with lora enabled) gets its weights
    again = make_backbone(family, target_time=True, lora=True, seed=3)
    load_lora(again, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x, t, text, mask, target_t=t * 0.5), v)
        assert torch.equal(again.eval()(x, t, text, mask, target_t=t * 0.5), v)
    assert count_parameters(fresh)[0] == trainable

    merge_lora(backbone)
    assert not has_lora(backbone)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in backbone.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(backbone(x, t, text, mask, target_t=t * 0.5), v, rtol=1e-4, atol=1e-5)


def test_lora_targets_that_match_nothing_are_an_error():
    backbone = make_backbone("sana")
    with pytest.raises(ValueError, match=r"to_qq.*Available Linear modules include: .*attn1\.to_q"):
        apply_lora(backbone, LoraConfig(enabled=True, targets=["to_q", "to_qq"]))
    assert not has_lora(backbone)
    with pytest.raises(ValueError, match="model.lora.targets"):
        build_backbone(ModelConfig(backbone="qwenimage", lora=LoraConfig(enabled=True, targets=["attn1.to_q"])), 1, 16, TEXT_DIM)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_empty_targets_use_family_defaults(family):
    backbone = make_backbone(family)
    apply_lora(backbone, LoraConfig(enabled=True, targets=[]))
    wrapped = {n.split(".lora_A")[0] for n, _ in backbone.named_parameters() if ".lora_A" in n}
    for target in backbone.default_lora_targets:
        assert any(n.endswith("." + target) for n in wrapped), target
    x, t, text, mask = inputs(2, 1, 16)
    backbone(x, t, text, mask).square().mean().backward()


# ----------------------------------------------------------------------------- pipeline folders


@pytest.mark.parametrize("with_vae", [False, True], ids=["pixels", "vae"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_round_trip(family, with_vae, tmp_path):
    from diffusers import AutoencoderKL

    vae = Vae(AutoencoderKL(**tiny_vae_config(1))) if with_vae else PixelSpace(1)
    channels, side = vae.latent_shape(16)[:2]
    backbone = make_backbone(family, channels, side, target_time=True, seed=5)
    randomize(backbone, "target_embed.linear_2")
    backbone.eval()
    folder = tmp_path / "pipe"
    save_pipeline(folder, backbone, minilm_path(), vae, {"run": "test", "step": 3})

    parts = load_pipeline_parts(folder)
    assert parts["transformer"] == folder / "transformer"
    assert (parts["vae"] == folder / "vae") if with_vae else parts["vae"] is None
    assert parts["family"] == family and parts["target_time"] is True
    assert parts["text_encoder"] is not None and str(parts["text_encoder"]) == str(parts["meta"]["text_encoder"]["path"])
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["family"] == family and meta["extra"] == {"run": "test", "step": 3} and meta["text_encoder"]["dim"] == TEXT_DIM
    assert (folder / "transformer" / TARGET_TIME_WEIGHTS).is_file() == (family == "qwenimage")

    # the same code path as a real checkpoint: diffusers from_pretrained, local files only
    loaded = build_backbone(ModelConfig(backbone=family, path=str(folder), target_time=True), channels, side, TEXT_DIM).eval()
    assert loaded.state_dict().keys() == backbone.state_dict().keys()
    assert pipeline_model_config(folder).model_dump() == ModelConfig(backbone=family, path=str(folder), target_time=True).model_dump()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    _, t, text, mask = inputs(2, channels, side)
    with torch.no_grad():
        x = vae.encode(images)
        assert x.shape == (2, channels, side, side)
        for target_t in (None, t * 0.5):
            assert torch.equal(loaded(x, t, text, mask, target_t=target_t), backbone(x, t, text, mask, target_t=target_t))

    vae_back = build_vae(VaeConfig(path=str(folder) if with_vae else None), 1)
    assert type(vae_back) is type(vae)
    with torch.no_grad():
        assert torch.equal(vae_back.encode(images), x)
        assert torch.equal(vae_back.decode(x), vae.decode(x))


def test_pipeline_from_lora_model_merges_a_copy(tmp_path):
    backbone = make_backbone("qwenimage", lora=True, seed=2)
    randomize(backbone, "lora_B")
    backbone.eval()
    save_pipeline(tmp_path / "pipe", backbone, None, None, None)
    assert has_lora(backbone), "exporting must not merge the live (still training) model"
    loaded = build_backbone(ModelConfig(backbone="qwenimage", path=str(tmp_path / "pipe")), 1, 16, TEXT_DIM).eval()
    assert not has_lora(loaded) and json.loads((tmp_path / "pipe" / META_FILE).read_text())["lora_merged"] is True
    x, t, text, mask = inputs(2, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, text, mask), backbone(x, t, text, mask), rtol=1e-4, atol=1e-5)


def test_pipeline_errors_name_the_field(tmp_path):
    qwen = make_backbone("qwenimage", target_time=True)
    save_pipeline(tmp_path / "qwen", qwen, None, None, None)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pipeline(tmp_path / "qwen", qwen, None, None, None)
    save_pipeline(tmp_path / "qwen", qwen, None, None, {"second": True}, overwrite=True)
    assert json.loads((tmp_path / "qwen" / META_FILE).read_text())["extra"] == {"second": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen"], "temporary export folders left behind"

    with pytest.raises(ValueError, match="model.target_time"):
        build_backbone(ModelConfig(backbone="qwenimage", path=str(tmp_path / "qwen")), 1, 16, TEXT_DIM)
    with pytest.raises(ValueError, match="set model.backbone=qwenimage"):
        build_backbone(ModelConfig(backbone="sana", path=str(tmp_path / "qwen")), 1, 16, TEXT_DIM)
    with pytest.raises(ValueError, match="takes 1 channels but the data has 3"):
        build_backbone(ModelConfig(backbone="qwenimage", path=str(tmp_path / "qwen"), target_time=True), 3, 16, TEXT_DIM)
    with pytest.raises(ValueError, match="text states of width"):
        build_backbone(ModelConfig(backbone="qwenimage", path=str(tmp_path / "qwen"), target_time=True), 1, 16, 512)
    with pytest.raises(FileNotFoundError, match="model.path"):
        build_backbone(ModelConfig(backbone="sana", path=str(tmp_path / "missing")), 1, 16, TEXT_DIM)
    # a Sana checkpoint with a guidance embedding cannot run without a target time
    save_pipeline(tmp_path / "sana", make_backbone("sana", target_time=True), None, None, None)
    with pytest.raises(ValueError, match="model.target_time=true"):
        build_backbone(ModelConfig(backbone="sana", path=str(tmp_path / "sana")), 1, 16, TEXT_DIM)


def test_sana_checkpoint_without_guidance_gains_a_zero_target_time_embedding(tmp_path):
    # e.g. the built-in teacher (fm, no target time) as the start of a twinflow run
    teacher = make_backbone("sana", seed=4).eval()
    save_pipeline(tmp_path / "teacher", teacher, None, None, None)
    student = build_backbone(ModelConfig(backbone="sana", path=str(tmp_path / "teacher"), target_time=True), 1, 16, TEXT_DIM).eval()
    assert student.transformer.config.guidance_embeds
    x, t, text, mask = inputs(2, 1, 16)
    with torch.no_grad():
        v = teacher(x, t, text, mask)
        assert torch.equal(student(x, t, text, mask, target_t=t * 0.2), v)
        randomize(student, "guidance_embedder.linear_2")
        assert (student(x, t, text, mask, target_t=t * 0.2) - v).abs().max() > 1e-4
    save_pipeline(tmp_path / "student", student, None, None, None)
    again = build_backbone(pipeline_model_config(tmp_path / "student"), 1, 16, TEXT_DIM).eval()
    with torch.no_grad():
        assert torch.equal(again(x, t, text, mask, target_t=t * 0.2), student(x, t, text, mask, target_t=t * 0.2))


# ----------------------------------------------------------------------------- VAE


def test_vae_encode_is_deterministic_scaled_mean(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = Vae(AutoencoderKL(**tiny_vae_config(3, latent_channels=4)))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = vae.encode(images)
    assert latents.shape == (2, 4, 8, 8) and vae.latent_shape(16) == (4, 8, 8)
    assert torch.equal(latents, vae.encode(images))
    with torch.no_grad():
        mean = vae.autoencoder.encode(images).latent_dist.mean
    torch.testing.assert_close(latents, mean * 0.5)
    assert vae.decode(latents).shape == images.shape
    assert not any(p.requires_grad for p in vae.parameters())

    vae.autoencoder.save_pretrained(str(tmp_path / "vae_only"))
    with pytest.raises(ValueError, match="vae.path.*3-channel"):
        build_vae(VaeConfig(path=str(tmp_path / "vae_only")), 1)
    with pytest.raises(FileNotFoundError, match="vae.path"):
        build_vae(VaeConfig(path=str(tmp_path / "nothing")), 3)
    pixels = build_vae(VaeConfig(), 1)
    assert isinstance(pixels, PixelSpace) and torch.equal(pixels.decode(pixels.encode(images)), images)


# ----------------------------------------------------------------------------- text encoder


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(max_length=12)


def test_minilm_states_and_masks(minilm):
    states, mask = minilm.encode(["a handwritten digit seven", "zero", "a handwritten digit seven"])
    assert states.shape == (3, 12, TEXT_DIM) and mask.shape == (3, 12)
    assert torch.isfinite(states).all()
    assert mask[1].sum() < mask[0].sum() and mask[:, 0].eq(1).all()
    assert torch.equal(states[0], states[2])
    assert (states[0] - states[1]).abs().max() > 1e-3
    assert minilm.dim == TEXT_DIM


def test_text_encoder_missing_path_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder.path"):
        TextEncoder(str(tmp_path / "no-such-encoder"))
    with pytest.raises(FileNotFoundError, match="text_encoder.path"):
        TextEncoder("sentence-transformers/all-MiniLM-L6-v2")  # a hub name is never downloaded


def test_pipeline_with_copied_text_encoder_has_diffusers_layout(minilm, tmp_path):
    save_pipeline(tmp_path / "pipe", make_backbone("sana"), minilm, None, None, copy_text_encoder=True)
    parts = load_pipeline_parts(tmp_path / "pipe")
    assert parts["text_encoder"] == tmp_path / "pipe" / "text_encoder"
    assert parts["tokenizer"] == tmp_path / "pipe" / "tokenizer"
    assert parts["meta"]["text_encoder"]["identity"] == minilm.identity
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(parts["tokenizer"]), local_files_only=True)) == len(minilm.tokenizer)
    copied = TextEncoder(str(parts["text_encoder"]), max_length=12)
    captions = ["a handwritten digit three"]
    assert torch.equal(copied.encode(captions)[0], minilm.encode(captions)[0])
