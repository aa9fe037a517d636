"""Does the weight-free FD to the teacher mean something? Two checks, logged to MLflow (experiment ``benchmarks``):

1. **Ranking on the built-in digits.** One `apex` distillation of the shipped teacher (the demo's recipe, in this
   process), its EMA weights taken every ``--every`` steps (plus the teacher itself at one step, "step 0"): checkpoints
   of clearly different quality, each at 1 and 2 NFE; and, off that trajectory, the teacher's own Euler ODE at
   ``--euler`` steps used as a one-step generator. Each is scored by the digit classifier's FD proxy against the real
   test split (``eval/runner.py``, what the README's tables use) and by the real-model evaluation's FD to the teacher
   in the latent space (``eval/quality.py``: pixels here, pooled to 8x8; the teacher's 50-step Euler samples as the
   reference), on the same number of images per prompt. The Spearman rank correlation between the two is the result.
2. **Collapse on a tiny stock pipeline.** A tiny Sana pipeline built offline: its own weights as the one-step student,
   against a generator that gives one image for every noise. Diversity (x teacher) and FD to the teacher of both.

    python jobs/benchmark_eval_metrics.py --steps 300 --every 50
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50, help="take a checkpoint every N steps")
    p.add_argument("--per-class", type=int, default=50, help="images per prompt for both scores")
    p.add_argument("--draws", type=int, default=2, help="noise draws per score")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--euler", type=int, nargs="*", default=[2, 3, 5, 8], help="Euler steps of the teacher-as-generator rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="./apex-runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from scipy.stats import spearmanr

    from apexdistill.config import build_config
    from apexdistill.demo import demo_config
    from apexdistill.eval.quality import QualityWorker, evaluate_quality, prepare
    from apexdistill.eval.runner import DigitsBench
    from apexdistill.models.build import build_backbone
    from apexdistill.train.data import digit_caption_table
    from apexdistill.train.inprocess import distill_digits
    from apexdistill.tracking import record_benchmark

    started = time.perf_counter()
    cfg = demo_config(args.workdir, overrides=["train.num_workers=0", "train.strategy=none", f"train.steps={args.steps}",
                                               f"train.batch_size={args.batch}", f"eval.samples_per_class={args.per_class}",
                                               f"eval.noise_draws={args.draws}", f"eval.images_per_prompt={args.per_class}",
                                               "eval.nfe=[1,2]", "eval.pipeline_batch_size=500"])
    text, mask = digit_caption_table(cfg)
    bench = DigitsBench(cfg, text, mask)
    teacher = build_backbone(cfg.model, 1, cfg.data.resolution, text.shape[-1]).eval()
    spec = prepare("benchmark", cfg, None, cfg.data.resolution, cfg.data.resolution)
    worker = QualityWorker(copy.deepcopy(teacher), cfg, list(spec.prompt_set.prompts), cfg.data.resolution, cfg.data.resolution,
                           teacher=teacher)  # one worker: the teacher's rows are sampled once and reused for every checkpoint
    points: list[dict] = []

    def score(step: int | str, model: torch.nn.Module, nfes: tuple[int, ...] = (1, 2)) -> None:
        digits = bench.score("student", model.eval(), list(nfes), "few_step")
        worker.student = model.eval()
        report = evaluate_quality(spec, worker=worker, progress=False)
        for d, row in zip(digits, [r for r in report.students() if r.nfe in nfes]):
            points.append({"step": step, "nfe": row.nfe, "fd_proxy": d.fd, "accuracy": d.accuracy, "fd_teacher": row.fd_teacher,
                           "fd_teacher_std": row.fd_teacher_std, "diversity_ratio": row.diversity_ratio,
                           "teacher_floor": report.teacher.fd_teacher})
            print(f"[bench] {step} at {row.nfe} NFE: FD proxy {d.fd:.2f} (accuracy {100 * d.accuracy:.1f}%), FD to the teacher "
                  f"{row.fd_teacher:.3f} (floor {report.teacher.fd_teacher:.3f}), diversity {row.diversity_ratio:.2f}x", flush=True)

    for k in args.euler:  # off the training trajectory: the teacher's own ODE with few steps
        score(f"teacher Euler {k} steps", EulerAsOneStep(teacher, k), nfes=(1,))
    score(0, copy.deepcopy(teacher))
    distill_digits(cfg, text, mask, args.steps, args.batch, every=args.every,
                   on_score=lambda step, strategy, _: score(step, strategy.ema.copy_to(copy.deepcopy(strategy.backbone))
                                                           if strategy.ema else strategy.backbone))
    rho, pvalue = spearmanr([q["fd_proxy"] for q in points], [q["fd_teacher"] for q in points])
    print(f"[bench] Spearman rank correlation over {len(points)} generators: {rho:.3f} (p = {pvalue:.2g}); target >= 0.8")

    collapse = _collapse(build_config)
    record = {"checkpoints": points, "spearman": float(rho), "spearman_p": float(pvalue), "collapse": collapse,
              "images_per_row": len(spec.prompt_set) * args.per_class, "draws": args.draws,
              "seconds": time.perf_counter() - started}
    record_benchmark(args.workdir, "eval_metrics", record, params={"steps": args.steps, "every": args.every,
                                                                     "per_class": args.per_class, "draws": args.draws},
                     metrics={"spearman": float(rho), "collapsed_diversity_ratio": collapse["collapsed"]["diversity_ratio"],
                              "collapsed_fd_teacher": collapse["collapsed"]["fd_teacher"],
                              "student_fd_teacher": collapse["student"]["fd_teacher"]})
    print(json.dumps(record, indent=1))
    return record


class EulerAsOneStep(torch.nn.Module):
    """The teacher's ``steps``-step Euler ODE as a one-step generator: at the sampler's single query it returns the
    velocity that lands on the ODE's endpoint (x0 = x - t*v)."""

    def __init__(self, teacher: torch.nn.Module, steps: int) -> None:
        super().__init__()
        self.teacher, self.steps = teacher, steps

    def forward(self, x, t, text, mask=None):
        from apexdistill.method.sampler import sample_euler

        x0 = sample_euler(self.teacher, x, text, mask, nfe=self.steps)
        return (x - x0) / t.reshape(-1, *[1] * (x.dim() - 1))


def _collapse(build_config) -> dict:
    """A tiny Sana pipeline's weights as the one-step student, and a generator that ignores its noise."""
    from apexdistill.eval.features import build_tiny_dinov2
    from apexdistill.eval.quality import CollapsedGenerator, QualityWorker, evaluate_quality, prepare
    from apexdistill.models.build import build_backbone
    from apexdistill.models.family import get_family
    from apexdistill.models.text import build_text_encoder

    with tempfile.TemporaryDirectory() as tmp:
        folder = get_family("sana").build_tiny_pipeline(Path(tmp) / "sana", seed=0)
        dino = build_tiny_dinov2(Path(tmp) / "dinov2")
        cfg = build_config({}, [f"model.path={folder}", "data.resolution=32", "text_encoder.max_length=24",
                                "eval.prompts=builtin:compositional", "eval.prompt_limit=12", "eval.images_per_prompt=6",
                                "eval.noise_draws=2", "eval.nfe=[1]", "eval.teacher_nfe=4", "eval.features=dinov2",
                                f"eval.feature_model={dino}"])
        spec = prepare("benchmark", cfg, None, 32, 32)
        from apexdistill.models.vae import build_vae

        c, h, _ = build_vae(cfg.vae, cfg.data.image_channels).latent_shape(32)
        student = build_backbone(cfg.model, c, h, build_text_encoder(cfg.text_encoder).dim)
        out = {}
        for name, model in (("student", student), ("collapsed", CollapsedGenerator())):
            worker = QualityWorker(model, cfg, list(spec.prompt_set.prompts), 32, 32)
            report = evaluate_quality(spec, worker=worker, progress=False)
            row = report.students()[0]
            out[name] = {"fd_teacher": row.fd_teacher, "diversity_ratio": row.diversity_ratio, "floor": report.teacher.fd_teacher}
            print(f"[bench] tiny Sana, {name}: FD to the teacher {row.fd_teacher:.3f} (floor {report.teacher.fd_teacher:.3f}), "
                  f"diversity {row.diversity_ratio:.3f}x the teacher's", flush=True)
    return out


if __name__ == "__main__":
    main()
