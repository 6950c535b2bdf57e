"""deps: TaskGraph -> TaskGraph with `deps`.

Two tasks conflict when their regions of one buffer overlap and at least one writes:
read-after-write, write-after-read and write-after-write, in program order (task id
order). Boxes are compared per buffer with numpy, a block of regions at a time, since
a decode step has thousands of tasks reading the same few buffers.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np

from tilec.ir.tasks import Dep, TaskGraph

BLOCK = 2048   # regions compared at once (bounds the overlap matrix)


def _boxes(regions: list) -> np.ndarray:
    return np.array([r.box for _, r in regions], dtype=np.int64).reshape(len(regions), -1, 2)


def _pairs(first: list, second: list, kind: str, buffer: str, out: dict) -> None:
    """Deps between accesses in `first` and overlapping, later accesses in `second`."""
    if not first or not second:
        return
    a_ids = np.array([t for t, _ in first])
    a_box = _boxes(first)
    for start in range(0, len(second), BLOCK):
        chunk = second[start:start + BLOCK]
        b_ids = np.array([t for t, _ in chunk])
        b_box = _boxes(chunk)
        overlap = np.all((b_box[:, None, :, 0] < a_box[None, :, :, 1])
                         & (a_box[None, :, :, 0] < b_box[:, None, :, 1]), axis=2)
        later = b_ids[:, None] > a_ids[None, :]
        bi, ai = np.nonzero(overlap & later)
        for before, after in zip(a_ids[ai].tolist(), b_ids[bi].tolist()):
            key = (before, after)
            if key not in out:
                out[key] = Dep(before, after, kind, buffer)


def conflicts(taskgraph: TaskGraph) -> list[Dep]:
    reads: dict[str, list] = defaultdict(list)
    writes: dict[str, list] = defaultdict(list)
    for task in taskgraph.tasks:
        for region in task.reads:
            reads[region.buffer].append((task.id, region))
        for region in task.writes:
            writes[region.buffer].append((task.id, region))
    deps: dict[tuple[int, int], Dep] = {}
    for buffer, ws in writes.items():
        _pairs(ws, reads.get(buffer, []), "RAW", buffer, deps)
        _pairs(reads.get(buffer, []), ws, "WAR", buffer, deps)
        _pairs(ws, ws, "WAW", buffer, deps)
    return sorted(deps.values(), key=lambda d: (d.after, d.before))


def deps(taskgraph: TaskGraph) -> TaskGraph:
    return replace(taskgraph, deps=tuple(conflicts(taskgraph)))
