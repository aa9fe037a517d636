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
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=100, help="score every N steps")
    p.add_argument("--per-class", type=int, default=50, help="images per prompt per score")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="./apex-runs")
    p.add_argument("--tag", default="")
    p.add_argument("overrides", nargs="*", help="key=value on top of the demo's config")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from apexdistill.data.digits import load_digits_split
    from apexdistill.demo import demo_config
    from apexdistill.eval.runner import DigitsBench
    from apexdistill.method.base import build_objective
    from apexdistill.models.build import build_backbone
    from apexdistill.train.data import digit_caption_table
    from apexdistill.train.loop import bind_reference, keep_initial_weights, lr_factor
    from apexdistill.train.strategy import build_strategy

    cfg = demo_config(args.workdir, overrides=["train.num_workers=0", "train.strategy=none", f"train.steps={args.steps}",
                                               f"train.batch_size={args.batch}", f"eval.samples_per_class={args.per_class}",
                                               *args.overrides])
    text, mask = digit_caption_table(cfg)
    split = load_digits_split("train", cfg.data.resolution, cfg.data.test_fraction, cfg.data.split_seed)
    bench = DigitsBench(cfg, text, mask)
    torch.manual_seed(cfg.run.seed)
    backbone = build_backbone(cfg.model, 1, cfg.data.resolution, text.shape[-1])
    objective = build_objective(cfg.objective)
    strategy = build_strategy(cfg, 0, 1, torch.device("cpu"))
    strategy.wrap(backbone, objective)
    bind_reference(objective, strategy, keep_initial_weights(cfg, backbone))
    rows = torch.Generator().manual_seed(cfg.run.seed + 7)
    torch.manual_seed(cfg.run.seed + 1)

    def score() -> dict:
        model = strategy.ema.copy_to(copy.deepcopy(backbone)) if strategy.ema else backbone
        rng = torch.get_rng_state()  # scoring must not shift the training noise
        scored = bench.score("student", model.eval(), [1, 2], "few_step")
        torch.set_rng_state(rng)
        return {**{f"fd_{r.nfe}nfe": round(r.fd, 2) for r in scored}, **{f"accuracy_{r.nfe}nfe": r.accuracy for r in scored}}

    history, trained = [], 0.0
    backbone.train()
    for step in range(args.steps):
        started = time.perf_counter()
        strategy.set_lr(lr_factor(cfg, step))
        idx = torch.randint(0, len(split), (args.batch,), generator=rows)
        labels = split.labels[idx]
        loss, metrics = objective.loss(strategy.model, {"x": split.images[idx], "text": text[labels], "text_mask": mask[labels]}, step)
        strategy.backward(loss)
        strategy.step()
        trained += time.perf_counter() - started
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            history.append({"step": step + 1, **score(), "train_s": round(trained, 1)})
            print(f"[ablation] {json.dumps(history[-1])}", flush=True)
    record = {"tag": args.tag, "overrides": args.overrides, "history": history, "s_per_step": trained / args.steps}
    out = Path(args.workdir) / "benchmarks" / "recipe_ablation.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"[ablation] appended to {out}")
    return record


if __name__ == "__main__":
    main()
