"""The backtest report: one self-contained HTML file with interactive plots.

Plots are made with plotly; plotly.js is inlined once in the page, so the
report opens offline and fetches nothing.  Fixed element ids and no
wall-clock time make the file a function of the backtest alone.

Per series (entity, metric) the report shows the values with labelled windows
shaded, each side's acting decisions (and guard-blocked ones), and the anomaly
scores with every rule's score threshold; before that, a summary table, the
confusion summary, action volume, guard interventions, time to detect and the
list of added/removed/changed decisions.  Long series are drawn with
per-bucket minimum and maximum (spikes stay visible); markers are exact.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from ia.core.times import iso
from ia.offline.backtest import Change, Labels, Row, detections, thresholds
from ia.offline.run import Variant

MAX_POINTS = 4000
COLORS = {"baseline": "#1f77b4", "candidate": "#ff7f0e", "window": "rgba(214,39,40,0.13)",
          "value": "#555555", "blocked": "#7f7f7f"}
CONFIG = {"displaylogo": False, "responsive": True}


@dataclass
class ReportInput:
    summary: dict[str, Any]
    baseline: Variant
    candidate: Variant
    base_rows: Sequence[Row]
    cand_rows: Sequence[Row]
    labels: Labels | None
    changes: Sequence[Change]
    command: str = ""
    max_series: int = 40


# --------------------------------------------------------------------------- helpers


def decimate(xs: Sequence[int], ys: Sequence[float], limit: int = MAX_POINTS
             ) -> tuple[list[int], list[float]]:
    """At most ``limit`` points: each bucket keeps its minimum and maximum, in time order."""
    n = len(xs)
    if n <= limit:
        return list(xs), list(ys)
    size = -(-n // (limit // 2))
    out_x, out_y = [], []
    for start in range(0, n, size):
        idx = range(start, min(start + size, n))
        lo = min(idx, key=lambda i: ys[i])
        hi = max(idx, key=lambda i: ys[i])
        for i in sorted({lo, hi}):
            out_x.append(xs[i])
            out_y.append(ys[i])
    return out_x, out_y


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(v: object) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v)


def _figure_html(fig: go.Figure, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=CONFIG)


# --------------------------------------------------------------------------- summary parts


_METRICS = [
    ("actions", ("volume", "actions")),
    ("precision", ("quality", "precision")),
    ("recall (windows detected)", ("quality", "recall")),
    ("false action rate (per negative event)", ("quality", "false_action_rate")),
    ("false actions per day", ("quality", "false_actions_per_day")),
    ("windows detected", ("quality", "detected_windows")),
    ("windows missed", ("quality", "missed_windows")),
    ("true actions (in a window)", ("quality", "true_actions")),
    ("false actions (outside windows)", ("quality", "false_actions")),
    ("time to detect, median (s)", ("quality", "time_to_detect_s", "median")),
    ("time to detect, mean (s)", ("quality", "time_to_detect_s", "mean")),
    ("guard interventions", ("guards_total",)),
    ("held by freeze windows", ("windows_total",)),
]


def _dig(side: dict[str, Any], path: tuple[str, ...]) -> Any:
    if path == ("guards_total",):
        return sum(side["guard_interventions"].values())
    if path == ("windows_total",):
        return sum(sum(m.values()) for m in side.get("held_by_windows", {}).values())
    cur: Any = side
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _delta(a: Any, b: Any) -> str:
    if isinstance(a, int | float) and isinstance(b, int | float):
        d = b - a
        if isinstance(d, int):
            return f"{d:+d}"
        return f"{d:+,.0f}" if abs(d) >= 100 else f"{d:+.4g}"
    return ""


def metrics_table(summary: dict[str, Any]) -> str:
    base, cand = summary["baseline"], summary["candidate"]
    rows = []
    for label, path in _METRICS:
        a, b = _dig(base, path), _dig(cand, path)
        if a is None and b is None:
            continue
        rows.append(f"<tr><th>{_e(label)}</th><td>{_fmt(a)}</td><td>{_fmt(b)}</td>"
                    f"<td>{_delta(a, b)}</td></tr>")
    return ("<table class='metrics'><thead><tr><th></th><th>baseline</th><th>candidate</th>"
            "<th>Δ</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def confusion_table(summary: dict[str, Any]) -> str:
    parts = []
    for side in ("baseline", "candidate"):
        q = summary[side].get("quality")
        if not q:
            continue
        parts.append(
            f"<table class='confusion'><caption>{side}</caption>"
            "<tr><th></th><th>in a labelled window</th><th>outside windows</th></tr>"
            f"<tr><th>acted</th><td>{q['true_actions']} actions, {q['detected_windows']} "
            f"windows detected</td><td>{q['false_actions']} false actions</td></tr>"
            f"<tr><th>did not act</th><td>{q['missed_windows']} windows missed</td>"
            f"<td>{q['negative_events'] - q['false_actions']} quiet events</td></tr></table>")
    return "".join(parts)


Bars = tuple[str, list[str], list[float], list[float]]  # title, categories, baseline, candidate


def confusion_bars(summary: dict[str, Any]) -> Bars | None:
    qb, qc = summary["baseline"].get("quality"), summary["candidate"].get("quality")
    if not qb or not qc:
        return None
    keys = {"windows<br>detected": "detected_windows", "windows<br>missed": "missed_windows",
            "true<br>actions": "true_actions", "false<br>actions": "false_actions"}
    return ("Confusion summary (labelled windows)", list(keys),
            [qb[k] for k in keys.values()], [qc[k] for k in keys.values()])


def volume_bars(summary: dict[str, Any]) -> Bars:
    vb, vc = summary["baseline"]["volume"]["by_mode"], summary["candidate"]["volume"]["by_mode"]
    modes = sorted(set(vb) | set(vc)) or ["auto"]
    return ("Decisions with an action, by mode", modes, [vb.get(m, 0) for m in modes],
            [vc.get(m, 0) for m in modes])


def guard_bars(summary: dict[str, Any]) -> Bars:
    gb = summary["baseline"]["guard_interventions"]
    gc = summary["candidate"]["guard_interventions"]
    guards = sorted(set(gb) | set(gc)) or ["(none)"]
    return ("Guard interventions", guards, [gb.get(g, 0) for g in guards],
            [gc.get(g, 0) for g in guards])


def _ttd_boxes(inp: ReportInput) -> list[go.Box]:
    boxes = []
    for side, rows in (("baseline", inp.base_rows), ("candidate", inp.cand_rows)):
        found = [d for d in detections(rows, inp.labels) if d["detected_at"] is not None] \
            if inp.labels is not None else []
        boxes.append(go.Box(
            name=side, y=[d["time_to_detect_s"] / 3600 for d in found], boxpoints="all",
            jitter=0.4, pointpos=0, marker_color=COLORS[side], showlegend=False,
            text=[f"{d['entity']} window from {iso(d['start'])}" for d in found],
            hovertemplate="%{text}<br>%{y:.2f} h<extra></extra>"))
    return boxes


def overview_figure(inp: ReportInput) -> go.Figure:
    """One full-width figure: confusion summary, actions by mode, guard interventions
    and (with labels) time to detect."""
    panels = [b for b in (confusion_bars(inp.summary), volume_bars(inp.summary),
                          guard_bars(inp.summary)) if b is not None]
    titles = [p[0] for p in panels]
    if inp.labels is not None:
        titles.append("Time to detect (h): first action in a window - its start")
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles,
                        horizontal_spacing=0.06,
                        column_widths=[0.3] + [0.7 / (len(titles) - 1)] * (len(titles) - 1))
    for col, (_, cats, base, cand) in enumerate(panels, start=1):
        for side, ys in (("baseline", base), ("candidate", cand)):
            fig.add_trace(go.Bar(name=side, x=cats, y=ys, marker_color=COLORS[side],
                                 legendgroup=side, showlegend=col == 1), row=1, col=col)
    if inp.labels is not None:
        for box in _ttd_boxes(inp):
            fig.add_trace(box, row=1, col=len(titles))
    fig.update_layout(barmode="group", height=400, legend={"orientation": "h", "y": -0.2},
                      margin={"l": 50, "r": 20, "t": 60, "b": 40})
    fig.update_annotations(font_size=12)
    return fig


def changes_table(changes: Sequence[Change], limit: int = 200) -> str:
    if not changes:
        return "<p>No decision differs.</p>"
    head = ("<tr><th>change</th><th>time (UTC)</th><th>entity / metric</th><th>value</th>"
            "<th>baseline</th><th>candidate</th></tr>")
    body = []
    for c in list(changes)[:limit]:
        b, d = c.baseline, c.candidate
        body.append(
            f"<tr class='{c.kind}'><td>{c.kind}</td><td>{iso(b.ts)}</td>"
            f"<td>{_e(b.entity)} / {_e(b.metric)}</td><td>{b.value:g}</td>"
            f"<td>{_side_cell(b)}</td><td>{_side_cell(d)}</td></tr>")
    more = f"<p>… and {len(changes) - limit} more (diff.jsonl has all).</p>" \
        if len(changes) > limit else ""
    return f"<table class='changes'>{head}{''.join(body)}</table>{more}"


def _side_cell(r: Row) -> str:
    what = f"{_e(r.mode)}: {_e(r.action)}" if r.action else "no action"
    extra = f" (rule {_e(r.rule)})" if r.rule else ""
    guards = f" [guards: {_e(', '.join(r.guards))}]" if r.guards else ""
    return f"{what}{extra}{guards}<br><small>score {r.score:.3f}</small>"


# --------------------------------------------------------------------------- series


def _by_series(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    out: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        out[(r.entity, r.metric)].append(r)
    return out


def pick_series(inp: ReportInput) -> list[tuple[str, str]]:
    """Series worth a plot first: most changes, then labelled, then acted on."""
    changed: dict[tuple[str, str], int] = defaultdict(int)
    for c in inp.changes:
        changed[(c.baseline.entity, c.baseline.metric)] += 1
    acted = {(r.entity, r.metric) for rows in (inp.base_rows, inp.cand_rows)
             for r in rows if r.action is not None}
    keys = sorted({(r.entity, r.metric) for r in inp.base_rows})

    def rank(k: tuple[str, str]) -> tuple:
        labelled = inp.labels is not None and inp.labels.covers(k[0])
        return (-changed.get(k, 0), not labelled, k not in acted, k)

    return sorted(keys, key=rank)[:inp.max_series]


def _markers(fig: go.Figure, rows: Sequence[Row], side: str, symbol: str) -> None:
    acting = [r for r in rows if r.acts]
    blocked = [r for r in rows if r.action is not None and not r.acts]
    if acting:
        fig.add_trace(go.Scatter(
            x=[r.ts for r in acting], y=[r.value for r in acting], mode="markers",
            name=f"{side} action", marker={"symbol": symbol, "size": 10,
                                           "color": COLORS[side],
                                           "line": {"width": 1, "color": "#000"}},
            text=[f"{r.mode}: {r.action} (rule {r.rule}), score {r.score:.3f}" for r in acting],
            hovertemplate="%{text}<extra></extra>"), row=1, col=1)
    if blocked:
        fig.add_trace(go.Scatter(
            x=[r.ts for r in blocked], y=[r.value for r in blocked], mode="markers",
            name=f"{side} blocked by a guard",
            marker={"symbol": "x-thin-open" if side == "baseline" else "x", "size": 9,
                    "color": COLORS[side]},
            text=[f"blocked: {', '.join(r.guards)}" for r in blocked],
            hovertemplate="%{text}<extra></extra>"), row=1, col=1)


def _scores_differ(a: Sequence[Row], b: Sequence[Row]) -> bool:
    return any(x.score != y.score for x, y in zip(a, b, strict=True))


def series_figure(inp: ReportInput, key: tuple[str, str], base: Sequence[Row],
                  cand: Sequence[Row]) -> go.Figure:
    entity, metric = key
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.62, 0.38],
                        vertical_spacing=0.05)
    xs, ys = decimate([r.ts for r in base], [r.value for r in base])
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=metric,
                             line={"color": COLORS["value"], "width": 1}), row=1, col=1)
    _markers(fig, base, "baseline", "triangle-up")
    _markers(fig, cand, "candidate", "circle")
    sides = [("baseline", base)] + ([("candidate", cand)] if _scores_differ(base, cand) else [])
    for side, rows in sides:
        sx, sy = decimate([r.ts for r in rows], [r.score for r in rows])
        fig.add_trace(go.Scatter(x=sx, y=sy, mode="lines", name=f"{side} score",
                                 line={"color": COLORS[side], "width": 1}), row=2, col=1)
    for side, variant in (("baseline", inp.baseline), ("candidate", inp.candidate)):
        for rule, thr in thresholds(variant.policy, entity, metric):
            fig.add_hline(y=thr, row=2, col=1, line_dash="dash", line_color=COLORS[side],
                          line_width=1, annotation_text=_e(f"{side} {rule} ≥ {thr:g}"),
                          annotation_position="top left", annotation_font_size=10)
    if inp.labels is not None:
        for start, end in inp.labels.windows.get(entity, ()):
            fig.add_vrect(x0=start, x1=end, fillcolor=COLORS["window"], line_width=0,
                          layer="below", row="all", col=1)
    shown = "every point" if len(xs) == len(base) else f"min/max of {len(xs) // 2} buckets"
    fig.update_layout(title=_e(f"{entity} / {metric}") + f" <sup>({len(base)} events, "
                      f"lines: {shown}; shaded: labelled windows)</sup>",
                      height=460, margin={"l": 60, "r": 20, "t": 60, "b": 30},
                      legend={"orientation": "h", "y": -0.08})
    fig.update_xaxes(type="date")
    fig.update_yaxes(title_text=_e(metric), row=1, col=1)
    fig.update_yaxes(title_text="anomaly score", range=[0, 1.02], row=2, col=1)
    return fig


# --------------------------------------------------------------------------- page


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ddd;
padding:.25rem .5rem;text-align:left;vertical-align:top;font-size:.9rem}
table.metrics td{text-align:right}caption{font-weight:bold;text-align:left}
tr.added td:first-child{color:#2ca02c}tr.removed td:first-child{color:#d62728}
tr.changed td:first-child{color:#9467bd}#render-errors{background:#fdd;padding:.5rem;
border:1px solid #d62728}code{background:#f4f4f4;padding:0 .2rem}
"""

# Any script error shows up on the page (and in the DOM, for headless checks);
# once loaded, the page records how many plots actually rendered.
_ERRORS_JS = """window.iaErrors=[];window.addEventListener('error',function(e){
window.iaErrors.push(String(e.message||e));var b=document.getElementById('render-errors');
if(b){b.hidden=false;b.textContent='Report error: '+window.iaErrors.join('; ');}});"""
_RENDERED_JS = """window.addEventListener('load',function(){setTimeout(function(){
var plots=document.querySelectorAll('.plotly-graph-div');var ok=0;
plots.forEach(function(p){if(p.querySelector('svg.main-svg')){ok++;}});
document.body.setAttribute('data-plots',String(plots.length));
document.body.setAttribute('data-rendered',String(ok));
document.body.setAttribute('data-errors',String(window.iaErrors.length));},0);});"""


def _header(inp: ReportInput) -> str:
    s = inp.summary
    src = s["source"]
    lab = s.get("labels")
    items = [f"<li>history: <code>{_e(json.dumps({k: v for k, v in src.items()}))}</code></li>"]
    for side, v in (("baseline", inp.baseline), ("candidate", inp.candidate)):
        d = v.describe()
        items.append(f"<li>{side}: <code>{_e(d['source'])}</code> (policy "
                     f"<code>{_e(d['policy'])}</code>, version {_e(d['policy_version'])}, "
                     f"{d['rules']} rules; detector overrides {_e(d['detector'] or 'none')})"
                     "</li>")
    items.append("<li>labels: " + (f"<code>{_e(lab['source'])}</code>, {lab['windows']} "
                                   f"windows on {lab['entities']} entities"
                                   if lab else "none") + "</li>")
    if inp.command:
        items.append(f"<li>command: <code>{_e(inp.command)}</code></li>")
    diff = s["diff"]
    return (f"<h1>Backtest: {_e(inp.baseline.name)} → {_e(inp.candidate.name)}</h1>"
            f"<ul>{''.join(items)}</ul>"
            f"<p><b>{diff['added']}</b> decisions added, <b>{diff['removed']}</b> removed, "
            f"<b>{diff['changed']}</b> changed, over {src['events']} events on "
            f"{src['entities']} entities.</p>")


def windows_table(summary: dict[str, Any]) -> str:
    """Decisions each freeze window held, per side: what a window costs and saves."""
    base = summary["baseline"].get("held_by_windows", {})
    cand = summary["candidate"].get("held_by_windows", {})
    if not base and not cand:
        return ""
    rows = []
    for name in sorted(set(base) | set(cand)):
        for side, held in (("baseline", base), ("candidate", cand)):
            modes = held.get(name, {})
            rows.append(f"<tr><td>{_e(name)}</td><td>{side}</td>"
                        f"<td>{modes.get('blocked', 0)}</td>"
                        f"<td>{modes.get('needs_approval', 0)}</td></tr>")
    return ("<table class='windows'><caption>Held by freeze windows</caption><tr>"
            "<th>window</th><th>side</th><th>blocked</th><th>downgraded to approval</th>"
            f"</tr>{''.join(rows)}</table>")


def render(inp: ReportInput) -> str:
    overview = _figure_html(overview_figure(inp), "overview")
    figs: list[str] = []
    base_by, cand_by = _by_series(inp.base_rows), _by_series(inp.cand_rows)
    series = pick_series(inp)
    for i, key in enumerate(series):
        figs.append(_figure_html(series_figure(inp, key, base_by[key], cand_by[key]),
                                 f"series-{i}"))
    total = len(base_by)
    note = f"<p>{len(series)} of {total} series shown (most changed first).</p>" \
        if len(series) < total else ""
    body = (
        "<div id='render-errors' hidden></div>" + _header(inp)
        + "<h2>Summary</h2>" + metrics_table(inp.summary) + confusion_table(inp.summary)
        + windows_table(inp.summary)
        + overview
        + "<h2>Decisions that differ</h2>" + changes_table(inp.changes)
        + "<h2>Series</h2>" + note + "".join(figs))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>Backtest {_e(inp.baseline.name)} vs {_e(inp.candidate.name)}</title>"
            f"<style>{_CSS}</style><script>{_ERRORS_JS}</script>"
            f"<script>{get_plotlyjs()}</script></head>"
            f"<body>{body}<script>{_RENDERED_JS}</script></body></html>\n")
