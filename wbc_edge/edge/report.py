"""The stream's HTML report: one self-contained file (thumbnails embedded) a hematologist can open.

Sections: the differential count table, rare-cell alerts, a few cells per class, the flagged cells
(rare first, then low confidence), and the run's throughput and timing.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

from ..taxonomy import FULL_NAMES, RARE_CODES

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child,td.l{text-align:left}
tr.rare td{background:#fde2e1}
.cells{display:flex;flex-wrap:wrap;gap:.5em;margin-bottom:1em}
figure{margin:0;width:104px;font-size:11px;text-align:center}
figure img{width:96px;height:96px;border:3px solid #4a4}
figure.rare img{border-color:#d22} figure.low_confidence img{border-color:#e90}
.alert{color:#b00;font-weight:bold}
.drift{border:2px solid #d22;background:#fde2e1;padding:.5em 1em;margin:1em 0}
"""


def _esc(v) -> str:
    return html.escape("" if v is None else str(v))


def _count_table(diff: dict) -> str:
    rows = []
    for code, c in diff.get("classes", {}).items():
        pct = f"{c['percent_of_wbc']:.1f}%" if c.get("percent_of_wbc") is not None else "–"
        cls = ' class="rare"' if code in RARE_CODES and c["count"] else ""
        rows.append(f"<tr{cls}><td>{_esc(code)}</td><td class=l>{_esc(FULL_NAMES.get(code, ''))}</td>"
                    f"<td>{c['count']}</td><td>{pct}</td></tr>")
    return ("<table><tr><th>class</th><th>name</th><th>cells</th><th>% of WBC</th></tr>"
            + "".join(rows) + f"<tr><th>total</th><th></th><th>{diff.get('n_cells', 0)}</th>"
            f"<th>{diff.get('n_wbc', 0)} WBC</th></tr></table>")


def _alerts(diff: dict) -> str:
    alerts = diff.get("rare_alerts", {})
    if not alerts:
        return "<p>No rare cells (BL, PMY, MY, MMY, PC, PLY, VLY) were predicted.</p>"
    held = lambda a: ", held as unverified (site shift)" if a.get("held") else ""  # noqa: E731
    items = "".join(f"<li class=alert>{_esc(c)} ({_esc(FULL_NAMES.get(c, ''))}): {a['count']} cell(s)"
                    f"{held(a)}</li>" for c, a in alerts.items())
    return f"<ul>{items}</ul><p>Every flagged cell is in <code>review/</code> with its prediction.</p>"


def _figure(item: dict) -> str:
    flags = item.get("flags") or []
    cls = "rare" if "rare" in flags or "rare_possible" in flags else "low_confidence" if flags else ""
    src = base64.b64encode(item["jpeg"]).decode("ascii")
    top = ", ".join(f"{c} {p:.2f}" for c, p in (item.get("top_k") or [])[:3])
    where = f"{Path(str(item.get('source', ''))).name} #{item.get('frame')}"
    return (f'<figure class="{cls}"><img src="data:image/jpeg;base64,{src}" title="{_esc(top)}">'
            f"<figcaption><b>{_esc(item.get('pred'))}</b> {item.get('confidence', 0):.2f}<br>"
            f"{_esc(where)}</figcaption></figure>")


def _gallery(gallery: dict[str, list[dict]]) -> str:
    parts = []
    for code, items in gallery.items():
        if items:
            parts.append(f"<h3>{_esc(code)} — {_esc(FULL_NAMES.get(code, ''))}</h3>"
                         f"<div class=cells>{''.join(_figure(i) for i in items)}</div>")
    return "".join(parts) or "<p>No cells were classified.</p>"


def _run_table(s: dict) -> str:
    lat, rss = s.get("latency_ms") or {}, s.get("rss_mb") or {}
    rows = [("status", s.get("status")), ("frames", s.get("frames")),
            ("unreadable frames", s.get("errors", {}).get("count")),
            ("frames restored (salt-and-pepper noise)", s.get("restored_frames", 0)),
            ("cells", s.get("cells")), ("frames/s", s.get("fps")), ("cells/s", s.get("cells_per_s")),
            ("latency p50 / p99 (ms)", f"{lat.get('p50')} / {lat.get('p99')}"),
            ("runner", s.get("runner")), ("TTA views", ", ".join(s.get("views") or [])),
            ("RSS start / end (MB)", f"{rss.get('start')} / {rss.get('end')}")]
    stages = "".join(f"<tr><td>{_esc(k)}</td><td>{v['total_s']:.2f}</td><td>{v['ms_per_frame']:.2f}</td></tr>"
                     for k, v in (s.get("timing") or {}).items())
    return ("<table>" + "".join(f"<tr><td>{_esc(k)}</td><td class=l>{_esc(v)}</td></tr>" for k, v in rows)
            + "</table><table><tr><th>stage</th><th>total s</th><th>ms / frame</th></tr>"
            + stages + "</table>")


def _errors(s: dict) -> str:
    ex = s.get("errors", {}).get("examples") or []
    if not ex:
        return ""
    items = "".join(f"<li>{_esc(e.get('source'))} #{e.get('index')}: {_esc(e.get('error'))}</li>" for e in ex)
    return f"<h2>Unreadable input (first {len(ex)} of {s['errors']['count']})</h2><ul>{items}</ul>"


def _site_monitor(s: dict) -> str:
    """A warning box when the site monitor fired, and its score per slide."""
    drift = s.get("drift") or {}
    if not drift.get("threshold"):
        return (f"<h2>Site monitor</h2><p>{_esc(drift.get('status') or 'not run')}: no comparison with the "
                "training cells.</p>")
    rows = "".join(f"<tr><td class=l>{_esc(k or '(input)')}</td><td>{r['n']}</td><td>{r['score']:.1f}</td>"
                   f"<td class=l>{'ALARM' if r['alarm'] else 'ok'}</td><td class=l>"
                   + _esc(", ".join(f"{t['what']} {t['z']:+.1f}" for t in r["top"][:2])) + "</td></tr>"
                   for k, r in drift.get("slides", {}).items())
    return (f"<h2>Site monitor</h2><p>Distance from the {_esc(drift.get('reference'))} statistics (threshold "
            f"{drift['threshold']:g}).</p><table><tr><th>slide</th><th>cells</th><th>score</th><th>state</th>"
            f"<th>furthest statistics (z)</th></tr>{rows}</table>")


def _drift_warning(s: dict) -> str:
    drift = s.get("drift") or {}
    return f"<div class=drift><b>Warning.</b> {_esc(drift['reason'])}</div>" if drift.get("alarm") else ""


def write_report(path, summary: dict, gallery: dict[str, list[dict]], flagged: list[dict]) -> Path:
    """Write the report; `gallery` maps class -> thumbnails, `flagged` lists flagged thumbnails.

    A thumbnail item is {'jpeg': bytes, 'pred', 'confidence', 'top_k', 'flags', 'source', 'frame'}.
    """
    path = Path(path)
    diff = summary.get("differential") or {}
    body = (f"<h1>wbc-edge stream report</h1><p>Source <code>{_esc(summary.get('source'))}</code>, "
            f"bundle <code>{_esc(summary.get('bundle'))}</code></p>{_drift_warning(summary)}"
            f"<h2>Differential count</h2>{_count_table(diff)}<h2>Rare-cell alerts</h2>{_alerts(diff)}"
            f"<h2>Flagged cells ({len(flagged)} shown)</h2>"
            f"<div class=cells>{''.join(_figure(i) for i in flagged) or 'none'}</div>"
            f"<h2>Cells by class</h2>{_gallery(gallery)}{_site_monitor(summary)}"
            f"<h2>Run</h2>{_run_table(summary)}"
            f"{_errors(summary)}")
    from .sinks import atomic_write_text  # a full disk leaves the previous report, not half of this one

    atomic_write_text(path, f"<!doctype html><html><head><meta charset=utf-8><title>wbc-edge report</title>"
                            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")
    return path


# ---- plain text, for the command line ----------------------------------------------------------
def summary_text(summary: dict) -> str:
    """The differential table and one line of run figures, as `wbc-edge stream` prints them."""
    diff, lines = summary.get("differential") or {}, []
    for code, c in diff.get("classes", {}).items():
        if c["count"]:
            pct = f"{c['percent_of_wbc']:5.1f}%" if c.get("percent_of_wbc") is not None else "   --"
            lines.append(f"{code:9s} {c['count']:7d}  {pct}{'  RARE' if code in RARE_CODES else ''}")
    for code, a in (diff.get("rare_alerts") or {}).items():
        held = (f", held as unverified (site shift; {a.get('unverified', 0)} cell(s) flagged)"
                if a.get("held") else "")
        lines.append(f"ALERT: {a['count']} {code} ({FULL_NAMES.get(code, code)}) cell(s){held}: see review/")
    lat, n_bad = summary.get("latency_ms") or {}, (summary.get("errors") or {}).get("count", 0)
    lines.append(f"{summary.get('status')}: {summary.get('frames')} frames, {summary.get('cells')} cells, "
                 f"{n_bad} unreadable; {summary.get('fps')} frames/s, "
                 f"latency p50 {lat.get('p50')} ms / p99 {lat.get('p99')} ms")
    if summary.get("restored_frames"):
        lines.append(f"{summary['restored_frames']} frame(s) had salt-and-pepper noise, restored before "
                     "classification (rows marked `restored`)")
    lines += _drift_lines(summary.get("drift") or {})
    if summary.get("error"):
        lines.append(f"error: {summary['error']}")
    return "\n".join(lines)


def _drift_lines(drift: dict) -> list[str]:
    """The site monitor in one line (ok, or no statistics), or the warning with each slide's score."""
    if not drift.get("threshold"):
        return [f"site monitor: {drift['status']}"] if drift.get("status") else []
    scores = ", ".join(f"{k or 'input'} {r['score']:.1f}" for k, r in drift.get("slides", {}).items())
    if not drift.get("alarm"):
        return [f"site monitor: ok (score {scores or '-'}, threshold {drift['threshold']:g})"]
    return [f"WARNING: {drift['reason']}",
            f"site monitor scores: {scores} (threshold {drift['threshold']:g})"]
