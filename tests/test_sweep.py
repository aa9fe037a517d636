"""Sweeps on real local Ray Tune and a real SQLite MLflow store: parent and child runs, ASHA stopping
a bad trial, resuming an interrupted sweep, and sweep files refused with clear messages."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from apexdistill.config import ConfigError, build_config
from apexdistill.tune.runner import run_sweep
from apexdistill.tune.sweep import SweepConfig, load_sweep

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]

from conftest import SWEEP_BASE


@pytest.fixture(scope="module")
def workdir(sweep_workdir):
    return sweep_workdir


def _base(workdir, *extra):
    return build_config({}, [f"run.workdir={workdir}", *SWEEP_BASE, *extra])


def _write(tmp_path, name, data) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _children(cfg, parent_id, experiment="sweeps-test"):
    client = MlflowClient(f"sqlite:///{Path(cfg.run.workdir).resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def _parent_id(cfg, name):
    import json

    return json.loads((Path(cfg.run.workdir).resolve() / "sweeps" / name / "parent_run.json").read_text())["run_id"]


def test_grid_sweep_parent_and_children_in_mlflow(grid_sweep):
    cfg, rows, parent_id = grid_sweep
    assert len(rows) == 4 and all(r.status == "finished" and r.metric is not None for r in rows)
    assert [r.metric for r in rows] == sorted(r.metric for r in rows)  # best first

    client, children = _children(cfg, parent_id, "sweeps-grid")
    assert len(children) == 4
    assert client.get_run(parent_id).info.experiment_id == children[0].info.experiment_id  # the sweep file's experiment
    points = sorted((float(c.data.params["train.lr"]), int(c.data.params["train.warmup_steps"])) for c in children)
    assert points == [(1e-4, 0), (1e-4, 2), (3e-3, 0), (3e-3, 2)]  # the trial params: the whole grid, once each
    assert all(c.data.params["train.steps"] == "6" and c.info.status == "FINISHED" for c in children)
    assert all(c.data.params["train.grad_clip"] == "0.5" and c.data.params["train.weight_decay"] == "0.0" for c in children)
    assert all("eval/fd_1nfe" in c.data.metrics for c in children)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["apexdistill.kind"] == "sweep"
    assert "space.train.grad_clip/train.weight_decay" in parent.data.params
    best = parent.data.tags["apexdistill.best_run_id"]
    assert best == rows[0].run_id and best in {c.info.run_id for c in children}
    assert parent.data.metrics["best/eval/fd_1nfe"] == pytest.approx(rows[0].metric)


def test_asha_stops_a_bad_trial_early(tmp_path, workdir):
    """From the shipped teacher, a learning rate of 0.01 wrecks the model by the first score (4 steps)
    while 1e-4 keeps it near the teacher; ASHA (grace 4 steps, the bad trial second) stops it there (0.05 sometimes went non-finite and errored instead)."""
    cfg = _base(workdir, "model.path=builtin:teacher")
    path = _write(tmp_path, "asha", {
        "name": "asha", "budget": {"steps": 12}, "eval_every": 4,
        "space": {"train.lr": {"grid": [1e-4, 0.01]}}, "scheduler": {"grace_period": 4, "reduction_factor": 2},
        "max_concurrent": 1, "resources": {"workers": 0, "cpus_per_worker": 0.45}})
    rows = run_sweep(cfg, load_sweep(path, cfg.model_dump(mode="json")), path.read_text())
    stopped = [r for r in rows if r.status == "stopped early"]
    assert stopped, [(r.params, r.status, r.steps) for r in rows]
    assert all(r.steps < 12 for r in stopped)
    assert any(r.params["train.lr"] == 0.01 for r in stopped)
    # in MLflow a stopped trial is KILLED, not FAILED (Tune stops a trial by raising SystemExit in its report)
    _, children = _children(cfg, _parent_id(cfg, "asha"))
    status = {r.trial_id: r.status for r in rows}
    assert {c.data.tags["apexdistill.trial_id"]: c.info.status for c in children} == {
        t: "KILLED" if st == "stopped early" else "FINISHED" for t, st in status.items()}


def test_an_optuna_sweep_with_in_training_scores_runs_to_the_end(tmp_path, workdir):
    """Optuna with ``eval_every`` (the shape of sweeps/apex_recipe.yaml): the progress reports between two
    scores carry no metric, which OptunaSearch used to index and fail on (KeyError, the sweep ended)."""
    cfg = _base(workdir)
    path = _write(tmp_path, "optuna", {
        "name": "optuna", "budget": {"steps": 4}, "eval_every": 2, "search": "optuna", "num_samples": 2,
        "overrides": ["train.log_every=1"],  # progress reports at steps 1 and 3, between the scores
        "space": {"train.lr": {"loguniform": [1e-4, 1e-3]}}, "max_concurrent": 2,
        "start_points": [{"train.lr": 3.21e-4}],  # the first trial's value; Optuna samples the second
        "resources": {"workers": 1, "cpus_per_worker": 0.35}})
    rows = run_sweep(cfg, load_sweep(path, cfg.model_dump(mode="json")), path.read_text())
    assert len(rows) == 2 and all(r.status == "finished" and r.metric is not None for r in rows), rows
    assert all(1e-4 <= r.params["train.lr"] <= 1e-3 for r in rows)
    assert sum(r.params["train.lr"] == 3.21e-4 for r in rows) == 1, [r.params for r in rows]  # the start point ran once
    client, children = _children(cfg, _parent_id(cfg, "optuna"))
    assert len(children) == 2
    for c in children:  # the in-training score at step 2 and the final one reached the store
        steps = sorted(m.step for m in client.get_metric_history(c.info.run_id, "eval/fd_1nfe"))
        assert steps[0] == 2 and steps[-1] == 4, steps


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, workdir):
    cfg_path = tmp_path / "base.yaml"
    cfg = _base(workdir)
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    sweep = _write(tmp_path, "resume", {"name": "resume", "budget": {"steps": 20}, "space": {"train.lr": {"grid": [1e-4, 2e-4]}},
                                         "max_concurrent": 1, "resources": {"workers": 0, "cpus_per_worker": 0.45}})
    cmd = [sys.executable, "-m", "apexdistill.cli", "sweep", "-c", str(cfg_path), "-s", str(sweep)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    finished: list = []
    while time.time() < deadline and not finished:  # wait until the first trial has finished
        time.sleep(2)
        try:
            _, children = _children(cfg, _parent_id(cfg, "resume"))
        except Exception:  # noqa: BLE001 - the store or the parent record does not exist yet
            continue
        finished = [c for c in children if c.info.status == "FINISHED"]
    assert finished, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
    proc.communicate(timeout=120)

    first = {c.info.run_id: c.info.start_time for c in finished}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming resume" in out.stdout
    # the console is our own lines: no Tune experiment box or TensorBoard hint, no library INFO lines
    console = (out.stdout + out.stderr).splitlines()
    noise = [line for line in console if re.search(r"Configuration for experiment|View detailed results|tensorboard|INFO |"
                                                   r"\] ?E\b|\bERROR\b|Traceback|pid=\d+\)", line)]
    assert noise == [], "\n".join(noise)
    _, children = _children(cfg, _parent_id(cfg, "resume"))
    assert sorted(float(c.data.params["train.lr"]) for c in children) == [1e-4, 2e-4]  # one child per trial
    assert all(c.info.status == "FINISHED" for c in children)
    client = MlflowClient(f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}")
    for c in children:  # the trial finished before the interruption was not run again
        if c.info.run_id in first:
            assert c.info.start_time == first[c.info.run_id]
            steps = [m.step for m in client.get_metric_history(c.info.run_id, "step")]
            assert len(steps) == len(set(steps))  # no step logged twice: it did not train again


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "space": {"train.lr": {"grid": [1e-3]}}, "metrc": "x"}, r"unknown key 'metrc'; did you mean 'metric'"),
        ({"name": "x", "space": {}}, r"search space is empty"),
        ({"name": "x", "space": {"train.lrr": {"grid": [1e-3]}}}, r"'train.lrr' is not a config key; did you mean 'train.lr'"),
        ({"name": "x", "space": {"train.lr": {"normal": [0, 1]}}}, r"expected one of \{grid, choice, uniform, loguniform, int"),
        ({"name": "x", "space": {"train.lr": {"uniform": [1, 0]}}, "search": "random"}, r"low < high"),
        ({"name": "x", "space": {"train.lr": {"uniform": [0, 1]}}}, r"search='grid' enumerates values"),
        ({"name": "x", "space": {"train.lr": {"grid": [1e-3]}}, "scheduler": {"grace_period": 10}}, r"set eval_every"),
        ({"name": "x", "space": {"objective.shift.a,objective.shift.b": {"grid": [[1.0]]}}}, r"must list 2 values"),
        ({"name": "x", "space": {"train.steps": {"grid": [0]}}}, r"a trial config is invalid(.|\n)*train.steps"),
        ({"name": "x", "search": "optuna", "num_samples": 2, "space": {"train.lr": {"loguniform": [1e-4, 1e-3]}, "train.ema_decay": {"choice": [0.9, 0.99]}}, "start_points": [{"train.lr": 3e-4}]}, r"start_points\[0\]: give a value for every space key; missing \['train.ema_decay'\]"),
        ({"name": "x", "search": "optuna", "num_samples": 2, "space": {"train.lr": {"loguniform": [1e-4, 1e-3]}, "train.ema_decay": {"choice": [0.9, 0.99]}}, "start_points": [{"train.lr": 3e-3, "train.ema_decay": 0.99}]}, r"start_points\[0\].train.lr=0.003 is outside the space's loguniform"),
        ({"name": "x", "search": "optuna", "num_samples": 2, "space": {"train.lr": {"loguniform": [1e-4, 1e-3]}, "train.ema_decay": {"choice": [0.9, 0.99]}}, "start_points": [{"train.lr": 3e-4, "train.ema_decay": 0.95}]}, r"start_points\[0\].train.ema_decay=0.95 is outside the space's choice"),
        ({"name": "x", "space": {"train.lr": {"grid": [1e-3]}}, "start_points": [{"train.lr": 1e-3}]}, r"start points are for search='optuna'"),
    ],
)
def test_bad_sweep_files_are_refused_with_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(_write(tmp_path, "bad", data), {})


def test_shipped_sweeps_validate_against_the_demo_config():
    from apexdistill.config import load_config
    from apexdistill.demo import DEMO_CONFIG

    base = load_config(DEMO_CONFIG).model_dump(mode="json")
    files = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert {f.stem for f in files} >= {"shift_grid", "loss_weights", "variants", "lam_detach", "learnable_shift"}
    sizes = {f.stem: len(load_sweep(f, base).corners()) for f in files}
    assert sizes["shift_grid"] == 12 * 3 and sizes["loss_weights"] == 5 * 3  # the paper's cells, 3 seeds each
    for name in ("shift_grid", "loss_weights", "variants", "lam_detach", "learnable_shift"):
        assert load_sweep(ROOT / "sweeps" / f"{name}.yaml", base).space["run.seed"] == {"grid": [0, 1, 2]}, name
    assert isinstance(SweepConfig.model_validate(yaml.safe_load((ROOT / "sweeps" / "shift_grid.yaml").read_text())), SweepConfig)


def test_random_and_optuna_spaces_sample_inside_their_bounds(tmp_path):
    """The space conversion feeds Tune's samplers and Optuna's (suggestions checked, no trials run)."""
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.variant_generator import generate_variants

    from apexdistill.tune.runner import _search_space

    space = {"train.lr": {"loguniform": [1e-5, 1e-3]}, "objective.shift.a": {"uniform": [-1.0, 0.5]},
             "train.batch_size": {"int": [8, 16]}, "objective.name": {"choice": ["apex", "fm"]}}
    for search in ("random", "optuna"):
        sweep = load_sweep(_write(tmp_path, search, {"name": search, "space": space, "search": search, "num_samples": 4}), {})
        converted = _search_space(sweep)
        if search == "random":
            points = [cfg for _, cfg in generate_variants(converted)]
        else:
            optuna = OptunaSearch(seed=0)
            assert optuna.set_search_properties(sweep.metric, sweep.mode, converted)
            points = [optuna.suggest(f"t{i}") for i in range(4)]
        for p in points:
            assert 1e-5 <= p["train.lr"] <= 1e-3 and -1.0 <= p["objective.shift.a"] <= 0.5
            assert 8 <= p["train.batch_size"] <= 16 and p["objective.name"] in ("apex", "fm")
            build_config({}, sweep.trial_overrides(p))  # every sampled point is a valid trial config


def test_seed_cells_give_each_point_its_mean_and_spread():
    """``run.seed`` in the space: the trials of each point of the other keys are one cell, with the mean and
    sample standard deviation of its finished seeds (a seed ASHA stopped counts as run, not as finished),
    best mean first; no seed key, no cells."""
    from apexdistill.tune.runner import TrialRow, format_cells, summarize_seeds

    space = {"objective.shift.a": {"grid": [-1.0, 0.5]}, "run.seed": {"grid": [0, 1, 2]}}
    sweep = SweepConfig.model_validate({"name": "s", "space": space})
    metrics = {(-1.0, 0): 4.0, (-1.0, 1): 5.0, (-1.0, 2): 6.0, (0.5, 0): 9.0, (0.5, 1): 11.0, (0.5, 2): None}
    rows = [TrialRow(f"t{i}", {"objective.shift.a": a, "run.seed": seed}, m, 0.99 if m is not None else None, 300,
                     "finished" if m is not None else "stopped early", None) for i, ((a, seed), m) in enumerate(metrics.items())]
    cells = summarize_seeds(rows[::-1], sweep)
    assert [c.params for c in cells] == [{"objective.shift.a": -1.0}, {"objective.shift.a": 0.5}]
    best, worst = cells
    assert (best.seeds, best.finished, best.mean, best.std) == (3, 3, 5.0, 1.0)
    assert (worst.seeds, worst.finished, worst.mean) == (3, 2, 10.0) and worst.std == pytest.approx(2 ** 0.5)
    assert best.accuracy == pytest.approx(0.99) and sorted(best.values) == [4.0, 5.0, 6.0]
    text = format_cells(cells, sweep)
    assert "5.00 +- 1.00" in text and "10.00 +- 1.41" in text and "2/3" in text and "run.seed" not in text
    assert summarize_seeds(rows, SweepConfig.model_validate({"name": "s", "space": {"objective.shift.a": {"grid": [-1.0]}}})) is None
