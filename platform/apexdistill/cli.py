"""The `apexdistill` command line. Thin: parses arguments and delegates to the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from apexdistill.config import ConfigError
from apexdistill.tracking import TrackingError


def _common_overrides(args: argparse.Namespace) -> list[str]:
    """The user's key=value overrides plus what --workdir / --tracking-uri stand for."""
    return [*args.overrides, *([f"run.workdir={args.workdir}"] if getattr(args, "workdir", None) else []),
            *([f"tracking.uri={args.tracking_uri}"] if getattr(args, "tracking_uri", None) else [])]


def _cmd_demo(args: argparse.Namespace) -> int:
    from apexdistill.demo import run_demo

    run_demo(args.workdir, quick=args.quick, overrides=[*args.overrides, *([f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else [])])
    return 0


def config_summary(cfg: Any) -> list[str]:
    """``apexdistill train``'s config in two console lines: what runs, on what, where it is logged. The full
    resolved config goes to the run folder and the MLflow run (``--verbose`` prints it too)."""
    from apexdistill.data.cache import default_cache_uri

    m, t, o = cfg.model, cfg.train, cfg.objective
    source = f"from {m.path}" if m.path else f"{m.preset} preset, random init"
    workers = f"{t.strategy} x {t.num_workers} worker(s)" if t.num_workers else "in-process"
    cache = default_cache_uri(cfg)
    mlflow = f"MLflow experiment '{cfg.tracking.experiment}'" if cfg.tracking.enabled else "MLflow off"
    return [f"[train] {m.backbone} ({source}), objective {o.name}, {workers}, {t.steps} steps of batch {t.batch_size}",
            f"[train] data {cfg.data.source} -> cache {cache}; run '{cfg.run.name}' in {cfg.run.workdir}; {mlflow}"]


def _cmd_train(args: argparse.Namespace) -> int:
    from apexdistill.config import dump_yaml, load_config
    from apexdistill.console import verbose
    from apexdistill.train.driver import run_dir, run_training

    cfg = load_config(args.config, _common_overrides(args))
    if verbose():
        print(dump_yaml(cfg), flush=True)
    print("\n".join(config_summary(cfg)), flush=True)
    print(f"[train] full resolved config: {run_dir(cfg) / 'config.yaml'} and the MLflow run (--verbose prints it)", flush=True)
    result = run_training(cfg, address=args.address)
    print(f"[train] checkpoint: {result.checkpoint_uri}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    import yaml

    from apexdistill.config import flatten, load_config, parse_override
    from apexdistill.plan import alternative_lines, format_plan, plan_memory, published_assumptions

    cfg = load_config(args.config, list(args.overrides))
    explicit = {parse_override(o)[0] for o in args.overrides}
    if args.config:
        explicit |= set(flatten(yaml.safe_load(Path(args.config).read_text()) or {}))
    assumed = published_assumptions(cfg, explicit)
    if assumed:  # `plan model.preset=sana-1.6b` as typed: the architecture's own run, not the digits' defaults
        cfg = load_config(args.config, [*(f"{k}={json.dumps(v)}" for k, v in assumed.items()), *args.overrides])
    plan = plan_memory(cfg)
    if assumed:
        plan.notes.insert(0, f"assumed for {cfg.model.preset} (not set in the config; set them to change): "
                             + ", ".join(f"{k}={json.dumps(v)}" for k, v in assumed.items()))
    if args.json:
        print(json.dumps(plan.as_dict()))
        return 0
    print(format_plan(plan))
    if not plan.fits:
        print("change one of (each re-planned):", *alternative_lines(cfg), sep="\n")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path as _Path

    from apexdistill.config import load_config
    from apexdistill.tune.runner import run_sweep
    from apexdistill.tune.sweep import load_sweep

    from apexdistill.demo import DEMO_CONFIG

    cfg = load_config(args.config or DEMO_CONFIG, _common_overrides(args))
    sweep = load_sweep(args.sweep, base=cfg.model_dump(mode="json"))
    run_sweep(cfg, sweep, sweep_text=_Path(args.sweep).read_text(), address=args.address)
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    return _build_cache(args, synthesize=False)


def _cmd_synthesize(args: argparse.Namespace) -> int:
    return _build_cache(args, synthesize=True)


def _build_cache(args: argparse.Namespace, synthesize: bool) -> int:
    """`preprocess` and `synthesize`: the cache of a config, built or found (`run_preprocess` hands a data.source=teacher
    config to the synthesis)."""
    from apexdistill.config import load_config
    from apexdistill.data.preprocess import run_preprocess

    cfg = load_config(args.config, _common_overrides(args))
    if synthesize:
        if cfg.data.source != "teacher":
            raise SystemExit(f"apexdistill synthesize: data.source is '{cfg.data.source}' in {args.config}: set "
                             "data.source=teacher (and model.path, data.prompts) to have the teacher write the training set")
        from apexdistill.data.synthesize import TeacherSource

        TeacherSource(cfg)  # the prompts and the teacher folder checked before Ray starts
    from apexdistill.train.driver import connect

    connect(cfg, args.address)
    info = run_preprocess(cfg, force=args.force)
    tag, done, texts = ("synthesize", "sampled", "prompts") if synthesize else ("preprocess", "encoded", "captions")
    print(f"[{tag}] {'hit (nothing ' + done + ')' if info.hit else 'built'}: {info.rows} rows, {info.rejected} rejected, "
          f"{info.truncated} truncated {texts}")
    print(f"[{tag}] cache: {info.uri}")
    return 0


def _load_model_arg(path: str, use_ema: bool, workdir: str | None = None):
    """A run folder or one of its checkpoint folders (trained by `apexdistill train`), or 'builtin:teacher' (the shipped
    digits teacher, with the demo's config)."""
    from apexdistill.assets import BUILTIN

    if path in BUILTIN:
        from apexdistill.demo import demo_config
        from apexdistill.models.build import build_backbone
        from apexdistill.train.data import digit_caption_table

        cfg = demo_config(workdir or "./apex-runs", overrides=[f"model.path={path}"])
        text, _ = digit_caption_table(cfg)
        return build_backbone(cfg.model, 1, cfg.data.resolution, text.shape[-1]).eval(), cfg
    from apexdistill.train.export import load_trained_backbone

    return load_trained_backbone(path, use_ema=use_ema)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from apexdistill.eval.runner import DigitsBench, format_table
    from apexdistill.train.data import digit_caption_table

    model, cfg = _load_model_arg(args.run, use_ema=not args.raw, workdir=args.workdir)
    if args.quality or cfg.text_encoder.kind == "pipeline":
        return _evaluate_quality(args, cfg)
    import json

    from apexdistill.config import build_config

    cfg = build_config(cfg.model_dump(mode="json"), [f"eval.nfe={json.dumps(list(args.nfe))}", *_eval_overrides(args.overrides)],
                       source=f"{args.run} with the evaluate overrides")
    if {args.height or cfg.data.resolution, args.width or cfg.data.resolution} != {cfg.data.resolution}:
        raise ValueError(f"--height/--width: the digit classifier scores {cfg.data.resolution}x{cfg.data.resolution} images only; "
                         "use `apexdistill sample --height --width` to look at other sizes")
    if cfg.data.source != "digits" or cfg.vae.path:
        raise ValueError(f"'{args.run}': evaluate scores prompt accuracy and the FD proxy with the built-in digit classifier, "
                         "so it needs a run on the built-in digits in pixel space; add --quality for the FD to the teacher, "
                         "CLIP score and diversity")
    if args.workdir:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"workdir": args.workdir})})
    if args.samples_per_class:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"samples_per_class": args.samples_per_class})})
    if args.draws:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"noise_draws": args.draws})})
    bench = DigitsBench(cfg, *digit_caption_table(cfg))
    rows = bench.score(Path(args.run).name, model, cfg.eval.nfe, "euler" if args.euler else "few_step")
    print(format_table(rows, bench.evaluator.floor_fd))
    return 0


def _eval_overrides(overrides: list[str]) -> list[str]:
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("eval.")]
    if bad:
        raise ValueError(f"evaluate takes eval.* overrides only (the run's training settings are fixed), got: {' '.join(bad)}")
    return list(overrides)


def _evaluate_quality(args: argparse.Namespace, cfg) -> int:
    """FD to the teacher, CLIP score, diversity and end-to-end speed over a prompt set (Ray Data batch inference),
    printed as a table and logged into the run's MLflow run."""
    import json

    from apexdistill.assets import BUILTIN
    from apexdistill.config import build_config
    from apexdistill.eval.quality import evaluate_quality, format_quality_table, prepare
    from apexdistill.train.driver import connect, log_quality, run_logger
    from apexdistill.train.export import resolve_checkpoint

    _eval_overrides(args.overrides)
    updates = [f"eval.nfe={json.dumps(list(args.nfe))}"]
    if args.draws:
        updates.append(f"eval.noise_draws={args.draws}")
    if args.seed is not None:
        updates.append(f"eval.seed={args.seed}")
    if args.actors is not None:
        updates.append(f"eval.actors={args.actors}")
    cfg = build_config(cfg.model_dump(mode="json"), [*updates, *args.overrides], source=f"{args.run} with the evaluate overrides")
    run_folder = None if args.run in BUILTIN else resolve_checkpoint(args.run)[1].parent.parent
    if args.prompt:
        from apexdistill.eval.prompts import prompt_set_from_list

        prompts = prompt_set_from_list(list(args.prompt), "--prompt")
    else:
        prompts = None
    height, width = image_size(cfg, args.height, args.width)
    spec = prepare(args.run, cfg, run_folder, height, width, device=args.device or default_device(), use_ema=not args.raw,
                   prompt_set=prompts)
    out = Path(args.output) if args.output else (run_folder / "eval" / "quality" if run_folder else Path(cfg.run.workdir) / "eval" / "quality")
    if spec.eval.actors:
        connect(cfg, args.address)
    print(f"[evaluate] {len(spec.prompt_set)} prompts x {spec.eval.images_per_prompt} images x {spec.eval.noise_draws} draw(s): "
          f"the teacher at {spec.eval.teacher_nfe} NFE (guidance {cfg.teacher.guidance_scale:g}), the student at "
          f"{', '.join(map(str, spec.eval.nfe))} NFE, {spec.eval.features} features, "
          + (f"{spec.eval.actors} Ray Data actor(s)" if spec.eval.actors else "in this process"), flush=True)
    report = evaluate_quality(spec, out_dir=out)
    print(format_quality_table(report))
    print(f"[evaluate] per-image scores, sample grid and summary: {out}")
    logger, step = run_logger(run_folder) if run_folder else (None, 0)
    if logger is not None:
        log_quality(logger, report, out, step=step)
        print(f"[evaluate] logged to MLflow run {logger.run_id}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from apexdistill.eval.grid import save_grid

    model, cfg = _load_model_arg(args.run, use_ema=not args.raw)
    images = sample_run(model, cfg, list(args.prompt), args.num, args.nfe, args.seed, device=args.device or default_device(),
                        height=args.height, width=args.width)
    save_grid(images, args.output, nrow=args.num)
    print(f"[sample] {images.shape[0]} image(s) of {images.shape[-2]}x{images.shape[-1]} at {args.nfe} NFE -> {args.output}")
    return 0


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def image_size(cfg, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) to sample at: default ``data.resolution`` squared; either side must be a
    multiple of the VAE factor x the patch size, checked before any model runs."""
    from apexdistill.data.buckets import size_step

    h, w = height or cfg.data.resolution, width or cfg.data.resolution
    step, why = size_step(cfg)
    if h % step or w % step or h < 1 or w < 1:
        raise ValueError(f"--height {h} --width {w}: both must be positive multiples of {step} ({why})")
    return h, w


def sample_run(model, cfg, prompts: list[str], num: int, nfe: int, seed: int, latents: bool = False, device: str = "cpu",
               height: int | None = None, width: int | None = None):
    """Images (or, with ``latents``, the sampled latents) of a trained run for ``prompts``, ``num``
    each, from noise seeded by ``seed`` (drawn on the CPU, as diffusers does with a CPU generator),
    at ``height`` x ``width`` pixels (default the ``data.resolution`` square). Pipeline runs sample
    exactly as the exported stock pipeline does (the student scheduler, the family's layout and
    random draws) and decode through the VAE. Returned on the CPU."""
    import torch

    from apexdistill.method.sampler import sample_few_step
    from apexdistill.models.family import get_family
    from apexdistill.models.text import build_text_encoder
    from apexdistill.models.vae import build_vae

    text, mask = build_text_encoder(cfg.text_encoder).to(device).encode(prompts)
    text, mask = text.repeat_interleave(num, 0).to(device), mask.repeat_interleave(num, 0).to(device)
    vae = build_vae(cfg.vae, cfg.data.image_channels).to(device)
    c, h, w = vae.latent_shape(*image_size(cfg, height, width))
    model = model.to(device)
    if cfg.text_encoder.kind == "pipeline":
        # one CPU generator for the initial noise and then the re-noise, as `pipe(generator=Generator().manual_seed(seed))`
        # draws them (Sana hands it to the scheduler's step); the families whose pipelines re-noise from the global RNG
        # get it seeded
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((len(prompts) * num, c, h, w), generator=g).to(device)
        torch.manual_seed(seed)
        x = get_family(cfg.model.backbone).sample_student(model, z, text, mask, nfe, generator=g)
    else:
        z = torch.randn((len(prompts) * num, c, h, w), generator=torch.Generator().manual_seed(seed)).to(device)
        x = sample_few_step(model, z, text, mask, nfe=nfe, generator=torch.Generator(device=device).manual_seed(seed))
    return (x if latents else vae.decode(x).clamp(-1, 1)).cpu()


def _cmd_export(args: argparse.Namespace) -> int:
    from apexdistill.train.export import export_pipeline

    out = export_pipeline(args.run, args.output, use_ema=not args.raw, overwrite=args.overwrite, link=args.link, dtype=args.dtype)
    print(f"[export] diffusers folder: {out}")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from apexdistill.report import build_report, default_out_dir

    workdir = Path(args.workdir or "./apex-runs")
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        db = workdir.resolve() / "mlflow.db"
        if not db.is_file():
            raise FileNotFoundError(f"no MLflow store at {db}: run 'apexdistill demo' (or train/sweep) first, "
                                    f"or pass --workdir / --tracking-uri")
        uri = f"sqlite:///{db}"
    out = Path(args.output) if args.output else default_out_dir(workdir, args.experiment, args.sweep)
    page, data = build_report(uri, out, args.experiment, args.sweep)
    runs = [r for r in data["runs"] if r["kind"] != "sweep"]
    print(f"[dashboard] {len(runs)} runs, {len(data['sweeps'])} sweeps from {data['tracking_uri']}")
    print(f"[dashboard] report: {page}")
    if args.serve:
        from apexdistill.report.serve import serve

        return serve(uri, page.parent, mlflow_port=args.port)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from apexdistill.submit import default_address, submit

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    _, status = submit(args.address or default_address(), command, args.working_dir, args.submission_id, args.follow)
    if status is None:
        return 0
    print(f"[submit] finished: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _cmd_job(args: argparse.Namespace) -> int:
    from apexdistill.submit import default_address, job_command

    return job_command(args.action, args.id, args.address or default_address(), args.follow)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apexdistill", description="APEX one-step distillation on Ray (see README.md)")
    verbose_help = "show Ray's, Ray Data's and the libraries' own output on the console (also APEXDISTILL_LOG=debug)"
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="preprocess -> teacher -> APEX distill -> evaluate -> report, on a laptop")
    d.add_argument("--workdir", default="./apex-runs")
    d.add_argument("--quick", action="store_true", help="a smoke run in well under a minute of training (for tests)")
    d.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<workdir>/mlflow.db)")
    d.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. objective.name=apex_literal")
    d.set_defaults(fn=_cmd_demo)

    t = sub.add_parser("train", help="distill (or pre-train) a model with Ray Train")
    t.add_argument("-c", "--config", required=True, help="YAML config (see jobs/configs/)")
    t.add_argument("--workdir", default=None, help="overrides run.workdir")
    t.add_argument("--address", default=None, help="Ray cluster address (default: local, or RAY_ADDRESS)")
    t.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: tracking.uri, MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    t.set_defaults(fn=_cmd_train)

    pl = sub.add_parser("plan", help="per-GPU memory (weights, gradients, optimizer, EMA, activations) and parameter counts "
                                     "of a training config, and whether it fits train.gpu_memory_gb; nothing is allocated")
    pl.add_argument("-c", "--config", default=None, help="YAML config (default: the defaults)")
    pl.add_argument("--json", action="store_true", help="print the plan as one JSON object on one line")
    pl.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.preset=sana-1.6b train.num_workers=8")
    pl.set_defaults(fn=_cmd_plan)

    w = sub.add_parser("sweep", help="a Ray Tune sweep over config keys; one MLflow parent run, a child run per trial")
    w.add_argument("-c", "--config", default=None, help="base YAML config (default: the demo's: the shipped digits teacher)")
    w.add_argument("-s", "--sweep", required=True, help="sweep file (see sweeps/)")
    w.add_argument("--workdir", default=None, help="overrides run.workdir")
    w.add_argument("--address", default=None, help="Ray cluster address (default: local, or RAY_ADDRESS)")
    w.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<workdir>/mlflow.db)")
    w.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base config")
    w.set_defaults(fn=_cmd_sweep)

    for name, fn, help_, config, force, example in (
        ("preprocess", _cmd_preprocess, "cache text embeddings and latents with Ray Data (Parquet under data.cache_uri)",
         dict(default=None, help="YAML config (default: the built-in digits, pixel space)"),
         "rebuild even when a complete cache exists", "data.resolution=32"),
        ("synthesize", _cmd_synthesize, "data-free: the teacher samples the training set from a prompt list (data.source="
         "teacher), Ray Data batch inference into the same Parquet cache; resumes where it stopped",
         dict(required=True, help="YAML config with data.source: teacher, model.path and data.prompts"),
         "sample again even when a complete cache exists (it stays until the new one is published)",
         "data.samples_per_prompt=4 teacher.nfe=20"),
    ):
        cp = sub.add_parser(name, help=help_)
        cp.add_argument("-c", "--config", **config)
        cp.add_argument("--force", action="store_true", help=force)
        cp.add_argument("--workdir", default=None, help="overrides run.workdir (the default cache is <workdir>/cache)")
        cp.add_argument("--address", default=None, help="Ray cluster address (default: local, or RAY_ADDRESS)")
        cp.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")
        cp.set_defaults(fn=fn)

    e = sub.add_parser("evaluate", help="score a run's checkpoint at 1/2/4 NFE (digits: accuracy and FD proxy; pipelines: FD "
                                         "to the teacher, CLIP score, diversity and end-to-end ms/image over a prompt set)")
    e.add_argument("run", help="run folder (<workdir>/runs/<name>), a checkpoint folder, or builtin:teacher (the shipped "
                   "digits teacher; with --euler --nfe 50 its reference row)")
    e.add_argument("--nfe", nargs="+", default=[1, 2, 4], help="student steps (integers; key=value overrides may follow)")
    e.add_argument("--euler", action="store_true", help="use the multi-step Euler ODE sampler (teachers)")
    e.add_argument("--raw", action="store_true", help="evaluate the raw weights instead of the EMA")
    e.add_argument("--samples-per-class", type=int, default=None)
    e.add_argument("--draws", type=int, default=None, help="independent noise draws per row (eval.noise_draws): means and "
                   "the spread; one draw's FD proxy moves by 0.25-0.35 (std) with the noise alone")
    e.add_argument("--workdir", default=None, help="where the evaluator's classifier is cached")
    e.add_argument("--quality", action="store_true", help="the real-model scores (FD to the teacher, CLIP score, diversity, "
                   "speed) on any run; pipeline runs always get them")
    e.add_argument("--prompt", action="append", default=None,
                   help="quality scores: a prompt (repeatable; default eval.prompts, else the run's captions)")
    e.add_argument("--seed", type=int, default=None, help="quality scores: the noise seed (eval.seed)")
    e.add_argument("--actors", type=int, default=None, help="quality scores: Ray Data actors (eval.actors; 0 = this process)")
    e.add_argument("--address", default=None, help="Ray cluster address for the actors (default: local, or RAY_ADDRESS)")
    e.add_argument("--device", default=None, help="quality scores: cpu or cuda (default: cuda when available)")
    e.add_argument("-o", "--output", default=None, help="quality scores: folder for the per-image scores, the sample grid and "
                   "the summary (default <run>/eval/quality)")
    e.add_argument("--height", type=int, default=None, help="quality scores: image height in pixels (default data.resolution)")
    e.add_argument("--width", type=int, default=None, help="quality scores: image width in pixels (default data.resolution)")
    e.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.prompts=builtin:compositional eval.features=dinov2 "
                   "eval.feature_model=/models/dinov2-base eval.clip_model=/models/clip-vit-l-14")
    e.set_defaults(fn=_cmd_evaluate)

    s = sub.add_parser("sample", help="write a PNG grid of samples for prompts")
    s.add_argument("run", help="run folder or checkpoint folder")
    s.add_argument("--prompt", action="append", required=True)
    s.add_argument("--nfe", type=int, default=1)
    s.add_argument("--num", type=int, default=8, help="images per prompt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--raw", action="store_true")
    s.add_argument("--height", type=int, default=None, help="image height in pixels (default data.resolution; e.g. a data.buckets shape)")
    s.add_argument("--width", type=int, default=None, help="image width in pixels (default data.resolution)")
    s.add_argument("-o", "--output", default="samples.png")
    s.set_defaults(fn=_cmd_sample)

    x = sub.add_parser("export", help="export a run's weights as a diffusers folder (transformer/)")
    x.add_argument("run")
    x.add_argument("-o", "--output", required=True)
    x.add_argument("--raw", action="store_true")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    x.add_argument("--link", action="store_true", help="symlink the VAE, text encoder and tokenizer instead of copying them")
    x.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="stock pipeline exports: the student transformer's stored dtype (default: the teacher's)")
    x.set_defaults(fn=_cmd_export)

    b = sub.add_parser("dashboard", help="a static HTML report comparing runs and sweeps, from MLflow; --serve adds the MLflow UI")
    b.add_argument("--experiment", action="append", default=None,
                   help="MLflow experiment to report (repeatable; default: every experiment with runs)")
    b.add_argument("--sweep", default=None, help="a sweep's parent run id (printed by 'apexdistill sweep'): that sweep only")
    b.add_argument("-o", "--output", default=None, help="report folder (default: <workdir>/reports/<experiment or sweep>)")
    b.add_argument("--workdir", default=None, help="work directory whose SQLite store is read (default ./apex-runs)")
    b.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    b.add_argument("--serve", action="store_true", help="also start the MLflow UI and serve the report on 127.0.0.1 until Ctrl-C")
    b.add_argument("--port", type=int, default=0, help="MLflow UI port with --serve (default: a free one)")
    b.set_defaults(fn=_cmd_dashboard)

    j = sub.add_parser("submit", help="submit a command to a Ray cluster as a Ray job (working directory uploaded)",
                       description="apexdistill submit --address http://HEAD:8265 [--follow] -- train -c CONFIG [key=value ...]")
    j.add_argument("--address", default=None, help="Ray Jobs API (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS if http, else http://127.0.0.1:8265)")
    j.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it succeeded")
    j.add_argument("--working-dir", default=".", help="uploaded as the job's working directory (default: .)")
    j.add_argument("--submission-id", default=None, help="default: apexdistill-<run name>, stable across re-submissions")
    j.add_argument("command", nargs=argparse.REMAINDER, help="after '--': an apexdistill subcommand (train, sweep, ...) or any command")
    j.set_defaults(fn=_cmd_submit)

    jb = sub.add_parser("job", help="status, logs, stop or list of Ray jobs")
    jb.add_argument("action", choices=["status", "logs", "stop", "list"])
    jb.add_argument("id", nargs="?", default=None, help="submission id (printed by 'apexdistill submit')")
    jb.add_argument("--address", default=None, help="Ray Jobs API (default as for submit)")
    jb.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    jb.set_defaults(fn=_cmd_job)
    for action in p._subparsers._group_actions:  # noqa: SLF001 - argparse keeps its subparsers here
        for sp in action.choices.values():
            sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    return p


def main(argv: list[str] | None = None) -> int:
    from apexdistill.console import quiet_environment, set_command, set_verbose

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    # key=value overrides may follow options (`evaluate RUN --nfe 1 2 eval.features=dinov2`): argparse leaves
    # positionals after an option's values unparsed, so they are taken here
    args, extra = parser.parse_known_args(argv)
    if args.command == "evaluate":  # `--nfe 1 2 eval.features=dinov2`: the overrides after the NFEs are overrides
        extra = [str(v) for v in args.nfe if "=" in str(v)] + extra
        try:
            args.nfe = [int(v) for v in args.nfe if "=" not in str(v)]
        except ValueError:
            parser.error(f"argument --nfe: expected integers, got {' '.join(map(str, args.nfe))}")
    if extra:
        if not hasattr(args, "overrides") or any("=" not in a or a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    set_verbose(bool(getattr(args, "verbose", False)))
    set_command(list(argv) if argv is not None else sys.argv[1:])
    quiet_environment()
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, TrackingError) as exc:
        if os.environ.get("APEXDISTILL_DEBUG"):
            raise
        print(f"apexdistill {args.command}: error: {exc}", file=sys.stderr)
        print("(set APEXDISTILL_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
