"""`apexdistill sweep`: Ray Tune over config keys, one MLflow parent run with a child run per trial.

Each trial is a small Tune function that builds the trial's config and calls ``run_training``. With
``resources.workers: 0`` (the default) the trial trains in its own process and reports to Tune itself
(``train/session.py``); with workers it is the "driver" of RAY_NOTES.md's Train V2 pattern, fitting a
``TorchTrainer`` whose ``TuneReportCallback`` forwards the workers' reports. Either way the in-training
scores of ``eval_every`` reach Tune, so ASHA can stop poor trials. The trial's MLflow run is a child of the sweep's parent run (``mlflow.parentRunId``).
Run names are stable (``<sweep>-<trial id>``), so an interrupted sweep resumed with the same command
(``Tuner.restore``) re-opens unfinished trials where their checkpoints left them and never re-runs
finished ones.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexdistill.config import Config, build_config, dump_yaml, with_absolute_paths
from apexdistill.tune.sweep import SweepConfig


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    metric: float | None
    accuracy: float | None
    steps: int | None
    status: str
    run_id: str | None


SEED_KEY = "run.seed"


@dataclass
class CellRow:
    """One point of the space over its seeds (``run.seed`` in the space): mean and spread of the finished trials."""
    params: dict[str, Any]
    seeds: int
    finished: int
    mean: float | None
    std: float | None
    accuracy: float | None
    values: list[float]


def summarize_seeds(rows: list[TrialRow], sweep: SweepConfig) -> list[CellRow] | None:
    """With ``run.seed`` in the space, the trials grouped by their other keys: the metric's mean and sample
    standard deviation over each cell's finished seeds, best mean first. None without a seed key."""
    if SEED_KEY not in sweep.space:
        return None
    keys = [k for k in sweep.space if k != SEED_KEY]
    cells: dict[str, list[TrialRow]] = {}
    for r in rows:
        cells.setdefault(json.dumps([r.params.get(k) for k in keys], default=str), []).append(r)
    out = []
    for members in cells.values():
        values = [r.metric for r in members if r.metric is not None]
        accs = [r.accuracy for r in members if r.metric is not None and r.accuracy is not None]
        mean = statistics.fmean(values) if values else None
        out.append(CellRow(params={k: members[0].params.get(k) for k in keys}, seeds=len(members), finished=len(values),
                           mean=mean, std=statistics.stdev(values) if len(values) > 1 else (0.0 if values else None),
                           accuracy=statistics.fmean(accs) if accs else None, values=values))
    sign = 1 if sweep.mode == "min" else -1
    out.sort(key=lambda c: (c.mean is None, sign * (c.mean or 0.0)))
    return out


def format_cells(cells: list[CellRow], sweep: SweepConfig) -> str:
    keys = [k for k in sweep.space if k != SEED_KEY]
    head = keys + [f"{sweep.metric} mean +- std", "accuracy", "seeds finished", "values"]
    table = [head]
    for c in cells:
        table.append([str(c.params.get(k)) for k in keys]
                     + ["-" if c.mean is None else f"{c.mean:.2f} +- {c.std:.2f}",
                        "-" if c.accuracy is None else f"{100 * c.accuracy:.1f}%", f"{c.finished}/{c.seeds}",
                        ", ".join(f"{v:.2f}" for v in c.values)])
    return _table(table)


def _search_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in sweep.space.items():
        kind, values = next(iter(spec.items()))
        space[key] = {
            "grid": lambda v: tune.grid_search(v),
            "choice": lambda v: tune.choice(v),
            "uniform": lambda v: tune.uniform(v[0], v[1]),
            "loguniform": lambda v: tune.loguniform(v[0], v[1]),
            "int": lambda v: tune.randint(int(v[0]), int(v[1]) + 1),
        }[kind](values)
    return space


def sweep_dir(cfg: Config, sweep: SweepConfig) -> Path:
    return Path(cfg.run.workdir).resolve() / "sweeps" / sweep.name


def _trial(params: dict[str, Any], base: dict[str, Any], sweep_data: dict[str, Any], parent: dict[str, str] | None) -> None:
    """One trial: build its config, train (in this process, or a TorchTrainer's workers whose metrics
    stream to Tune), report the final scores."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from apexdistill.train.driver import run_training

    sweep = SweepConfig.model_validate(sweep_data)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = build_config(base, [*sweep.trial_overrides(params), f"run.name={sweep.name}-{trial_id}"])
    result = run_training(cfg, evaluate=True, parent_run_id=parent["run_id"] if parent else None,
                          train_callbacks=[TuneReportCallback()] if sweep.resources.workers else None, tune_trial=True, run_tags={"apexdistill.sweep": sweep.name,
                                                                            "apexdistill.trial_id": trial_id})
    final: dict[str, Any] = {"step": int(result.metrics.get("step", 0)), "final": 1, **result.eval_scores}
    if result.mlflow_run_id:
        final["mlflow_run_id"] = result.mlflow_run_id
    ray.tune.report(final)


def _open_parent(cfg: Config, sweep: SweepConfig, folder: Path, sweep_text: str) -> dict[str, str] | None:
    """The sweep's MLflow parent run, created once and reused when the sweep resumes."""
    if not cfg.tracking.enabled:
        return None
    from mlflow import MlflowClient

    from apexdistill.tracking import check_reachable, get_or_create_experiment, git_commit, resolve_uri

    uri = resolve_uri(cfg)
    check_reachable(uri)
    record = folder / "parent_run.json"
    client = MlflowClient(uri)
    if record.is_file():
        data = json.loads(record.read_text())
        if data.get("uri") == uri:
            client.update_run(data["run_id"], status="RUNNING")
            return data
    experiment_id = get_or_create_experiment(client, cfg, uri)
    run = client.create_run(experiment_id, run_name=sweep.name, tags={
        "apexdistill.sweep": sweep.name, "apexdistill.kind": "sweep", "mlflow.source.git.commit": git_commit(),
        "apexdistill.metric": sweep.metric, "apexdistill.mode": sweep.mode})
    run_id = run.info.run_id
    data = {"uri": uri, "run_id": run_id, "experiment_id": experiment_id}
    record.write_text(json.dumps(data))  # first: a failure below never leaves an orphan parent behind
    for key, spec in sweep.space.items():  # MLflow param names take no commas: joint keys use '/'
        client.log_param(run_id, f"space.{key.replace(',', '/')}", json.dumps(spec))
    for key in ("metric", "mode", "search", "num_samples", "max_concurrent", "eval_every"):
        client.log_param(run_id, f"sweep.{key}", getattr(sweep, key))
    client.log_param(run_id, "sweep.budget_steps", sweep.budget.steps)
    client.log_text(run_id, sweep_text, "sweep.yaml")
    client.log_text(run_id, dump_yaml(cfg), "base_config.yaml")
    return data


def sweep_progress(sweep: SweepConfig) -> Any:
    """Quiet mode: one line per trial event (started, an in-training score, finished, stopped, failed)
    instead of Tune's status tables."""
    from ray import tune

    class SweepProgress(tune.Callback):
        def __init__(self) -> None:
            self.done = 0
            self.retries: dict[str, int] = {}

        def _name(self, trial: Any) -> str:
            params = ", ".join(f"{k}={(trial.config or {}).get(k)}" for k in sweep.space)
            return f"{trial.trial_id} ({params})"

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"[sweep] started {self._name(trial)}", flush=True)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if sweep.metric in result:
                print(f"[sweep] {trial.trial_id} step {result.get('step', '?')}: {sweep.metric}={result[sweep.metric]:.2f}", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            last = trial.last_result or {}
            how = "finished" if last.get("final") else "stopped early"
            score = f", {sweep.metric}={last[sweep.metric]:.2f}" if sweep.metric in last else ""
            print(f"[sweep] {how} {trial.trial_id}{score} ({self.done}/{len(trials)} trials done)", flush=True)

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1
            print(f"[sweep] {trial.trial_id} failed ({trial_error_line(trial)}); retry {self.retries[trial.trial_id]} of "
                  f"max_failures={sweep.max_failures}, from its last checkpoint", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            print(f"[sweep] FAILED {trial.trial_id}: {trial_error_line(trial)} (traceback: {trial.local_path or 'its trial folder'})",
                  flush=True)

    return SweepProgress()


def trial_error_line(trial: Any) -> str:
    """The last line of a failed trial's exception (Tune wraps it: the cause's own message is what says why)."""
    error: BaseException | None = None
    try:
        error = trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 - an unreadable error file: fall back to its text
        error = None
    while error is not None and getattr(error, "__cause__", None) is not None:
        error = error.__cause__
    text = f"{type(error).__name__}: {error}" if error is not None else ""
    if not text.strip() and trial.error_file and Path(trial.error_file).is_file():
        text = Path(trial.error_file).read_text()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def check_sweep_metric(cfg: Config, sweep: SweepConfig) -> None:
    """A sweep ranks its trials by a metric the runs report: refused before any trial starts otherwise."""
    from apexdistill.train.driver import available_metrics

    if not sweep.metric.startswith("eval/"):
        return  # a training metric (loss, ...): every run reports those
    names = available_metrics(cfg, in_training=bool(sweep.eval_every))
    if sweep.metric not in names:
        raise ValueError(f"metric: '{sweep.metric}' is not reported by this sweep's runs; they report "
                         f"{', '.join(names) or 'no eval/* metric (no teacher in model.path to score against)'}")


def run_sweep(cfg: Config, sweep: SweepConfig, sweep_text: str = "", address: str | None = None) -> list[TrialRow]:
    """Run (or resume) the sweep; returns one row per trial, best first."""
    from ray import tune

    from apexdistill.console import verbose
    from apexdistill.data.preprocess import run_preprocess
    from apexdistill.train.driver import connect, prepare_evaluator

    if sweep.experiment:  # the parent lives in the same experiment as its trials
        cfg = build_config(cfg.model_dump(mode="json"), [f"tracking.experiment={sweep.experiment}"])
    # trials run in Tune's trial folders: a relative ./apex-runs there is a new work directory with no
    # cache, whose rebuild by two trials at once starves Ray Data of CPUs (seen: a sweep stuck for minutes)
    cfg = with_absolute_paths(cfg)
    check_sweep_metric(cfg, sweep)
    connect(cfg, address)
    folder = sweep_dir(cfg, sweep)
    folder.mkdir(parents=True, exist_ok=True)
    parent = _open_parent(cfg, sweep, folder, sweep_text)
    run_preprocess(cfg)  # every trial then hits the cache
    prepare_evaluator(cfg)  # once here rather than in every trial

    # progress reports carry the sweep metric only at eval steps (ASHA skips the others): not an error
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg.model_dump(mode="json"), sweep_data=sweep.model_dump(mode="json"), parent=parent),
        sweep.resources.trial_resources(),
    )
    storage = Path(cfg.run.workdir).resolve() / "tune"
    path = storage / sweep.name
    space = _search_space(sweep)
    if tune.Tuner.can_restore(str(path)):
        print(f"[sweep] resuming {sweep.name} from {path} (finished trials are not run again)", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True, param_space=space)
    else:
        search_alg = None
        if sweep.search == "optuna":
            from apexdistill.tune.searchers import ScoredOptunaSearch

            search_alg = ScoredOptunaSearch(seed=cfg.run.seed, points_to_evaluate=sweep.start_points or None)
        scheduler = None
        if sweep.scheduler is not None:
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="step", max_t=sweep.budget.steps, grace_period=sweep.scheduler.grace_period,
                                      reduction_factor=sweep.scheduler.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, search_alg=search_alg, scheduler=scheduler,
                                        num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent,
                                        # a CPU trial that trains itself leaves its process to the next trial: no
                                        # new process importing torch and diffusers (~8 s on 2 cores) per trial. Not
                                        # on GPUs: a stopped trial's frames (its model) could outlive it there, and
                                        # a second model on the device is worth more than seconds of start-up
                                        reuse_actors=sweep.resources.workers == 0 and not sweep.resources.use_gpu),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(storage), verbose=1 if verbose() else 0,
                                      failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                      callbacks=None if verbose() else [sweep_progress(sweep)]),
        )
    results = tuner.fit()
    rows = collect_rows(results, sweep, list(sweep.space))
    finished = [r for r in rows if r.metric is not None]
    if parent is not None:
        _close_parent(parent, sweep, finished)
    (folder / "results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=str))
    print("\n" + format_results(rows, sweep), flush=True)
    cells = summarize_seeds(rows, sweep)
    if cells is not None:  # run.seed in the space: each point's mean and spread over its seeds
        cells_json = json.dumps([c.__dict__ for c in cells], indent=2, default=str)
        (folder / "cells.json").write_text(cells_json)
        print(f"\neach point over its seeds ({SEED_KEY}):\n" + format_cells(cells, sweep), flush=True)
        if parent is not None:
            from mlflow import MlflowClient

            MlflowClient(parent["uri"]).log_text(parent["run_id"], cells_json, "cells.json")
    if parent is not None:
        print(f"[sweep] MLflow: parent run {parent['run_id']} ({parent['uri']}); children: "
              f"tags.mlflow.parentRunId = '{parent['run_id']}'", flush=True)
    return rows


def collect_rows(results: Any, sweep: SweepConfig, keys: list[str]) -> list[TrialRow]:
    rows = []
    for r in results:
        metrics = r.metrics or {}
        value = metrics.get(sweep.metric)
        acc = metrics.get("eval/accuracy_1nfe")
        final = bool(metrics.get("final"))
        status = "error" if r.error else ("finished" if final else "stopped early")
        rows.append(TrialRow(
            trial_id=str(metrics.get("trial_id", getattr(r, "path", "?")).rsplit("/", 1)[-1]),
            params={k: (r.config or {}).get(k) for k in keys},
            metric=float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None,
            accuracy=float(acc) if isinstance(acc, (int, float)) else None,
            steps=int(metrics["step"]) if "step" in metrics else None,
            status=status, run_id=metrics.get("mlflow_run_id"),
        ))
    sign = 1 if sweep.mode == "min" else -1
    rows.sort(key=lambda r: (r.metric is None, sign * (r.metric or 0.0)))
    return rows


def _close_parent(parent: dict[str, str], sweep: SweepConfig, finished: list[TrialRow]) -> None:
    from apexdistill.tracking import RunLogger

    logger = RunLogger(parent["uri"], parent["run_id"])
    if finished:
        best = finished[0]
        logger.set_tags({"apexdistill.best_trial": best.trial_id, "apexdistill.best_run_id": best.run_id or "",
                         "apexdistill.best_params": json.dumps(best.params)})
        logger.log_metrics({f"best/{sweep.metric}": best.metric, "trials_finished": len(finished)})
    # trials that ASHA stopped (or that were killed) never closed their child runs
    for run in logger.client.search_runs([parent["experiment_id"]], f"tags.mlflow.parentRunId = '{parent['run_id']}' "
                                         f"and attributes.status = 'RUNNING'"):
        logger.client.set_terminated(run.info.run_id, "KILLED")
    logger.client.set_terminated(parent["run_id"], "FINISHED")


def format_results(rows: list[TrialRow], sweep: SweepConfig) -> str:
    keys = list(sweep.space)
    head = ["trial"] + keys + [sweep.metric, "accuracy", "steps", "status"]
    table = [head]
    for r in rows:
        table.append([r.trial_id] + [str(r.params.get(k)) for k in keys]
                     + ["-" if r.metric is None else f"{r.metric:.2f}", "-" if r.accuracy is None else f"{100 * r.accuracy:.1f}%",
                        "-" if r.steps is None else str(r.steps), r.status])
    return _table(table)


def _table(table: list[list[str]]) -> str:
    """Rows of cells as aligned text columns, a rule under the head row."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
