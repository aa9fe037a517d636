"""`apexdistill dashboard --serve`: the MLflow UI and the report, both on 127.0.0.1, until Ctrl-C.

The MLflow server runs as a child process in its own process group (it forks its web workers); on
Ctrl-C, SIGTERM or an error the whole group is stopped by PID, and the report's HTTP server with it.
"""

from __future__ import annotations

import functools
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServeError(ValueError):
    """The MLflow UI could not be started (reported as a clear error, not a traceback)."""


def start_mlflow_ui(uri: str, port: int, log_file: Path, timeout: float = 90.0, artifacts: Path | None = None) -> subprocess.Popen:
    """``mlflow server`` against the store at ``uri`` on 127.0.0.1:port; returns once /health answers.
    New experiments keep their artifacts in ``artifacts`` (default: next to a SQLite database, else
    beside the log file), never in the current directory. Whatever goes wrong on the way (including
    Ctrl-C during the wait), the server is stopped before the error propagates."""
    if artifacts is None:
        from apexdistill.tracking import sqlite_artifact_dir

        artifacts = sqlite_artifact_dir(uri) if uri.startswith("sqlite:///") else log_file.parent / "mlartifacts"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", HOST, "--port", str(port),
           "--workers", "1", "--artifacts-destination", str(artifacts)]
    # MLflow 3's server also starts its job runner (a process and seven huey consumers, for its GenAI jobs,
    # which a tracking UI does not use): measured on a SQLite store, 10 processes and 53% of a core while
    # idle, against 2 processes and 0.3% without it, and it answers in half the time. Set the variable to
    # true to have the jobs back.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=log_file.parent, env=env)
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes through a proxy
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                tail = log_file.read_text(errors="replace")[-2000:]
                raise ServeError(f"the MLflow UI exited with code {proc.returncode} at start-up ({log_file}):\n{tail}")
            try:
                with no_proxy.open(f"http://{HOST}:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return proc
            except OSError:
                time.sleep(0.5)
        raise ServeError(f"the MLflow UI did not answer on http://{HOST}:{port} within {timeout:.0f} s; see {log_file}")
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group we started, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def serve(uri: str, report_dir: Path, mlflow_port: int = 0, report_port: int = 0) -> int:
    """Start both servers, print their addresses, block until Ctrl-C (or SIGTERM), stop both; returns
    the exit code (1 if the MLflow UI died on its own). A store that is already a tracking server
    (http://...) has its own UI: only the report is served then."""
    from apexdistill.tracking import redact_uri

    signal.signal(signal.SIGTERM, _interrupt)  # before anything starts: SIGTERM unwinds like Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &` in a script)
    proc = None
    httpd = None
    code = 0
    try:
        if uri.startswith(("http://", "https://")):
            ui = uri.rstrip("/")
        else:
            mlflow_port = mlflow_port or free_port()
            proc = start_mlflow_ui(uri, mlflow_port, report_dir / "mlflow-ui.log")
            ui = f"http://{HOST}:{mlflow_port}"
        handler = functools.partial(_Quiet, directory=str(report_dir))
        httpd = http.server.ThreadingHTTPServer((HOST, report_port), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        print(f"[dashboard] MLflow UI: {ui}" + (f" (store {redact_uri(uri)}, pid {proc.pid})" if proc else " (the tracking server's own)"), flush=True)
        print(f"[dashboard] report:    http://{HOST}:{httpd.server_address[1]}/index.html", flush=True)
        print(f"[dashboard] Ctrl-C stops {'both' if proc else 'the report server'}", flush=True)
        while proc is None or proc.poll() is None:
            time.sleep(0.5)
        print(f"[dashboard] the MLflow UI exited with code {proc.returncode}; see {report_dir / 'mlflow-ui.log'}", flush=True)
        code = 1
    except KeyboardInterrupt:
        print("\n[dashboard] stopping", flush=True)
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if proc is not None:
            stop(proc)
    return code
