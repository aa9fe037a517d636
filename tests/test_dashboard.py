"""The comparison report, built from a real SQLite MLflow store holding a real 2 x 2 grid sweep (the
session's ``grid_sweep``): its data checked against the store, the page opened in a real headless
Chromium, and the MLflow UI started by ``--serve`` queried through its REST API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from apexdistill.cli import main
from apexdistill.report import build_report
from apexdistill.report.collect import ReportError, collect

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("APEXDISTILL_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _uri(cfg) -> str:
    return f"sqlite:///{Path(cfg.run.workdir).resolve() / 'mlflow.db'}"


@pytest.fixture(scope="module")
def report(grid_sweep, tmp_path_factory):
    """`apexdistill dashboard --sweep PARENT -o DIR`, run as users run it."""
    cfg, _, parent = grid_sweep
    out = tmp_path_factory.mktemp("report")
    assert main(["dashboard", "--workdir", str(cfg.run.workdir), "--sweep", parent, "-o", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_data_matches_the_store(grid_sweep, report):
    cfg, rows, parent = grid_sweep
    _, data = report
    client = MlflowClient(_uri(cfg))
    exp = client.get_experiment_by_name("sweeps-grid")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_id = {c.info.run_id: c for c in children}

    runs = [r for r in data["runs"] if r["kind"] != "sweep"]
    assert len(runs) == 4 and {r["run_id"] for r in runs} == set(by_id)  # the sweep's trials, nothing else
    for r in runs:
        assert r["fd"]["1"] == pytest.approx(by_id[r["run_id"]].data.metrics["eval/fd_1nfe"])
    assert {"train.lr", "train.warmup_steps"} <= set(data["param_columns"])

    (sweep,) = data["sweeps"]
    assert sweep["run_id"] == parent and sweep["metric"] == "eval/fd_1nfe" and len(sweep["trials"]) == 4
    assert sweep["best_run_id"] == rows[0].run_id
    heat = sweep["heatmap"]
    assert (heat["y_key"], heat["x_key"]) == ("train.lr", "train.warmup_steps")
    assert heat["y_values"] == [1e-4, 3e-3] and heat["x_values"] == [0, 2]
    for y, row in zip(heat["y_values"], heat["cells"]):
        for x, cell in zip(heat["x_values"], row):
            (match,) = [c for c in children if float(c.data.params["train.lr"]) == y and int(c.data.params["train.warmup_steps"]) == x]
            assert cell["n"] == 1 and cell["run_ids"] == [match.info.run_id]
            assert cell["value"] == pytest.approx(match.data.metrics["eval/fd_1nfe"])
    assert heat["best"] == pytest.approx(min(r.metric for r in rows))
    # the ablation table in grid order (first key slowest), with the joint key read as "grad_clip : weight_decay"
    table = sweep["table"]
    assert table["header"] == ["lr", "warmup_steps", "grad_clip : weight_decay"]
    assert [r["label"][:2] for r in table["rows"]] == [["0.0001", "0"], ["0.0001", "2"], ["0.003", "0"], ["0.003", "2"]]
    assert all(r["label"][2] == "0.5 : 0" for r in table["rows"])

    losses = {s["run_id"]: s["points"] for s in data["curves"]["loss"]}
    assert set(losses) == set(by_id)
    for run_id, points in losses.items():  # the curve is the logged history, step for step
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        assert [tuple(p) for p in points] == [(s, pytest.approx(v)) for s, v in history]
    # the end-of-run sample grids (from a random init there is no teacher row) and their timings
    assert {s["run_id"] for s in data["samples"]} == set(by_id)
    assert all(s["src"].startswith("data:image/png;base64,") for s in data["samples"])
    assert {(s["run_id"], s["model"], s["nfe"]) for s in data["speed"]} == {(i, "student", 1) for i in by_id}


def test_report_page_is_self_contained(report):
    out, data = report
    page = (out / "index.html").read_text()
    assert re.search(r"""(src|href)=["']https?://""", page) is None  # nothing to fetch when viewed
    assert page.count('<td class="heat') == 4 and page.count("<polyline") >= 4
    assert len(re.findall(r'<tr[^>]* data-run-id="', page)) == 8  # runs table + ablation table


def test_report_in_headless_chromium(report):
    """No console errors; the runs table, the heat map, the charts and the sample grids are visible and
    the table sorts on a click. Screenshot: test-artifacts/report.png."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    out, data = report
    profile = out.parent / "chromium-profile"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1400,2400",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get((out / "index.html").as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        table = driver.find_element(By.ID, "runs-table")
        assert table.is_displayed()
        assert len(table.find_elements(By.CSS_SELECTOR, "tbody tr")) == 4
        heat = driver.find_elements(By.CSS_SELECTOR, "table.heatmap td.heat")
        assert len(heat) == 4 and all(c.is_displayed() for c in heat)
        charts = driver.find_elements(By.CSS_SELECTOR, "svg.chart")
        assert charts and all(c.is_displayed() and c.size["height"] > 100 for c in charts)
        images = driver.find_elements(By.CSS_SELECTOR, "figure.samples img")
        assert len(images) == 4
        assert all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i) for i in images)
        assert driver.execute_script("return window.apexReport.title") == data["title"]

        # sorting: click the "FD 1 NFE" header twice, the rows come out ascending then descending
        headers = table.find_elements(By.CSS_SELECTOR, "thead th")
        names = [h.text for h in headers]
        col = names.index("FD 1 NFE")
        # results lead: the scores come right after the run name, before any config column, and are on screen
        assert col == 1 and names.index("steps") < names.index("status") < len(names) - len(data["param_columns"])
        assert headers[col].rect["x"] + headers[col].rect["width"] <= driver.execute_script("return window.innerWidth")

        def column() -> list[float]:
            return [float(r.find_elements(By.TAG_NAME, "td")[col].get_attribute("data-sort"))
                    for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

        headers[col].click()
        assert column() == sorted(column())
        headers[col].click()
        assert column() == sorted(column(), reverse=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "report.png"))
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()


def _free_port() -> int:
    from apexdistill.report.serve import free_port

    return free_port()


def test_serve_starts_the_mlflow_ui_on_loopback_and_stops_it(grid_sweep, tmp_path):
    cfg, _, parent = grid_sweep
    port = _free_port()
    cmd = [sys.executable, "-m", "apexdistill.cli", "dashboard", "--workdir", str(cfg.run.workdir), "--sweep", parent,
           "-o", str(tmp_path / "served"), "--serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any("Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        assert f"MLflow UI: http://127.0.0.1:{port}" in text, text
        report_url = re.search(r"report:\s+(http://127\.0\.0\.1:\d+/index\.html)", text).group(1)

        body = json.dumps({"experiment_ids": [MlflowClient(_uri(cfg)).get_experiment_by_name("sweeps-grid").experiment_id],
                           "filter": f"tags.mlflow.parentRunId = '{parent}'", "max_results": 100}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            runs = json.loads(resp.read())["runs"]
        assert len(runs) == 4 and all(r["info"]["status"] == "FINISHED" for r in runs)
        # MLflow 3's job runner (a process and seven huey consumers, half a core while idle) is not started
        started = [" ".join(p.cmdline()) for p in psutil.Process(proc.pid).children(recursive=True)]
        assert any("-m mlflow server" in c for c in started), started
        assert not any("huey" in c or "_job_runner" in c for c in started), started
        with urllib.request.urlopen(report_url, timeout=10) as resp:
            assert resp.status == 200 and b'class="heatmap"' in resp.read()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopping" in rest
    with pytest.raises(urllib.error.URLError):  # what it started is gone
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


def test_bad_selection_is_a_clear_error(grid_sweep, tmp_path, capsys):
    cfg, rows, _ = grid_sweep
    uri = _uri(cfg)
    with pytest.raises(ReportError, match="--experiment nope: no such experiment.*sweeps-grid"):
        collect(uri, experiments=["nope"])
    with pytest.raises(ReportError, match="is not a sweep's parent run"):
        collect(uri, sweep=rows[0].run_id)  # a trial, not the parent
    assert main(["dashboard", "--workdir", str(tmp_path / "empty")]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    # a failed build leaves an existing report alone
    out = tmp_path / "kept"
    build_report(uri, out, experiments=["sweeps-grid"])
    before = (out / "index.html").read_text()
    with pytest.raises(ReportError):
        build_report(uri, out, experiments=["nope"])
    assert (out / "index.html").read_text() == before


def test_report_edge_cases_from_a_hand_made_store(tmp_path):
    """No Ray needed: runs logged straight into a real SQLite store. A resumed run that replayed steps,
    a run whose last loss is NaN, a run with no metrics and an HTML-like name, and a random-search
    sweep whose trials sit in another experiment than its parent."""
    import math

    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    main_exp = client.create_experiment("main", artifact_location=(tmp_path / "art").as_uri())
    other_exp = client.create_experiment("trials", artifact_location=(tmp_path / "art").as_uri())

    def run(exp, name, tags=None, params=None, history=(), status="FINISHED"):
        r = client.create_run(exp, run_name=name, tags=tags or {})
        for k, v in (params or {}).items():
            client.log_param(r.info.run_id, k, v)
        for t, (key, step, value) in enumerate(history):
            client.log_batch(r.info.run_id, metrics=[Metric(key, value, 1000 + t, step)])
        client.set_terminated(r.info.run_id, status)
        return r.info.run_id

    resumed = run(main_exp, "resumed", params={"objective.name": "fm"}, history=[
        ("loss", 1, 1.0), ("loss", 2, 0.9), ("loss", 3, 0.8), ("loss", 2, 0.7), ("loss", 3, 0.6),  # restart at step 2
        ("eval/fd_1nfe", 3, 40.0)])
    diverged = run(main_exp, "diverged", params={"objective.name": "fm"},
                   history=[("loss", 1, 1.0), ("loss", 2, 2.0), ("loss", 3, math.nan)])
    run(main_exp, '<img src=x onerror="alert(1)">', params={"objective.name": "fm"}, status="FAILED")
    parent = run(main_exp, "rand", tags={"apexdistill.kind": "sweep", "apexdistill.sweep": "rand",
                                         "apexdistill.metric": "eval/fd_1nfe", "apexdistill.mode": "min"},
                 params={"space.train.lr": json.dumps({"loguniform": [1e-5, 1e-3]})})
    trials = [run(other_exp, f"rand-{i}", tags={"mlflow.parentRunId": parent, "apexdistill.sweep": "rand"},
                  params={"train.lr": str(lr), "objective.name": "fm"}, history=[("eval/fd_1nfe", 4, fd)])
              for i, (lr, fd) in enumerate([(3e-4, 30.0), (2e-5, 50.0)])]

    page, data = build_report(uri, tmp_path / "out", experiments=["main"])
    curves = {s["name"]: s["points"] for s in data["curves"]["loss"]}
    assert curves["resumed"] == [[1, 1.0], [2, 0.7], [3, 0.6]]  # the last value logged for each step
    assert curves["diverged"] == [[1, 1.0], [2, 2.0]]  # a NaN at the end does not hide the run
    # the trials logged in another experiment still belong to their sweep
    assert {r["run_id"] for r in data["runs"]} >= {resumed, diverged, parent, *trials}
    (sweep,) = data["sweeps"]
    assert sweep["heatmap"] is None and sweep["table"]["header"] == ["lr"]
    assert [r["run_id"] for r in sweep["table"]["rows"]] == trials and sweep["trials"][0]["metric"] == 30.0
    html = page.read_text()
    assert '<img src=x onerror' not in html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "status-failed" in html
    # --sweep finds the trials in the other experiment too
    assert len(collect(uri, sweep=parent)["sweeps"][0]["trials"]) == 2
