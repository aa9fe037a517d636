"""Files shipped inside the package: the pre-trained digits teacher (a diffusers pipeline folder)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BUILTIN = {"builtin:teacher": ASSETS / "teacher-digits16-sana"}
# How the shipped teacher was made (and how to make it again):
TEACHER_COMMAND = "apexdistill train -c jobs/configs/teacher_digits.yaml && apexdistill export-teacher"


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
