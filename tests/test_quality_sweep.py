"""Sweeps ranked by real-model quality (issue: a sweep on a stock pipeline failed every trial in the digits'
evaluation): a 2-trial Ray Tune sweep on a tiny stock Sana pipeline ranked by ``eval/fd_teacher_1nfe``, a metric
the runs cannot report refused before any trial starts, and a trial that raises shown with its exception's last
line on the console and in its MLflow child run. Real local Ray Tune, real SQLite MLflow, real pipeline classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from apexdistill.config import build_config
from apexdistill.tune.runner import run_sweep
from apexdistill.tune.sweep import load_sweep

pytestmark = pytest.mark.timeout(600)

SIDE, L = 32, 24
RESOURCES = {"workers": 0, "cpus_per_worker": 0.45}


@pytest.fixture(scope="module")
def sana(tmp_path_factory):
    from apexdistill.eval.features import build_tiny_clip
    from apexdistill.models.family import get_family

    root = tmp_path_factory.mktemp("sweep-sana")
    build_tiny_clip(root / "clip")
    return get_family("sana").build_tiny_pipeline(root / "sana", seed=0)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One work directory for the module: the tiny pipeline's cache is built by the first sweep, hit by the rest."""
    return tmp_path_factory.mktemp("quality-sweeps")


def _pipeline_base(workdir, sana):
    return build_config({}, [f"eval.clip_model={sana.parent / 'clip'}", "eval.prompts=builtin:compositional",
        f"model.path={sana}", f"run.workdir={workdir}", f"data.resolution={SIDE}", f"text_encoder.max_length={L}", "data.limit=32",
        "model.lora.enabled=true", "model.lora.rank=4", "train.batch_size=8", "train.log_every=2", "train.checkpoint_every=0",
        "objective.apex.generator_warmup_steps=0", "eval.prompt_limit=4", "eval.images_per_prompt=2", "eval.teacher_nfe=4",
        "eval.during_samples_per_class=4",
        "eval.nfe=[1]", "tracking.experiment=quality-sweeps"])


def _sweep_file(tmp_path, name, metric, space, **extra):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "metric": metric, "budget": {"steps": 4}, "space": space, "max_concurrent": 2,
                                    "resources": RESOURCES, **extra}, sort_keys=False))
    return path


def _children(workdir, experiment, name):
    parent = json.loads((Path(workdir) / "sweeps" / name / "parent_run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{Path(workdir) / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def test_a_pipeline_sweep_is_ranked_by_the_fd_to_the_teacher(sana, workdir, tmp_path):
    cfg = _pipeline_base(workdir, sana)
    # eval_every: the in-training FD to the teacher (the same definitions on the fixed prompts) reaches Tune at step 2
    path = _sweep_file(tmp_path, "shift", "eval/fd_teacher_1nfe", {"objective.shift.a": {"grid": [-1.0, 0.5]}}, eval_every=2)
    rows = run_sweep(cfg, load_sweep(path, cfg.model_dump(mode="json")), path.read_text())
    assert len(rows) == 2 and all(r.status == "finished" and r.metric is not None for r in rows)
    assert rows[0].metric <= rows[1].metric  # best (lowest FD) first
    client, children = _children(workdir, "quality-sweeps", "shift")
    assert len(children) == 2
    for child in children:
        m = child.data.metrics
        assert child.info.status == "FINISHED"
        assert {"eval/fd_teacher_1nfe", "eval/diversity_1nfe", "eval/ms_per_image_1nfe", "eval/teacher_fd_floor"} <= set(m)
        assert child.data.tags["apexdistill.eval_prompt_hash"]
        history = {h.step: h.value for h in client.get_metric_history(child.info.run_id, "eval/fd_teacher_1nfe")}
        assert set(history) == {2, 4} and all(v > 0 for v in history.values())  # in training at 2, the final score at 4
    assert sorted(c.data.metrics["eval/fd_teacher_1nfe"] for c in children) == pytest.approx(sorted(r.metric for r in rows))

    # the dashboard shows the quality columns and each trial's CLIP score per prompt tag
    from apexdistill.report import build_report

    page, data = build_report(f"sqlite:///{workdir / 'mlflow.db'}", tmp_path / "report", ["quality-sweeps"])
    html = page.read_text()
    assert "FD to teacher 1 NFE" in html and "CLIP 1 NFE" in html and "diversity x teacher 1 NFE" in html
    assert len(data["clip_tags"]) == 2 and set(data["clip_tags"][0]["tags"]) == {"single_object", "two_object", "counting", "colors"}
    assert "CLIP score by prompt tag" in html and 'class="sortable clip-tags"' in html


def test_a_metric_the_runs_cannot_report_is_refused_before_any_trial(sana, workdir, tmp_path):
    cfg = _pipeline_base(workdir, sana)
    path = _sweep_file(tmp_path, "digits-metric", "eval/accuracy_1nfe", {"objective.shift.a": {"grid": [-1.0, 0.5]}})
    with pytest.raises(ValueError, match=r"metric: 'eval/accuracy_1nfe' is not reported.*eval/fd_teacher_1nfe"):
        run_sweep(cfg, load_sweep(path, cfg.model_dump(mode="json")), path.read_text())
    assert not (workdir / "tune" / "digits-metric").exists() and not (workdir / "sweeps" / "digits-metric").exists()


def test_a_failing_trial_shows_its_error_on_the_console_and_in_mlflow(sana, workdir, tmp_path, capsys):
    """A learning rate that sends the loss to inf: the trial raises FloatingPointError in its first steps; retried
    once (max_failures: 1), it fails the same way, and the console says both."""
    cfg = build_config(_pipeline_base(workdir, sana).model_dump(mode="json"), ["train.grad_clip=0", "tracking.experiment=failing-trials"])
    path = _sweep_file(tmp_path, "diverges", "eval/fd_teacher_1nfe", {"train.lr": {"grid": [1e30]}}, max_failures=1)
    rows = run_sweep(cfg, load_sweep(path, cfg.model_dump(mode="json")), path.read_text())
    printed = capsys.readouterr().out
    assert rows[0].status == "error"
    retry = [line for line in printed.splitlines() if line.startswith("[sweep] ") and "retry 1 of max_failures=1" in line]
    assert len(retry) == 1 and "FloatingPointError: non-finite loss at step" in retry[0], printed
    line = next(line for line in printed.splitlines() if "[sweep] FAILED" in line)
    assert "FloatingPointError: non-finite loss at step" in line
    client, children = _children(workdir, "failing-trials", "diverges")
    (child,) = children
    assert child.info.status == "FAILED" and "non-finite loss" in child.data.tags["apexdistill.error"]
    assert "error.txt" in [a.path for a in client.list_artifacts(child.info.run_id)]
