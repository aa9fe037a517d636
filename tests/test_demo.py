"""End to end: `apexdistill demo --quick` through the real console script (shipped teacher, local Ray
Train, real evaluation), and the CLI's error path."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(600)
# lines `apexdistill demo --quick` may print (33 today: 5 stages, the table, where things are)
CONSOLE_LINE_BUDGET = 40


def _cli() -> list[str]:
    exe = shutil.which("apexdistill")
    return [exe] if exe else [sys.executable, "-m", "apexdistill.cli"]


def test_demo_quick_end_to_end(tmp_path, capsys):
    proc = subprocess.run([*_cli(), "demo", "--quick", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=580,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[demo] 1/5" in out and "[demo] 5/5" in out and "[train] step" in out
    # a console a person can read: our own lines, on a screen or two, nothing at error level, no Ray chatter
    console = (proc.stdout + proc.stderr).splitlines()
    assert len(console) <= CONSOLE_LINE_BUDGET, "\n".join(console)
    noise = [line for line in console if re.search(r"\] ?E\b|\bE\d{4}|\bERROR\b|Traceback|Warning:|pid=\d+\)|INFO |it/s\]", line)]
    assert noise == [], "\n".join(noise)
    (log_line,) = [line for line in console if line.startswith("[log] ")]  # the log file's path, printed once
    assert (tmp_path / "logs" / "apexdistill.log").stat().st_size > 0 and str(tmp_path / "logs" / "apexdistill.log") in log_line
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    rows = {(r["model"], r["nfe"]): r for r in results["rows"]}
    assert set(rows) == {("teacher", 10), ("teacher", 1), ("student (apex)", 1), ("student (apex)", 2)}
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["fd"] > 0 and r["ms_per_image"] > 0
    # the shipped teacher is a real, trained model: even at 10 Euler steps it draws the prompted digit
    assert rows[("teacher", 10)]["accuracy"] >= 0.8
    assert results["classifier_test_accuracy"] >= 0.95
    assert results["train_steps"] == 20
    # even the smoke run's 20 steps of the recipe leave the one-step student ahead of the teacher at one step
    assert rows[("student (apex)", 1)]["fd"] < rows[("teacher", 1)]["fd"], rows
    png = tmp_path / "demo" / "samples.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same numbers are printed as a table
    assert f"{rows[('teacher', 1)]['fd']:.2f}" in out
    # and the demo ends with the comparison report: its run, the teacher-vs-student grid, the side-by-side timings
    assert f"report: {results['report']}" in out
    report = json.loads((tmp_path / "reports" / "demo" / "report.json").read_text())
    (run_row,) = [r for r in report["runs"] if r["name"] == "demo-apex"]
    assert run_row["fd"]["1"] == pytest.approx(rows[("student (apex)", 1)]["fd"])
    assert report["samples"] and report["samples"][0]["artifact"] == "demo/samples.png"
    speed = {(s["model"], s["nfe"]): s for s in report["speed"]}
    assert set(speed) == {("teacher", 10), ("teacher", 1), ("student", 1), ("student", 2)}
    assert speed[("teacher", 10)]["speedup"] == pytest.approx(1.0) and speed[("student", 1)]["speedup"] > 1.0

    # the trained run can be scored and sampled from the command line (its commands run here, in-process:
    # the console script itself was exercised above, and a second and third interpreter cost ~10 s of imports)
    from apexdistill.cli import main

    run = tmp_path / "runs" / "demo-apex"
    capsys.readouterr()
    assert main(["evaluate", str(run), "--nfe", "1", "--samples-per-class", "5", "--workdir", str(tmp_path)]) == 0
    scored = capsys.readouterr().out
    assert "demo-apex" in scored and "real data (floor)" in scored
    # the shipped teacher is scored by name, here on two noise draws (means and the FD's spread)
    assert main(["evaluate", "builtin:teacher", "--euler", "--nfe", "2", "--samples-per-class", "3", "--draws", "2",
                 "--workdir", str(tmp_path)]) == 0
    scored = capsys.readouterr().out
    assert "builtin:teacher" in scored and "+-" in scored and "means over 2 noise draws" in scored
    img = tmp_path / "seven.png"
    assert main(["sample", str(run), "--prompt", "a handwritten digit seven", "--num", "3", "-o", str(img)]) == 0
    from PIL import Image

    with Image.open(img) as im:
        assert im.width > im.height > 16  # one row of three upscaled samples


def test_cli_config_error_is_clear(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  stpes: 3\n")
    proc = subprocess.run([*_cli(), "train", "-c", str(cfg)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'train.stpes'" in proc.stderr and "did you mean 'train.steps'" in proc.stderr


def test_verbose_brings_the_libraries_output_back(tmp_path):
    """Quiet (the default): a Ray Data log record and a library's deprecation warning land in
    <workdir>/logs/apexdistill.log, not on the console, while our own warnings stay on it;
    APEXDISTILL_LOG=debug (what --verbose sets) leaves Ray's console handlers alone. In a fresh
    interpreter (the routing changes process-wide logging state)."""
    script = """
import logging, sys, warnings
from apexdistill.console import route_logs
import ray.data  # installs Ray Data's own console handler, as in a run
path = route_logs(sys.argv[1])
logging.getLogger("ray.data").warning("RAY-DATA-RECORD")
warnings.warn_explicit("LIB-DEPRECATION", DeprecationWarning, "/site-packages/ray/data/dataset.py", 1)
warnings.warn_explicit("OUR-WARNING", UserWarning, "/x/apexdistill/train/loop.py", 1)
print("LOG", path)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "always"}
    env.pop("APEXDISTILL_LOG", None)
    quiet = subprocess.run([sys.executable, "-c", script, str(tmp_path / "q")], capture_output=True, text=True, timeout=120, env=env)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    console = quiet.stdout + quiet.stderr
    log = (tmp_path / "q" / "apexdistill.log").read_text()
    assert "RAY-DATA-RECORD" in log and "LIB-DEPRECATION" in log and "OUR-WARNING" not in log
    assert "RAY-DATA-RECORD" not in console and "LIB-DEPRECATION" not in console and "OUR-WARNING" in console
    loud = subprocess.run([sys.executable, "-c", script, str(tmp_path / "v")], capture_output=True, text=True, timeout=120,
                          env={**env, "APEXDISTILL_LOG": "debug"})
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "RAY-DATA-RECORD" in loud.stdout + loud.stderr and "LOG None" in loud.stdout
    assert not (tmp_path / "v").exists()


def test_verbose_flag_is_accepted_before_or_after_the_command():
    from apexdistill.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--verbose", "demo"]).verbose and parser.parse_args(["demo", "--verbose"]).verbose
    assert parser.parse_args(["train", "-c", "x.yaml", "-v"]).verbose and not parser.parse_args(["demo"]).verbose
