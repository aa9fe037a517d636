"""Worker faults told on the console in our own words: which rank failed and why, the retry count
against ``train.max_failures``, how long the new worker group took, and where a run that gives up
can be resumed from.

``FaultReporter`` is a Ray Train ``UserCallback``: it runs in the Train controller, which sees a dead
worker (SIGKILL, out of memory, a lost node) or a worker's exception on its next poll. It appends its
line to the run's progress file (``console.ProgressRelay`` prints it on the driver) and records the
failure in ``<run>/last_failure.json``; rank 0 of the next worker group reads that record when it
resumes and says how long the restart took (``restart_line``).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ray.train import UserCallback

from apexdistill.console import process_died

FAILURE_FILE = "last_failure.json"


def fault_reason(exc: BaseException) -> str:
    """One line that says why a worker stopped: a dead process (its pid and Ray's exit type), or the
    last line of the worker's exception (Ray wraps it: the innermost cause says why)."""
    text = str(exc)
    exit_type = re.search(r"Worker exit type: (\w+)", text)
    pid = re.search(r"\bpid[:=] ?(\d+)", text)
    if exit_type or "actor died" in text.lower() or "health check" in text.lower():
        return process_died(pid.group(1) if pid else None, f"exit type {exit_type.group(1)}" if exit_type else type(exc).__name__)
    cause = exc
    while getattr(cause, "__cause__", None) is not None:
        cause = cause.__cause__
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:300]


#: what a rank says when another rank's process died under it (gloo, NCCL): a consequence, not a cause
PEER_LOSS = ("connection closed by peer", "remote worker crash", "connection reset by peer", "nccl communicator was aborted",
             "watchdog caught collective operation timeout")


def describe_failure(worker_exceptions: dict[int, BaseException]) -> str:
    """Each failed rank and why; ranks that only lost their connection to a failed rank are named together."""
    causes, peers = [], []
    for rank in sorted(worker_exceptions):
        text = str(worker_exceptions[rank]).lower()
        (peers if any(s in text for s in PEER_LOSS) else causes).append(rank)
    if not causes:  # every rank reports a lost connection: the cause is outside the group (a node, the network)
        causes, peers = peers, []
    line = "; ".join(f"rank {r}: {fault_reason(worker_exceptions[r])}" for r in causes)
    if peers:
        line += f" (rank{'s' if len(peers) > 1 else ''} {', '.join(map(str, peers))} lost the connection to it)"
    return line


def _append(progress_file: str | None, line: str) -> None:
    if progress_file is None:  # verbose mode: the controller's output is forwarded by Ray
        print(line, flush=True)
        return
    with open(progress_file, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


class FaultReporter(UserCallback):
    """Reports each worker-group failure once, with its retry count (see the module docstring)."""

    def __init__(self, run_dir: str | Path, progress_file: str | None, max_failures: int) -> None:
        self.run_dir, self.progress_file, self.max_failures = str(run_dir), progress_file, max_failures
        self.failures = 0

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        ranks = sorted(worker_exceptions)
        reasons = describe_failure(worker_exceptions)
        n, limit = self.failures, self.max_failures
        if limit == -1 or n <= limit:
            what = f"restarting the worker group from the last checkpoint (retry {n} of train.max_failures={limit if limit != -1 else 'unlimited'})"
        else:
            what = f"giving up: train.max_failures={limit} retries {'used' if limit else 'allowed'}"
        _append(self.progress_file, f"[train] worker failure: {reasons}; {what}")
        record = {"time": time.time(), "failure": n, "ranks": ranks, "reason": reasons}
        tmp = Path(self.run_dir) / (FAILURE_FILE + ".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(Path(self.run_dir) / FAILURE_FILE)


def restart_line(run_dir: Path, step: int, where: str) -> str | None:
    """Rank 0 of a worker group that resumes after a failure this fit recorded: the restart line (and the
    record is consumed). None when the group starts for another reason (a new fit, a resumed run)."""
    path = Path(run_dir) / FAILURE_FILE
    try:
        record = json.loads(path.read_text())
        path.unlink()
    except (OSError, ValueError):
        return None
    took = time.time() - float(record["time"])
    return (f"[train] restarted after failure {record['failure']}: the new worker group took {took:.0f} s to start; "
            f"resuming at step {step} from {where}")


def clear_failure_record(run_dir: Path) -> None:
    """Before a fit: a record left by an earlier fit that died is not this fit's failure."""
    (Path(run_dir) / FAILURE_FILE).unlink(missing_ok=True)


_STOP = {"requested": False}


def stop_requested() -> bool:
    """True once a Ctrl-C reached an in-process run (``deferred_interrupt``): the loop stops at its next step boundary."""
    return _STOP["requested"]


@contextlib.contextmanager
def deferred_interrupt(enabled: bool = True) -> Iterator[None]:
    """An in-process run (``train.num_workers: 0``) trains in this thread, so a Ctrl-C would land anywhere in it: in
    the middle of an MLflow write (a SQLite transaction left open, "database is locked" for the rest of the process) or
    of a checkpoint. The first Ctrl-C asks the loop to stop at the end of its step (``stop_requested``), where it raises
    KeyboardInterrupt itself; a second one stops at once. Interrupted system calls restart rather than fail (EINTR)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _handler(signum: int, frame: Any) -> None:
        if _STOP["requested"]:
            raise KeyboardInterrupt
        _STOP["requested"] = True
        print("[train] Ctrl-C: stopping at the end of this step (press Ctrl-C again to stop now)", flush=True)

    previous = signal.signal(signal.SIGINT, _handler)
    signal.siginterrupt(signal.SIGINT, False)
    _STOP["requested"] = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _STOP["requested"] = False
