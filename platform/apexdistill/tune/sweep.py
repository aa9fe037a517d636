"""Sweep files (``sweeps/*.yaml``): a search space over any config key, validated like a config.

    name: shift_grid
    overrides: [objective.name=apex, eval.nfe=[1]]     # applied to every trial, on top of -c CONFIG
    budget: {steps: 400, max_minutes: 2}              # per trial (train.steps / train.max_minutes)
    space:
      objective.shift.a: {grid: [-1, -0.5, 0.5]}
      objective.shift.b: {grid: [0, 0.1, 1, 10]}
      train.lr: {loguniform: [1.0e-5, 1.0e-3]}        # also: uniform [lo, hi], int [lo, hi], choice [...]
    metric: eval/fd_1nfe
    mode: min
    search: grid                                      # grid | random | optuna
    num_samples: 1                                    # grid: repeats of the grid; random/optuna: trials
    start_points: [{train.lr: 3.0e-4}]                # optuna: trials run first with these values (every space key)
    scheduler: {name: asha, grace_period: 100, reduction_factor: 2}   # optional; time unit = training steps
    max_concurrent: 2
    resources: {workers: 0, cpus_per_worker: 0.45, use_gpu: false, driver_cpus: 0.1}   # 0: the trial trains itself
    eval_every: 100                                   # in-training scores every N steps (what ASHA sees)
"""

from __future__ import annotations

import difflib
import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apexdistill.config import Config, ConfigError, _known_keys, build_config

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "int")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Strict):
    steps: int = Field(400, ge=1, description="train.steps of every trial")
    max_minutes: float | None = Field(None, gt=0, description="train.max_minutes of every trial")


class Scheduler(_Strict):
    name: Literal["asha"] = "asha"
    grace_period: int = Field(100, ge=1, description="training steps before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class Resources(_Strict):
    workers: int = Field(0, ge=0, description="Ray Train workers per trial; 0 = the trial trains in its own process "
                                              "(no worker group to start; its CPUs/GPU are a worker's)")
    cpus_per_worker: float = Field(0.45, gt=0)
    use_gpu: bool = Field(False, description="one GPU per worker (workers=0: the trial's own): one trial per GPU with workers<=1")
    driver_cpus: float = Field(0.1, gt=0, description="the trial's driver when it has workers (it only waits on its TorchTrainer)")

    def trial_resources(self) -> dict[str, float]:
        """What Tune reserves for a trial: its driver's CPUs, or, training itself, a worker's."""
        if self.workers:
            return {"CPU": self.driver_cpus}
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {})}


class SweepConfig(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="also the Tune experiment and the MLflow parent run name")
    description: str = ""
    experiment: str | None = Field(None, description="MLflow experiment of the parent and child runs (default: the base config's)")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides applied to every trial")
    budget: Budget = Field(default_factory=Budget)
    space: dict[str, dict[str, Any]] = Field(..., description="config key -> {grid|choice|uniform|loguniform|int: values}")
    metric: str = "eval/fd_1nfe"
    mode: Literal["min", "max"] = "min"
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1)
    start_points: list[dict[str, Any]] = Field(
        default_factory=list, description="search: optuna: the first trials take these values (one per space key), e.g. "
        "the base config's recipe, so the search is measured against it in the same sweep; they count in num_samples")
    scheduler: Scheduler | None = None
    max_concurrent: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=0, description="times Tune retries a failed trial (it resumes from its last checkpoint "
                                                 "into the same MLflow child run); the console says each retry")
    resources: Resources = Field(default_factory=Resources)
    eval_every: int = Field(0, ge=0, description="eval.every of every trial (needed by ASHA)")

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not space:
            raise ValueError("the search space is empty: give at least one config key under 'space'")
        known = set(_known_keys(Config))
        for key, spec in space.items():
            parts = key.split(",")
            for part in parts:
                if part not in known:
                    close = difflib.get_close_matches(part, sorted(known), n=1, cutoff=0.6)
                    raise ValueError(f"space: '{part}' is not a config key" + (f"; did you mean '{close[0]}'?" if close else ""))
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"space.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list) or not values:
                raise ValueError(f"space.{key}.{kind}: expected a non-empty list, got {values!r}")
            if len(parts) > 1:
                if kind not in ("grid", "choice"):
                    raise ValueError(f"space.{key}: joint keys take grid or choice values (one list per point)")
                bad = [v for v in values if not isinstance(v, list) or len(v) != len(parts)]
                if bad:
                    raise ValueError(f"space.{key}: every point must list {len(parts)} values (one per key), got {bad[0]!r}")
            if kind in ("uniform", "loguniform", "int"):
                if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                    raise ValueError(f"space.{key}.{kind}: expected [low, high] with low < high, got {values}")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"space.{key}.loguniform: bounds must be positive, got {values}")
        return space

    @model_validator(mode="after")
    def _combinations(self) -> "SweepConfig":
        kinds = {next(iter(spec)) for spec in self.space.values()}
        if self.search == "grid" and kinds - {"grid", "choice"}:
            raise ValueError(f"search='grid' enumerates values: use grid/choice, not {sorted(kinds - {'grid', 'choice'})} (or search=random)")
        if self.search == "optuna" and "grid" in kinds:
            raise ValueError("search='optuna' samples its own points: use choice/uniform/loguniform/int instead of grid")
        if self.scheduler is not None and not self.eval_every:
            raise ValueError("scheduler: ASHA stops trials on in-training scores: set eval_every (e.g. 100)")
        for i, point in enumerate(self.start_points):
            _check_start_point(self, i, point)
        if self.scheduler is not None and self.eval_every and self.scheduler.grace_period < self.eval_every:
            raise ValueError(f"scheduler.grace_period={self.scheduler.grace_period} is shorter than eval_every={self.eval_every}")
        return self

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        """What one trial runs with: sweep overrides, the budget, the sweep's resources, then the params."""
        r = self.resources
        budget = [f"train.steps={self.budget.steps}", f"train.max_minutes={'null' if self.budget.max_minutes is None else self.budget.max_minutes}"]
        res = [f"train.num_workers={r.workers}", f"train.cpus_per_worker={r.cpus_per_worker}", f"train.use_gpu={str(r.use_gpu).lower()}"]
        if r.workers > 1:
            res.append("train.strategy=ddp")
        elif r.workers == 0:  # one process, no process group (a base config's ddp would be refused)
            res.append("train.strategy=none")
        evaluation = [f"eval.every={self.eval_every}"] if self.eval_every else []
        if self.experiment:
            evaluation.append(f"tracking.experiment={self.experiment}")
        return [*self.overrides, *budget, *res, *evaluation, *(f"{k}={_yaml_value(v)}" for k, v in expand(params).items())]

    def corners(self) -> list[dict[str, Any]]:
        """Every grid/choice combination (or the bounds of ranges), and the start points: used to validate trial
        configs up front."""
        options = []
        for key, spec in self.space.items():
            kind, values = next(iter(spec.items()))
            options.append([(key, v) for v in (values if kind in ("grid", "choice") else [values[0], values[1]])])
        combos = itertools.product(*options)
        return [dict(c) for c in itertools.islice(combos, 256)] + list(self.start_points)


def _check_start_point(sweep: SweepConfig, i: int, point: dict[str, Any]) -> None:
    where = f"start_points[{i}]"
    if sweep.search != "optuna":
        raise ValueError(f"{where}: start points are for search='optuna' (a grid already runs every point)")
    if i >= sweep.num_samples:
        raise ValueError(f"start_points: {len(sweep.start_points)} points but num_samples={sweep.num_samples}: they count in it")
    if set(point) != set(sweep.space):
        missing, extra = sorted(set(sweep.space) - set(point)), sorted(set(point) - set(sweep.space))
        raise ValueError(f"{where}: give a value for every space key" + (f"; missing {missing}" if missing else "")
                         + (f"; not in the space: {extra}" if extra else ""))
    for key, value in point.items():
        kind, values = next(iter(sweep.space[key].items()))
        inside = value in values if kind == "choice" else isinstance(value, (int, float)) and values[0] <= value <= values[1]
        if not inside:
            raise ValueError(f"{where}.{key}={value!r} is outside the space's {kind} {values}")


def expand(params: dict[str, Any]) -> dict[str, Any]:
    """Joint keys ("a.b,c.d": [1, 2]) -> {"a.b": 1, "c.d": 2}."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        parts = key.split(",")
        out.update(zip(parts, value) if len(parts) > 1 else [(key, value)])
    return out


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return str(v)


def load_sweep(path: str | Path, base: dict[str, Any] | None = None) -> SweepConfig:
    """Read and validate a sweep file; every trial config it can produce is validated too (against
    ``base``, the -c CONFIG), so a bad value fails before any trial starts."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {p} must hold a mapping at the top level")
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"invalid sweep file ({p}):"]
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"])
            if e["type"] == "extra_forbidden":
                close = difflib.get_close_matches(loc.split(".")[-1], list(SweepConfig.model_fields), n=1, cutoff=0.6)
                lines.append(f"  - unknown key '{loc}'" + (f"; did you mean '{close[0]}'?" if close else ""))
            else:
                lines.append(f"  - '{loc}': {e['msg']}" if loc else f"  - {e['msg']}")
        raise ConfigError("\n".join(lines)) from None
    for params in sweep.corners():
        try:
            build_config(base or {}, sweep.trial_overrides(params), source=f"{p} with {params}")
        except ConfigError as exc:
            raise ConfigError(f"sweep file {p}: a trial config is invalid:\n{exc}") from None
    return sweep
