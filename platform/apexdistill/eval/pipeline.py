"""The teacher pipeline's own scheduler, as the teacher is run for evaluation (``eval/quality.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_teacher_scheduler(folder: str | Path) -> Any:
    """The scheduler the teacher pipeline ships (its class from model_index.json), freshly loaded: a
    scheduler holds the state of one sampling run."""
    import diffusers

    from apexdistill.models.family import read_model_index

    index = read_model_index(folder) or {}
    if "scheduler" not in index:
        raise ValueError(f"model.path: {folder} has no scheduler in its model_index.json (not a stock pipeline folder)")
    cls = getattr(diffusers, index["scheduler"][1])
    return cls.from_pretrained(str(Path(folder) / "scheduler"))
