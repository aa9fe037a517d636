"""Ablation harness for the `apex` recipe: distill the shipped teacher in-process (no Ray), scoring the
EMA weights at 1 and 2 NFE every N steps, with the library's own objective, strategy, EMA and reference
weights. Quick to iterate with (a 400-step run is about 2 minutes on 2 cores); the table in the
README's "The apex recipe" was made with it. Appends one JSON line per run to
``<workdir>/benchmarks/recipe_ablation.jsonl``.

    python jobs/recipe_ablation.py --steps 800 --every 200 objective.apex.lambda_g=0
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=100, help="score every N steps")
    p.add_argument("--per-class", type=int, default=50, help="images per prompt per score")
    p.add_argument("--draws", type=int, default=1, help="noise draws per score (means; eval.noise_draws)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="./apex-runs")
    p.add_argument("--tag", default="")
    p.add_argument("overrides", nargs="*", help="key=value on top of the demo's config")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from apexdistill.demo import demo_config
    from apexdistill.eval.runner import DigitsBench
    from apexdistill.train.data import digit_caption_table
    from apexdistill.train.inprocess import distill_digits

    cfg = demo_config(args.workdir, overrides=["train.num_workers=0", "train.strategy=none", f"train.steps={args.steps}",
                                               f"train.batch_size={args.batch}", f"eval.samples_per_class={args.per_class}",
                                               f"eval.noise_draws={args.draws}",
                                               *args.overrides])
    text, mask = digit_caption_table(cfg)
    bench = DigitsBench(cfg, text, mask)
    history: list[dict] = []

    def score(step: int, strategy, trained_s: float) -> None:
        model = strategy.ema.copy_to(copy.deepcopy(strategy.backbone)) if strategy.ema else strategy.backbone
        scored = bench.score("student", model.eval(), [1, 2], "few_step")
        history.append({"step": step, **{f"fd_{r.nfe}nfe": round(r.fd, 2) for r in scored},
                        **{f"accuracy_{r.nfe}nfe": r.accuracy for r in scored}, "train_s": round(trained_s, 1)})
        print(f"[ablation] {json.dumps(history[-1])}", flush=True)

    distill_digits(cfg, text, mask, args.steps, args.batch, every=args.every, on_score=score)
    trained = history[-1]["train_s"]
    record = {"tag": args.tag, "overrides": args.overrides, "history": history, "s_per_step": trained / args.steps}
    out = Path(args.workdir) / "benchmarks" / "recipe_ablation.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"[ablation] appended to {out}")
    return record


if __name__ == "__main__":
    main()
