"""Files shipped inside the package: the pre-trained digits teacher (a diffusers pipeline folder) and the
evaluator's digit classifier (so the FD proxy is the same function on every machine)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BUILTIN = {"builtin:teacher": ASSETS / "teacher-digits16-sana"}
# How the shipped teacher was made (and how to make it again):
TEACHER_COMMAND = "apexdistill train -c jobs/configs/teacher_digits.yaml && apexdistill export-teacher"
# The evaluator's classifier for the default split (16 px, test fraction 0.2, split and seed 0), trained
# once by ``train_classifier`` and shipped: trained on first use instead, its float round-off (which
# differs between CPUs) moved every FD proxy by a few percent (teacher@50: 2.92 on one machine, 3.09 on another)
EVALUATOR = ASSETS / "evaluator"
# (how it was made: with the two files removed, train it straight into the folder)
EVALUATOR_COMMAND = ("python -c 'from apexdistill.assets import EVALUATOR; from apexdistill.eval.classifier import "
                     "load_or_train_classifier as f; f(EVALUATOR, shipped=False)'")


def resolve_model_path(path: str | None) -> str | None:
    """Map ``builtin:...`` names to the shipped folders; other paths pass through unchanged."""
    if path is None or not path.startswith("builtin:"):
        return path
    if path not in BUILTIN:
        raise ValueError(f"model.path: unknown built-in '{path}', expected one of {sorted(BUILTIN)}")
    folder = BUILTIN[path]
    if not (folder / "transformer" / "config.json").is_file():
        raise FileNotFoundError(f"model.path: the built-in teacher is missing at {folder}; regenerate it with: {TEACHER_COMMAND}")
    return str(folder)
