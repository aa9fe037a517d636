"""Real-model quality (eval/quality.py, eval/features.py): the Frechet distance against scipy's sqrtm, the CLIP
score against torchmetrics', tiny CLIP and DINOv2 folders built from their transformers configs (random weights,
saved and loaded by path like real ones: they test the code path, never the numbers), the whole evaluation on a
tiny stock Sana pipeline, a collapsed generator, Ray Data actors (two give the numbers of one), and bad input
refused before any compute with the field named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apexdistill.config import ConfigError, build_config

pytestmark = pytest.mark.timeout(300)

SIDE = 32
L = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from apexdistill.eval.features import build_tiny_clip, build_tiny_dinov2
    from apexdistill.models.family import get_family

    root = tmp_path_factory.mktemp("quality-models")
    return {"clip": build_tiny_clip(root / "clip"), "dinov2": build_tiny_dinov2(root / "dinov2"),
            "sana": get_family("sana").build_tiny_pipeline(root / "sana", seed=0)}


def _pipeline_cfg(models, tmp_path, *extra):
    return build_config({}, [f"model.path={models['sana']}", f"run.workdir={tmp_path}", f"data.resolution={SIDE}",
                             f"text_encoder.max_length={L}", "eval.prompts=builtin:compositional", "eval.prompt_limit=6",
                             "eval.images_per_prompt=3", "eval.noise_draws=2", "eval.nfe=[1,2]", "eval.teacher_nfe=4",
                             "eval.pipeline_batch_size=7", *extra])


def _student(cfg, scale: float = 0.0):
    """The teacher's weights, optionally moved by ``scale`` x a seeded random direction: a student of known distance."""
    from apexdistill.models.build import build_backbone
    from apexdistill.models.vae import build_vae

    c, h, _ = build_vae(cfg.vae, cfg.data.image_channels).latent_shape(SIDE)
    from apexdistill.models.text import build_text_encoder

    model = build_backbone(cfg.model, c, h, build_text_encoder(cfg.text_encoder).dim).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g) * p.abs().mean())
    return model


def test_frechet_distance_matches_scipy_sqrtm():
    """FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), scipy's sqrtm (real part) as the reference, 1e-6 relative."""
    from scipy import linalg

    from apexdistill.eval.metrics import frechet_distance

    rng = np.random.default_rng(0)
    for d, shift, stretch in ((8, 0.3, 1.5), (32, 0.0, 0.7), (64, 1.0, 3.0)):
        a = rng.normal(size=(400, d))
        b = (rng.normal(size=(350, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)) * stretch + shift
        mu_a, mu_b = a.mean(0), b.mean(0)
        s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        covmean = linalg.sqrtm(s_a @ s_b)
        ref = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(np.real(covmean)))
        ours = frechet_distance(a, b)
        assert ours == pytest.approx(ref, rel=1e-6), (d, ours, ref)


def test_clip_score_matches_torchmetrics(models):
    """Our per-image CLIP scores and the set's score (max(mean, 0)) against torchmetrics' CLIPScore on the same
    images, prompts and local model. torchmetrics 1.9 expects tensors from get_*_features; transformers 5 returns
    model outputs, so torchmetrics gets a view of the same model that returns their pooler_output (the projection)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import AutoProcessor, CLIPModel

    from apexdistill.eval.features import ClipModel, clip_score_of, to_uint8

    ours = ClipModel(models["clip"])
    images = torch.rand((6, 3, 40, 48), generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a photo of a red cat", "a dog", "two birds", "a blue car", "a photo of a cup", "three apples"]
    per_image = ours.scores(images, prompts)

    class Projected(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *a, **k):
            return self.model.get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return self.model.get_text_features(*a, **k).pooler_output

    reference = CLIPModel.from_pretrained(str(models["clip"])).eval()
    processor = AutoProcessor.from_pretrained(str(models["clip"]))
    metric = CLIPScore(model_name_or_path=lambda: (Projected(reference), processor))
    uint8 = to_uint8(images)
    for i in range(len(prompts)):  # one pair at a time: torchmetrics' score of each image
        single = CLIPScore(model_name_or_path=lambda: (Projected(reference), processor))
        single.update([uint8[i]], [prompts[i]])
        assert float(single.compute()) == pytest.approx(max(float(per_image[i]), 0.0), rel=1e-4, abs=1e-4)
    metric.update(list(uint8), prompts)
    assert clip_score_of(per_image) == pytest.approx(float(metric.compute()), rel=1e-4, abs=1e-4)


def test_tiny_feature_folders_load_by_path_and_give_features(models):
    from apexdistill.eval.features import build_feature_space

    images = torch.rand((5, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(1)) * 2 - 1
    for kind in ("clip", "dinov2"):
        cfg = build_config({}, [f"eval.features={kind}", f"eval.feature_model={models[kind]}"])
        space = build_feature_space(cfg.eval)
        feats = space(None, images)
        assert feats.shape == (5, 32 if kind == "dinov2" else 16) and torch.isfinite(feats).all()
        assert not torch.allclose(feats[0], feats[1])  # different images, different features


def test_bad_input_is_refused_before_any_compute_naming_the_field(models, tmp_path):
    """prepare() checks every input and loads no model: the run path need not even exist for these errors."""
    from apexdistill.eval.quality import prepare

    nowhere = str(tmp_path / "no-run")

    def refused(*extra):
        cfg = _pipeline_cfg(models, tmp_path, *extra)
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            prepare(nowhere, cfg, None, SIDE, SIDE)
        return str(err.value)

    assert "eval.prompts" in refused(f"eval.prompts={tmp_path / 'missing.txt'}") and "missing.txt" in refused(
        f"eval.prompts={tmp_path / 'missing.txt'}")
    (tmp_path / "empty.txt").write_text("\n# only a comment\n\n")
    msg = refused(f"eval.prompts={tmp_path / 'empty.txt'}")
    assert "eval.prompts" in msg and "no prompts" in msg
    msg = refused(f"eval.clip_model={models['dinov2']}")  # a folder that is not a CLIP model
    assert "eval.clip_model" in msg and "dinov2" in msg and "not a clip model" in msg
    msg = refused(f"eval.clip_model={tmp_path}")  # no config.json at all
    assert "eval.clip_model" in msg and "config.json" in msg
    msg = refused("eval.features=dinov2", f"eval.feature_model={models['clip']}")
    assert "eval.feature_model" in msg and "not a dinov2 model" in msg
    msg = refused(f"eval.reference={tmp_path / 'no-images'}")
    assert "eval.reference" in msg
    with pytest.raises(ConfigError, match="eval.feature_model"):  # the schema itself: clip features need a folder
        _pipeline_cfg(models, tmp_path, "eval.features=clip")


def test_quality_on_a_tiny_stock_pipeline_with_clip_and_dinov2(models, tmp_path):
    """Every row, metric and artifact of a pipeline evaluation with DINOv2 features, a CLIP score and real images."""
    import pyarrow.parquet as pq
    from PIL import Image

    from apexdistill.eval.quality import QualityWorker, evaluate_quality, format_quality_table, prepare

    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(real / f"{i}.png")
    cfg = _pipeline_cfg(models, tmp_path, "eval.features=dinov2", f"eval.feature_model={models['dinov2']}",
                        f"eval.clip_model={models['clip']}", f"eval.reference={real}")
    spec = prepare("in-process", cfg, None, SIDE, SIDE)
    worker = QualityWorker(_student(cfg, 0.2), cfg, list(spec.prompt_set.prompts), SIDE, SIDE)
    report = evaluate_quality(spec, worker=worker, out_dir=tmp_path / "out", progress=False)

    assert [(r.model, r.nfe) for r in report.rows] == [("teacher", 4), ("student", 1), ("student", 2)]
    teacher = report.teacher
    assert teacher.draws == 2 and teacher.fd_teacher_std is not None and teacher.diversity_ratio is None
    for r in report.rows:
        assert np.isfinite([r.fd_teacher, r.diversity, r.clip_score, r.fd_real, r.ms_per_image, r.ms_transformer]).all()
        assert r.ms_per_image > r.ms_transformer > 0
        assert set(r.clip_by_tag) == set(spec.prompt_set.tag_names())  # the first 6 built-in prompts: all six categories
    metrics = report.metrics()
    for n in (1, 2):
        for key in ("fd_teacher", "fd_teacher_std", "clip_score", "diversity", "ms_per_image", "ms_transformer", "speedup", "fd_real"):
            assert f"eval/{key}_{n}nfe" in metrics
    assert {"eval/teacher_fd_floor", "eval/teacher_clip_score", "eval/teacher_fd_real"} <= set(metrics)
    assert report.feature_dim == 32 and report.images_per_row == 18

    table = pq.read_table(tmp_path / "out" / "per_image.parquet")
    # teacher: 2 draws + its reference draw; each student NFE: 2 draws; 6 prompts x 3 images each
    assert table.num_rows == 18 * (3 + 2 * 2)
    assert set(table.column("model").to_pylist()) == {"teacher", "student"}
    assert json.loads((tmp_path / "out" / "quality.json").read_text())["prompt_hash"] == spec.prompt_set.hash
    assert Image.open(tmp_path / "out" / "samples.png").size[1] > 3 * SIDE  # rows: teacher, 1 NFE, 2 NFE
    printed = format_quality_table(report)
    assert "teacher (floor)" in printed and "CLIP score by tag" in printed and spec.prompt_set.hash in printed


def test_a_collapsed_generator_has_no_diversity_and_a_large_fd(models, tmp_path):
    """One output for every noise: diversity ~ 0 (flagged) and an FD to the teacher far above a working student's."""
    from apexdistill.eval.quality import CollapsedGenerator, QualityWorker, evaluate_quality, prepare

    # DINOv2's 32 features and 64 images a row: N above D, so the FD is not dominated by its small-N bias
    cfg = _pipeline_cfg(models, tmp_path, "eval.nfe=[1]", "eval.noise_draws=1", "eval.images_per_prompt=8", "eval.prompt_limit=8",
                        "eval.features=dinov2", f"eval.feature_model={models['dinov2']}")
    spec = prepare("in-process", cfg, None, SIDE, SIDE)
    working = QualityWorker(_student(cfg, 0.0), cfg, list(spec.prompt_set.prompts), SIDE, SIDE)
    good_report = evaluate_quality(spec, worker=working, progress=False)
    good = good_report.students()[0]
    collapsed_worker = QualityWorker(CollapsedGenerator(), cfg, list(spec.prompt_set.prompts), SIDE, SIDE,
                                     teacher=working.teacher)
    bad_report = evaluate_quality(spec, worker=collapsed_worker, progress=False)
    bad = bad_report.students()[0]
    assert bad.diversity_ratio < 0.01 and bad.collapsed
    assert not good.collapsed and good.diversity_ratio > 0.5
    assert bad.fd_teacher > 3 * good.fd_teacher


def test_two_ray_data_actors_give_the_numbers_of_one(tmp_path):
    """The shipped digits teacher scored as a run (no training needed): by one worker (in this process, every batch)
    and by two Ray Data actors sharing the batches, every number is the same (each batch's noise comes from its own
    seeds, not from which worker runs it or after which batch)."""
    import ray

    from apexdistill.eval.quality import evaluate_quality, load_run_student, prepare

    _, cfg = load_run_student("builtin:teacher")
    cfg = build_config(cfg.model_dump(mode="json"), [f"run.workdir={tmp_path}", "eval.images_per_prompt=3", "eval.noise_draws=2",
                                                    "eval.teacher_nfe=4", "eval.nfe=[1,2]", "eval.pipeline_batch_size=8",
                                                    "eval.actor_cpus=0.4"])
    spec = prepare("builtin:teacher", cfg, None, 16, 16)
    in_process = evaluate_quality(spec, actors=0, progress=False)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    two = evaluate_quality(spec, actors=2, progress=False)
    # one seed per image and draw: 2 draws + the teacher's reference draw, 10 prompts x 3 images each
    assert len(set(two.per_image.column("seed").to_pylist())) == 3 * 10 * 3
    for a, b in zip(in_process.rows, two.rows, strict=True):
        assert (a.model, a.nfe) == (b.model, b.nfe)
        assert b.fd_teacher == pytest.approx(a.fd_teacher, rel=1e-6)
        assert b.diversity == pytest.approx(a.diversity, rel=1e-6)
        assert b.fd_teacher_std == pytest.approx(a.fd_teacher_std, rel=1e-5)
    # a real signal on the digits: the teacher's own floor is below its one-step row's distance
    assert in_process.teacher.fd_teacher < in_process.students()[0].fd_teacher


def test_a_turbo_teacher_stated_without_guidance_is_sampled_without_cfg(tmp_path):
    """Z-Image-Turbo's teacher.guidance_scale=0.0 is kept (not taken for unset): no negative prompt, no CFG pass."""
    from apexdistill.eval.quality import QualityWorker
    from apexdistill.models.family import get_family

    folder = get_family("zimage").build_tiny_pipeline(tmp_path / "zimage", seed=0)
    cfg = build_config({}, [f"model.path={folder}", f"data.resolution={SIDE}", f"text_encoder.max_length={L}",
                            "teacher.guidance_scale=0.0", "eval.nfe=[1]"])
    worker = QualityWorker(_student(cfg), cfg, ["a cat"], SIDE, SIDE)
    assert worker.guidance == 0.0 and worker.neg is None and not worker.family.uses_cfg(worker.guidance)


def test_evaluate_keeps_a_digits_run_on_the_digit_metrics_with_eval_overrides(tmp_path, capsys):
    """`evaluate RUN eval.key=value` on a digits run scores prompt accuracy and the FD proxy with the overrides applied;
    --quality switches to the real-model scores; a repeated NFE is refused."""
    from apexdistill.cli import main

    assert main(["evaluate", "builtin:teacher", "--nfe", "1", "--draws", "1", "--workdir", str(tmp_path), "eval.samples_per_class=3"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "FD proxy" in printed and "FD to teacher" not in printed
    assert main(["evaluate", "builtin:teacher", "--nfe", "1", "1", "--workdir", str(tmp_path)]) == 2
    assert "eval.nfe lists 1 more than once" in capsys.readouterr().err
