"""Chrome / Perfetto trace JSON (the "Trace Event Format") of a Timeline.

Layout, the same for predicted and measured timelines so the two open side by side in
https://ui.perfetto.dev or chrome://tracing:
  * one process per device (pid 0, named "<target>: <source>"; a multi-device engine:
    pid = device, named "device <d> (<target>): <source>", with a flow from each
    transfer part's sender to each receiver),
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

from tilec.ir.tasks import TRANSFER
from tilec.viz.timeline import Timeline, span_args

PID = 0
MIN_DUR_US = 1e-3   # the format wants positive durations; a clock tick can read 0


def chrome_trace(timeline: Timeline, PID: int = PID, first_flow: int = 1) -> dict[str, Any]:
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
        common = {"name": f"event {flow.event}", "cat": "dependency", "id": i + first_flow,
                  "pid": PID}
        events.append({**common, "ph": "s", "tid": src.worker, "ts": _middle(src)})
        events.append({**common, "ph": "f", "bp": "e", "tid": dst.worker, "ts": _middle(dst)})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"device": timeline.device, "source": timeline.source,
                          "workers": timeline.workers}}


def _middle(span) -> float:
    """Flow ends bind to the slice enclosing their time stamp: the middle of a slice is
    unambiguous, where its start may be the previous slice's end."""
    return span.start_us + max(span.dur_us, MIN_DUR_US) / 2


def devices_trace(timelines: list[Timeline], transfers) -> dict[str, Any]:
    """A multi-device engine's timelines in one trace: one process per device (pid =
    device), and a flow from each transfer part's sender to each of its receivers
    (`transfers`: the engine's, by sequence number)."""
    events: list[dict[str, Any]] = []
    flows = 1
    ends: dict[int, dict[int, Any]] = {}   # transfer seq -> device -> its span
    for d, timeline in enumerate(timelines):
        own = chrome_trace(timeline, d, flows)["traceEvents"]
        own[0]["args"]["name"] = f"device {d} ({timeline.device}): {timeline.source}"
        events += own
        flows += len(timeline.flows)
        for span in timeline.spans:
            task = timeline.tasks[span.task]
            if task.group == TRANSFER:
                ends.setdefault(task.tile[0], {})[d] = span
    for seq, spans in sorted(ends.items()):
        for part in transfers[seq].parts:
            for d in part.dsts:
                if part.src not in spans or d not in spans:
                    continue
                sent, got = spans[part.src], spans[d]
                common = {"name": f"transfer {seq}: {part.region.buffer}", "cat": "transfer",
                          "id": flows}
                events.append({**common, "ph": "s", "pid": part.src, "tid": sent.worker,
                               "ts": _middle(sent)})
                events.append({**common, "ph": "f", "bp": "e", "pid": d, "tid": got.worker,
                               "ts": _middle(got)})
                flows += 1
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"devices": len(timelines), "source": timelines[0].source}}


def write_chrome_trace(timeline: Timeline | list[Timeline], path: str | os.PathLike,
                       transfers=()) -> None:
    """One timeline, or one per device of a multi-device engine (then its `transfers`,
    see devices_trace)."""
    data = devices_trace(timeline, transfers) if isinstance(timeline, list) \
        else chrome_trace(timeline)
    with open(path, "w") as f:
        json.dump(data, f)
