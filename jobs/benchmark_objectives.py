"""Benchmark: distill the shipped digits teacher with several objectives under the same budget.

Prints the demo table for each objective (teacher at 50 and 1 NFE, student at 1 and 2 NFE), writes
``<workdir>/benchmarks/objectives.json`` and logs every row to MLflow (SQLite in the work directory).

    python jobs/benchmark_objectives.py --objectives apex apex_literal regression --minutes 4.5
    python jobs/benchmark_objectives.py --guidance-ratios 0 1 3 --guidance-references frozen ema --minutes 30 train.steps=400
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--objectives", nargs="+", default=["apex", "apex_literal", "regression"])
    p.add_argument("--minutes", type=float, default=4.5, help="distillation budget per objective")
    p.add_argument("--guidance-ratios", nargs="*", type=float, default=None,
                   help="instead of --objectives: apex with each objective.apex.guidance_ratio r (guidance from the EMA)")
    p.add_argument("--guidance-references", nargs="*", default=["auto"], help="with --guidance-ratios: objective.apex.guidance_reference values")
    p.add_argument("--workdir", default="./apex-runs")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import mlflow

    from apexdistill.demo import demo_config
    from apexdistill.eval.runner import DigitsBench, format_table
    from apexdistill.models.build import build_backbone
    from apexdistill.train.data import digit_caption_table
    from apexdistill.train.driver import clear_run, run_training
    from apexdistill.train.export import load_trained_backbone

    base = demo_config(args.workdir, overrides=[f"train.max_minutes={args.minutes}", *args.overrides])
    bench = DigitsBench(base, *digit_caption_table(base))
    teacher = build_backbone(base.model, 1, base.data.resolution, 384).eval()
    rows = bench.score("teacher", teacher, [base.eval.teacher_nfe], "euler") + bench.score("teacher", teacher, [1], "few_step")
    timing = {}
    variants = ([(f"apex r={r:g} {ref}" if r else "apex r=0", ["objective.name=apex", f"objective.apex.guidance_ratio={r}",
                                                               f"objective.apex.guidance_reference={ref}"])
                 for r in args.guidance_ratios for ref in (args.guidance_references if r else args.guidance_references[:1])]
                if args.guidance_ratios is not None else [(name, [f"objective.name={name}"]) for name in args.objectives])
    for name, extra in variants:
        cfg = demo_config(args.workdir, overrides=[f"train.max_minutes={args.minutes}", *extra,
                                                   f"run.name=bench-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}", *args.overrides])
        clear_run(cfg)  # each benchmark run starts fresh, never resumes
        t0 = time.time()
        result = run_training(cfg, evaluate=False)  # scored below, side by side with the teacher
        timing[name] = {"train_minutes": (time.time() - t0) / 60, "steps": int(result.metrics.get("step", 0))}
        student, _ = load_trained_backbone(result.run_dir)
        rows += bench.score(f"student ({name})", student, cfg.eval.nfe, "few_step")

    table = format_table(rows, bench.evaluator.floor_fd)
    print(table)
    for name, t in timing.items():
        print(f"{name}: {t['steps']} steps in {t['train_minutes']:.1f} min")
    out = Path(args.workdir) / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    record = {"rows": [r.as_dict() for r in rows], "floor_fd": bench.evaluator.floor_fd, "timing": timing}
    (out / "objectives.json").write_text(json.dumps(record, indent=2))

    mlflow.set_tracking_uri(f"sqlite:///{Path(args.workdir).resolve() / 'mlflow.db'}")
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="objectives"):
        mlflow.log_params({"minutes": args.minutes, "objectives": ",".join(n for n, _ in variants)})
        mlflow.log_metric("floor_fd", bench.evaluator.floor_fd)
        for r in rows:
            key = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{r.model}_nfe{r.nfe}").strip("_")
            mlflow.log_metric(f"{key}_fd", r.fd)
            if r.accuracy is not None:
                mlflow.log_metric(f"{key}_accuracy", r.accuracy)
        mlflow.log_text(table, "objectives.txt")
    print(f"written: {out / 'objectives.json'} and MLflow experiment 'benchmarks'")


if __name__ == "__main__":
    main()
