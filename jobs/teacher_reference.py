"""Score the shipped teacher's multi-step reference row for the demo's settings and ship it.

The demo's table compares the student with the teacher at 50 Euler steps. That row depends only on the
shipped teacher, the shipped evaluator and fixed settings (images per prompt, seed, draws), yet it cost
3 draws x 28 s on every run. This script scores it once, per noise draw, and writes it with its
provenance to ``platform/apexdistill/assets/teacher_reference.json``. The demo uses it only when its key
(the files' hashes and every setting) is exactly the run's; ``tests/test_reference.py`` recomputes it.

    python jobs/teacher_reference.py                      # the demo's row (50 steps, 3 draws)
    python jobs/teacher_reference.py --check              # recompute and compare, write nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def score_draws(cfg, bench, teacher, draws: int) -> dict:
    """Per-draw FD proxy and accuracy of the teacher's reference row (the demo's seeds)."""
    from apexdistill.eval.generate import DRAW_SEED_STRIDE

    fds, accs, ms = [], [], None
    e = cfg.eval
    for i in range(draws):
        one = bench.score("teacher", teacher, [e.teacher_nfe], "euler", draws=1, seed=e.seed + DRAW_SEED_STRIDE * i)[0]
        fds.append(one.fd)
        accs.append(one.accuracy)
        ms = one.ms_per_image if ms is None else ms
        print(f"[reference] draw {i + 1}/{draws}: FD proxy {one.fd:.4f}, accuracy {100 * one.accuracy:.1f}%", flush=True)
    return {"fd_draws": fds, "accuracy_draws": accs, "ms_per_image": ms}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="./apex-runs")
    p.add_argument("--check", action="store_true", help="recompute and compare with the shipped row; write nothing")
    p.add_argument("overrides", nargs="*", help="key=value on top of the demo's config")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from apexdistill.demo import demo_config
    from apexdistill.eval.runner import REFERENCE_FILE, DigitsBench, load_references, reference_key
    from apexdistill.models.build import build_backbone
    from apexdistill.train.data import digit_caption_table

    cfg = demo_config(args.workdir, overrides=args.overrides)
    bench = DigitsBench(cfg, *digit_caption_table(cfg))
    e = cfg.eval
    key = reference_key(cfg, bench.classifier_info, e.teacher_nfe, "euler", e.reference_draws)
    if key is None:
        print("[reference] the model or the evaluator is not a shipped file: there is no fixed row to ship", file=sys.stderr)
        return 2
    teacher = build_backbone(cfg.model, 1, cfg.data.resolution, bench.text_table.shape[-1]).eval()
    scored = score_draws(cfg, bench, teacher, e.reference_draws)
    rows = [r for r in load_references() if r["key"] != key]
    old = next((r for r in load_references() if r["key"] == key), None)
    if args.check:
        if old is None:
            print("[reference] no shipped row for these settings", file=sys.stderr)
            return 1
        diffs = [abs(a - b) / b for a, b in zip(scored["fd_draws"], old["fd_draws"])]
        print(f"[reference] largest relative FD difference to the shipped row: {max(diffs):.2e}")
        return 0 if max(diffs) < 1e-2 else 1
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    provenance = {"command": f"python jobs/teacher_reference.py {' '.join(args.overrides)}".strip(),
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
                  "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1 torch thread",
                  "note": "ms_per_image is this machine's; the demo times the row on its own"}
    rows.append({"key": key, **scored, "provenance": provenance})
    REFERENCE_FILE.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"[reference] wrote {REFERENCE_FILE}: FD proxy {sum(scored['fd_draws']) / len(scored['fd_draws']):.4f} "
          f"(mean of {len(scored['fd_draws'])} draws)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
