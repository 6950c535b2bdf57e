"""Timelines of an engine step: which task ran on which worker, when.

One layout serves the predicted timeline (the cost model's start/finish times stored
in the schedule) and the measured one (host-clock spans recorded by a CPU executor
while profiling), so the two can be drawn and compared the same way.

A flow is a cross-worker dependency as the kernel enforces it: task B waits on an
event that task A signals, and A runs on another worker than B.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from tilec.ir.attention import attention_chunks
from tilec.ir.schedule import Schedule
from tilec.ir.tasks import TRANSFER


@dataclass(frozen=True)
class TaskInfo:
    """What a trace event or a Gantt bar says about one task."""

    id: int
    kind: str            # the task kind (kernel opcode name)
    group: str
    tile: tuple[int, int, int]
    bytes: int
    flops: int
    waits: tuple[tuple[int, int], ...]   # (event, count)
    signal: int
    role: str            # the role that owns the task (target.roles)


@dataclass(frozen=True)
class Span:
    task: int
    worker: int
    start_us: float
    finish_us: float
    step: int = 0

    @property
    def dur_us(self) -> float:
        return self.finish_us - self.start_us


@dataclass(frozen=True)
class Flow:
    """An arrow from span `src` (the signalling task) to span `dst` (the waiter)."""

    src: int   # index into Timeline.spans
    dst: int
    event: int


@dataclass(frozen=True)
class Timeline:
    device: str                 # target name: one trace process per device
    source: str                 # "predicted (cost model)" or "measured (interpret)" ...
    roles: tuple[str, ...]      # per worker
    tasks: tuple[TaskInfo, ...]  # per task id
    spans: tuple[Span, ...]
    flows: tuple[Flow, ...]
    critical: frozenset[int] = frozenset()   # task ids on the critical path

    @property
    def workers(self) -> int:
        return len(self.roles)

    def worker_name(self, w: int) -> str:
        return f"worker {w} ({self.roles[w]})"


def task_kinds(manifest, schedule: Schedule) -> list[str]:
    """The kind (kernel opcode name) of every task, by task id. A split attention
    group's opcode runs two kinds of task: partials over chunks of keys and, in the
    last tile column, their merge."""
    groups = schedule.taskgraph.fused.groups
    index = {g.name: i for i, g in enumerate(groups)}
    split = {t.group: attention_chunks(t) for t in schedule.taskgraph.tilings
             if t.grid[2] > 1}
    kinds = []
    for t in schedule.taskgraph.tasks:
        if t.group == TRANSFER:   # multi-device: a message the host's comm worker runs
            kinds.append(TRANSFER)
            continue
        kind = manifest.kinds[manifest.opcodes[index[t.group]]]
        if groups[index[t.group]].kind == "attention" and t.group in split:
            kind += "_merge" if t.tile[2] == split[t.group] else "_partial"
        kinds.append(kind)
    return kinds


def task_infos(manifest, schedule: Schedule) -> tuple[TaskInfo, ...]:
    kinds = task_kinds(manifest, schedule)
    roles = schedule.task_roles()
    return tuple(
        TaskInfo(t.id, kinds[t.id], t.group, tuple(t.tile), t.bytes, t.flops,
                 tuple((w.event, w.count) for w in schedule.waits[t.id]), schedule.signal[t.id],
                 roles[t.id])
        for t in schedule.taskgraph.tasks)


def signallers(schedule: Schedule) -> dict[int, list[int]]:
    """event -> the task ids that signal it."""
    out: dict[int, list[int]] = {}
    for tid, ev in enumerate(schedule.signal):
        out.setdefault(ev, []).append(tid)
    return out


def cross_worker_edges(schedule: Schedule) -> list[tuple[int, int, int]]:
    """(signalling task, waiting task, event) for every wait satisfied by a task on
    another worker: the synchronisation that crosses workers."""
    where = schedule.worker_of()
    by_event = signallers(schedule)
    edges = []
    for tid, waits in enumerate(schedule.waits):
        for w in waits:
            for src in by_event.get(w.event, ()):
                if where[src][0] != where[tid][0]:
                    edges.append((src, tid, w.event))
    return edges


def _flows(schedule: Schedule, spans: list[Span]) -> tuple[Flow, ...]:
    index = {(s.step, s.task): i for i, s in enumerate(spans)}
    steps = sorted({s.step for s in spans})
    flows = []
    for step in steps:
        for src, dst, ev in cross_worker_edges(schedule):
            a, b = index.get((step, src)), index.get((step, dst))
            if a is not None and b is not None:
                flows.append(Flow(a, b, ev))
    return tuple(flows)


def predicted(manifest, schedule: Schedule, critical: Iterable[int] = ()) -> Timeline:
    """The cost model's timeline, as the schedule pass placed the tasks."""
    spans = [Span(tid, w, schedule.start_us[tid], schedule.finish_us[tid])
             for w, queue in enumerate(schedule.queues) for tid in queue]
    spans.sort(key=lambda s: (s.start_us, s.worker))
    return Timeline(schedule.target.name, "predicted (cost model)",
                    _worker_roles(schedule), task_infos(manifest, schedule),
                    tuple(spans), _flows(schedule, spans), frozenset(critical))


def measured(manifest, schedule: Schedule, records: Iterable[tuple[int, int, int, float, float]],
             backend: str) -> Timeline:
    """A timeline from an executor's profile records (step, worker, task, start s, end s),
    times made relative to the first start and converted to microseconds."""
    records = list(records)
    t0 = min((r[3] for r in records), default=0.0)
    spans = [Span(tid, w, (a - t0) * 1e6, (b - t0) * 1e6, step)
             for step, w, tid, a, b in records]
    spans.sort(key=lambda s: (s.start_us, s.worker))
    return Timeline(schedule.target.name, f"measured ({backend})",
                    _worker_roles(schedule), task_infos(manifest, schedule),
                    tuple(spans), _flows(schedule, spans))


def _worker_roles(schedule: Schedule) -> tuple[str, ...]:
    """The role of each worker that has a queue ("none" where no role lists it)."""
    names = schedule.target.worker_roles()
    return tuple((names[w] if w < len(names) else "") or "none"
                 for w in range(schedule.workers))


def span_args(timeline: Timeline, span: Span) -> dict[str, Any]:
    info = timeline.tasks[span.task]
    args: dict[str, Any] = {
        "task": info.id, "kind": info.kind, "group": info.group, "tile": list(info.tile),
        "bytes": info.bytes, "flops": info.flops,
        "waits": [{"event": e, "count": c} for e, c in info.waits],
        "signal": info.signal, "role": info.role, "step": span.step,
    }
    if info.id in timeline.critical:
        args["critical_path"] = True
    return args
