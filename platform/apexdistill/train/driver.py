"""Launch the worker loop with Ray Train's ``TorchTrainer``, tracked in MLflow, and collect the result.

Run names are stable (no timestamps): running the same name again resumes from its last checkpoint
(Ray Train V2 resumes by ``RunConfig(name, storage_path)``; ``resume_from_checkpoint`` raises) and
logs into the same MLflow run. ``FailureConfig(max_failures)`` restarts a failed worker group from
the last reported checkpoint, inside the same ``fit()`` and the same MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apexdistill.config import Config, dump_yaml


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint_dir: Path | None  # the local checkpoint folder (None when it lives on run.storage_uri)
    metrics: dict[str, Any]
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    eval_rows: list[Any] = field(default_factory=list)
    checkpoint_uri: str = ""
    #: the final scores as MLflow metrics (``eval_metrics`` of the digits rows, or a quality report's metrics)
    eval_scores: dict[str, float] = field(default_factory=dict)  # where the latest checkpoint is: the local folder, or its URI on run.storage_uri


CONDITIONING_FILE = "conditioning.json"  # in the run folder and MLflow: apexdistill.resolve.conditioning_record


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.workdir).resolve() / "runs" / cfg.run.name


def ray_storage(cfg: Config) -> Path:
    return Path(cfg.run.workdir).resolve() / "ray_results"


def clear_run(cfg: Config) -> None:
    """Delete a run's folder and Ray's record of it, so the next fit starts fresh instead of resuming
    (and opens a new MLflow run: the record of the old one lives in the run folder); on
    ``run.storage_uri`` too."""
    import posixpath
    import shutil

    for path in (run_dir(cfg), ray_storage(cfg) / cfg.run.name):
        shutil.rmtree(path, ignore_errors=True)
    from apexdistill.train.storage import RunStorage

    storage = RunStorage.from_config(cfg)
    if storage is not None:
        for folder in (storage.root, posixpath.join(storage.ray_storage_path, cfg.run.name)):
            if storage.fs.get_file_info(folder).type.name != "NotFound":
                storage.fs.delete_dir(folder)


# every Ray process of ours: offline models, Train V2, worker prints once (not again through Train's logger)
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1",
              "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# a local Ray that this process starts (not a cluster it joins): see ensure_ray
# (and the controller polls its workers every 0.5 s, not 2: a checkpoint's report and the end of a fit wait for a poll)
LOCAL_WORKER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# quiet mode: no loading bars or info chatter in the workers' own logs either
QUIET_WORKER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                    "TQDM_DISABLE": "1", "MLFLOW_LOGGING_LEVEL": "WARNING", "RAY_AIR_NEW_OUTPUT": "0"}


def ensure_ray(address: str | None = None, log_dir: str | Path | None = None) -> None:
    """Start (or join) Ray once per process, quietly, with offline workers. In quiet mode (the
    default, see ``apexdistill.console``) Ray forwards no worker output and its driver-side logs go
    to ``log_dir/apexdistill.log``."""
    import ray

    from apexdistill.console import quiet_environment, route_logs, verbose

    if ray.is_initialized():
        if log_dir is not None:
            route_logs(log_dir)
        return
    quiet_environment()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    local = {} if address else {
        # Ray Train V2 watches its controller through the state API, which the dashboard serves
        "include_dashboard": True, "dashboard_host": "127.0.0.1",
        # the raylet starts a worker per CPU for the first driver, but they are not started in this job's
        # runtime environment (its env_vars), so no task or actor of ours can use them: they only import
        # Ray and idle (measured with a task of 0.5 CPU: it gets new processes either way)
        "_system_config": {"prestart_worker_first_driver": False},
    }
    env_vars = dict(WORKER_ENV)
    if not address:
        # Train V2 starts a PreemptionWatcher actor with every worker group: it polls for nodes being
        # drained (spot preemption), which a local single-node Ray never is. Off here, it costs no process
        # per fit and no error-level core_worker line (its restartable actor's arguments) on a run that succeeds.
        env_vars.update(LOCAL_WORKER_ENV)
    env_vars.update(QUIET_WORKER_ENV if not verbose() else {"APEXDISTILL_LOG": "debug"})  # trial drivers follow the console mode
    # inside a submitted Ray job, Ray refuses a key that the job's runtime env sets too: the job's wins
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    env_vars = {k: v for k, v in env_vars.items() if k not in (job.get("env_vars") or {})}
    if log_dir is not None:
        route_logs(log_dir)  # before ray.init: its own start-up warnings go to the file too
    ray.init(
        address=address,
        log_to_driver=verbose(),
        configure_logging=True,
        logging_level="WARNING",
        runtime_env={"env_vars": env_vars} if env_vars else None,
        **local,
    )
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = verbose()
    if log_dir is not None:
        route_logs(log_dir)  # ray.init and ray.data installed console handlers of their own


def log_dir(cfg: Config) -> Path:
    return Path(cfg.run.workdir).resolve() / "logs"


def connect(cfg: Config, address: str | None = None) -> None:
    """Start or join Ray; on a multi-node cluster refuse the setups that cannot work across machines
    before any work starts. Multi-node: a remote ``address``, more than one node once connected, or a
    run that needs more than the only node has (its workers will come from nodes the autoscaler adds).
    Checked when this process joins Ray (trials inside a sweep inherit it)."""
    import ray

    from apexdistill.cluster import check_cluster, check_multinode, is_remote_address
    from apexdistill.tracking import resolve_uri

    if ray.is_initialized():  # joined before (a sweep's trial, a notebook): this run's log file all the same
        ensure_ray(address, log_dir(cfg))
        return
    uri = resolve_uri(cfg) if cfg.tracking.enabled else None
    address = address or os.environ.get("RAY_ADDRESS")
    if is_remote_address(address):
        check_multinode(cfg, uri, f"Ray address {address}")
    ensure_ray(address, log_dir(cfg))
    check_cluster(cfg, uri, address)


def check_memory_plan(cfg: Config) -> None:
    """Refuse a consistency bank that does not fit ``train.host_memory_gb`` and, for GPU runs, a config whose memory plan
    (``apexdistill plan``) does not fit ``train.gpu_memory_gb``, naming what would (``ConfigError``). A model the planner cannot trace
    is reported and trained anyway: the plan is advice, the GPU has the last word."""
    from apexdistill.config import ConfigError
    from apexdistill.plan import check_bank_fits, check_plan_fits

    try:
        bank = check_bank_fits(cfg)  # host memory, CPU runs too
        if bank is not None and cfg.train.use_gpu:
            print(f"[train] {bank.line()}", flush=True)
        plan = check_plan_fits(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a planner limitation must not block training
        print(f"[train] no memory plan for this model ({type(exc).__name__}: {exc}); training without one", flush=True)
        return
    if plan is not None:
        print(f"[train] memory plan: {plan.per_gpu_gb:.1f} GB per GPU of train.gpu_memory_gb={cfg.train.gpu_memory_gb:g}", flush=True)


def check_cpu_headroom(cfg: Config) -> None:
    """A streamed cache is read by Ray Data tasks that take a whole CPU each: workers that hold more
    than the rest of the cluster's CPUs leave them unscheduled and the run waits forever."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    used = cfg.train.num_workers * cfg.train.cpus_per_worker
    if cfg.train.num_workers and total - used < 1.0:
        raise ValueError(
            f"train.num_workers={cfg.train.num_workers} x train.cpus_per_worker={cfg.train.cpus_per_worker} = {used:g} CPUs "
            f"leaves {total - used:g} of the cluster's {total:g} CPUs for Ray Data's read tasks, which need 1: the run "
            f"would wait forever. Lower train.cpus_per_worker (e.g. {max(0.05, (total - 1) / cfg.train.num_workers):.2g}), "
            f"raise data.in_memory_max_mb so the cache is read once by the driver, or add CPUs"
        )


def negative_embedding(cache_uri: str) -> dict[str, list]:
    """The cache's negative (unconditional) text states, for guidance in the objective."""
    from apexdistill.data.preprocess import read_negative

    neg = read_negative(cache_uri)
    return {"text": neg["text"].tolist(), "mask": neg["text_mask"].tolist()}


def sample_prompts(cfg: Config, cache_uri: str, limit: int = 8) -> dict[str, list] | None:
    """Text states of the fixed prompts for the MLflow sample grids: the ten digits, or the first
    distinct captions of the cache."""
    from apexdistill.train.data import digit_caption_table

    if cfg.data.source == "digits":
        text, mask = digit_caption_table(cfg)
    else:
        from apexdistill.data.preprocess import distinct_captions

        # the cache already holds every caption's states: no text encoder is loaded here
        rows = distinct_captions(cache_uri, limit, with_states=True)
        if not rows:
            return None
        return {"text": [r["text"].tolist() for r in rows], "mask": [r["text_mask"].tolist() for r in rows]}
    return {"text": text.tolist(), "mask": mask.tolist()}


def evaluate_run(cfg: Config, run_folder: Path, logger: Any | None, step: int = 0, weights_from: str | Path | None = None,
                 actors: int | None = None) -> tuple[list[Any], dict[str, float]]:
    """Score the final (EMA) weights and log them into the run, at the final training ``step`` (so they are the run's
    latest values even where ``eval.every`` logged in-training scores earlier). Returns (rows, metrics).

    On the built-in digits in pixel space: prompt accuracy and the FD proxy against the real test split, with a
    sample grid (the teacher at ``eval.teacher_nfe`` above the student at each NFE) and each row's ms/image.
    Otherwise (a stock pipeline, or any run with a teacher in ``model.path``): FD to the teacher, CLIP score, diversity
    and end-to-end speed over the prompt set (``eval/quality.py``; ``actors`` overrides ``eval.actors``)."""
    if not is_digits_run(cfg):
        return _evaluate_quality_run(cfg, run_folder, logger, step, weights_from, actors)
    from apexdistill.eval.runner import DigitsBench, format_table
    from apexdistill.models.build import build_backbone
    from apexdistill.train.data import DataShapes, digit_caption_table
    from apexdistill.train.export import load_trained_backbone

    model, _ = load_trained_backbone(weights_from or run_folder, use_ema=cfg.eval.use_ema)
    bench = DigitsBench(cfg, *digit_caption_table(cfg))
    rows = bench.score(cfg.run.name, model, cfg.eval.nfe, "few_step")
    print(format_table(rows, bench.evaluator.floor_fd), flush=True)
    grid_rows = [("student", model, n, "few_step") for n in cfg.eval.nfe]
    if cfg.model.path:  # a teacher to compare with (a run from a random init has none)
        shapes = DataShapes.load(run_folder)
        teacher = build_backbone(cfg.model, shapes.channels, shapes.resolution, shapes.text_dim).eval()
        grid_rows.insert(0, ("teacher", teacher, cfg.eval.teacher_nfe, "euler"))
    grid = bench.grid(grid_rows, run_folder / "eval" / "samples.png")
    if logger is not None:
        log_eval_rows(logger, rows, bench.evaluator.floor_fd, step=step)
        logger.log_metrics(grid.speed_metrics(), step)
        logger.log_artifacts(grid.path.parent, "eval")
    return rows, eval_metrics(rows)


def is_digits_run(cfg: Config) -> bool:
    """A run the built-in digit classifier can score (the digits, in pixel space)."""
    return cfg.data.source == "digits" and not cfg.vae.path


def available_metrics(cfg: Config, in_training: bool = False) -> list[str]:
    """The ``eval/*`` metrics a run of this config reports at its end (and, ``in_training``, with ``eval.every``)."""
    e = cfg.eval
    per_nfe: list[str] = []
    if is_digits_run(cfg):
        per_nfe = ["fd", "ms_per_image"] + ([] if e.feature_extractor else ["accuracy"]) + (["fd_std"] if e.noise_draws > 1 else [])
        during = ["eval/fd_1nfe"] + ([] if e.feature_extractor else ["eval/accuracy_1nfe"])
        extra = ["eval/floor_fd"]
    elif cfg.model.path:
        per_nfe = ["fd_teacher", "diversity", "ms_per_image", "ms_transformer", "speedup"] + \
            (["clip_score"] if e.clip_model else []) + (["fd_real"] if e.reference else []) + \
            (["fd_teacher_std"] if e.noise_draws > 1 else [])
        during = ["eval/fd_teacher_1nfe", "eval/diversity_1nfe"]
        extra = ["eval/teacher_fd_floor", "eval/teacher_ms_per_image"] + (["eval/teacher_clip_score"] if e.clip_model else [])
    else:
        return []
    names = [f"eval/{m}_{n}nfe" for n in e.nfe for m in per_nfe] + extra
    return sorted(set(names + (during if in_training else [])))


def _evaluate_quality_run(cfg: Config, run_folder: Path, logger: Any | None, step: int, weights_from: str | Path | None,
                          actors: int | None) -> tuple[list[Any], dict[str, float]]:
    from apexdistill.eval.quality import evaluate_quality, format_quality_table, prepare

    import torch

    source = str(weights_from or run_folder)
    device = "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"  # a GPU run is scored on a GPU
    spec = prepare(source, cfg, run_folder, cfg.data.resolution, cfg.data.resolution, device=device, use_ema=cfg.eval.use_ema)
    out = run_folder / "eval" / "quality"
    report = evaluate_quality(spec, actors=actors, out_dir=out)
    print(format_quality_table(report), flush=True)
    if logger is not None:
        log_quality(logger, report, out, step=step)
    return report.rows, report.metrics()


def log_quality(logger: Any, report: Any, folder: Path, step: int = 0) -> None:
    """A quality report into an MLflow run: its metrics at ``step``, the prompt set's hash as a tag, and the
    per-image scores, sample grid and summary as artifacts under ``eval/quality``."""
    logger.log_metrics(report.metrics(), step)
    logger.set_tags({"apexdistill.eval_prompt_hash": report.prompt_hash, "apexdistill.eval_prompt_set": report.prompt_set[:250],
                     "apexdistill.eval_features": report.features})
    logger.log_artifacts(folder, "eval/quality")


def run_logger(run_folder: Path) -> tuple[Any | None, int]:
    """The MLflow run a run folder logs into (``mlflow_run.json``) and its last checkpoint's step, or (None, 0)."""
    import json

    from apexdistill.tracking import RUN_FILE, RunLogger
    from apexdistill.train.export import _trained_steps

    record = Path(run_folder) / RUN_FILE
    if not record.is_file():
        return None, 0
    data = json.loads(record.read_text())
    return RunLogger(data["uri"], data["run_id"]), int(_trained_steps(run_folder) or 0)


def eval_metrics(rows: list[Any], prefix: str = "eval") -> dict[str, float]:
    """Evaluation rows -> {"eval/fd_1nfe": ..., "eval/accuracy_1nfe": ..., "eval/ms_per_image_1nfe": ...}."""
    metrics: dict[str, float] = {}
    for r in rows:
        metrics[f"{prefix}/fd_{r.nfe}nfe"] = r.fd
        metrics[f"{prefix}/ms_per_image_{r.nfe}nfe"] = r.ms_per_image
        if r.accuracy is not None:
            metrics[f"{prefix}/accuracy_{r.nfe}nfe"] = r.accuracy
        if getattr(r, "fd_std", None) is not None:  # several noise draws: the spread of their FDs
            metrics[f"{prefix}/fd_std_{r.nfe}nfe"] = r.fd_std
    return metrics


def prepare_evaluator(cfg: Config) -> None:
    """Train (or find) the evaluator's digit classifier once, in this process, before workers or trials need it."""
    if cfg.data.source != "digits":
        return
    from apexdistill.eval.metrics import build_evaluator

    build_evaluator(Path(cfg.run.workdir) / "eval", cfg.data.resolution, cfg.data.test_fraction, cfg.data.split_seed,
                    cfg.eval.feature_extractor)


def log_eval_rows(logger: Any, rows: list[Any], floor_fd: float | None = None, prefix: str = "eval", step: int = 0) -> None:
    metrics = eval_metrics(rows, prefix)
    if floor_fd is not None:
        metrics[f"{prefix}/floor_fd"] = floor_fd
    logger.log_metrics(metrics, step)
    logger.log_dict({"rows": [r.as_dict() for r in rows], "floor_fd": floor_fd}, f"{prefix}/results.json")


def _close_failed(handle: Any, exc: BaseException) -> None:
    """Close the MLflow run of a run that stopped: KILLED for Ctrl-C or a sweep's scheduler stopping the trial (Tune
    raises SystemExit in its report), else FAILED with the error's last line as the tag ``apexdistill.error`` and its
    traceback as the artifact ``error.txt``."""
    if handle is None:
        return
    from apexdistill.tracking import RunLogger

    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        _close_quietly(handle, "KILLED")
        return
    import traceback

    try:
        logger = RunLogger.from_handle(handle)
        cause = exc
        while getattr(cause, "__cause__", None) is not None:  # Ray wraps a worker's error: its cause says why
            cause = cause.__cause__
        lines = [line for line in f"{type(cause).__name__}: {cause}".strip().splitlines() if line.strip()]
        logger.set_tags({"apexdistill.error": (lines[-1] if lines else type(cause).__name__)[:500]})
        logger.log_text("".join(traceback.format_exception(exc)), "error.txt")
    finally:
        _close_quietly(handle, "FAILED")


def _close_quietly(handle: Any, status: str) -> None:
    """Close a stopped run's MLflow run; if the store fails too, say so in one line and let the stop line follow."""
    from apexdistill.tracking import close_run

    try:
        close_run(handle, status)
    except Exception as exc:  # noqa: BLE001 - the run's own error is the one to raise
        print(f"[train] could not mark MLflow run {handle.run_id} {status}: {type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}", flush=True)


def last_good_checkpoint(out: Path, storage: Any = None) -> tuple[int, str] | None:
    """The step and place of a run's newest complete checkpoint (the run folder, or ``run.storage_uri``), or None."""
    from apexdistill.train.loop import latest_checkpoint

    if storage is not None:
        folder = storage.latest()
        return (int(folder.rstrip("/").rsplit("_", 1)[-1]), storage.to_uri(folder)) if folder else None
    local = latest_checkpoint(out)
    return (int(local.name.rsplit("_", 1)[-1]), str(local)) if local is not None else None


def stopped_line(cfg: Config, out: Path, storage: Any, handle: Any, exc: BaseException) -> str:
    """What a person reads when a fit stops: interrupted or failed, the last good checkpoint, and how to resume."""
    from apexdistill.console import resume_command

    try:
        last = last_good_checkpoint(out, storage)
    except Exception:  # noqa: BLE001 - storage gone too: the line still says what happened
        last = None
    where = f"the last good checkpoint is step {last[0]} ({last[1]})" if last else "no checkpoint was written yet"
    mlflow = f", MLflow run {handle.run_id}" if handle is not None else ""
    again = f"{'resume with' if last else 'run again'}: {resume_command(out / 'config.yaml')}"
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return f"[train] interrupted; {where}{mlflow}; {again}"
    from apexdistill.train.faults import fault_reason

    return f"[train] failed ({fault_reason(exc)}); {where}{mlflow}; {again}"


def run_training(cfg: Config, address: str | None = None, evaluate: bool | None = None, parent_run_id: str | None = None,
                 train_callbacks: list[Any] | None = None, run_tags: dict[str, str] | None = None,
                 tune_trial: bool = False) -> TrainResult:
    """Preprocess (a cache hit costs milliseconds), open the MLflow run, fit, evaluate, close the run.

    ``evaluate``: score the final weights on the built-in digits (default: when the data is the digits
    and ``eval.at_end`` is set). ``parent_run_id`` makes the MLflow run a child (sweep trials);
    ``train_callbacks`` go to ``RunConfig(callbacks=...)`` (Tune's report callback). ``tune_trial``:
    this process is a Ray Tune trial; with ``train.num_workers=0`` the loop then runs here and reports
    to Tune itself (``train/session.py``), with no worker group to start."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from apexdistill.data.preprocess import read_cache, read_cache_tables, run_preprocess
    from apexdistill.tracking import RUN_FILE, RunLogger, close_run, open_run, redact_uri
    from apexdistill.train.data import DataShapes, LocalRows, row_bytes
    from apexdistill.train.faults import FaultReporter, clear_failure_record, deferred_interrupt
    from apexdistill.train.loop import latest_checkpoint, train_loop_per_worker
    from apexdistill.train.storage import RunStorage

    check_memory_plan(cfg)  # a GPU run that cannot fit is refused before Ray, data or workers start
    out = run_dir(cfg)
    handle = None
    if cfg.tracking.enabled:  # an unreachable server is reported before any worker starts
        from apexdistill.tracking import check_reachable, resolve_uri

        check_reachable(resolve_uri(cfg))
    storage = RunStorage.from_config(cfg)
    if storage is not None:  # unreachable or unwritable storage is reported before Ray starts
        storage.check_writable(dump_yaml(cfg))
    connect(cfg, address)
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / "config.yaml")
    from apexdistill.resolve import conditioning_record

    conditioning = conditioning_record(cfg)  # resolved once: what every checkpoint records and the export reproduces
    (out / CONDITIONING_FILE).write_text(json.dumps(conditioning, indent=2))
    cache = run_preprocess(cfg)
    shapes = DataShapes.from_manifest(cache.manifest, cache.uri)
    shapes.save(out)
    if storage is not None:
        storage.put_file(out / "data_shapes.json", "data_shapes.json")
        if not (out / RUN_FILE).is_file():  # resumed on another machine: log into the same MLflow run
            storage.get_file(RUN_FILE, out / RUN_FILE)
    # a cache that the workers hold in memory anyway is read here once: no Ray Data task needs a CPU
    in_driver = shapes.rows * row_bytes(cache.manifest) <= cfg.data.in_memory_max_mb * 2**20
    if not in_driver:
        check_cpu_headroom(cfg)
    if cfg.tracking.enabled:
        handle = open_run(cfg, out, tags={"apexdistill.cache_key": cache.key, **(run_tags or {})},
                          parent_run_id=parent_run_id)
        if storage is not None:
            storage.put_file(out / RUN_FILE, RUN_FILE)
    resume_from = last_good_checkpoint(out, storage)
    if handle is not None and not (handle.resumed and resume_from):  # else the resume line below names the run
        verb = "resuming" if handle.resumed else "logging to"
        print(f"[train] MLflow: {verb} run {handle.run_id} in experiment '{cfg.tracking.experiment}' ({redact_uri(handle.uri)})", flush=True)
    if resume_from is not None:
        into = f" into MLflow run {handle.run_id} in experiment '{cfg.tracking.experiment}' ({redact_uri(handle.uri)})" if handle else ""
        print(f"[train] resuming run '{cfg.run.name}' from its step-{resume_from[0]} checkpoint ({resume_from[1]}){into}", flush=True)
    logger = RunLogger.from_handle(handle)
    if logger is not None:
        logger.log_dict(conditioning, CONDITIONING_FILE)

    if cfg.eval.every:  # the in-training scores need the classifier: train it here, not in every worker
        prepare_evaluator(cfg)
    workers = cfg.train.num_workers
    resources: dict[str, float] | None = None
    if workers > 0:
        resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1.0} if cfg.train.use_gpu else {})}
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the split into shards: no bars in the training log
    from apexdistill.console import PROGRESS_FILE, ProgressRelay, verbose

    loop_progress = not verbose()
    loop_config = {
        "config": cfg.model_dump(mode="json"), "run_dir": str(out), "shapes": shapes.__dict__,
        "row_bytes": row_bytes(cache.manifest), "tracking": handle.as_dict() if handle else None,
        "sample_prompts": sample_prompts(cfg, cache.uri) if handle or cfg.eval.every else None,
        "negative": negative_embedding(cache.uri), "conditioning": conditioning,
        # quiet mode: Ray forwards no worker output; rank 0 appends its progress here and we print it
        "progress_file": str(out / PROGRESS_FILE) if loop_progress else None,
        "report_progress": tune_trial,  # Tune's schedulers may rank by any logged metric
    }
    in_trial = tune_trial and workers == 0
    datasets: dict[str, Any] | None
    if in_trial and in_driver:  # read here, iterated here: no Ray Data task waits for a CPU the trials hold
        datasets = {"train": LocalRows(read_cache_tables(cache.uri))}
    elif in_driver:  # read here once, into the object store; each worker takes its share (no dataset actors to start)
        loop_config["local_rows"] = ray.put(read_cache_tables(cache.uri))
        datasets = None
    else:
        datasets = {"train": read_cache(cache.uri)}
    trainer = None if in_trial else TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        datasets=datasets,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.train.use_gpu and workers > 0, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            # on object storage Ray keeps its run state there too (and a pointer per published checkpoint)
            storage_path=storage.ray_storage_path if storage else str(ray_storage(cfg)),
            storage_filesystem=storage.fs if storage else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[*(train_callbacks or []), FaultReporter(out, loop_config["progress_file"], cfg.train.max_failures)],
        ),
    )
    clear_failure_record(out)
    started = time.time()
    try:
        with ProgressRelay(out) if loop_progress else contextlib.nullcontext(), deferred_interrupt(workers == 0):
            if trainer is None:
                from apexdistill.train.session import TuneTrialSession

                session = TuneTrialSession(datasets)
                train_loop_per_worker(loop_config, session)
                reported, last_checkpoint = session.last_metrics, session.last_checkpoint
            else:
                result = trainer.fit()
                if result.error is not None:
                    raise result.error
                reported, last_checkpoint = result.metrics, result.checkpoint
    except BaseException as exc:
        _close_failed(handle, exc)
        if not tune_trial:  # a sweep reports its trials itself
            print(stopped_line(cfg, out, storage, handle, exc), flush=True)
        raise
    if last_checkpoint is None:
        raise RuntimeError(f"run {cfg.run.name} finished without a checkpoint")
    # local mode reports the folder we published; with workers Ray also has a copy under storage_path
    if storage is not None:
        latest = storage.latest()
        if latest is None:
            raise RuntimeError(f"run {cfg.run.name} finished without a complete checkpoint under {storage.run_uri}")
        checkpoint, checkpoint_uri = None, storage.to_uri(latest)
    else:
        checkpoint = latest_checkpoint(out) or Path(last_checkpoint.path)
        checkpoint_uri = str(checkpoint)
    metrics = dict(reported or {})
    rows: list[Any] = []
    if logger is not None:
        logger.set_tags({"apexdistill.checkpoint": checkpoint_uri})
        logger.log_metrics({"fit_seconds": time.time() - started})
    scores: dict[str, float] = {}
    if evaluate is None:
        evaluate = cfg.eval.at_end and (is_digits_run(cfg) or bool(cfg.model.path))
    if evaluate:
        print("[train] evaluating the final weights " + ("on the built-in digits" if is_digits_run(cfg) else
              "against the teacher (eval.at_end=false skips this)"), flush=True)
        # a sweep trial scores in its own process: its CPUs are reserved, actors would wait for others
        try:
            rows, scores = evaluate_run(cfg, out, logger, step=int(metrics.get("step") or 0),
                                        weights_from=storage.run_uri if storage else None, actors=0 if tune_trial else None)
        except BaseException as exc:
            _close_failed(handle, exc)
            raise
    if handle is not None:
        close_run(handle, "FINISHED")
    return TrainResult(run_dir=out, checkpoint_dir=checkpoint, checkpoint_uri=checkpoint_uri, metrics=metrics, eval_rows=rows,
                       eval_scores=scores,
                       mlflow_run_id=handle.run_id if handle else None, tracking_uri=handle.uri if handle else None)

