"""Benchmark on one GPU: Sana 0.6B and 1.6B at 1024 px, training and sampling (first run: one H200, README).

For each of the Sana 0.6B and 1.6B architectures (``model.preset=sana-0.6b`` / ``sana-1.6b``, random
weights: the speed and memory of a step do not depend on the values), with bf16 FSDP2 on one rank
(the training code path, ``FSDP2Strategy``, with a process group of world size 1) and 1024 px
latents (32 x 32 x 32: Sana's DC-AE is f32c32) with 300 text tokens of width 2304:

1. training, with and without ``train.gradient_checkpointing``: ``apex`` (the demo's recipe, with its kept
   teacher copy, which fm's memory ratio leaves out) and ``fm`` step time
   (median), samples/s and peak memory (``torch.cuda.max_memory_allocated``), next to the
   ``apexdistill plan`` estimate of the same setup;
2. sampling: the 1-NFE student (the exported pipeline's student scheduler) against the teacher as users
   run it (Sana's DPM-Solver, 20 steps, CFG 4.5 = two passes per step), images/s of the transformer
   (text encoding and VAE decoding are not included). The APEX paper reports 7.30 samples/s for its
   0.6B model on one A100.

    python jobs/benchmark_gpu.py                         # one 80 GB GPU, about 2-3 minutes
    python jobs/benchmark_gpu.py --device cpu --tiny     # the same code path on a tiny Sana, seconds

Writes ``<workdir>/benchmarks/gpu.json`` (``gpu-tiny-cpu.json`` for the CPU check) and logs a run to
the MLflow experiment ``benchmarks`` of ``<workdir>/mlflow.db``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

#: Sana's shipped teacher setting (SanaPipeline.__call__ defaults; DPM-Solver flow_shift 3 at 1024 px)
TEACHER_STEPS, TEACHER_GUIDANCE = 20, 4.5
PAPER_SAMPLES_PER_S_06B_A100 = 7.30


@contextlib.contextmanager
def one_rank_group(device: torch.device):
    """A real process group of world size 1 (nccl on CUDA, gloo on CPU): what fsdp2 needs."""
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _peak_mb(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**20


def _recipe() -> dict[str, Any]:
    """apex as the demo's recipe runs it: the demo config's objective section (fm ignores it)."""
    from apexdistill.demo import demo_config

    return {"objective": demo_config(".").objective.model_dump(mode="json")}


def bench_size(preset: str, overrides: list[str], device: torch.device, batch: int, steps: int, sample_batch: int,
               latent: tuple[int, int, int], text: tuple[int, int]) -> dict[str, Any]:
    """One architecture: build it once, wrap it with fsdp2, time apex and fm with checkpointing off and
    on (diffusers' switch flips on the wrapped model), then sample."""
    from apexdistill.config import build_config
    from apexdistill.method.base import build_objective
    from apexdistill.models.build import build_backbone
    from apexdistill.models.family import get_family
    from apexdistill.plan import Shapes, plan_memory
    from apexdistill.train.loop import wrap_with_reference
    from apexdistill.train.strategy import build_strategy
    from diffusers import DPMSolverMultistepScheduler

    common = [f"model.preset={preset}", "train.strategy=fsdp2", "train.num_workers=1", f"train.batch_size={batch}",
              f"train.use_gpu={device.type == 'cuda'}", *overrides]
    cfg = build_config(_recipe(), common)
    c, h, w = latent
    text_len, text_dim = text
    shapes = Shapes(latent=latent, text_len=text_len, text_dim=text_dim)  # the plan of exactly what is timed here
    family = get_family(cfg.model.backbone)
    torch.manual_seed(0)
    with torch.device(device):  # random init where it runs (a 1.6B init on the CPU alone takes tens of seconds)
        backbone = build_backbone(cfg.model, c, h, text_dim)
    strategy = build_strategy(cfg, 0, 1, device)
    frozen = wrap_with_reference(strategy, backbone.train(), build_objective(cfg.objective))  # the recipe's kept teacher
    frozen_mb = sum(t.numel() * t.element_size() for t in (frozen or {}).values()) / 2**20
    objectives = {"apex": strategy.objective, "fm": build_objective(build_config({}, [*common, "objective.name=fm"]).objective).to(device)}
    g = torch.Generator(device="cpu").manual_seed(0)
    data = {"x": (torch.rand(batch, c, h, w, generator=g) * 2 - 1).to(device),
            "text": torch.randn(batch, text_len, text_dim, generator=g).to(device),
            "text_mask": torch.ones(batch, text_len, dtype=torch.long, device=device)}

    # the kept teacher copy is allocated for both objectives here; fm alone would not hold it, so fm's
    # training memory is its peak less that copy
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in backbone.parameters()), "frozen_teacher_mb": frozen_mb}
    for checkpointing in (False, True):
        if checkpointing:
            backbone.enable_gradient_checkpointing()
        else:
            backbone.transformer.disable_gradient_checkpointing()
        for name, objective in objectives.items():
            def step(objective=objective):
                loss, _ = objective.loss(strategy.model, data, 1000)
                strategy.backward(loss)
                strategy.step()

            step()  # warm-up (allocator, kernels, the optimizer's states)
            times = _timed(step, device, steps)
            key = f"{name}{'_ckpt' if checkpointing else ''}"
            planned = plan_memory(build_config(_recipe(), [*common, f"objective.name={name}", f"train.gradient_checkpointing={checkpointing}"]),
                                  shapes) if device.type == "cuda" else None
            median = statistics.median(times)
            out[key] = {"step_s": median, "samples_per_s": batch / median, "peak_memory_mb": _peak_mb(step, device),
                        "planned_mb": planned.per_gpu_gb * 1024 if planned else None}
            plan = f" (plan {out[key]['planned_mb']:.0f} MiB)" if out[key]["planned_mb"] is not None else ""
            memory = f", peak {out[key]['peak_memory_mb']:.0f} MiB{plan}" if device.type == "cuda" else ""
            print(f"[bench] {preset} {key}: {median * 1e3:.0f} ms/step, {batch / median:.1f} samples/s{memory}", flush=True)
        suffix = "_ckpt" if checkpointing else ""
        apex, fm = out[f"apex{suffix}"], out[f"fm{suffix}"]
        out[f"apex_over_fm_time{suffix}"] = apex["step_s"] / fm["step_s"]
        if apex["peak_memory_mb"] is not None:
            out[f"apex_over_fm_memory{suffix}"] = apex["peak_memory_mb"] / (fm["peak_memory_mb"] - frozen_mb)
        memory = (f", {out[f'apex_over_fm_memory{suffix}']:.2f}x memory (fm without the {frozen_mb:.0f} MiB teacher copy)"
                  if apex["peak_memory_mb"] is not None else "")
        print(f"[bench] {preset} apex over fm{' (checkpointing)' if checkpointing else ''}: "
              f"{out[f'apex_over_fm_time{suffix}']:.2f}x time{memory}", flush=True)
    backbone.transformer.disable_gradient_checkpointing()

    model = strategy.model.eval()
    z = torch.randn(sample_batch, c, h, w, generator=g).to(device)
    text, mask = data["text"][:1].expand(sample_batch, -1, -1), data["text_mask"][:1].expand(sample_batch, -1)
    neg, neg_mask = torch.zeros_like(text[:1]), torch.ones_like(mask[:1])
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    runs = {
        "student_1nfe": lambda: family.sample_student(model, z, text, mask, 1),
        f"teacher_{TEACHER_STEPS}step": lambda: family.sample(model, scheduler, z, text, mask, TEACHER_STEPS, TEACHER_GUIDANCE,
                                                             neg_text=neg, neg_mask=neg_mask),
    }
    for name, run in runs.items():
        run()  # warm-up
        median = statistics.median(_timed(run, device, 3 if name.startswith("student") else 1))
        out[name] = {"seconds_per_batch": median, "images_per_s": sample_batch / median}
        print(f"[bench] {preset} {name}: {sample_batch / median:.2f} images/s (batch {sample_batch})", flush=True)
    out["student_over_teacher"] = out["student_1nfe"]["images_per_s"] / out[f"teacher_{TEACHER_STEPS}step"]["images_per_s"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (the benchmark); cpu only with --tiny")
    p.add_argument("--tiny", action="store_true", help="a tiny Sana at 8x8 latents instead of the real sizes: checks the "
                                                       "code path in seconds (CPU tests)")
    p.add_argument("--presets", nargs="+", default=["sana-0.6b", "sana-1.6b"])
    p.add_argument("--batch", type=int, default=4, help="training batch per GPU (the paper's micro batch: 4)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per setup")
    p.add_argument("--sample-batch", type=int, default=8, help="images per sampling call")
    p.add_argument("--workdir", default="./apex-runs")
    p.add_argument("--log-only", metavar="JSON", help="log a record this script wrote on another machine (one without MLflow: "
                                                       "the GPU box) to <workdir>'s MLflow store; measures nothing")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_args(argv)
    if args.log_only:
        record = json.loads(Path(args.log_only).read_text())
        log_record(args.workdir, Path(args.log_only).stem, record)
        return record
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmark_gpu: no CUDA device here (torch.cuda.is_available() is False). It measures Sana 0.6B/1.6B on "
                 "one 80 GB GPU; to check its code path on a CPU run: python jobs/benchmark_gpu.py --device cpu --tiny")
    if device.type == "cuda":  # init_process_group's device_id needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and not args.tiny:
        sys.exit("benchmark_gpu: --device cpu runs only with --tiny (the real sizes need a GPU)")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny kernels: more threads on a shared CPU only fight each other

    if args.tiny:  # the sized 'tiny' preset at Sana's latent channels, 8x8 latents, short narrow captions
        presets, latent, text = ["tiny"], (32, 8, 8), (8, 64)
    else:  # 1024 px through the DC-AE (f32c32); SanaPipeline's 300 tokens of Gemma-2-2B (2304 wide)
        presets, latent, text = args.presets, (32, 32, 32), (300, 2304)
    torch.manual_seed(0)
    results: dict[str, Any] = {}
    with one_rank_group(device):
        for preset in presets:
            results[preset] = bench_size(preset, list(args.overrides), device, args.batch, args.steps, args.sample_batch,
                                         latent, text)
            if device.type == "cuda":  # the previous size's model, optimizer and EMA are gone with its frame
                torch.cuda.empty_cache()
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "batch_per_gpu": args.batch, "latent": latent, "text_tokens": text[0], "results": results,
              "paper_samples_per_s_06b_a100": PAPER_SAMPLES_PER_S_06B_A100, "overrides": list(args.overrides)}
    log_record(args.workdir, "gpu" if not args.tiny else f"gpu-tiny-{device.type}", record)
    return record


def log_record(workdir: str, name: str, record: dict[str, Any]) -> None:
    """``<workdir>/benchmarks/<name>.json`` (written first) and a run in the MLflow experiment ``benchmarks``."""
    from apexdistill.config import build_config, flatten
    from apexdistill.tracking import record_benchmark

    metrics = {}
    for preset, r in record["results"].items():
        for key, value in r.items():
            if isinstance(value, dict):
                metrics.update({f"{preset}/{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
            elif isinstance(value, (int, float)) and key.startswith(("apex_over_fm", "student_over")):
                metrics[f"{preset}/{key}"] = value
    cfg = build_config(_recipe(), list(record.get("overrides", [])))
    record_benchmark(workdir, name, record, params={"presets": ",".join(record["results"]), "batch_per_gpu": record["batch_per_gpu"],
                                                     "device": record["device"], "strategy": "fsdp2 (world size 1)",
                                                     "apex": "the demo's recipe (its objective section)",
                                                     **{k: v for k, v in flatten(cfg).items() if k.startswith("objective.apex.")}},
                     metrics=metrics)


if __name__ == "__main__":
    main()
