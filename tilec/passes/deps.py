"""deps: TaskGraph -> TaskGraph with `deps`.

Two tasks conflict when their regions of one buffer overlap and at least one writes:
read-after-write, write-after-read and write-after-write, in program order (task id
order). Boxes are compared per buffer with numpy, a block of regions at a time, since
a decode step has thousands of tasks reading the same few buffers.

A pair of tasks gets one dep even when they conflict on several buffers or in several
ways: the first found, buffers in the order their first write appears, and per buffer
RAW, then WAR, then WAW. Pairs are collected and de-duplicated as arrays; only the
final deps become `Dep` objects (a Llama-1B decode step has 2.3 M of them, and a
Python loop per pair took seconds).
"""
from __future__ import annotations

import gc
from collections import defaultdict
from dataclasses import replace

import numpy as np

from tilec.ir.tasks import TRANSFER, Dep, TaskGraph
from tilec.passes.geometry import box_array, overlap_matrix
from tilec.passes.cost import DepTuple

BLOCK = 2048   # regions compared at once (bounds the overlap matrix)
KINDS = ("RAW", "WAR", "WAW")   # and ORDER: transfers in sequence (transfer_chain)


def _pairs(first: list, second: list) -> tuple[np.ndarray, np.ndarray]:
    """(before, after) task ids: accesses in `first` and overlapping, later accesses in
    `second`."""
    if not first or not second:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    found = []
    a_ids = np.array([t for t, _ in first], dtype=np.int64)
    a_box = box_array([r for _, r in first])
    for start in range(0, len(second), BLOCK):
        chunk = second[start:start + BLOCK]
        b_ids = np.array([t for t, _ in chunk], dtype=np.int64)
        b_box = box_array([r for _, r in chunk])
        overlap = overlap_matrix(b_box, a_box)
        later = b_ids[:, None] > a_ids[None, :]
        bi, ai = np.nonzero(overlap & later)
        found.append((a_ids[ai], b_ids[bi]))
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def conflicts(taskgraph: TaskGraph) -> list[Dep]:
    return _conflicts(taskgraph)[0]


def _conflicts(taskgraph: TaskGraph) -> tuple[list[Dep], np.ndarray, np.ndarray]:
    """`conflicts`, and their before and after task ids as arrays (cost.edges)."""
    reads: dict[str, list] = defaultdict(list)
    writes: dict[str, list] = defaultdict(list)
    for task in taskgraph.tasks:
        for region in task.reads:
            reads[region.buffer].append((task.id, region))
        for region in task.writes:
            writes[region.buffer].append((task.id, region))
    # Every candidate pair, tagged with its source (buffer, kind) in priority order.
    sources: list[tuple[str, str]] = []
    befores, afters, tags = [], [], []
    for buffer, ws in writes.items():
        rs = reads.get(buffer, [])
        for kind, (first, second) in zip(KINDS, ((ws, rs), (rs, ws), (ws, ws))):
            before, after = _pairs(first, second)
            befores.append(before)
            afters.append(after)
            tags.append(np.full(len(before), len(sources), dtype=np.int64))
            sources.append((kind, buffer))
    if not sources:
        return [], np.zeros(0, np.int64), np.zeros(0, np.int64)
    before, after, tag = np.concatenate(befores), np.concatenate(afters), np.concatenate(tags)
    # Keep each pair's first occurrence (a stable sort: the lowest tag), ordered by
    # (after, before) as the passes after this one expect.
    n = 1 + max(task.id for task in taskgraph.tasks)   # ids are 0..n-1 (schedule checks)
    key = after * n + before
    order = np.argsort(key, kind="stable")
    key = key[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    keep = order[first]
    before, after = before[keep], after[keep]
    kinds = [kind for kind, _ in sources]
    buffers = [buffer for _, buffer in sources]
    tag = tag[keep].tolist()
    ids = list(range(n))   # one int object per task id, shared by all its deps (memory)
    # The cyclic garbage collector, triggered by allocation counts, walks the whole heap
    # again and again while millions of Deps are made (3 s of 5.5 s for Llama-1B). Deps
    # form no cycles, so it is paused while they are built.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return list(map(Dep, map(ids.__getitem__, before.tolist()),
                        map(ids.__getitem__, after.tolist()),
                        map(kinds.__getitem__, tag), map(buffers.__getitem__, tag))), \
            before, after
    finally:
        if enabled:
            gc.enable()


def transfer_chain(taskgraph: TaskGraph, found: list[Dep]) -> list[Dep]:
    """`found` plus an ORDER dep between consecutive transfer tasks (multi-device): each
    device runs its transfers in sequence order, the same order on every device, so a
    blocking message always finds its partner. Still ordered by (after, before)."""
    chain = [t.id for t in taskgraph.tasks if t.group == TRANSFER]
    have = {(d.before, d.after) for d in found}
    extra = [Dep(a, b, "ORDER", "") for a, b in zip(chain, chain[1:]) if (a, b) not in have]
    if not extra:
        return found
    return sorted(found + extra, key=lambda d: (d.after, d.before))


def deps(taskgraph: TaskGraph) -> TaskGraph:
    found, before, after = _conflicts(taskgraph)
    if taskgraph.transfers:
        chained = transfer_chain(taskgraph, found)
        if chained is not found:
            return replace(taskgraph, deps=tuple(chained))
    return replace(taskgraph, deps=DepTuple(found, before, after))
