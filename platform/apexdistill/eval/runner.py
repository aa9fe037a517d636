"""Score models on the built-in digits: the glue between a trained backbone and the metrics.

The student is sampled with the few-step sampler at each requested NFE, the teacher with its
multi-step Euler ODE; both see the same prompts and the same fixed-seed noise.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apexdistill.config import Config
from apexdistill.data.digits import CAPTIONS
from apexdistill.eval.generate import evaluate_rows, generate
from apexdistill.eval.grid import save_grid
from apexdistill.eval.metrics import EvalRow, build_evaluator


class DigitsBench:
    """Everything needed to score a model on the digits: evaluator and the ten prompts' text states."""

    def __init__(self, cfg: Config, text_table: torch.Tensor, mask_table: torch.Tensor) -> None:
        self.cfg = cfg
        self.evaluator, self.classifier_info = build_evaluator(
            Path(cfg.run.workdir) / "eval", cfg.data.resolution, cfg.data.test_fraction, cfg.data.split_seed, cfg.eval.feature_extractor
        )
        self.text_table, self.mask_table = text_table, mask_table

    def score(self, name: str, model: torch.nn.Module, nfes: list[int], sampler: str, draws: int | None = None,
              seed: int | None = None) -> list[EvalRow]:
        e = self.cfg.eval
        return evaluate_rows(
            name, model, self.evaluator, self.text_table, self.mask_table, nfes, sampler,
            samples_per_class=e.samples_per_class, seed=e.seed if seed is None else seed, batch_size=e.batch_size,
            channels=1, resolution=self.cfg.data.resolution, draws=draws or e.noise_draws,
        )

    def reference(self, name: str, model: torch.nn.Module, nfe: int, sampler: str, draws: int) -> tuple[EvalRow, dict | None]:
        """The teacher's multi-step reference row: the shipped one (``assets/teacher_reference.json``) when
        its key is exactly this run's settings, with its provenance; else scored here (provenance None).
        A shipped row's ``ms_per_image`` is the producing machine's: the caller times it on this one."""
        entry = shipped_reference(self.cfg, self.classifier_info, nfe, sampler, draws)
        if entry is None:
            return self.score(name, model, [nfe], sampler, draws=draws)[0], None
        fds, accs = entry["fd_draws"], entry["accuracy_draws"]
        row = EvalRow(model=name, nfe=int(nfe), accuracy=sum(accs) / draws, fd=sum(fds) / draws,
                      ms_per_image=float(entry["ms_per_image"]), fd_std=statistics.stdev(fds) if draws > 1 else None, draws=draws)
        return row, entry["provenance"]

    def grid(self, models: list[tuple[str, torch.nn.Module, int, str]], path: Path, per_class: int = 1,
             timing_per_class: int | None = None, min_repeats: int = 3, min_seconds: float = 0.0) -> GridResult:
        """One row per (name, model, nfe, sampler): the ten prompts, same noise for every row. Each row's
        sampling is timed on the same timing batch (``timing_per_class`` images per prompt) in rounds that
        visit every row once (so a busy moment of the machine slows every row, not one of them), at least
        ``min_repeats`` rounds (and for at least ``min_seconds``), and each row keeps its median: the
        grid's own ten images are too few to time (the same model at the same NFE read 0.81 and 1.44
        ms/image), and one row timed after another read 0.57 and 0.88. Default: 10 per prompt, fewer
        when ``eval.samples_per_class`` is smaller (tests)."""
        timing_per_class = timing_per_class or max(1, min(10, self.cfg.eval.samples_per_class))
        rows, titles = [], []
        common = dict(seed=self.cfg.eval.seed, batch_size=self.cfg.eval.batch_size, channels=1, resolution=self.cfg.data.resolution)
        for name, model, nfe, sampler in models:
            images, _, _ = generate(model, self.text_table, self.mask_table, nfe, sampler, samples_per_class=per_class, **common)
            rows.append(images)
            titles.append(f"{name} {nfe} NFE")
        times: list[list[float]] = [[] for _ in models]
        started = time.perf_counter()
        while len(times[0]) < min_repeats or time.perf_counter() - started < min_seconds:
            for row_times, (name, model, nfe, sampler) in zip(times, models):
                row_times.append(generate(model, self.text_table, self.mask_table, nfe, sampler, samples_per_class=timing_per_class,
                                          warmup=not row_times, **common)[2])
        speed = [{"model": name, "nfe": int(nfe), "sampler": sampler, "ms_per_image": statistics.median(row_times),
                  "timed_images": 10 * timing_per_class, "repeats": len(row_times)}
                 for row_times, (name, model, nfe, sampler) in zip(times, models)]
        save_grid(torch.cat(rows), path, nrow=len(CAPTIONS) * per_class, labels_text=titles)
        return GridResult(path, speed)


@dataclass
class GridResult:
    """A sample grid PNG and, per row, {model, nfe, sampler, ms_per_image (median), timed_images, repeats}."""

    path: Path
    speed: list[dict]

    def speed_metrics(self, student_prefix: str = "student") -> dict[str, float]:
        """{"speed/ms_per_image_teacher_50nfe": ..., "speed/ms_per_image_student_1nfe": ...} for MLflow."""
        out = {}
        for row in self.speed:
            who = "student" if row["model"].startswith(student_prefix) else "teacher"
            out[f"speed/ms_per_image_{who}_{row['nfe']}nfe"] = row["ms_per_image"]
        return out


def format_table(rows: list[EvalRow], floor_fd: float | None = None) -> str:
    draws = max((r.draws for r in rows), default=1)
    spread = draws > 1
    head = f"{'model':<22} {'NFE':>4} {'accuracy':>9} {'FD proxy':>9}" + (f" {'spread':>7}" if spread else "") + f" {'ms/image':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = "-" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        sd = (f" {'+-' + format(r.fd_std, '.2f'):>7}" if r.fd_std is not None else f" {'':>7}") if spread else ""
        lines.append(f"{r.model:<22} {r.nfe:>4} {acc:>9} {r.fd:>9.2f}{sd} {r.ms_per_image:>9.3f}")
    if floor_fd is not None:
        lines.append(f"{'real data (floor)':<22} {'':>4} {'':>9} {floor_fd:>9.2f}")
    if spread:
        fewer = [f"{r.model} at {r.nfe} NFE: the first {r.draws}" for r in rows if r.draws != draws]
        lines.append(f"(accuracy and FD proxy: means over {draws} noise draws{'; ' if fewer else ''}{'; '.join(fewer)}; "
                     "spread: the FD's std across them)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the shipped reference row

REFERENCE_FILE = Path(__file__).resolve().parents[1] / "assets" / "teacher_reference.json"
REFERENCE_COMMAND = "python jobs/teacher_reference.py"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reference_key(cfg: Config, classifier_info: dict[str, Any], nfe: int, sampler: str, draws: int) -> dict[str, Any] | None:
    """Everything a teacher row of the digits depends on: the teacher's weights and config, the evaluator's
    classifier, the split, the images per prompt, seed, batch, NFE, sampler and draws. None when the model
    or the evaluator is not a shipped file (nothing fixed to ship a row for)."""
    from apexdistill.assets import BUILTIN

    if cfg.model.path not in BUILTIN or not classifier_info.get("classifier_shipped"):
        return None
    folder = BUILTIN[cfg.model.path] / "transformer"
    e, d = cfg.eval, cfg.data
    return {"teacher_sha256": _sha256(folder / "diffusion_pytorch_model.safetensors"), "teacher_config_sha256": _sha256(folder / "config.json"),
            "classifier_sha256": _sha256(Path(classifier_info["classifier_weights_path"])),
            "model": cfg.model.model_dump(mode="json"), "resolution": d.resolution, "test_fraction": d.test_fraction,
            "split_seed": d.split_seed, "samples_per_class": e.samples_per_class, "seed": e.seed, "batch_size": e.batch_size,
            "nfe": int(nfe), "sampler": sampler, "draws": int(draws)}


def load_references(path: Path = REFERENCE_FILE) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def shipped_reference(cfg: Config, classifier_info: dict[str, Any], nfe: int, sampler: str, draws: int,
                      path: Path = REFERENCE_FILE) -> dict[str, Any] | None:
    """The shipped entry whose key is exactly these settings, or None (then the row is scored)."""
    key = reference_key(cfg, classifier_info, nfe, sampler, draws)
    if key is None:
        return None
    return next((entry for entry in load_references(path) if entry["key"] == key), None)


def shipped_reference_for(cfg: Config) -> bool:
    """Whether this config's teacher reference row is shipped, decided from the files before the evaluator is
    loaded (the demo's up-front estimate): the classifier is the shipped one of ``load_or_train_classifier``."""
    from apexdistill.assets import EVALUATOR
    from apexdistill.eval.classifier import cache_key

    weights = EVALUATOR / f"{cache_key(cfg.data.resolution, cfg.data.test_fraction, cfg.data.split_seed, 0)}.safetensors"
    info = {"classifier_shipped": weights.is_file() and not cfg.eval.feature_extractor, "classifier_weights_path": str(weights)}
    return shipped_reference(cfg, info, cfg.eval.teacher_nfe, "euler", cfg.eval.reference_draws) is not None
