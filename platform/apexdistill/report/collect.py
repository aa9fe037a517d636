"""Read the MLflow store into the report's data: plain JSON-able dicts, no HTML.

What is read (everything the platform logs, nothing else):
- runs: params (the flattened config), final metrics (``eval/*``, ``teacher/*``, ``speed/*``, the last
  ``samples_per_s`` and ``step``), tags (``apexdistill.*``, ``mlflow.parentRunId``), status, times;
- sweeps: parent runs tagged ``apexdistill.kind=sweep``, their ``space.*`` params (the search space,
  joint keys spelled with '/') and their children (``tags.mlflow.parentRunId``);
- curves: the metric history of the loss terms, ``grad_norm`` and the in-training ``eval/fd_1nfe``;
- sample grids: the ``eval/samples.png`` (or the demo's ``demo/samples.png``) artifact of each run.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

# config keys shown in the runs table when runs differ in them (plus each sweep's own space keys)
KEY_PARAMS = [
    "objective.name", "objective.shift.a", "objective.shift.b", "objective.apex.lambda_g", "objective.apex.lambda_p",
    "objective.apex.lambda_r", "objective.apex_literal.lambda_p", "objective.apex_literal.lambda_e",
    "model.lora.enabled", "train.strategy", "train.num_workers", "train.batch_size", "train.lr", "train.steps",
]
CURVE_KEYS = ["loss", "grad_norm", "eval/fd_1nfe"]  # plus every loss_* term a run logged
MAX_CURVE_RUNS = 12
MAX_SAMPLE_RUNS = 12
MAX_POINTS = 400
SAMPLE_ARTIFACTS = ["eval/samples.png", "demo/samples.png", "eval/quality/samples.png"]
_NFE = re.compile(r"^(?:eval|teacher)/(fd|accuracy|ms_per_image)_(\d+)nfe$")
_SPEED = re.compile(r"^speed/ms_per_image_(teacher|student)_(\d+)nfe$")
# the real-model evaluation (eval/quality.py): FD to the teacher, CLIP score, diversity (x teacher), FD to real images
_QUALITY = re.compile(r"^eval/(fd_teacher|clip_score|diversity|fd_real)_(\d+)nfe$")
QUALITY_SUMMARY = "eval/quality/quality.json"


class ReportError(ValueError):
    """The store, experiment or sweep asked for does not exist or holds nothing to report."""


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _value(text: str | None) -> Any:
    """An MLflow param string back to a number where it is one (params are stored as text)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _same(a: Any, b: Any) -> bool:
    fa, fb = _finite(a), _finite(b)
    if fa is not None and fb is not None:
        return math.isclose(fa, fb, rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def select_runs(client: Any, experiments: list[str] | None, sweep: str | None) -> tuple[list[Any], list[Any]]:
    """(experiments, runs): the sweep's parent and children, or every run of the named experiments
    (default: every experiment that has runs, except MLflow's empty 'Default')."""
    if sweep:
        try:
            parent = client.get_run(sweep)
        except Exception:  # noqa: BLE001 - MLflow raises its own RestException/MlflowException
            raise ReportError(f"--sweep {sweep}: no such run in the tracking store") from None
        if parent.data.tags.get("apexdistill.kind") != "sweep":
            raise ReportError(f"--sweep {sweep}: run '{parent.info.run_name}' is not a sweep's parent run "
                              f"(no tag apexdistill.kind=sweep); pass the parent run id printed by 'apexdistill sweep'")
        children = _children(client, sweep)
        ids = {parent.info.experiment_id, *(c.info.experiment_id for c in children)}
        return [client.get_experiment(i) for i in sorted(ids)], [parent, *children]
    if experiments:
        exps = []
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
                raise ReportError(f"--experiment {name}: no such experiment in the tracking store (it has: {known})")
            exps.append(exp)
    else:
        exps = [e for e in client.search_experiments() if e.name != "Default" or _search(client, [e.experiment_id], "", 1)]
    runs = with_sweep_relatives(client, _search(client, [e.experiment_id for e in exps], "")) if exps else []
    if not runs:
        raise ReportError("the tracking store has no runs to report" + (f" in {', '.join(e.name for e in exps)}" if exps else ""))
    return exps, runs


def _children(client: Any, parent_id: str) -> list[Any]:
    """A sweep's trials, in whichever experiment they were logged (sweeps made before the parent moved
    to its trials' experiment have them elsewhere)."""
    ids = [e.experiment_id for e in client.search_experiments()]
    return _search(client, ids, f"tags.mlflow.parentRunId = '{parent_id}'")


def with_sweep_relatives(client: Any, runs: list[Any]) -> list[Any]:
    """Add the trials of every sweep parent and the sweep parent of every trial that the selection missed."""
    have = {r.info.run_id for r in runs}
    out = list(runs)
    for run in runs:
        if run.data.tags.get("apexdistill.kind") == "sweep":
            out += [c for c in _children(client, run.info.run_id) if c.info.run_id not in have]
            have.update(r.info.run_id for r in out)
    for run in list(out):
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if parent_id and parent_id not in have:
            try:
                parent = client.get_run(parent_id)
            except Exception:  # noqa: BLE001 - a deleted parent
                continue
            if parent.data.tags.get("apexdistill.kind") == "sweep":
                out.append(parent)
                have.add(parent_id)
    return out


def _search(client: Any, experiment_ids: list[str], query: str, limit: int | None = None) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, query, max_results=limit or 1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token or limit:
            return runs


def run_row(run: Any, experiment_names: dict[str, str]) -> dict[str, Any]:
    info, data = run.info, run.data
    nfe: dict[str, dict[int, float]] = {"fd": {}, "accuracy": {}, "ms_per_image": {}}
    teacher: dict[str, dict[int, float]] = {"fd": {}, "accuracy": {}, "ms_per_image": {}}
    for key, value in data.metrics.items():
        m = _NFE.match(key)
        if m and _finite(value) is not None:
            (teacher if key.startswith("teacher/") else nfe)[m.group(1)][int(m.group(2))] = float(value)
    speed: list[dict[str, Any]] = []
    for key, value in data.metrics.items():
        m = _SPEED.match(key)
        if m and _finite(value) is not None:
            speed.append({"model": m.group(1), "nfe": int(m.group(2)), "ms_per_image": float(value)})
    quality: dict[str, dict[int, float]] = {"fd_teacher": {}, "clip_score": {}, "diversity": {}, "fd_real": {}}
    for key, value in data.metrics.items():
        m = _QUALITY.match(key)
        if m and _finite(value) is not None:
            quality[m.group(1)][int(m.group(2))] = float(value)
    end = info.end_time or (int(time.time() * 1000) if info.status == "RUNNING" else None)
    return {
        "run_id": info.run_id,
        "name": info.run_name,
        "experiment": experiment_names.get(info.experiment_id, info.experiment_id),
        "status": info.status,
        "parent_run_id": data.tags.get("mlflow.parentRunId"),
        "kind": data.tags.get("apexdistill.kind", "run"),
        "sweep": data.tags.get("apexdistill.sweep"),
        "objective": data.tags.get("apexdistill.objective") or data.params.get("objective.name"),
        "params": {k: _value(v) for k, v in data.params.items()},
        "fd": nfe["fd"], "accuracy": nfe["accuracy"], "ms_per_image": nfe["ms_per_image"],
        "teacher": teacher,
        "quality": quality,
        "teacher_fd_floor": _finite(data.metrics.get("eval/teacher_fd_floor")),
        "teacher_clip_score": _finite(data.metrics.get("eval/teacher_clip_score")),
        "speed": sorted(speed, key=lambda r: (r["model"] != "teacher", r["nfe"])),
        "floor_fd": _finite(data.metrics.get("eval/floor_fd")),
        "steps": _finite(data.metrics.get("step")),
        "samples_per_s": _finite(data.metrics.get("samples_per_s")),
        "peak_memory_mb": _finite(data.metrics.get("peak_memory_mb")),
        "start_time": info.start_time,
        "duration_s": (end - info.start_time) / 1000 if end and info.start_time else None,
        "metrics": {k: v for k, v in data.metrics.items() if _finite(v) is not None},
        "metric_keys": sorted(data.metrics),
    }


def shown_params(rows: list[dict[str, Any]], extra: list[str]) -> list[str]:
    """The key params that vary between the reported runs (all of them if there is one run), then the sweeps' keys."""
    objectives = {r["params"].get("objective.name") for r in rows}
    keys = []
    for key in [*extra, *KEY_PARAMS]:
        parts = key.split(".")
        if key not in extra and parts[0] == "objective" and len(parts) == 3 and parts[1] not in ("shift", "time") \
                and parts[1] not in objectives:
            continue  # another objective's weights: not what these runs used
        values = {json.dumps(r["params"].get(key), sort_keys=True) for r in rows if key in r["params"]}
        if values and key not in keys and (len(values) > 1 or len(rows) == 1 or key in extra or key == "objective.name"):
            keys.append(key)
    return keys


def sweep_order(client: Any, run_id: str) -> list[str]:
    """The space's keys in the sweep file's order (MLflow returns params sorted by name)."""
    import yaml

    try:
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(client.download_artifacts(run_id, "sweep.yaml", tmp)).read_text()
        return list((yaml.safe_load(text) or {}).get("space") or {})
    except Exception:  # noqa: BLE001 - no artifact (older sweeps) or an unreadable store: params order
        return []


def sweep_section(parent: dict[str, Any], children: list[dict[str, Any]], order: list[str] | None = None) -> dict[str, Any]:
    """A sweep's trials, its heat map (exactly two grid keys) and its ablation table (one row per grid point)."""
    found: dict[str, Any] = {}
    for key, text in parent["params"].items():
        if key.startswith("space."):
            spec = text if isinstance(text, dict) else _value(text)
            found[key[len("space."):].replace("/", ",")] = spec
    rank = {k: i for i, k in enumerate(order or [])}
    space = {k: found[k] for k in sorted(found, key=lambda k: rank.get(k, len(rank)))}
    metric = _tag(parent, "apexdistill.metric") or "eval/fd_1nfe"
    mode = _tag(parent, "apexdistill.mode") or "min"
    keys = [k for joint in space for k in joint.split(",")]
    trials = []
    for child in children:
        trials.append({"run_id": child["run_id"], "name": child["name"], "status": child["status"],
                       "values": {k: child["params"].get(k) for k in keys},
                       "metric": _finite(child["metrics"].get(metric)),
                       "fd": child["fd"], "accuracy": child["accuracy"]})
    section = {"run_id": parent["run_id"], "name": parent["sweep"] or parent["name"], "status": parent["status"],
               "experiment": parent["experiment"], "metric": metric, "mode": mode, "space": space,
               "best_run_id": _tag(parent, "apexdistill.best_run_id") or None, "trials": trials,
               "heatmap": None, "table": ablation_table(space, trials)}
    # a heat map when exactly two single keys are swept over a grid (other keys, joint ones included, hold one point)
    varied = [k for k, spec in space.items() if not (isinstance(spec, dict) and "grid" in spec and len(spec["grid"]) == 1)]
    grids = [k for k in varied if isinstance(space[k], dict) and "grid" in space[k] and "," not in k]
    if len(varied) == 2 and len(grids) == 2:
        section["heatmap"] = heatmap(grids[0], space[grids[0]]["grid"], grids[1], space[grids[1]]["grid"], trials, metric, mode)
    return section


def _tag(row: dict[str, Any], key: str) -> str | None:
    return row.get("tags", {}).get(key)


def heatmap(y_key: str, y_values: list[Any], x_key: str, x_values: list[Any], trials: list[dict[str, Any]],
            metric: str, mode: str) -> dict[str, Any]:
    """cells[i][j]: the mean metric of the finished trials at (y_values[i], x_values[j]), None where none finished."""
    cells: list[list[dict[str, Any] | None]] = []
    for y in y_values:
        row = []
        for x in x_values:
            hits = [t for t in trials if _same(t["values"].get(y_key), y) and _same(t["values"].get(x_key), x)]
            scores = [t["metric"] for t in hits if t["metric"] is not None and t["status"] == "FINISHED"]
            row.append({"value": sum(scores) / len(scores), "n": len(scores), "run_ids": [t["run_id"] for t in hits]}
                       if scores else None)
        cells.append(row)
    values = [c["value"] for r in cells for c in r if c]
    best = (min(values) if mode == "min" else max(values)) if values else None
    return {"y_key": y_key, "y_values": y_values, "x_key": x_key, "x_values": x_values, "cells": cells,
            "metric": metric, "mode": mode, "best": best,
            "range": [min(values), max(values)] if values else None}


def ablation_table(space: dict[str, Any], trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's Table 6 layout: one row per grid point of the space (joint keys read as
    'lambda_p : lambda_e' = '1 : 0.5'), the trials' 1/2/4-NFE scores as columns; random and Optuna
    points are listed as they were sampled."""
    keys = list(space)
    header = [" : ".join(part.rsplit(".", 1)[-1] for part in key.split(",")) for key in keys]
    nfes = sorted({n for t in trials for n in t["fd"]})
    rows = []
    for t in trials:
        label = []
        for key in keys:
            label.append(" : ".join(_fmt(t["values"].get(part)) for part in key.split(",")))
        rows.append({"label": label, "run_id": t["run_id"], "status": t["status"], "metric": t["metric"],
                     "fd": {n: t["fd"].get(n) for n in nfes}, "accuracy": {n: t["accuracy"].get(n) for n in nfes}})
    order = _grid_order(space, trials)
    if order is not None:
        rows.sort(key=lambda r: order.get(r["run_id"], len(order)))
    return {"header": header, "nfes": nfes, "rows": rows}


def _grid_order(space: dict[str, Any], trials: list[dict[str, Any]]) -> dict[str, int] | None:
    """Row order of a grid sweep: the grid's own order (first key slowest), not the order trials ran in."""
    if not all(isinstance(s, dict) and "grid" in s for s in space.values()):
        return None

    def rank(t: dict[str, Any]) -> tuple[int, ...]:
        out = []
        for key, spec in space.items():
            parts = key.split(",")
            for i, point in enumerate(spec["grid"]):
                point = point if isinstance(point, list) else [point]
                if all(_same(t["values"].get(p), v) for p, v in zip(parts, point)):
                    out.append(i)
                    break
            else:
                out.append(len(spec["grid"]))
        return tuple(out)

    return {t["run_id"]: i for i, t in enumerate(sorted(trials, key=rank))}


def _fmt(v: Any) -> str:
    f = _finite(v)
    if f is None or isinstance(v, bool):
        return str(v)
    return f"{f:g}"


def curves(client: Any, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """metric -> one series per run ({name, run_id, points [[step, value], ...]}), thinned to MAX_POINTS."""
    keys = list(CURVE_KEYS)
    for r in rows:
        keys += sorted(k for k in r["metric_keys"] if k.startswith("loss_") and k not in keys)
    out: dict[str, list[dict[str, Any]]] = {}
    for key in keys:
        series = []
        for r in rows:
            if key not in r["metric_keys"]:
                continue
            # one value per step, the last logged (a resumed run replays steps); non-finite values dropped
            latest: dict[int, tuple[int, float]] = {}
            for m in client.get_metric_history(r["run_id"], key):
                if m.step not in latest or m.timestamp >= latest[m.step][0]:
                    latest[m.step] = (m.timestamp, m.value)
            history = [(step, v) for step, (_, v) in sorted(latest.items()) if _finite(v) is not None]
            if len(history) < 2:
                continue
            stride = max(1, len(history) // MAX_POINTS)
            points = history[::stride] + ([history[-1]] if (len(history) - 1) % stride else [])
            series.append({"name": r["name"], "run_id": r["run_id"], "points": [[int(s), float(v)] for s, v in points]})
        if series:
            out[key] = series
    return out


def sample_grids(client: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first sample-grid artifact found in each run, as a data URI (the report needs no other files)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            if len(out) == MAX_SAMPLE_RUNS:
                break
            for path in SAMPLE_ARTIFACTS:
                folder = path.rsplit("/", 1)[0]
                try:
                    names = {a.path for a in client.list_artifacts(r["run_id"], folder)}
                except Exception:  # noqa: BLE001 - an artifact store we cannot read: no grid for that run
                    names = set()
                if path not in names:
                    continue
                local = Path(client.download_artifacts(r["run_id"], path, tmp))
                data = base64.b64encode(local.read_bytes()).decode()
                out.append({"run_id": r["run_id"], "name": r["name"], "artifact": path,
                            "src": f"data:image/png;base64,{data}"})
                break
    return out


def speed_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """NFE vs ms/image and the speed-up over the teacher's multi-step sampler, per run that timed them
    side by side (the ``speed/*`` metrics: every row measured on the same sample-grid batch)."""
    out = []
    for r in rows:
        if not r["speed"]:
            continue
        teachers = [s for s in r["speed"] if s["model"] == "teacher"]
        ref = max(teachers, key=lambda s: s["nfe"]) if teachers else None
        for s in r["speed"]:
            out.append({"run": r["name"], "run_id": r["run_id"], "model": s["model"], "nfe": s["nfe"],
                        "ms_per_image": s["ms_per_image"],
                        "speedup": ref["ms_per_image"] / s["ms_per_image"] if ref and s["ms_per_image"] > 0 else None,
                        "reference": f"teacher {ref['nfe']} NFE" if ref else None})
    return out


def clip_by_tag(client: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run with a CLIP score: the score of each prompt tag, per (model, NFE), from its quality summary artifact."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            if not r["quality"]["clip_score"]:
                continue
            try:
                summary = json.loads(Path(client.download_artifacts(r["run_id"], QUALITY_SUMMARY, tmp)).read_text())
            except Exception:  # noqa: BLE001 - no summary (or an unreadable store): no per-tag table for that run
                continue
            columns = [{"model": q["model"], "nfe": q["nfe"], "by_tag": q.get("clip_by_tag") or {}} for q in summary["rows"]]
            tags = sorted({t for c in columns for t in c["by_tag"]})
            if tags:
                out.append({"run_id": r["run_id"], "name": r["name"], "prompt_set": summary.get("prompt_set"),
                            "prompt_hash": summary.get("prompt_hash"), "tags": tags, "columns": columns})
    return out


def collect(uri: str, experiments: list[str] | None = None, sweep: str | None = None) -> dict[str, Any]:
    """Everything the report shows, from the store at ``uri``."""
    from mlflow import MlflowClient

    from apexdistill.tracking import _quiet_store_logs, check_reachable, redact_uri

    check_reachable(uri)
    _quiet_store_logs()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded grid otherwise
    client = MlflowClient(uri)
    exps, runs = select_runs(client, experiments, sweep)
    names = {e.experiment_id: e.name for e in exps}
    rows = []
    for run in runs:
        row = run_row(run, names)
        row["tags"] = {k: v for k, v in run.data.tags.items() if k.startswith("apexdistill.")}
        rows.append(row)
    parents = [r for r in rows if r["kind"] == "sweep"]
    trials = [r for r in rows if r["kind"] != "sweep"]
    sweeps = [sweep_section(p, [r for r in trials if r["parent_run_id"] == p["run_id"]], sweep_order(client, p["run_id"]))
              for p in parents]
    extra = [k for s in sweeps for joint in s["space"] for k in joint.split(",")]
    def first_fd(r: dict[str, Any]) -> float | None:  # the digits' FD proxy, else the FD to the teacher
        return r["fd"].get(1, r["quality"]["fd_teacher"].get(1))

    ranked = sorted(trials, key=lambda r: (first_fd(r) is None, first_fd(r) or 0.0))
    title = f"sweep {sweeps[0]['name']}" if sweep and sweeps else ", ".join(e.name for e in exps)
    return {
        "title": title,
        "tracking_uri": redact_uri(uri),
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "experiments": [e.name for e in exps],
        "param_columns": shown_params(trials or rows, extra),
        "runs": [{k: v for k, v in r.items() if k not in ("metrics", "metric_keys", "tags")} for r in rows],
        "sweeps": sweeps,
        "curves": curves(client, ranked[:MAX_CURVE_RUNS]),
        "samples": sample_grids(client, ranked),
        "speed": speed_table(ranked),
        "clip_tags": clip_by_tag(client, ranked),
    }
