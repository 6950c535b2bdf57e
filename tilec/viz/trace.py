"""Chrome / Perfetto trace JSON (the "Trace Event Format") of a Timeline.

Layout, the same for predicted and measured timelines so the two open side by side in
https://ui.perfetto.dev or chrome://tracing:
  * one process per device (pid 0, named "<target>: <source>"),
  * one thread (track) per worker, named "worker <w> (<role>)",
  * one complete event (ph "X") per task run, named by its kind, with task, group,
    tile, bytes, flops, waits and signal in `args`; times in microseconds,
  * one flow (ph "s" on the signalling task, ph "f" with bp "e" on the waiting task,
    sharing an `id`, each stamped at the middle of its task) per cross-worker
    dependency: Perfetto draws it as an arrow from the first task to the second.
"""
from __future__ import annotations

import json
import os
from typing import Any

from tilec.viz.timeline import Timeline, span_args

PID = 0
MIN_DUR_US = 1e-3   # the format wants positive durations; a clock tick can read 0


def chrome_trace(timeline: Timeline) -> dict[str, Any]:
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": PID,
         "args": {"name": f"{timeline.device}: {timeline.source}"}},
    ]
    for w in range(timeline.workers):
        events.append({"ph": "M", "name": "thread_name", "pid": PID, "tid": w,
                       "args": {"name": timeline.worker_name(w)}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": PID, "tid": w,
                       "args": {"sort_index": w}})
    for span in timeline.spans:
        events.append({"ph": "X", "name": timeline.tasks[span.task].kind, "cat": "task",
                       "pid": PID, "tid": span.worker, "ts": span.start_us,
                       "dur": max(span.dur_us, MIN_DUR_US), "args": span_args(timeline, span)})
    for i, flow in enumerate(timeline.flows):
        src, dst = timeline.spans[flow.src], timeline.spans[flow.dst]
        common = {"name": f"event {flow.event}", "cat": "dependency", "id": i + 1, "pid": PID}
        events.append({**common, "ph": "s", "tid": src.worker, "ts": _middle(src)})
        events.append({**common, "ph": "f", "bp": "e", "tid": dst.worker, "ts": _middle(dst)})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"device": timeline.device, "source": timeline.source,
                          "workers": timeline.workers}}


def _middle(span) -> float:
    """Flow ends bind to the slice enclosing their time stamp: the middle of a slice is
    unambiguous, where its start may be the previous slice's end."""
    return span.start_us + max(span.dur_us, MIN_DUR_US) / 2


def write_chrome_trace(timeline: Timeline, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(chrome_trace(timeline), f)
