"""`apexdistill dashboard`: a static comparison report built from the MLflow store, and the MLflow UI.

``build_report`` reads the store (``collect``), renders one self-contained ``index.html`` (``render``)
and writes it with the data it shows (``report.json``) under ``<workdir>/reports/<name>/``. Both files
are written to temporary names and renamed, so a failed build never leaves half a report over an
old one. See dashboards/README.md for how to review runs with it and in MLflow.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from apexdistill.report.collect import ReportError
from apexdistill.report.collect import collect as collect_report  # not re-bound as `collect`: that is the submodule
from apexdistill.report.render import render as render_report

__all__ = ["ReportError", "build_report", "collect_report", "render_report", "default_out_dir"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "report"


def default_out_dir(workdir: str | Path, experiments: list[str] | None, sweep: str | None) -> Path:
    name = f"sweep-{sweep}" if sweep else "-".join(experiments) if experiments else "all"
    return Path(workdir).resolve() / "reports" / _slug(name)


def build_report(uri: str, out_dir: str | Path, experiments: list[str] | None = None, sweep: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Write ``out_dir/index.html`` and ``out_dir/report.json``; return the page's path and the data."""
    data = collect_report(uri, experiments, sweep)
    page = render_report(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(data, indent=1, default=str)), ("index.html", page)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    return out / "index.html", data
