"""`apexdistill demo`: shipped teacher -> APEX distillation (Ray Train) -> evaluation -> table.

Rows: the teacher at its multi-step setting (50-step Euler) and at 1 NFE, and the student at 1 and
2 NFE. Writes ``<workdir>/demo/results.json`` and ``<workdir>/demo/samples.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from apexdistill.config import Config, load_config

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
# --quick: a smoke run for tests and CI (seconds of training, a small evaluation)
QUICK = ["train.steps=20", "train.max_minutes=null", "train.log_every=10", "eval.samples_per_class=10", "eval.teacher_nfe=10",
         "eval.noise_draws=1", "eval.teacher_noise_draws=1"]
# measured on this project's 2-core machine (the demo's 2 DDP workers, batch 32 each): the wall time
# printed up front is an estimate from these, the step count is what the results depend on
SECONDS_PER_STEP = 0.245  # the recipe: 1100 steps in 4.5 min of fit, Ray Train start-up included (2026-12-07 08:04 UTC;
# its first 128 steps, filling the consistency bank, cost about twice the others); the whole demo took 5.7 min
FIXED_SECONDS = 45  # Ray start-up, preprocessing, loading the evaluator, the report
SECONDS_PER_REFERENCE_DRAW = 28  # one noise draw of the teacher's 50 steps (1000 images)
SECONDS_PER_DRAW = 3  # one noise draw of the 1- and 2-step rows


def demo_config(workdir: str, quick: bool = False, overrides: list[str] | None = None) -> Config:
    return load_config(DEMO_CONFIG, [f"run.workdir={workdir}", *(QUICK if quick else []), *(overrides or [])])


def run_demo(workdir: str = "./apex-runs", quick: bool = False, overrides: list[str] | None = None) -> dict:
    from apexdistill.eval.runner import DigitsBench, format_table, shipped_reference_for
    from apexdistill.models.build import build_backbone
    from apexdistill.data.preprocess import run_preprocess
    from apexdistill.train.data import DataShapes, digit_caption_table
    from apexdistill.train.driver import clear_run, ensure_ray, log_dir, run_training
    from apexdistill.train.export import load_trained_backbone

    cfg = demo_config(workdir, quick, overrides)
    started = time.time()
    draws, ref_draws = cfg.eval.noise_draws, cfg.eval.reference_draws
    evaluation = SECONDS_PER_DRAW * draws + (0 if shipped_reference_for(cfg) else SECONDS_PER_REFERENCE_DRAW * ref_draws)
    estimate = (FIXED_SECONDS + evaluation + SECONDS_PER_STEP * cfg.train.steps) / 60
    budget = f", or train.max_minutes={cfg.train.max_minutes:g} if that comes first" if cfg.train.max_minutes else ""
    print(f"[demo] {cfg.train.steps} distillation steps{budget}: about {estimate:.0f} min on a 2-core laptop "
          f"(the scores depend on the steps and seeds, not on the machine; ms/image does)", flush=True)
    out = Path(cfg.run.workdir) / "demo"
    out.mkdir(parents=True, exist_ok=True)
    clear_run(cfg)  # the demo always distills afresh; other runs resume instead

    print(f"[demo] 1/5 preprocess: Ray Data -> Parquet cache (workdir {Path(cfg.run.workdir).resolve()})", flush=True)
    ensure_ray(log_dir=log_dir(cfg))
    cache = run_preprocess(cfg)
    shapes = DataShapes.from_manifest(cache.manifest, cache.uri)
    print(f"[demo]     {'cache hit' if cache.hit else 'cached'}: {cache.rows} rows at {cache.uri}", flush=True)

    print("[demo] 2/5 evaluator and teacher", flush=True)
    bench = DigitsBench(cfg, *digit_caption_table(cfg))
    info = bench.classifier_info
    accuracy = "n/a" if info.get("real_accuracy") is None else f"{100 * info['real_accuracy']:.1f}%"
    source = "the shipped digit_classifier" if info.get("classifier_shipped") else info["feature_extractor"]
    print(f"[demo]     evaluator ({source}): {accuracy} on the real test split; "
          f"real-data floor FD {bench.evaluator.floor_fd:.2f}", flush=True)

    teacher = build_backbone(cfg.model, shapes.channels, shapes.resolution, shapes.text_dim).eval()

    where = "local mode" if cfg.train.num_workers == 0 else f"{cfg.train.num_workers} workers, {cfg.train.strategy}"
    print(f"[demo] 3/5 distilling with '{cfg.objective.name}' (Ray Train, {where})", flush=True)
    t0 = time.time()
    result = run_training(cfg, evaluate=False)  # the demo scores teacher and student side by side below
    train_minutes = (time.time() - t0) / 60
    student, _ = load_trained_backbone(result.run_dir, use_ema=cfg.eval.use_ema)

    ref_note = f", the teacher's {cfg.eval.teacher_nfe} steps on the first {ref_draws}" if ref_draws != draws else ""
    print(f"[demo] 4/5 evaluating (same prompts and noise for every row; {draws} noise draw{'s' * (draws > 1)} of "
          f"{10 * cfg.eval.samples_per_class} images{ref_note})", flush=True)
    reference, provenance = bench.reference("teacher", teacher, cfg.eval.teacher_nfe, "euler", ref_draws)
    if provenance is not None:
        print(f"[demo]     teacher at {cfg.eval.teacher_nfe} steps: the shipped reference row ({ref_draws} draws, scored "
              f"{provenance['date']} by '{provenance['command']}'; assets/teacher_reference.json)", flush=True)
    rows = [reference]
    rows += bench.score("teacher", teacher, [1], "few_step")
    rows += bench.score(f"student ({cfg.objective.name})", student, cfg.eval.nfe, "few_step")

    print("[demo] 5/5 report", flush=True)
    grid = bench.grid(
        [("teacher", teacher, cfg.eval.teacher_nfe, "euler"), ("teacher", teacher, 1, "few_step")]
        + [("student", student, n, "few_step") for n in cfg.eval.nfe],
        out / "samples.png", min_repeats=5,
    )
    speed = grid.speed_metrics()
    if provenance is not None:  # the shipped row's time was another machine's: this one's, from the grid's timing
        reference.ms_per_image = grid.speed[0]["ms_per_image"]
    results = {
        "rows": [r.as_dict() for r in rows],
        "floor_fd": bench.evaluator.floor_fd,
        "classifier_test_accuracy": info.get("real_accuracy"),
        "objective": cfg.objective.name,
        "train_steps": int(result.metrics.get("step", 0)),
        "train_minutes": train_minutes,
        "total_minutes": (time.time() - started) / 60,
        "checkpoint": str(result.checkpoint_dir),
        "samples_png": str(grid.path),
        "speed": grid.speed,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if result.mlflow_run_id:
        _log_to_mlflow(result, rows, bench.evaluator.floor_fd, grid.path, results, speed)
    print()
    print(format_table(rows, bench.evaluator.floor_fd))
    print(f"\n{results['train_steps']} distillation steps in {train_minutes:.1f} min; total {results['total_minutes']:.1f} min")
    print(f"samples: {grid.path}\nresults: {out / 'results.json'}")
    if result.mlflow_run_id:
        from apexdistill.report import build_report, default_out_dir

        try:  # the run is done and logged: a report that cannot be built is a warning, not a failed demo
            page, _ = build_report(result.tracking_uri, default_out_dir(cfg.run.workdir, [cfg.tracking.experiment], None),
                                   experiments=[cfg.tracking.experiment])
            results["report"] = str(page)
            (out / "results.json").write_text(json.dumps(results, indent=2))
        except Exception as exc:  # noqa: BLE001 - any failure of the report
            page = f"not built ({type(exc).__name__}: {exc}); try 'apexdistill dashboard --workdir {cfg.run.workdir}'"
        print(f"MLflow: run {result.mlflow_run_id} in {result.tracking_uri}")
        print(f"report: {page}  (open it in a browser; 'apexdistill dashboard --serve' adds the MLflow UI)")
    return results


def _log_to_mlflow(result, rows, floor_fd, grid, results, speed) -> None:
    """The demo's table into the training run: the student's rows as eval/*, the teacher's as teacher/*."""
    from apexdistill.tracking import RunLogger
    from apexdistill.train.driver import log_eval_rows

    logger = RunLogger(result.tracking_uri, result.mlflow_run_id)
    student = [r for r in rows if r.model.startswith("student")]
    step = int(results["train_steps"])  # the final step: the latest value of eval/* in the run
    log_eval_rows(logger, student, floor_fd, step=step)
    log_eval_rows(logger, [r for r in rows if r.model.startswith("teacher")], floor_fd, prefix="teacher", step=step)
    logger.log_artifacts(grid.parent, "demo")
    logger.log_metrics({"demo/total_minutes": results["total_minutes"], "demo/train_minutes": results["train_minutes"], **speed}, step)
