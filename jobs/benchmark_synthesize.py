"""Benchmark: data-free distillation on the built-in digits, and the synthesis's throughput.

1. **Throughput.** ``run_synthesize`` (``data.source: teacher``, the shipped digits teacher at its 50 Euler steps) with
   1 and then 2 teacher actors on the same rows, each a cold build (``force``) on one started local Ray: rows/s of
   the whole build (actor start-up included) and of its sampling alone (from the first committed shard on), and the
   cache's bytes per row.
2. **Quality.** The demo's recipe and steps (``platform/apexdistill/configs/demo.yaml``) trained twice per seed: on
   the real digits, and on a set the teacher synthesized (no real image used: 10 digit captions x
   ``--samples-per-prompt`` images, about the 1437 real training rows). Each student is scored as the demo scores it
   (1 NFE, the few-step sampler, ``eval.noise_draws`` draws of 1000 images: FD proxy and accuracy); the table has
   the mean and spread over the seeds.

Writes ``<workdir>/benchmarks/synthesize.json`` and logs to MLflow (experiment "benchmarks").

    python jobs/benchmark_synthesize.py                       # both parts, 3 seeds, the demo's 1100 steps
    python jobs/benchmark_synthesize.py --steps 40 --seeds 0 --throughput-rows 200   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def throughput(workdir: Path, rows_per_prompt: int, actors: int) -> dict:
    from apexdistill.config import load_config
    from apexdistill.data.synthesize import run_synthesize
    from apexdistill.demo import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG, [f"run.workdir={workdir}", "data.source=teacher", f"data.samples_per_prompt={rows_per_prompt}",
                                    f"data.actors={actors}", "data.actor_cpus=0.5", "data.shard_rows=50", "data.batch_size=50"])
    started = time.time()
    info = run_synthesize(cfg, force=True)
    seconds = time.time() - started
    return {"actors": actors, "rows": info.rows, "seconds": seconds, "rows_per_s": info.rows / seconds,
            "sampling_rows_per_s": info.manifest["settings"]["sampling_rows_per_s"],
            "bytes_per_row": info.manifest["bytes_per_row"], "teacher_steps": info.manifest["settings"]["sampler"]["steps"]}


def distill(workdir: Path, seed: int, steps: int | None, synthesized: int | None) -> dict:
    from apexdistill.demo import demo_config
    from apexdistill.eval.runner import DigitsBench
    from apexdistill.train.data import digit_caption_table
    from apexdistill.train.driver import run_training
    from apexdistill.train.export import load_trained_backbone

    data = ["data.source=teacher", f"data.samples_per_prompt={synthesized}"] if synthesized else []
    name = f"{'synthesized' if synthesized else 'real'}-seed{seed}"
    cfg = demo_config(str(workdir), overrides=[*data, f"run.seed={seed}", f"run.name={name}",
                                               *([f"train.steps={steps}", "train.max_minutes=null"] if steps else [])])
    started = time.time()
    result = run_training(cfg, evaluate=False)
    minutes = (time.time() - started) / 60
    student, _ = load_trained_backbone(result.run_dir, use_ema=cfg.eval.use_ema)
    (row,) = DigitsBench(cfg, *digit_caption_table(cfg)).score(name, student, [1], "few_step")
    return {"data": "synthesized" if synthesized else "real", "seed": seed, "steps": int(result.metrics["step"]), "minutes": minutes,
            "fd": row.fd, "fd_std": row.fd_std, "accuracy": row.accuracy, "draws": cfg.eval.noise_draws}


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="./apex-runs/bench-synthesize")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="distillation steps (default: the demo's)")
    ap.add_argument("--samples-per-prompt", type=int, default=144, help="synthesized images per digit caption (144: 1440 rows)")
    ap.add_argument("--throughput-rows", type=int, default=600, help="rows of the throughput builds (10 prompts x rows/10)")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    workdir = Path(args.workdir).resolve()

    from apexdistill.train.driver import ensure_ray

    ensure_ray(log_dir=workdir / "logs")
    speed = [throughput(workdir / "throughput", max(1, args.throughput_rows // 10), n) for n in (1, 2)]
    for s in speed:
        print(f"[bench] synthesis, {s['actors']} actor(s): {s['rows']} rows at {s['teacher_steps']} teacher steps in "
              f"{s['seconds']:.1f} s = {s['rows_per_s']:.1f} rows/s with the actors' start-up, {s['sampling_rows_per_s']:.1f} rows/s "
              f"sampling; {s['bytes_per_row']:.0f} bytes a row")
    print(f"[bench] 2 actors / 1 actor: {speed[1]['rows_per_s'] / speed[0]['rows_per_s']:.2f}x overall, "
          f"{speed[1]['sampling_rows_per_s'] / speed[0]['sampling_rows_per_s']:.2f}x sampling")

    runs = []
    if not args.skip_quality:
        for seed in args.seeds:
            for synthesized in (None, args.samples_per_prompt):
                runs.append(distill(workdir, seed, args.steps, synthesized))
                r = runs[-1]
                print(f"[bench] {r['data']:>11} seed {seed}: {r['steps']} steps in {r['minutes']:.1f} min; 1 NFE FD proxy "
                      f"{r['fd']:.3f} (+- {r['fd_std'] or 0:.3f} over {r['draws']} draws), accuracy {100 * r['accuracy']:.1f}%", flush=True)
    summary = {}
    for data in ("real", "synthesized"):
        rows = [r for r in runs if r["data"] == data]
        if rows:
            summary[data] = {"fd_mean": statistics.mean(r["fd"] for r in rows), "accuracy_mean": statistics.mean(r["accuracy"] for r in rows),
                             "fd_sd": statistics.stdev([r["fd"] for r in rows]) if len(rows) > 1 else 0.0}
            print(f"[bench] {data:>11}: 1 NFE FD proxy {_mean_sd([r['fd'] for r in rows])}, accuracy "
                  f"{_mean_sd([100 * r['accuracy'] for r in rows])}% over seeds {args.seeds}")
    if len(summary) == 2:
        print(f"[bench] synthesized / real FD: {summary['synthesized']['fd_mean'] / summary['real']['fd_mean']:.3f}")

    from apexdistill.tracking import record_benchmark

    record = {"throughput": speed, "runs": runs, "summary": summary, "seeds": args.seeds, "steps": args.steps,
              "samples_per_prompt": args.samples_per_prompt, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    metrics = {f"rows_per_s_{s['actors']}actor": s["rows_per_s"] for s in speed}
    metrics |= {f"sampling_rows_per_s_{s['actors']}actor": s["sampling_rows_per_s"] for s in speed} | {"bytes_per_row": speed[0]["bytes_per_row"]}
    for data, s in summary.items():
        metrics |= {f"{data}_fd": s["fd_mean"], f"{data}_accuracy": s["accuracy_mean"]}
    record_benchmark(workdir, "synthesize", record, params={"seeds": str(args.seeds), "steps": str(args.steps or "demo"),
                                                            "samples_per_prompt": args.samples_per_prompt}, metrics=metrics)


if __name__ == "__main__":
    main()
