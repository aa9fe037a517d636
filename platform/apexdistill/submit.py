"""`apexdistill submit` and `apexdistill job`: Ray Jobs from the command line, through ``JobSubmissionClient``.

    apexdistill submit --address http://HEAD:8265 [--follow] -- train -c jobs/configs/distill_cluster.yaml
    apexdistill submit --address http://HEAD:8265 -- python jobs/sweep.py -s sweeps/shift_grid.yaml
    apexdistill job status|logs|stop|list [ID] --address http://HEAD:8265

The working directory is uploaded as the job's runtime environment (work directories, virtualenvs,
caches and git data excluded), and ``platform/apexdistill`` rides along as a ``py_module`` so the
driver and every worker run the code you submitted, not an older install on the nodes.

Submission ids are stable: ``apexdistill-<run name>`` (from ``run.name=...``, the config file's
``run.name`` or the sweep's ``name``). Submitting the same command again while that job is pending or
running follows it instead of starting a second copy; once it has ended, the next submission gets
``-2``, ``-3``... (the run itself resumes from its checkpoint: same run name, same MLflow run).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from apexdistill.train.driver import WORKER_ENV

SUBCOMMANDS = {"train", "sweep", "preprocess", "evaluate", "sample", "export", "demo", "dashboard"}
EXCLUDES = [".git", ".venv", "venv", "apex-runs", "**/__pycache__", "*.egg-info", ".pytest_cache", "test-artifacts",
            "mlruns", "build", "dist", "*.parquet", "*.safetensors.tmp"]
ACTIVE = {"PENDING", "RUNNING"}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


class SubmitError(ValueError):
    """A job cannot be submitted (bad command, an id taken by a different running command)."""


def default_address() -> str:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or (
        os.environ["RAY_ADDRESS"] if os.environ.get("RAY_ADDRESS", "").startswith("http") else DEFAULT_ADDRESS)


def entrypoint(command: list[str]) -> str:
    """``train -c X`` -> ``apexdistill train -c X``; anything else (``python jobs/train.py ...``) as given."""
    if not command:
        raise SubmitError("nothing to submit: give the command after '--', e.g. -- train -c jobs/configs/teacher_digits.yaml")
    if command[0] in SUBCOMMANDS:
        command = ["apexdistill", *command]
    return shlex.join(command)


def _option(command: list[str], *names: str) -> str | None:
    for i, word in enumerate(command):
        for name in names:
            if word == name and i + 1 < len(command):
                return command[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def run_name(command: list[str], working_dir: Path) -> str:
    """The run (or sweep) name the command will use: ``run.name=...``, else the config's, else the sweep file's."""
    for word in reversed(command):
        if word.startswith("run.name="):
            return word.split("=", 1)[1]
    for flags, key in ((("-s", "--sweep"), "name"), (("-c", "--config"), "run")):
        path = _option(command, *flags)
        if not path:
            continue
        file = Path(path) if Path(path).is_absolute() else working_dir / path
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        value = data.get("name") if key == "name" else (data.get("run") or {}).get("name")
        if value:
            return str(value)
    words = [w for w in command if not w.startswith("-") and "=" not in w and "/" not in w][:2]
    return "-".join(words) or "job"


def base_submission_id(command: list[str], working_dir: Path) -> str:
    return "apexdistill-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", run_name(command, working_dir)).strip("-") or "job")


def runtime_env(working_dir: Path, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": list(EXCLUDES),
        "env_vars": {**WORKER_ENV, "PYTHONUNBUFFERED": "1", **(extra_env or {})},
    }
    package = working_dir / "platform" / "apexdistill"
    if package.is_dir():
        env["py_modules"] = [str(package)]
    return env


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, or Ray's own errors for a wrong address
        if "Authentication" in type(exc).__name__ or "authentication token" in str(exc):
            raise SubmitError(
                f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token and give its token "
                f"(RAY_AUTH_TOKEN, or the file ~/.ray/auth_token; on the head: 'ray get-auth-token')") from None
        raise SubmitError(f"cannot reach the Ray Jobs API at {address} ({exc}); is the cluster up "
                          f"('ray up ray_cluster.yaml', then 'ray dashboard ray_cluster.yaml' for a tunnel)?") from None


class _JobsApi:
    """Errors of Ray's Jobs API (a RuntimeError with the HTTP answer) as a SubmitError that says what failed."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if exc is not None and isinstance(exc, RuntimeError) and not isinstance(exc, SubmitError):
            raise SubmitError(f"{self.what}: {exc}") from None
        return False


def submit(address: str, command: list[str], working_dir: str | Path = ".", submission_id: str | None = None,
           follow: bool = False, extra_env: dict[str, str] | None = None) -> tuple[str, str | None]:
    """Submit (or re-attach to) the job; returns (submission id, final status if followed)."""
    wd = Path(working_dir).resolve()
    if not wd.is_dir():
        raise SubmitError(f"working directory {wd} does not exist")
    entry = entrypoint(command)
    client = _client(address)
    base = submission_id or base_submission_id(command, wd)
    jobs = {j.submission_id: j for j in client.list_jobs() if j.submission_id}
    family = [i for i in jobs if i == base or re.fullmatch(re.escape(base) + r"-\d+", i)]
    running = [i for i in family if str(jobs[i].status) in ACTIVE]
    if running:
        job_id = running[0]
        if jobs[job_id].entrypoint != entry:
            raise SubmitError(f"job {job_id} is still {jobs[job_id].status} with another command ({jobs[job_id].entrypoint}); "
                              f"stop it ('apexdistill job stop {job_id}') or pass --submission-id")
        print(f"[submit] {job_id} is already {jobs[job_id].status}: following it instead of submitting a second copy", flush=True)
    else:
        job_id = base
        n = 2
        while job_id in jobs:
            job_id, n = f"{base}-{n}", n + 1
        with _JobsApi(f"submitting {job_id} to {address}"):
            client.submit_job(entrypoint=entry, submission_id=job_id, runtime_env=runtime_env(wd, extra_env),
                              metadata={"apexdistill": "1", "working_dir": str(wd)})
        print(f"[submit] {job_id}: {entry}", flush=True)
    print(f"[submit] status: apexdistill job status {job_id} --address {address}\n"
          f"[submit] logs:   apexdistill job logs {job_id} --address {address} --follow\n"
          f"[submit] stop:   apexdistill job stop {job_id} --address {address}", flush=True)
    if not follow:
        return job_id, None
    return job_id, follow_logs(client, job_id)


def follow_logs(client: Any, job_id: str, out: Any = None) -> str:
    """Stream the job's logs until it ends; return its final status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\n[submit] stopped following; {job_id} keeps running (apexdistill job stop {job_id} stops it)", flush=True)
        return str(client.get_job_status(job_id))
    return wait(client, job_id)


def wait(client: Any, job_id: str, timeout: float = 60.0) -> str:
    """The terminal status (the log stream can close a moment before the status flips)."""
    deadline = time.time() + timeout
    status = str(client.get_job_status(job_id))
    while status in ACTIVE and time.time() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id))
    return status


def job_command(action: str, job_id: str | None, address: str, follow: bool = False) -> int:
    client = _client(address)
    with _JobsApi(f"job {action} {job_id or ''} at {address}".replace("  ", " ")):
        return _job_command(client, action, job_id, address, follow)


def _job_command(client: Any, action: str, job_id: str | None, address: str, follow: bool) -> int:
    if action == "list":
        for j in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            print(f"{j.submission_id or j.job_id:<40} {str(j.status):<10} {j.entrypoint}")
        return 0
    if not job_id:
        raise SubmitError(f"'apexdistill job {action}' needs a submission id (see 'apexdistill job list')")
    if action == "status":
        info = client.get_job_info(job_id)
        print(f"{job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
        return 0
    if action == "logs":
        if follow:
            return 0 if follow_logs(client, job_id) == "SUCCEEDED" else 1
        print(client.get_job_logs(job_id), end="")
        return 0
    if action == "stop":
        stopped = client.stop_job(job_id)
        print(f"{job_id}: {'stop requested' if stopped else 'not running'}; now {wait(client, job_id, 30)}")
        return 0
    raise SubmitError(f"unknown job action {action!r}")
