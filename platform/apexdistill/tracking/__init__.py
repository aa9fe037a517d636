"""MLflow tracking: one experiment per study, one MLflow run per job, logged from rank 0 only.

The driver owns the run: ``open_run`` checks the store is reachable (before any worker starts),
creates the experiment and the run (or reopens the run recorded in the run folder, so a resumed or
restarted job keeps logging into the same MLflow run), and logs the flattened params, the resolved
config and the tags. Workers get ``(uri, run_id)`` and log through ``RunLogger`` on rank 0: metrics
every ``train.log_every`` steps and sample grids as an image series. The driver closes the run with
the evaluation results and the exported weights.

Default store: ``sqlite:///<run.workdir>/mlflow.db`` with artifacts in ``<run.workdir>/mlartifacts``;
``--tracking-uri`` / ``tracking.uri`` / ``MLFLOW_TRACKING_URI`` point at a server instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexdistill.config import Config, dump_yaml, flatten

RUN_FILE = "mlflow_run.json"  # in the run folder: which MLflow run this job logs into


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable path)."""


def _quiet_store_logs() -> None:
    """MLflow's SQL store logs its schema migrations at INFO on every new database."""
    import logging

    for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def resolve_uri(cfg: Config) -> str:
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(cfg.run.workdir).resolve() / 'mlflow.db')}"


def redact_uri(uri: str) -> str:
    """The URI with its password masked, for anything printed or written (reports, logs)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def sqlite_artifact_dir(uri: str) -> Path:
    """Where a SQLite store's artifacts live: ``mlartifacts`` next to the database file."""
    return (Path(uri.split("sqlite:///", 1)[-1]).parent / "mlartifacts").resolve()


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with the address in the message, before compute is spent."""
    if _is_local_store(uri):
        path = Path(uri.split("sqlite:///", 1)[-1])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"MLflow store {uri}: cannot create {path.parent} ({exc})") from None
        return
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {resp.status}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it, or pass another --tracking-uri "
                f"(tracking.uri / MLFLOW_TRACKING_URI), or tracking.enabled=false"
            ) from None
        return
    # a database URI (postgresql://, mysql://): one cheap query
    try:
        from mlflow import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any driver error means "cannot log there"
        raise TrackingError(f"MLflow tracking store {redact_uri(uri)} cannot be used: {str(exc).replace(uri, redact_uri(uri))}") from None


def git_commit(start: Path | None = None) -> str:
    here = start or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def get_or_create_experiment(client: Any, cfg: Config, uri: str) -> str:
    name = cfg.tracking.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment '{name}' is deleted in {uri}: restore it, or set tracking.experiment")
        return exp.experiment_id
    location = None
    if _is_local_store(uri):  # keep artifacts next to the database, not in the current directory
        location = sqlite_artifact_dir(uri).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - created concurrently by another job (a sweep's trials)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@dataclass
class RunHandle:
    uri: str
    run_id: str
    experiment_id: str
    resumed: bool

    def as_dict(self) -> dict[str, str]:
        return {"uri": self.uri, "run_id": self.run_id}


def _recorded_run(run_dir: Path, uri: str, client: Any) -> str | None:
    record = run_dir / RUN_FILE
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    if data.get("uri") != uri:
        return None
    try:
        run = client.get_run(data["run_id"])
    except Exception:  # noqa: BLE001 - deleted or from another store
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


def open_run(cfg: Config, run_dir: Path, tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> RunHandle:
    """Create (or reopen) this job's MLflow run and log what is known before training."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    uri = resolve_uri(cfg)
    check_reachable(uri)
    _quiet_store_logs()
    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, cfg, uri)
    run_id = _recorded_run(run_dir, uri, client)
    resumed = run_id is not None
    all_tags = {"apexdistill.objective": cfg.objective.name, "apexdistill.strategy": cfg.train.strategy,
                "apexdistill.lora": str(cfg.model.lora.enabled).lower(), "apexdistill.run_dir": str(run_dir),
                "mlflow.source.git.commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if resumed:
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
    else:
        run = client.create_run(experiment_id, run_name=cfg.run.name, tags=all_tags)
        run_id = run.info.run_id
        params = [Param(k, "null" if v is None else str(v)[:6000]) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_FILE).write_text(json.dumps({"uri": uri, "run_id": run_id, "experiment_id": experiment_id}))
    client.log_text(run_id, dump_yaml(cfg), "config.yaml")
    return RunHandle(uri, run_id, experiment_id, resumed)


def close_run(handle: RunHandle, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    MlflowClient(handle.uri).set_terminated(handle.run_id, status=status)


class RunLogger:
    """Rank-0 logging into an existing run (workers, evaluation)."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def last_step(self) -> int:
        """The highest training step this run has logged (its ``step`` metric), 0 for none."""
        value = self.client.get_run(self.run_id).data.metrics.get("step")
        return int(value) if value is not None else 0

    def log_image(self, image: Any, key: str, step: int) -> None:
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_dict(self, data: dict[str, Any], path: str) -> None:
        self.client.log_dict(self.run_id, data, path)

    def log_artifacts(self, folder: str | Path, path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    @classmethod
    def from_handle(cls, handle: RunHandle | dict[str, str] | None) -> "RunLogger | None":
        if handle is None:
            return None
        data = handle.as_dict() if isinstance(handle, RunHandle) else handle
        return cls(data["uri"], data["run_id"])


def record_benchmark(workdir: str | Path, name: str, record: dict[str, Any], params: dict[str, Any],
                     metrics: dict[str, float]) -> Path:
    """A benchmark's results: ``<workdir>/benchmarks/<name>.json`` and one run in the MLflow experiment
    ``benchmarks`` of the work directory's SQLite store (params, metrics and the JSON as an artifact).
    The JSON is written first, so a machine without MLflow (a bare GPU box) still keeps the numbers."""
    workdir = Path(workdir).resolve()
    out = workdir / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    import mlflow

    _quiet_store_logs()
    # a client on the store, not mlflow.set_tracking_uri: that would also export MLFLOW_TRACKING_URI to
    # every process started afterwards (Ray workers, jobs) and send their runs here
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("benchmarks")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("benchmarks")
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    client.log_dict(run_id, record, f"{name}.json")
    client.set_terminated(run_id, "FINISHED")
    print(f"[bench] wrote {path}; MLflow experiment 'benchmarks' in {workdir / 'mlflow.db'}")
    return path
