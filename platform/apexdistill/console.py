"""The console a person reads: our own progress lines (``[demo]``, ``[preprocess]``, ``[train]``,
``[sweep]``, ``[evaluate]``), and nothing else on success. Ray's, Ray Data's, MLflow's and the model
libraries' logs, worker output and deprecation warnings go to a log file (its path printed once).

``--verbose`` or ``APEXDISTILL_LOG=debug`` brings everything back to the console, as Ray prints it.
Warnings raised by apexdistill itself (they ask the user to act) stay on the console either way.

Ray Train workers run in other processes, whose output Ray would forward to the console with
``(RayTrainWorker pid=...)`` prefixes. In quiet mode Ray forwards nothing (``log_to_driver=False``);
rank 0 appends its progress lines to ``<run>/progress.log`` and the driver prints them as they come
(``ProgressRelay``). The workers' own output stays in Ray's session logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

LOG_ENV = "APEXDISTILL_LOG"
LOG_FILE = "apexdistill.log"
PROGRESS_FILE = "progress.log"
#: loggers whose records go to the log file in quiet mode
NOISY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow", "alembic", "urllib3", "filelock",
                 "transformers", "diffusers", "huggingface_hub", "httpx", "py.warnings", "torch.distributed", "DeepSpeed",
                 "deepspeed", "optuna", "numexpr")
_state: dict[str, Any] = {"file": None, "handler": None, "showwarning": None, "command": None}


def set_command(argv: list[str]) -> None:
    """The command line this process runs (the CLI records it): what a stopped run says to type to resume."""
    _state["command"] = list(argv)


def resume_command(config_file: str | Path) -> str:
    """The exact command that resumes a stopped run: the one that started it, when this process is the CLI;
    else ``apexdistill train -c`` its run folder's resolved config (same ``run.name``, so it resumes)."""
    import shlex

    if _state["command"] and _state["command"][0] == "train":
        return shlex.join(["apexdistill", *_state["command"]])
    return shlex.join(["apexdistill", "train", "-c", str(config_file)])


def verbose() -> bool:
    return os.environ.get(LOG_ENV, "").strip().lower() in ("debug", "verbose", "all", "1")


def set_verbose(on: bool) -> None:
    if on:
        os.environ[LOG_ENV] = "debug"


def quiet_environment() -> None:
    """Before any library is imported: no Hugging Face download/loading bars, no per-process noise."""
    if verbose():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the libraries' own bars (weights loading); ours are lines
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # MLflow installs its own console handler when first imported (which may be after route_logs): its
    # INFO lines ("Creating initial MLflow database tables...") stay off the console; warnings still show
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Ray Tune's new output engine prints an experiment box and a TensorBoard hint even at verbose=0;
    # the legacy reporter at verbose=0 prints nothing (the sweep prints its own progress lines)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
        and getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def _showwarning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
    """Our own warnings to the console (they ask the user to act); everyone else's, and deprecation
    notices about the libraries' APIs even when raised at our call sites, to the log file."""
    ours = "apexdistill" in Path(filename).parts and not category.__module__.split(".")[0] in ("ray", "torch", "transformers", "diffusers")
    if ours and not issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
        _state["showwarning"](message, category, filename, lineno, file, line)
        return
    logging.getLogger("py.warnings").warning("%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip())


def route_logs(folder: str | Path, announce: bool = True) -> Path | None:
    """Send the libraries' logs and warnings to ``folder/apexdistill.log`` (quiet mode), and print its
    path once. Call again after ``ray.init`` (Ray installs its own console handler) and after the
    first ``import ray.data``; it is idempotent. Returns the log file (None in verbose mode)."""
    if verbose():
        return None
    path = Path(folder).expanduser().resolve() / LOG_FILE
    if _state["file"] != path:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        old = _state["handler"]
        _state.update(file=path, handler=handler)
        if announce:
            print(f"[log] Ray, Ray Data and library logs: {path}", flush=True)
        if old is not None:
            for name in NOISY_LOGGERS:
                logging.getLogger(name).removeHandler(old)
            old.close()
    handler = _state["handler"]
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if _is_console(h):
                logger.removeHandler(h)
        if handler not in logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False
    _route_raylet_lines()
    if _state["showwarning"] is None:
        _state["showwarning"] = warnings.showwarning
        warnings.showwarning = _showwarning
    for lib in ("transformers", "diffusers"):
        try:
            module = __import__(f"{lib}.utils.logging", fromlist=["disable_progress_bar"])
            module.disable_progress_bar()
            module.set_verbosity_error()
        except Exception:  # noqa: BLE001 - not installed or another version: nothing to quiet
            pass
    return path


#: Ray's report of a dead worker process: its pid and exit type
WORKER_DIED = re.compile(r"Worker PID: (\d+) Worker exit type: (\w+)")


def process_died(pid: int | str | None, exit_type: str) -> str:
    """How our lines say that a Ray process died (a worker, an actor): its pid and Ray's exit type."""
    return f"its process{f' (pid {pid})' if pid else ''} died ({exit_type}: killed, out of memory, or its node was lost)"
_death_listeners: list[Any] = []


@contextlib.contextmanager
def on_worker_death(listener: Any) -> Iterator[None]:
    """While the block runs, ``listener(pid, exit_type)`` is called when Ray reports that one of this job's worker
    processes died (a killed or out-of-memory Ray Data actor, say): the stage says it in its own words."""
    _death_listeners.append(listener)
    try:
        yield
    finally:
        _death_listeners.remove(listener)


def _route_raylet_lines() -> None:
    """Ray's driver prints the cluster's error messages (a worker died, an actor's restart) from a thread of its
    own, in its log format and whatever ``log_to_driver`` says: in quiet mode they go to the log file, and our
    own lines tell the event (``train/faults.py``)."""
    worker = sys.modules.get("ray._private.worker")
    if worker is None or getattr(worker.print_to_stdstream, "_apexdistill", False):
        return
    printer = worker.print_to_stdstream

    def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet" and not verbose():
            for line in data.get("lines") or []:
                logging.getLogger("ray").warning("raylet: %s", line)
                death = WORKER_DIED.search(line) if "A worker died or was killed" in line else None
                for listener in list(_death_listeners) if death else []:
                    listener(int(death.group(1)), death.group(2))
            return
        printer(data, ignore_prefix)

    print_to_stdstream._apexdistill = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_to_stdstream


def log_file() -> Path | None:
    return _state["file"]


class Periodic:
    """Calls ``fn()`` every ``interval`` seconds on a daemon thread while the ``with`` block runs
    (and once more on exit with ``final=True``): the progress printers' one background loop."""

    def __init__(self, fn: Any, interval: float, final: bool = False) -> None:
        self.fn, self.interval, self.final = fn, interval, final
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="apexdistill-progress", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.fn()

    def __enter__(self) -> "Periodic":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.final:
            self.fn()


class ProgressRelay(Periodic):
    """Prints the lines that Ray Train's rank 0 appends to ``<run>/progress.log`` while ``fit()`` runs
    (quiet mode: Ray forwards no worker output). A context manager; the last lines are flushed on exit."""

    def __init__(self, run_dir: str | Path, interval: float = 0.25) -> None:
        self.path = Path(run_dir) / PROGRESS_FILE
        self._offset = self.path.stat().st_size if self.path.is_file() else 0
        super().__init__(self._drain, interval, final=True)

    def _drain(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("r", encoding="utf-8", errors="replace") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1] if "\n" in chunk else ""
        self._offset += len(complete.encode("utf-8"))
        if complete:
            sys.stdout.write(complete)
            sys.stdout.flush()
