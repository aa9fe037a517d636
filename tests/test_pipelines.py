"""Stock pipelines end to end, offline: tiny pipelines of each family built from the real diffusers
classes, saved with ``save_pretrained`` and loaded back through ``model.path`` exactly as a user's
checkpoint is. Ray Data preprocessing with the pipeline's own encoders in actors -> Ray Train (2
workers, fsdp2 with activation checkpointing, LoRA: the shipped distill configs' setup) -> export ->
``DiffusionPipeline.from_pretrained(export)`` at 1 and 2 NFE against our sampler; the LoRA adapter
through ``load_lora_weights``; the teacher sampler with CFG against the stock pipeline.

Tolerances: fp32 on CPU. Same-graph comparisons (our sampler vs the pipeline running the same
weights) at 1e-5; merged LoRA vs an adapter loaded by the pipeline at 1e-4 (the merge changes the
order of the additions)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline

from apexdistill.config import build_config
from apexdistill.models.family import family_names, get_family

pytestmark = pytest.mark.timeout(420)

PROMPTS = ("a handwritten digit seven", "a handwritten digit two")
L = 24  # text tokens (the pipelines' max_sequence_length)
SIDE = 32  # pixels; every tiny pipeline's VAE factor x patch size divides it
SAME = 1e-5
MERGED = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny stock pipeline folder per family, built once."""
    root = tmp_path_factory.mktemp("tiny-pipelines")
    return {name: get_family(name).build_tiny_pipeline(root / name, seed=0) for name in family_names()}


def _stated(name):
    """Z-Image must state its teacher's guidance (Turbo 0.0, the base model 5.0): the base model's, CFG on."""
    return ["teacher.guidance_scale=5.0"] if name == "zimage" else []


def _load(folder):
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, family, **kw):
    """The stock pipeline's call with output_type='latent', returned in our (B, C, H, W) layout."""
    # a fresh list: ZImagePipeline.encode_prompt writes the chat-templated prompts back into the list it gets
    out = pipe(list(PROMPTS), height=SIDE, width=SIDE, max_sequence_length=L, output_type="latent", **family.exact_call_kwargs, **kw).images
    if out.dim() == 3:  # Qwen-Image returns packed tokens
        out = pipe._unpack_latents(out, SIDE, SIDE, pipe.vae_scale_factor)[:, :, 0]
    return out


def _latent_noise(folder, seed=0):
    from apexdistill.models.vae import load_vae

    c, h, w = load_vae(folder).latent_shape(SIDE)
    return torch.randn((len(PROMPTS), c, h, w), generator=torch.Generator().manual_seed(seed))


def _pipeline_noise(pipe, z):
    """The noise in the layout the pipeline's ``latents=`` takes (Qwen-Image: packed tokens)."""
    if hasattr(pipe, "_pack_latents") and type(pipe).__name__.startswith("QwenImage"):
        b, c, h, w = z.shape
        return pipe._pack_latents(z, b, c, h, w)
    return z


@pytest.mark.parametrize("name", family_names())
def test_teacher_with_cfg_through_the_config_equals_the_stock_pipeline(tiny, name):
    """The teacher a run evaluates (config -> cached-style embeddings -> family sampler on the
    pipeline's own scheduler, the pipeline's default guidance) reproduces pipe(...) latents."""
    from apexdistill.models.build import build_backbone
    from apexdistill.models.text import build_text_encoder

    folder = tiny[name]
    cfg = build_config({}, [f"model.path={folder}", f"data.resolution={SIDE}", f"text_encoder.max_length={L}", *_stated(name)])
    family = get_family(cfg.model.backbone)
    assert family.name == name
    encoder = build_text_encoder(cfg.text_encoder)
    text, mask = encoder.encode(list(PROMPTS))
    neg, neg_mask = encoder.encode_negative()
    z = _latent_noise(folder)
    backbone = build_backbone(cfg.model, z.shape[1], z.shape[-1], text.shape[-1]).eval()
    pipe = _load(folder)
    steps = 3 if name != "qwenimage" else 4
    ours = family.sample(backbone, pipe.scheduler, z, text, mask, steps, cfg.teacher.guidance_scale, neg, neg_mask)
    # the negative prompt the run cached (Qwen-Image's pipeline runs CFG only when it is given one)
    kw = {family.guidance_argument: cfg.teacher.guidance_scale, "num_inference_steps": steps, "latents": _pipeline_noise(pipe, z),
          "negative_prompt": [family.prompt_defaults().negative_prompt] * len(PROMPTS)}
    stock = _call(pipe, family, **kw)
    diff = float((ours - stock).abs().max())
    assert diff <= SAME, f"{name}: teacher sampler vs stock pipeline with CFG {cfg.teacher.guidance_scale}: max abs diff {diff:.3g} > {SAME}"


@pytest.mark.parametrize("name", family_names())
def test_exported_lora_student_runs_in_the_stock_pipeline(tiny, name, tmp_path):
    """A LoRA'd backbone exported as a stock pipeline folder: from_pretrained(export) at 1 and 2 NFE
    equals our student sampler for the same noise, and the teacher pipeline with the exported
    adapter (load_lora_weights) equals the merged export."""
    from apexdistill.config import LoraConfig
    from apexdistill.models.build import build_backbone
    from apexdistill.models.lora import apply_lora
    from apexdistill.models.pipeline import save_stock_pipeline
    from apexdistill.models.text import build_text_encoder

    folder = tiny[name]
    cfg = build_config({}, [f"model.path={folder}", f"data.resolution={SIDE}", f"text_encoder.max_length={L}", *_stated(name)])
    family = get_family(name)
    text, mask = build_text_encoder(cfg.text_encoder).encode(list(PROMPTS))
    z = _latent_noise(folder, seed=1)
    backbone = build_backbone(cfg.model, z.shape[1], z.shape[-1], text.shape[-1])
    apply_lora(backbone, LoraConfig(enabled=True, rank=4, alpha=8.0, targets=[]))
    with torch.no_grad():  # a trained-looking adapter (B = 0 would make it a no-op)
        for n, p in backbone.named_parameters():
            if ".lora_" in n:
                p.copy_(0.05 * torch.randn_like(p))
    backbone.eval()
    out = save_stock_pipeline(tmp_path / "export", backbone, folder, meta={"objective": "test"})
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == family.pipeline_class and index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert (out / "README.md").read_text().count("sigmas=[0.999]") == 1
    student = _load(out)
    assert student.scheduler.config.stochastic_sampling and student.scheduler.config.shift == 1.0

    teacher = _load(folder)
    teacher.scheduler = copy.deepcopy(student.scheduler)
    teacher.load_lora_weights(str(out / "lora"))
    for nfe, sigmas in ((1, [0.999]), (2, [0.999, 0.6])):
        torch.manual_seed(7)
        ours = family.sample_student(backbone, z, text, mask, nfe, generator=torch.Generator().manual_seed(7))
        kw = dict(sigmas=sigmas, latents=_pipeline_noise(student, z), **{family.guidance_argument: family.guidance_off})
        torch.manual_seed(7)
        stock = _call(student, family, generator=torch.Generator().manual_seed(7), **kw)
        torch.manual_seed(7)
        adapter = _call(teacher, family, generator=torch.Generator().manual_seed(7), **kw)
        d_stock, d_lora = float((ours - stock).abs().max()), float((adapter - stock).abs().max())
        assert d_stock <= SAME, f"{name} {nfe} NFE: our sampler vs from_pretrained(export): {d_stock:.3g} > {SAME}"
        assert d_lora <= MERGED, f"{name} {nfe} NFE: load_lora_weights vs merged export: {d_lora:.3g} > {MERGED}"
    assert float((ours - _call(teacher, family, latents=_pipeline_noise(teacher, z), sigmas=[0.999],
                                **{family.guidance_argument: family.guidance_off})).abs().max()) > 0  # 2 NFE differs from 1


def test_preprocess_train_lora_fsdp2_export_and_run_in_the_stock_pipeline(tiny, tmp_path, capsys):
    """The whole product on a tiny Sana pipeline: Ray Data preprocessing with the pipeline's encoders
    in actors (cached embeddings = encode_prompt, cached latents = the VAE's normalization, one
    negative embedding), 2 fsdp2 workers with LoRA, activation checkpointing and guidance from the
    frozen base (jobs/configs/distill_*.yaml's setup), export, and the stock pipeline running the student
    exactly as `apexdistill sample` does."""
    from apexdistill.cli import sample_run
    from apexdistill.data.preprocess import load_cache_tensors, read_negative
    from apexdistill.models.vae import load_vae
    from apexdistill.train.driver import run_training
    from apexdistill.train.export import export_pipeline, load_trained_backbone

    folder = tiny["sana"]
    family = get_family("sana")
    cfg = build_config({}, [
        f"model.path={folder}", f"run.workdir={tmp_path / 'work'}", f"data.resolution={SIDE}", f"text_encoder.max_length={L}",
        "data.limit=48", "model.lora.enabled=true", "model.lora.rank=4", "train.steps=4", "train.batch_size=8",
        "train.num_workers=2", "train.strategy=fsdp2", "train.gradient_checkpointing=true", "train.cpus_per_worker=0.45",
        "train.log_every=2", "run.name=sana-lora",
        "objective.apex.generator_warmup_steps=0", "eval.at_end=false",  # `apexdistill evaluate` scores it below
    ])
    assert cfg.objective.apex.guidance_ratio == pytest.approx(3.5)  # Sana's 4.5 - 1
    result = run_training(cfg)
    assert result.metrics["step"] == 4 and torch.isfinite(torch.tensor(result.metrics["loss"]))

    # the cache holds what the stock pipeline computes
    cache_uri = next(p for p in (tmp_path / "work" / "cache").iterdir() if not p.name.startswith("."))
    rows = load_cache_tensors(str(cache_uri))
    pipe = _load(folder)
    instruction = family.prompt_defaults().complex_human_instruction
    embeds, emask, neg, neg_mask = pipe.encode_prompt(rows["caption"][:4], do_classifier_free_guidance=True, max_sequence_length=L,
                                                      complex_human_instruction=instruction)
    assert torch.equal(rows["text"][:4], embeds.float()) and torch.equal(rows["text_mask"][:4], emask.long())
    cached_neg = read_negative(str(cache_uri))
    assert torch.equal(cached_neg["text"], neg[:1].float()) and torch.equal(cached_neg["text_mask"], neg_mask[:1].long())
    vae = load_vae(folder)
    assert tuple(rows["x"].shape[1:]) == vae.latent_shape(SIDE)

    # export, then the stock pipeline at 1 and 2 NFE equals `apexdistill sample`
    out = export_pipeline(result.run_dir, tmp_path / "export", link=True)
    assert os.path.islink(out / "text_encoder") and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    from mlflow import MlflowClient

    tags = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).data.tags
    assert tags["apexdistill.export"] == str(out.resolve()) and tags["apexdistill.lora"] == "true"
    assert tags["apexdistill.strategy"] == "fsdp2"
    model, run_cfg = load_trained_backbone(result.run_dir)
    student = _load(out)
    for nfe, sigmas in ((1, [0.999]), (2, [0.999, 0.6])):
        ours = sample_run(model, run_cfg, list(PROMPTS), 1, nfe, seed=5, latents=True)
        g = torch.Generator().manual_seed(5)
        z = torch.randn(ours.shape, generator=g)  # the noise, then the re-noise from where the generator is
        stock = _call(student, family, sigmas=sigmas, latents=z, guidance_scale=1.0, generator=g)
        diff = float((ours - stock).abs().max())
        assert diff <= SAME, f"{nfe} NFE: `apexdistill sample` vs from_pretrained(export): {diff:.3g} > {SAME}"
        # as a user calls it: the pipeline draws the noise and the 2-NFE re-noise from one generator, as `sample` does
        stock = _call(student, family, sigmas=sigmas, guidance_scale=1.0, generator=torch.Generator().manual_seed(5))
        diff = float((ours - stock).abs().max())
        assert diff <= SAME, f"{nfe} NFE: `apexdistill sample --seed 5` vs pipe(generator=seed 5): {diff:.3g} > {SAME}"
    images = sample_run(model, run_cfg, list(PROMPTS), 1, 1, seed=5)
    assert images.shape == (2, 3, SIDE, SIDE) and images.abs().max() <= 1.0

    # `apexdistill evaluate` on a pipeline run: the teacher as users run it (its scheduler, CFG; 8 steps here) against
    # the student at 1 and 2 NFE over the run's captions, on a Ray Data actor, scored, decoded into a grid, and
    # logged into the run's MLflow run
    from apexdistill.cli import main

    out_dir = tmp_path / "quality"
    capsys.readouterr()
    assert main(["evaluate", str(result.run_dir), "--nfe", "1", "2", "-o", str(out_dir), "eval.images_per_prompt=2",
                 "eval.prompt_limit=4", "eval.teacher_nfe=8"]) == 0
    printed = capsys.readouterr().out
    assert "| teacher (floor) | 8 |" in printed and "| student | 2 |" in printed and "FD to teacher" in printed
    metrics = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).data.metrics
    assert {"eval/fd_teacher_1nfe", "eval/fd_teacher_2nfe", "eval/diversity_1nfe", "eval/ms_per_image_2nfe",
            "eval/teacher_fd_floor"} <= set(metrics)
    from PIL import Image

    assert Image.open(out_dir / "samples.png").size[1] > 3 * SIDE  # three rows: teacher, student 1 NFE, student 2 NFE
    assert (out_dir / "per_image.parquet").is_file()


@pytest.mark.parametrize("name", family_names())
def test_shipped_distill_configs_load_with_a_pipeline_of_their_family(tiny, name):
    """jobs/configs/distill_<family>.yaml validates with a pipeline folder of that family in model.path
    (the real checkpoint's place), and takes the family, encoder and VAE from it."""
    from pathlib import Path

    from apexdistill.config import load_config

    path = Path(__file__).resolve().parents[1] / "jobs" / "configs" / f"distill_{name}.yaml"
    cfg = load_config(path, [f"model.path={tiny[name]}", f"data.resolution={SIDE}", "data.path=/tmp/any.parquet"])
    assert cfg.model.backbone == name and cfg.text_encoder.kind == "pipeline" and cfg.vae.path == str(tiny[name])
    assert cfg.model.lora.enabled and cfg.train.strategy == "fsdp2" and cfg.objective.apex.guidance_ratio > 0
