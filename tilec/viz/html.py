"""`tilec inspect --html`: one self-contained page (inline CSS, SVG and script; no
network) with the summary, a Gantt chart of the predicted timeline, per-worker
utilisation and the fusion groups.

The Gantt chart is drawn in the browser by a small inline script from the timeline
embedded as JSON: one `<rect class="task">` per task (coloured by kind), one
`<rect class="critical">` outline over each task of the critical path, and a
`<line class="flow">` per cross-worker dependency.
"""
from __future__ import annotations

import html
import json
from typing import Any

from tilec.passes.roles import format_workers
from tilec.viz.text import roles_line
from tilec.viz.timeline import Timeline

STYLE = """
body { font: 13px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; max-width: 1200px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 15px; margin: 20px 0 6px; }
.sub { color: #666; margin-bottom: 12px; }
table { border-collapse: collapse; margin: 4px 0; }
td, th { padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
th { border-bottom: 1px solid #ccc; font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 6px 12px; }
.card b { display: block; font-size: 17px; }
.bar { background: #eee; width: 220px; height: 12px; border-radius: 3px; }
.bar div { background: #0072B2; height: 12px; border-radius: 3px; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
rect.task { stroke: #fff; stroke-width: 0.5; }
rect.critical { fill: none; stroke: #d00; stroke-width: 2; }
line.flow { stroke: #555; stroke-opacity: 0.35; stroke-width: 1; }
.legend span { display: inline-block; margin-right: 12px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
ul.groups { padding-left: 18px; } ul.groups li { margin: 2px 0; }
.anchor { font-weight: 700; } .ops { color: #555; }
"""

# Draws the Gantt chart into #gantt from the JSON in #timeline-data.
SCRIPT = r"""
(function () {
  var d = JSON.parse(document.getElementById('timeline-data').textContent);
  var NS = 'http://www.w3.org/2000/svg';
  var left = 150, right = 40, top = 24, row = 26, barH = 18, width = 1100;
  var end = 0;
  d.spans.forEach(function (s) { end = Math.max(end, s.finish_us); });
  if (end <= 0) end = 1;
  var scale = (width - left - right) / end;
  var height = top + row * d.workers + 30;
  var svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('width', width); svg.setAttribute('height', height);
  svg.setAttribute('viewBox', '0 0 ' + width + ' ' + height);
  function el(name, attrs, parent) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    (parent || svg).appendChild(e);
    return e;
  }
  function x(t) { return left + t * scale; }
  for (var w = 0; w < d.workers; w++) {
    var y = top + w * row;
    el('rect', {x: left, y: y, width: width - left - right, height: row - 2,
                fill: w % 2 ? '#fafafa' : '#f3f3f3'});
    el('text', {x: 6, y: y + row / 2 + 4}).textContent = d.names[w];
  }
  var ticks = 8;
  for (var i = 0; i <= ticks; i++) {
    var t = end * i / ticks, tx = x(t);
    el('line', {x1: tx, x2: tx, y1: top - 4, y2: top + row * d.workers, stroke: '#ddd'});
    el('text', {x: tx, y: top + row * d.workers + 16, 'text-anchor': 'middle'}).textContent =
      (t >= 1000 ? (t / 1000).toFixed(1) + ' ms' : t.toFixed(1) + ' us');
  }
  var mid = {};
  d.spans.forEach(function (s) {
    var y = top + s.worker * row + (row - 2 - barH) / 2;
    var bar = el('rect', {'class': 'task', x: x(s.start_us), y: y,
                          width: Math.max(1, (s.finish_us - s.start_us) * scale), height: barH,
                          fill: d.colours[s.kind], 'data-task': s.task});
    el('title', {}, bar).textContent = 'task ' + s.task + ': ' + s.kind + ' ' + s.group +
      ' tile ' + JSON.stringify(s.tile) + ', role ' + s.role + '\n' +
      s.start_us.toFixed(1) + ' - ' + s.finish_us.toFixed(1) + ' us, ' + s.bytes + ' bytes, ' +
      s.flops + ' flops';
    mid[s.task] = {x0: x(s.start_us), x1: x(s.finish_us), y: y + barH / 2};
  });
  d.spans.forEach(function (s) {
    if (!s.critical) return;
    var y = top + s.worker * row + (row - 2 - barH) / 2;
    el('rect', {'class': 'critical', x: x(s.start_us), y: y,
                width: Math.max(1, (s.finish_us - s.start_us) * scale), height: barH,
                'data-task': s.task});
  });
  d.flows.forEach(function (f) {
    var a = mid[f[0]], b = mid[f[1]];
    if (a && b) el('line', {'class': 'flow', x1: a.x1, y1: a.y, x2: b.x0, y2: b.y});
  });
  var holder = document.getElementById('gantt');
  holder.innerHTML = '';
  holder.appendChild(svg);
})();
"""


def _kind_colours(kinds: list[str]) -> dict[str, str]:
    from tilec.viz.dot import PALETTE

    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(sorted(set(kinds)))}


def _timeline_data(timeline: Timeline) -> dict[str, Any]:
    kinds = [t.kind for t in timeline.tasks]
    spans = []
    for s in timeline.spans:
        info = timeline.tasks[s.task]
        spans.append({"task": s.task, "worker": s.worker, "start_us": s.start_us,
                      "finish_us": s.finish_us, "kind": info.kind, "group": info.group,
                      "tile": list(info.tile), "bytes": info.bytes, "flops": info.flops,
                      "role": info.role, "critical": s.task in timeline.critical})
    flows = [[timeline.spans[f.src].task, timeline.spans[f.dst].task] for f in timeline.flows]
    return {"workers": timeline.workers,
            "names": [timeline.worker_name(w) for w in range(timeline.workers)],
            "spans": spans, "flows": flows, "colours": _kind_colours(kinds)}


def _script_json(data: Any) -> str:
    # "</" would end the script element early.
    return json.dumps(data).replace("</", "<\\/")


def _legend(timeline: Timeline) -> str:
    colours = _kind_colours([t.kind for t in timeline.tasks])
    items = "".join(f'<span><i style="background:{c}"></i>{html.escape(k)}</span>'
                    for k, c in colours.items())
    return (f'<div class="legend">{items}<span><i style="border:2px solid #d00;'
            f'width:7px;height:7px"></i>critical path</span></div>')


def gantt_section(timeline: Timeline) -> str:
    return (f"<h2>Timeline: {html.escape(timeline.source)}</h2>{_legend(timeline)}"
            '<div id="gantt"><noscript>the chart needs JavaScript</noscript></div>'
            f'<script type="application/json" id="timeline-data">'
            f"{_script_json(_timeline_data(timeline))}</script>"
            f"<script>{SCRIPT}</script>")


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    def cell(tag, i, v):
        cls = ' class="n"' if i in numeric else ""
        return f"<{tag}{cls}>{html.escape(str(v))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _us(x: float) -> str:
    return f"{x / 1000:.2f} ms" if x >= 1000 else f"{x:.1f} us"


def report_html(s: dict[str, Any], timeline: Timeline) -> str:
    """The whole report page for summary `s` (tilec.inspect.summary) and the predicted
    timeline."""
    e = html.escape
    cards = [("predicted step", _us(s["predicted_step_us"])),
             ("lower bound", _us(s["lower_bound_us"])),
             ("critical path", f"{_us(s['critical_path_us'])}, {len(s['critical_path'])} tasks"),
             ("tasks", s["tasks"]), ("workers", s["workers"]), ("events", s["events"]),
             ("waits", f"{s['waits']} ({s['cross_worker_waits']} cross-worker)")]
    parts = [f"<h1>{e(s['model'])}</h1>",
             f'<div class="sub">target {e(s["target"])} ({e(s["backend"])}); roles: '
             + e(roles_line(s["roles"]))
             + "</div>",
             '<div class="cards">' + "".join(f"<div class=\"card\">{e(k)}<b>{e(str(v))}</b></div>"
                                             for k, v in cards) + "</div>",
             gantt_section(timeline)]

    util = "".join(
        f"<tr><td>worker {w['worker']} ({e(w['role'])})</td><td class=\"n\">{w['tasks']}</td>"
        f"<td class=\"n\">{_us(w['busy_us'])}</td><td class=\"n\">{w['utilisation']:.0%}</td>"
        f"<td><div class=\"bar\"><div style=\"width:{100 * w['utilisation']:.1f}%\">"
        "</div></div></td></tr>"
        for w in s["per_worker"])
    parts.append("<h2>Workers</h2><table><tr><th>worker</th><th class=\"n\">tasks</th>"
                 "<th class=\"n\">busy</th><th class=\"n\">utilisation</th><th></th></tr>"
                 f"{util}</table>")
    if len(s["roles"]) > 1:
        parts.append("<h2>Roles</h2>" + _table(
            ["role", "workers", "owns", "tasks", "busy"],
            [[r["name"], format_workers(r["workers"]), ", ".join(r["kinds"] + r["ops"])
              or "the rest", r["tasks"], _us(r["busy_us"])] for r in s["roles"]], {3, 4}))
    parts.append("<h2>Task kinds</h2>" + _table(["kind", "tasks"],
                                                 [[k, n] for k, n in s["task_kinds"].items()], {1}))
    b = s["bytes"]
    parts.append("<h2>Bytes per step</h2>" + _table(
        ["", "bytes"],
        [["weights", f"{b['weights']:,}"], ["KV cache", f"{b['kv']:,}"],
         ["intermediates", f"{b['intermediate']:,}"],
         ["intermediates, unfused op by op", f"{b['intermediate_unfused']:,}"],
         ["cost model total", f"{b['cost_model']:,}"]], {1}))
    parts.append("<h2>Critical path</h2>" + _table(
        ["task", "kind", "group", "tile", "worker", "start", "finish"],
        [[c["task"], c["kind"], c["group"], tuple(c["tile"]), c["worker"], _us(c["start_us"]),
          _us(c["finish_us"])] for c in s["critical_path"]], {0, 4, 5, 6}))
    groups = []
    for g in s["fusion_groups"]:
        ops = " ".join(f'<span class="anchor">{e(o)}</span>' if o == g["anchor"] else e(o)
                       for o in g["ops"])
        groups.append(f'<li><b>{e(g["name"])}</b> ({e(g["kind"])}, {g["tasks"]} tasks): '
                      f'<span class="ops">{ops}</span></li>')
    parts.append(f"<h2>Fusion groups ({s['groups']})</h2><ul class=\"groups\">"
                 + "".join(groups) + "</ul>")
    k = s["kernel"]
    aot = ""
    if k.get("aot"):
        a = k["aot"]
        aot = (f"; sm_{a['arch']}: {a['n_regs']} registers, {a['n_spills']} spill bytes, "
               f"{a['shared']} bytes shared memory")
    parts.append(f"<h2>Kernel</h2><p>{k['source_lines']} lines, {k['opcodes']} opcodes over "
                 f"{len(k['task_kinds'])} task kinds "
                 f"({e(', '.join(k['task_kinds']))}), at most {k['max_waits']} waits per "
                 f"task{e(aot)}</p>")
    return page(f"tilec: {s['model']}", "".join(parts))


def timeline_html(timeline: Timeline, title: str) -> str:
    """A page with only the Gantt chart (for pictures of the timeline)."""
    return page(title, f"<h1>{html.escape(title)}</h1>{gantt_section(timeline)}")


def page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>\n")
