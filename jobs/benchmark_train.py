"""Benchmark: training cost of apex against fm, Ray Train's overhead, and 1 vs 2 workers.

Three measurements on the tiny Sana backbone and the built-in digits, all in one run so that the
ratios compare numbers taken side by side on the same (noisy) machine:

1. ``apex`` (the demo's recipe) vs ``fm`` in-process, same backbone and batch: median step time (interleaved blocks;
   with the recipe's consistency bank, once it is full: the warm-up fills it), and the recipe with fresh targets
   and training memory. On CUDA the memory is ``torch.cuda.max_memory_allocated``; on CPU, where
   torch keeps no allocator statistics, it is weights + gradients + AdamW states + the activations
   saved for backward (counted with ``saved_tensors_hooks``), which is what differs between the two.
   apex's consistency bank (``consistency_bank_size``) lives in host memory, not the training device's: it is
   reported apart, and as a second ratio with the training memory (what a CPU-only run holds).
2. The same loop plainly in-process against Ray Train with one worker: steady-state samples/s
   (median over logging windows, the first one dropped) and the fixed start-up cost.
1b. The default apex recipe on a tiny stock Sana pipeline with its CFG (guided consistency target) against fm, with
   the bank full, while it fills, and with an unguided target.
3. Ray Train with 1 and 2 workers (DDP, one torch thread each).

    python jobs/benchmark_train.py --steps 300 --batch 32

Writes ``<workdir>/benchmarks/train.json`` and logs a run to the MLflow experiment ``benchmarks``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


#: the digits' sample: a 1x16x16 image, 16 text tokens of width 384 (MiniLM)
DIGITS_SHAPE = (1, 16, 16, 384)


def _batch(n: int, gen: torch.Generator, shape: tuple[int, int, int, int] = DIGITS_SHAPE) -> dict[str, torch.Tensor]:
    c, side, length, dim = shape
    return {"x": torch.rand(n, c, side, side, generator=gen) * 2 - 1, "text": torch.randn(n, length, dim, generator=gen),
            "text_mask": torch.ones(n, length, dtype=torch.long)}


def _setup(cfg, shape: tuple[int, int, int, int] = DIGITS_SHAPE, negative: dict | None = None):
    from apexdistill.method.base import build_objective
    from apexdistill.models.build import build_backbone
    from apexdistill.train.loop import wrap_with_reference
    from apexdistill.train.strategy import Strategy

    c, side, _, dim = shape
    backbone = build_backbone(cfg.model, c, side, dim)
    strategy = Strategy(cfg, 0, 1, torch.device(cfg.train.use_gpu and "cuda" or "cpu"))
    # the recipe's frozen teacher, and the negative prompt's states for a guided target
    wrap_with_reference(strategy, backbone, build_objective(cfg.objective), negative)
    return strategy


def _step(strategy, batch, step):
    loss, _ = strategy.objective.loss(strategy.model, batch, step)
    strategy.backward(loss)
    strategy.step()


def saved_activation_bytes(strategy, batch, step) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = strategy.objective.loss(strategy.model, batch, step)
    loss.backward()
    strategy.optimizer.zero_grad(set_to_none=True)
    return total


def state_bytes(strategy) -> int:
    trainable = sum(p.numel() * p.element_size() for p in strategy.backbone.parameters() if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in strategy.backbone.parameters())
    return weights + trainable * 3  # + gradients + AdamW's two moments


DIGITS_VARIANTS = {"apex": ["objective.name=apex"], "apex_no_anchor": ["objective.name=apex", "objective.apex.lambda_r=0"],
                   "apex_fresh_targets": ["objective.name=apex", "objective.apex.consistency_bank_size=0"],
                   "fm": ["objective.name=fm"]}


def objective_costs(base_cfg, batch_size: int, steps: int, blocks: int, variants: dict[str, list[str]] = DIGITS_VARIANTS,
                    shape: tuple[int, int, int, int] = DIGITS_SHAPE, negative: dict | None = None) -> dict:
    """Interleaved blocks of each variant's steps; step 1000 so apex's generator term is fully on."""
    from apexdistill.config import build_config

    gen = torch.Generator().manual_seed(0)
    batches = [_batch(batch_size, gen, shape) for _ in range(4)]
    strategies = {name: _setup(build_config(base_cfg.model_dump(mode="json"), ov), shape, negative) for name, ov in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in strategies}
    for name, s in strategies.items():  # warm-up, and with consistency_bank_size the steps that fill the bank
        for i in range(3 + getattr(s.objective, "bank_fill_steps", lambda _: 0)(batch_size)):
            _step(s, batches[i % 4], 1000)
    for _ in range(blocks):
        for name, s in strategies.items():
            for i in range(steps // blocks):
                t0 = time.perf_counter()
                _step(s, batches[i % 4], 1000)
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, s in strategies.items():
        device = s.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            _step(s, batches[0], 1000)
            memory = torch.cuda.max_memory_allocated(device)
        else:
            memory = state_bytes(s) + saved_activation_bytes(s, batches[0], 1000)
        bank = getattr(s.objective, "bank_bytes", 0)  # apex's consistency bank, in host memory
        out[name] = {"median_step_s": statistics.median(times[name]), "memory_mb": memory / 2**20, "host_bank_mb": bank / 2**20,
                     "activations_mb": saved_activation_bytes(s, batches[0], 1000) / 2**20}
    for name in (n for n in variants if n.startswith("apex")):
        suffix = "" if name == "apex" else name[4:]
        out[f"time_ratio{suffix}"] = out[name]["median_step_s"] / out["fm"]["median_step_s"]
        out[f"memory_ratio{suffix}"] = out[name]["memory_mb"] / out["fm"]["memory_mb"]
        out[f"memory_with_bank_ratio{suffix}"] = (out[name]["memory_mb"] + out[name]["host_bank_mb"]) / out["fm"]["memory_mb"]
        out[f"activation_ratio{suffix}"] = out[name]["activations_mb"] / out["fm"]["activations_mb"]
    return out


def pipeline_costs(workdir: str, batch_size: int, steps: int, blocks: int) -> dict:
    """The same on a tiny stock Sana pipeline with its CFG (SanaPipeline's 4.5, r = 3.5): the default recipe's guided
    consistency target (16 teacher calls a step while its bank fills, none after) against fm and the unguided target."""
    from pathlib import Path

    from apexdistill.config import build_config
    from apexdistill.models.family import get_family
    from apexdistill.models.text import build_text_encoder
    from apexdistill.models.vae import build_vae

    side, length = 32, 24
    folder = get_family("sana").build_tiny_pipeline(Path(workdir) / "benchmarks" / "tiny-sana", seed=0)
    cfg = build_config({}, [f"model.path={folder}", f"data.resolution={side}", f"text_encoder.max_length={length}",
                            f"train.batch_size={batch_size}", f"run.workdir={workdir}"])
    c, h, _ = build_vae(cfg.vae, cfg.data.image_channels).latent_shape(side)
    dim = build_text_encoder(cfg.text_encoder).dim
    gen = torch.Generator().manual_seed(1)
    negative = {"text": torch.randn(1, length, dim, generator=gen).tolist(), "mask": [[1] * length]}
    variants = {"apex": [], "apex_fresh_targets": ["objective.apex.consistency_bank_size=0"],
                "apex_unguided_fresh": ["objective.apex.consistency_bank_size=0", "objective.apex.guidance_ratio=0"],
                "fm": ["objective.name=fm"]}
    out = objective_costs(cfg, batch_size, steps, blocks, variants, (c, h, length, dim), negative)
    out["guidance_ratio"] = cfg.objective.apex.guidance_ratio
    return out


def plain_loop(cfg, shapes, cache_uri: str, steps: int, log_every: int) -> dict:
    """The worker loop's work without Ray: same data (read once from the Parquet cache), model, objective."""
    from apexdistill.data.preprocess import load_cache_tensors
    from apexdistill.train.data import InMemoryBatches

    t0 = time.time()
    torch.manual_seed(cfg.run.seed)
    strategy = _setup(cfg)
    rows = load_cache_tensors(cache_uri)
    batches = InMemoryBatches({k: rows[k] for k in ("x", "text", "text_mask")}, cfg.run.seed)
    setup_s = time.time() - t0
    rates, window = [], time.time()
    for step in range(steps):
        _step(strategy, batches.next(cfg.train.batch_size), step)
        if (step + 1) % log_every == 0:
            rates.append(log_every * cfg.train.batch_size / (time.time() - window))
            window = time.time()
    return {"setup_s": setup_s, "samples_per_s": statistics.median(rates[1:] or rates), "windows": len(rates)}


def ray_run(cfg) -> dict:
    from mlflow import MlflowClient

    from apexdistill.train.driver import clear_run, run_training

    clear_run(cfg)
    t0 = time.time()
    result = run_training(cfg, evaluate=False)
    wall = time.time() - t0
    history = MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, "samples_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][:-1]  # the last window is the partial one
    trained = float(result.metrics["trained_seconds"])
    return {"wall_s": wall, "trained_s": trained, "startup_s": wall - trained,
            "samples_per_s": statistics.median(rates[1:] or rates), "windows": len(rates)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps per Ray / plain run")
    p.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    p.add_argument("--objective-steps", type=int, default=60, help="timed steps per objective (apex vs fm)")
    p.add_argument("--workdir", default="./apex-runs")
    p.add_argument("--objectives-only", action="store_true", help="only part 1 (apex vs fm), no Ray runs")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from apexdistill.config import build_config, flatten
    from apexdistill.data.preprocess import run_preprocess
    from apexdistill.train.data import DataShapes
    from apexdistill.tracking import record_benchmark
    from apexdistill.train.driver import ensure_ray

    torch.set_num_threads(1)  # one thread everywhere: a Ray worker with one CPU gets one thread
    log_every = 25
    common = [f"run.workdir={args.workdir}", "model.path=builtin:teacher", "objective.name=apex", f"train.batch_size={args.batch}",
              f"train.steps={args.steps}", f"train.log_every={log_every}", "train.checkpoint_every=0", "eval.at_end=false",
              "tracking.experiment=benchmark-train-runs", *args.overrides]
    from apexdistill.demo import demo_config

    # apex is the default recipe (the demo's)
    cfg = build_config({"objective": demo_config(args.workdir).objective.model_dump(mode="json")}, common)
    ensure_ray()
    cache = run_preprocess(cfg)
    shapes = DataShapes.from_manifest(cache.manifest, cache.uri)

    print("[bench] 1/3 apex vs fm, in-process", flush=True)
    costs = objective_costs(cfg, args.batch, args.objective_steps, blocks=4)
    print(f"[bench]     apex {costs['apex']['median_step_s'] * 1e3:.1f} ms/step, fm {costs['fm']['median_step_s'] * 1e3:.1f} ms/step: "
          f"{costs['time_ratio']:.2f}x time; memory {costs['apex']['memory_mb']:.1f} vs {costs['fm']['memory_mb']:.1f} MB: "
          f"{costs['memory_ratio']:.2f}x (activations {costs['activation_ratio']:.2f}x); its consistency bank in host memory "
          f"{costs['apex']['host_bank_mb']:.1f} MB (with it {costs['memory_with_bank_ratio']:.2f}x)", flush=True)
    print(f"[bench]     apex without the real anchor (lambda_r=0): {costs['apex_no_anchor']['median_step_s'] * 1e3:.1f} ms/step: "
          f"{costs['time_ratio_no_anchor']:.2f}x time, {costs['memory_ratio_no_anchor']:.2f}x memory", flush=True)
    from apexdistill.method.base import build_objective

    fill = build_objective(cfg.objective).bank_fill_steps(args.batch)
    print(f"[bench]     apex with fresh reference targets every step (consistency_bank_size=0; with a bank, its first {fill} "
          f"steps): {costs['apex_fresh_targets']['median_step_s'] * 1e3:.1f} ms/step: {costs['time_ratio_fresh_targets']:.2f}x time, "
          f"{costs['memory_ratio_fresh_targets']:.2f}x memory", flush=True)
    print("[bench] 1b/3 the default recipe on a tiny stock Sana pipeline with CFG 4.5 vs fm, in-process", flush=True)
    guided = pipeline_costs(args.workdir, args.batch, args.objective_steps, blocks=4)
    print(f"[bench]     apex (guided target, bank full) {guided['apex']['median_step_s'] * 1e3:.1f} ms/step, fm "
          f"{guided['fm']['median_step_s'] * 1e3:.1f} ms/step: {guided['time_ratio']:.2f}x time; while its bank fills (fresh "
          f"guided targets) {guided['time_ratio_fresh_targets']:.2f}x, fresh unguided targets "
          f"{guided['time_ratio_unguided_fresh']:.2f}x", flush=True)
    if args.objectives_only:
        return

    print("[bench] 2/3 plain in-process loop vs Ray Train with one worker", flush=True)
    plain = plain_loop(cfg, shapes, cache.uri, args.steps, log_every)
    one = ray_run(build_config({}, [*common, "run.name=bench-1w", "train.num_workers=1", "train.cpus_per_worker=1"]))
    print(f"[bench]     plain {plain['samples_per_s']:.0f} samples/s, Ray 1 worker {one['samples_per_s']:.0f} samples/s: "
          f"{one['samples_per_s'] / plain['samples_per_s']:.2f}x; Ray start-up {one['startup_s']:.1f} s (plain setup {plain['setup_s']:.1f} s)", flush=True)

    print("[bench] 3/3 Ray Train, 2 workers (DDP)", flush=True)
    two = ray_run(build_config({}, [*common, "run.name=bench-2w", "train.num_workers=2", "train.cpus_per_worker=0.45",
                                    "train.strategy=ddp"]))
    print(f"[bench]     2 workers {two['samples_per_s']:.0f} samples/s vs 1 worker {one['samples_per_s']:.0f}: "
          f"{two['samples_per_s'] / one['samples_per_s']:.2f}x", flush=True)

    record = {"objectives": costs, "pipeline_cfg": guided, "plain": plain, "ray_1_worker": one, "ray_2_workers": two,
              "ray_over_plain": one["samples_per_s"] / plain["samples_per_s"],
              "two_over_one": two["samples_per_s"] / one["samples_per_s"], "batch_per_rank": args.batch, "steps": args.steps}
    record_benchmark(
        args.workdir, "train", record,
        params={k: v for k, v in flatten(cfg).items() if k.startswith(("model.", "train.batch_size", "objective.name"))},
        metrics={"apex_over_fm_time": costs["time_ratio"], "apex_over_fm_memory": costs["memory_ratio"],
                 "apex_over_fm_memory_with_host_bank": costs["memory_with_bank_ratio"], "apex_host_bank_mb": costs["apex"]["host_bank_mb"],
                 "apex_no_anchor_over_fm_time": costs["time_ratio_no_anchor"],
                 "apex_no_anchor_over_fm_memory": costs["memory_ratio_no_anchor"],
                 "apex_fresh_targets_over_fm_time": costs["time_ratio_fresh_targets"],
                 "pipeline_cfg_apex_over_fm_time": guided["time_ratio"],
                 "pipeline_cfg_apex_fresh_over_fm_time": guided["time_ratio_fresh_targets"],
                 "pipeline_cfg_apex_unguided_fresh_over_fm_time": guided["time_ratio_unguided_fresh"],
                 "ray_over_plain": record["ray_over_plain"], "ray_startup_s": one["startup_s"],
                 "two_over_one_workers": record["two_over_one"], "plain_samples_per_s": plain["samples_per_s"],
                 "ray1_samples_per_s": one["samples_per_s"], "ray2_samples_per_s": two["samples_per_s"]},
    )

if __name__ == "__main__":
    main()
