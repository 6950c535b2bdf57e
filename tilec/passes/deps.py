"""deps: TaskGraph -> TaskGraph with `deps`.

Two tasks conflict when their regions of one buffer overlap and at least one writes:
read-after-write, write-after-read and write-after-write, in program order (task id
order). Boxes are compared per buffer with numpy, a block of regions at a time, since
a decode step has thousands of tasks reading the same few buffers.

A pair of tasks gets one dep even when they conflict on several buffers or in several
ways: the first found, buffers in the order their first write appears, and per buffer
RAW, then WAR, then WAW. Pairs are collected and de-duplicated as arrays, and the
deps stay arrays (cost.DepArrays): a Llama-1B decode step has 1.5 M of them, and
making a `Dep` object for each took most of the pass; one is made only when read.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np

from tilec.ir.tasks import TRANSFER, Dep, TaskGraph
from tilec.passes.geometry import box_array, overlap_matrix
from tilec.passes.cost import DepArrays

BLOCK = 2048   # regions compared at once (bounds the overlap matrix)
KINDS = ("RAW", "WAR", "WAW")   # and ORDER: transfers in sequence (transfer_chain)


def _accesses(items: list) -> tuple[np.ndarray, np.ndarray]:
    """(task ids, box_array) of (task id, region) pairs."""
    if not items:
        return np.zeros(0, np.int64), np.zeros((0, 0, 2), np.int64)
    return np.array([t for t, _ in items], dtype=np.int64).reshape(len(items)), \
        box_array([r for _, r in items])


def _pairs(first: tuple[np.ndarray, np.ndarray],
           second: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(before, after) task ids: accesses in `first` and overlapping, later accesses in
    `second` (each as _accesses)."""
    a_ids, a_box = first
    if not len(a_ids) or not len(second[0]):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    found = []
    for start in range(0, len(second[0]), BLOCK):
        b_ids = second[0][start:start + BLOCK]
        b_box = second[1][start:start + BLOCK]
        overlap = overlap_matrix(b_box, a_box)
        overlap &= b_ids[:, None] > a_ids[None, :]
        bi, ai = np.nonzero(overlap)
        found.append((a_ids[ai], b_ids[bi]))
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def conflicts(taskgraph: TaskGraph) -> list[Dep]:
    return list(_conflicts(taskgraph))


def _conflicts(taskgraph: TaskGraph) -> DepArrays:
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
        ws = _accesses(ws)
        rs = _accesses(reads.get(buffer, []))
        for kind, (first, second) in zip(KINDS, ((ws, rs), (rs, ws), (ws, ws))):
            before, after = _pairs(first, second)
            befores.append(before)
            afters.append(after)
            tags.append(np.full(len(before), len(sources), dtype=np.int64))
            sources.append((kind, buffer))
    if not sources:
        empty = np.zeros(0, np.int64)
        return DepArrays(empty, empty.copy(), empty.copy(), [], [])
    before, after, tag = np.concatenate(befores), np.concatenate(afters), np.concatenate(tags)
    # Keep each pair's first occurrence (the lowest tag), ordered by (after, before) as
    # the passes after this one expect: one sort of (after, before, tag) packed into an
    # int64 (a stable argsort of the pairs took 4x as long), if it fits.
    n = 1 + max(task.id for task in taskgraph.tasks)   # ids are 0..n-1 (schedule checks)
    m = len(sources)
    key = after * n + before
    if n * n * m < 1 << 62:
        packed = np.sort(key * m + tag)
        key, tag = packed // m, packed % m
    else:
        order = np.argsort(key, kind="stable")
        key, tag = key[order], tag[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    key = key[first]
    return DepArrays(key % n, key // n, tag[first],
                     [kind for kind, _ in sources], [buffer for _, buffer in sources])


def transfer_chain(taskgraph: TaskGraph, found: DepArrays) -> DepArrays:
    """`found` plus an ORDER dep between consecutive transfer tasks (multi-device): each
    device runs its transfers in sequence order, the same order on every device, so a
    blocking message always finds its partner. Still ordered by (after, before), as
    arrays: GLM-5 on 8 devices has half a million deps per device, and making a Dep of
    each to add a few hundred took a third of the pass."""
    chain = np.array([t.id for t in taskgraph.tasks if t.group == TRANSFER], dtype=np.int64)
    n = 1 + max((task.id for task in taskgraph.tasks), default=0)
    before, after = found.arrays
    key = after * n + before                  # ascending: found is ordered so
    extra = chain[1:] * n + chain[:-1]        # ascending too: ids grow along the chain
    extra = extra[~np.isin(extra, key)]
    if not len(extra):
        return found
    kinds, buffers = found.sources()
    merged = np.concatenate([key, extra])
    tag = np.concatenate([found.tags(), np.full(len(extra), len(kinds), dtype=np.int64)])
    order = np.argsort(merged, kind="stable")   # the pairs are distinct: a total order
    merged, tag = merged[order], tag[order]
    return DepArrays(merged % n, merged // n, tag, [*kinds, "ORDER"], [*buffers, ""])


def deps(taskgraph: TaskGraph) -> TaskGraph:
    found = _conflicts(taskgraph)
    if taskgraph.transfers:
        found = transfer_chain(taskgraph, found)
    return replace(taskgraph, deps=found)
