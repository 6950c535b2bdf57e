"""deps: TaskGraph -> TaskGraph with `deps`.

Two tasks conflict when their regions of one buffer overlap and at least one writes:
read-after-write, write-after-read and write-after-write, in program order.
"""
from __future__ import annotations

from dataclasses import replace

from tilec.ir.tasks import Dep, TaskGraph


def conflicts(taskgraph: TaskGraph) -> list[Dep]:
    deps: dict[tuple[int, int], Dep] = {}
    writes: dict[str, list] = {}
    reads: dict[str, list] = {}
    for task in taskgraph.tasks:
        found: list[Dep] = []
        for region in task.reads:
            for other, oregion in writes.get(region.buffer, ()):
                if region.overlaps(oregion):
                    found.append(Dep(other, task.id, "RAW", region.buffer))
        for region in task.writes:
            for other, oregion in reads.get(region.buffer, ()):
                if other != task.id and region.overlaps(oregion):
                    found.append(Dep(other, task.id, "WAR", region.buffer))
            for other, oregion in writes.get(region.buffer, ()):
                if region.overlaps(oregion):
                    found.append(Dep(other, task.id, "WAW", region.buffer))
        for dep in found:
            deps.setdefault((dep.before, dep.after), dep)
        for region in task.reads:
            reads.setdefault(region.buffer, []).append((task.id, region))
        for region in task.writes:
            writes.setdefault(region.buffer, []).append((task.id, region))
    return sorted(deps.values(), key=lambda d: (d.after, d.before))


def deps(taskgraph: TaskGraph) -> TaskGraph:
    return replace(taskgraph, deps=tuple(conflicts(taskgraph)))
