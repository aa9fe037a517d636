"""The report's data -> one self-contained HTML page: inline CSS, inline SVG charts, PNGs as data URIs
and a few lines of inline JavaScript for sorting. Nothing is fetched when the page is viewed."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from string import Template
from typing import Any

TEMPLATE = Path(__file__).with_name("template.html")
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939"]


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def num(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "&ndash;"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.2g}"
    return esc(v)


def _nfe_get(d: dict, n: int) -> Any:
    """NFE-keyed dicts have int keys in Python and str keys once through JSON."""
    return d.get(n, d.get(str(n)))


def _sort_key(v: Any) -> str:
    return "" if v is None else esc(v)


def _cell(v: Any, digits: int = 2, cls: str = "") -> str:
    sort = _sort_key(v if not isinstance(v, bool) else str(v).lower())
    return f'<td class="{cls}" data-sort="{sort}">{num(v, digits)}</td>'


def param_label(key: str) -> str:
    """``train.lr`` -> ``lr``, ``objective.apex.lambda_p`` -> ``apex.lambda_p``; ``objective.name`` and
    ``lora.enabled`` keep their section, where the last part alone says little."""
    parts = key.split(".")
    if parts[0] == "objective" and len(parts) > 2:
        return ".".join(parts[1:])  # shift.a, apex.lambda_p, apex_literal.lambda_p
    return ".".join(parts[-2:]) if parts[-1] in {"name", "enabled", "stage"} and len(parts) > 1 else parts[-1]


def runs_table(data: dict[str, Any]) -> str:
    runs = [r for r in data["runs"] if r["kind"] != "sweep"]
    nfes = sorted({int(n) for r in runs for n in r["fd"]}) or ([] if any(r.get("quality", {}).get("fd_teacher") for r in runs) else [1])
    # the real-model scores, where any run has them: (metric, column label, digits)
    quality = [(key, label, digits) for key, label, digits in QUALITY_COLUMNS
               if any(r.get("quality", {}).get(key) for r in runs)]
    q_nfes = sorted({int(n) for r in runs for key, _, _ in quality for n in r["quality"][key]})
    params = data["param_columns"]
    # results first (what a reader compares), then the config keys that differ between the runs
    head = ["run", *[f"FD {n} NFE" for n in nfes], *[f"acc {n} NFE" for n in nfes],
            *[f"{label} {n} NFE" for _, label, _ in quality for n in q_nfes], *(["teacher floor"] if quality else []),
            "ms/img 1 NFE", "steps", "minutes", "samples/s", "status", "experiment", *[param_label(p) for p in params]]
    out = ['<table class="sortable" id="runs-table"><thead><tr>']
    out += [f'<th title="click to sort">{esc(h)}</th>' for h in head]
    out.append("</tr></thead><tbody>")
    for r in runs:
        cells = [f'<td data-sort="{esc(r["name"])}" title="{esc(r["run_id"])}">{esc(r["name"])}</td>']
        cells += [_cell(_nfe_get(r["fd"], n)) for n in nfes]
        cells += [_cell(None if _nfe_get(r["accuracy"], n) is None else 100 * _nfe_get(r["accuracy"], n), 1) for n in nfes]
        cells += [_cell(_nfe_get(r.get("quality", {}).get(key, {}), n), digits) for key, _, digits in quality for n in q_nfes]
        cells += [_cell(r.get("teacher_fd_floor"), 3)] if quality else []
        cells += [_cell(_nfe_get(r["ms_per_image"], 1), 3), _cell(None if r["steps"] is None else int(r["steps"])),
                  _cell(None if r["duration_s"] is None else r["duration_s"] / 60, 1), _cell(r["samples_per_s"], 0)]
        cells += [f'<td data-sort="{esc(r["status"])}" class="status-{esc(r["status"]).lower()}">{esc(r["status"])}</td>',
                  f'<td data-sort="{esc(r["experiment"])}">{esc(r["experiment"])}</td>']
        cells += [_cell(r["params"].get(p), 4) for p in params]
        out.append(f'<tr data-run-id="{esc(r["run_id"])}">{"".join(cells)}</tr>')
    out.append("</tbody></table>")
    return "".join(out)


QUALITY_COLUMNS = [("fd_teacher", "FD to teacher", 3), ("fd_real", "FD to real", 3), ("clip_score", "CLIP", 2),
                   ("diversity", "diversity x teacher", 2)]


def clip_tags_html(data: dict[str, Any]) -> str:
    if not data.get("clip_tags"):
        return ('<p class="empty">No CLIP scores logged (the real-model evaluation with <code>eval.clip_model</code> set: '
                '<code>apexdistill evaluate RUN eval.clip_model=/path/to/clip</code>).</p>')
    out = []
    for t in data["clip_tags"]:
        cols = t["columns"]
        out.append(f'<table class="sortable clip-tags" data-run-id="{esc(t["run_id"])}"><caption>{esc(t["name"])}: CLIP score by '
                   f'prompt tag <small>({esc(t["prompt_set"])}, hash {esc(t["prompt_hash"])})</small></caption><thead><tr><th>tag</th>')
        out += [f'<th>{esc(c["model"])} {esc(c["nfe"])} NFE</th>' for c in cols]
        out.append("</tr></thead><tbody>")
        for tag in t["tags"]:
            out.append(f'<tr><td data-sort="{esc(tag)}">{esc(tag)}</td>' + "".join(_cell(c["by_tag"].get(tag)) for c in cols) + "</tr>")
        out.append("</tbody></table>")
    return "".join(out)


def _heat_color(value: float, lo: float, hi: float, mode: str) -> str:
    """Green for the best end of the range, through yellow, to red for the worst."""
    t = 0.5 if hi <= lo else (value - lo) / (hi - lo)
    if mode == "max":
        t = 1 - t
    stops = [(26, 152, 80), (254, 224, 139), (215, 48, 39)]
    a, b, u = (stops[0], stops[1], t * 2) if t < 0.5 else (stops[1], stops[2], t * 2 - 1)
    return "#" + "".join(f"{round(x + (y - x) * u):02x}" for x, y in zip(a, b))


def _axis(v: Any) -> str:
    """A grid value as the sweep file wrote it: 0.1, 10, 1e-05 (not 0.1000, 10.0000, 0.0000)."""
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else esc(v)


def heatmap_table(h: dict[str, Any], sweep_name: str) -> str:
    lo, hi = h["range"] or (0.0, 0.0)
    out = [f'<table class="heatmap" data-sweep="{esc(sweep_name)}"><caption>{esc(h["metric"])} '
           f'({"lower" if h["mode"] == "min" else "higher"} is better): rows {esc(h["y_key"])}, columns {esc(h["x_key"])}'
           f'</caption><thead><tr><th>{esc(h["y_key"].rsplit(".", 1)[-1])} \\ {esc(h["x_key"].rsplit(".", 1)[-1])}</th>']
    out += [f"<th>{_axis(x)}</th>" for x in h["x_values"]]
    out.append("</tr></thead><tbody>")
    for y, row in zip(h["y_values"], h["cells"]):
        out.append(f"<tr><th>{_axis(y)}</th>")
        for cell in row:
            if cell is None:
                out.append('<td class="heat-empty" data-value="">no finished trial</td>')
                continue
            best = " heat-best" if h["best"] is not None and math.isclose(cell["value"], h["best"]) else ""
            color = _heat_color(cell["value"], lo, hi, h["mode"])
            out.append(f'<td class="heat{best}" data-value="{cell["value"]:.6g}" style="background:{color}" '
                       f'title="{esc(", ".join(cell["run_ids"]))}">{cell["value"]:.2f}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def ablation_html(t: dict[str, Any], best_run_id: str | None) -> str:
    nfes = t["nfes"]
    out = ['<table class="sortable ablation"><thead><tr>']
    out += [f"<th>{esc(h)}</th>" for h in t["header"]]
    out += [f"<th>FD {n} NFE</th>" for n in nfes] + [f"<th>acc {n} NFE</th>" for n in nfes] + ["<th>status</th></tr></thead><tbody>"]
    for r in t["rows"]:
        cls = ' class="best"' if r["run_id"] == best_run_id else ""
        out.append(f'<tr{cls} data-run-id="{esc(r["run_id"])}">')
        out += [f'<td data-sort="{esc(v)}">{esc(v)}</td>' for v in r["label"]]
        out += [_cell(_nfe_get(r["fd"], n)) for n in nfes]
        out += [_cell(None if _nfe_get(r["accuracy"], n) is None else 100 * _nfe_get(r["accuracy"], n), 1) for n in nfes]
        out.append(f'<td data-sort="{esc(r["status"])}">{esc(r["status"])}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def sweeps_html(data: dict[str, Any]) -> str:
    if not data["sweeps"]:
        return '<p class="empty">No sweeps among these runs (run one with <code>apexdistill sweep -s sweeps/NAME.yaml</code>).</p>'
    out = []
    for s in data["sweeps"]:
        best = next((t for t in s["trials"] if t["run_id"] == s["best_run_id"]), None)
        best_text = (f'best: <b>{esc(best["name"])}</b> ({esc(s["metric"])} = {num(best["metric"])})' if best else "no best trial yet")
        out.append(f'<section class="sweep" id="sweep-{esc(s["run_id"])}"><h3>{esc(s["name"])} '
                   f'<small>{esc(s["experiment"])} &middot; parent run {esc(s["run_id"])} &middot; {esc(s["status"])} &middot; '
                   f'{len(s["trials"])} trials</small></h3><p>{best_text}</p>')
        if s["heatmap"]:
            out.append(heatmap_table(s["heatmap"], s["name"]))
        out.append(ablation_html(s["table"], s["best_run_id"]))
        out.append("</section>")
    return "".join(out)


def line_chart(key: str, series: list[dict[str, Any]], width: int = 560, height: int = 260) -> str:
    """An inline SVG: one polyline per run, axes with five ticks each, hover titles."""
    left, right, top, bottom = 56, 12, 12, 34
    xs = [p[0] for s in series for p in s["points"]]
    ys = [p[1] for s in series for p in s["points"]]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.04 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    w, h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * h

    out = [f'<svg class="chart" role="img" aria-label="{esc(key)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'xmlns="http://www.w3.org/2000/svg"><title>{esc(key)}</title>',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fff" stroke="#ccc"/>']
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        xv = x0 + (x1 - x0) * i / 4
        x_label = f"{xv:.0f}" if x1 - x0 >= 8 else f"{xv:.3g}"
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end" class="tick">{yv:.3g}</text>'
                   f'<text x="{sx(xv):.1f}" y="{top + h + 14}" text-anchor="middle" class="tick">{x_label}</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 4}" text-anchor="middle" class="tick">step</text>')
    for i, s in enumerate(series):
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s["points"])
        color = PALETTE[i % len(PALETTE)]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}" data-run-id="{esc(s["run_id"])}">'
                   f'<title>{esc(s["name"])}: last {s["points"][-1][1]:.4g} at step {s["points"][-1][0]}</title></polyline>')
    out.append("</svg>")
    legend = "".join(f'<span><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{esc(s["name"])}</span>'
                     for i, s in enumerate(series))
    return f'<figure class="curve"><figcaption>{esc(key)}</figcaption>{"".join(out)}<div class="legend">{legend}</div></figure>'


def curves_html(data: dict[str, Any]) -> str:
    if not data["curves"]:
        return '<p class="empty">No metric histories with two or more points.</p>'
    return "".join(line_chart(key, series) for key, series in data["curves"].items())


def samples_html(data: dict[str, Any]) -> str:
    if not data["samples"]:
        return ('<p class="empty">No sample grids logged (they are written by the end-of-run evaluation on the '
                'built-in digits: <code>eval.at_end=true</code>).</p>')
    return "".join(f'<figure class="samples"><figcaption>{esc(s["name"])} <small>({esc(s["artifact"])})</small></figcaption>'
                   f'<img alt="sample grid of {esc(s["name"])}" src="{s["src"]}"></figure>' for s in data["samples"])


def speed_html(data: dict[str, Any]) -> str:
    if not data["speed"]:
        return '<p class="empty">No side-by-side timings logged (<code>speed/*</code> metrics, from the end-of-run evaluation).</p>'
    out = ['<table class="sortable" id="speed-table"><thead><tr><th>run</th><th>model</th><th>NFE</th><th>ms/image</th>'
           "<th>speed-up</th><th>over</th></tr></thead><tbody>"]
    for r in data["speed"]:
        out.append(f'<tr><td data-sort="{esc(r["run"])}">{esc(r["run"])}</td><td data-sort="{esc(r["model"])}">{esc(r["model"])}</td>'
                   f'{_cell(r["nfe"])}{_cell(r["ms_per_image"], 3)}{_cell(r["speedup"], 1)}'
                   f'<td>{esc(r["reference"] or "")}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def render(data: dict[str, Any]) -> str:
    runs = [r for r in data["runs"] if r["kind"] != "sweep"]
    return Template(TEMPLATE.read_text()).substitute(
        title=esc(data["title"]),
        tracking_uri=esc(data["tracking_uri"]),
        generated_at=esc(data["generated_at"]),
        n_runs=len(runs),
        n_sweeps=len(data["sweeps"]),
        runs_table=runs_table(data),
        sweeps=sweeps_html(data),
        curves=curves_html(data),
        samples=samples_html(data),
        speed=speed_html(data),
        clip_tags=clip_tags_html(data),
        # raw text inside <script>: no HTML escaping, but no "</script>" either
        data_json=json.dumps({k: data[k] for k in ("title", "experiments", "tracking_uri")}).replace("<", "\\u003c"),
    )
