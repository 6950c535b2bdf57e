"""memplan: Schedule -> Schedule with every buffer placed in a typed pool.

One flat allocation per (kind, dtype), so the kernel takes one pointer per pool:
weights `w_<dtype>`, state `s_<dtype>`, everything else `a_<dtype>` (the arena).
Offsets are multiples of 16 elements so vector loads stay aligned for every dtype.

Weights and state live across steps: back to back, never shared. On a multi-device
engine each device's pool holds only the part of each weight and state buffer its
tasks touch (`Buffer.stored`: a flat range of its layout, which for a weight the shard
pass gave a box, `Buffer.shard`, is that compact box), placed so the whole buffer still
lies inside the pool (the executors view an operand whole: `Buffer.extent`); a buffer it touches none of (stored (0, 0):
another device role's weights, an expert pool on the routing device) takes no bytes
and need not lie inside the pool, since nothing on the device addresses it (the
engine file checks hold the tasks to that).
Inputs and outputs are touched by the host before and after the launch, so they are
live for the whole step and share bytes with nothing. An activation may reuse arena bytes of another
activation only when one's accesses all happen-before the other's, by the schedule's
own queues and waits (the vector clocks of `sync`), so no interleaving the kernel can
take reads bytes that another buffer is still using.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from tilec.errors import ScheduleError
from tilec.ir.schedule import POOL_ALIGN, POOL_OF_BUFFER_KIND, Pool, Schedule
from tilec.ir.tasks import Buffer
from tilec.passes.sync import happens_before_clocks

ALIGN = POOL_ALIGN   # elements


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pool_of(buffer: Buffer) -> tuple[str, str]:
    """(pool name, pool kind) a buffer belongs to."""
    prefix, kind = POOL_OF_BUFFER_KIND[buffer.kind]
    return f"{prefix}_{buffer.type.dtype}", kind


def size_of(buffer: Buffer) -> int:
    return max(buffer.type.numel, 1)


def accesses(schedule: Schedule) -> dict[str, list[int]]:
    """buffer name -> ids of the tasks that read or write it."""
    found: dict[str, set[int]] = {}
    for task in schedule.taskgraph.tasks:
        for region in task.reads + task.writes:
            found.setdefault(region.buffer, set()).add(task.id)
    return {name: sorted(ts) for name, ts in found.items()}


class Lifetimes:
    """Answers "do all accesses of X happen-before all accesses of Y?" in O(workers)
    per pair: X's last position per worker against the elementwise minimum of Y's
    clocks taken just before each of its tasks runs."""

    def __init__(self, schedule: Schedule, by_buffer: dict[str, list[int]]):
        where = schedule.worker_of()
        clocks = np.array(happens_before_clocks(schedule), dtype=np.int64)
        clocks = clocks.reshape(len(schedule.taskgraph.tasks), max(1, schedule.workers))
        for t, (w, i) in where.items():
            clocks[t, w] = i     # before the task itself runs
        self.row: dict[str, int] = {}        # buffer -> its row of `need` and `meet`
        need, meet = [], []
        for name, ts in by_buffer.items():
            if not ts:
                continue
            row = np.zeros(clocks.shape[1], dtype=np.int64)
            places = np.array([where[t] for t in ts], dtype=np.int64)
            np.maximum.at(row, places[:, 0], places[:, 1] + 1)
            self.row[name] = len(need)
            need.append(row)
            meet.append(clocks[ts].min(axis=0))
        shape = (len(need), clocks.shape[1])
        self.need = np.array(need, dtype=np.int64).reshape(shape)
        self.meet = np.array(meet, dtype=np.int64).reshape(shape)

    def before(self, x: str, y: str) -> bool:
        if x not in self.row or y not in self.row:
            return False   # a buffer no task touches is treated as always live
        return not (self.meet[self.row[y]] < self.need[self.row[x]]).any()

    def disjoint(self, x: str, y: str) -> bool:
        return self.before(x, y) or self.before(y, x)

    def overlapping(self, y: str, xs: list[str]) -> list[bool]:
        """[not self.disjoint(x, y) for x in xs], for all of them at once: placing each
        of GLM-5's activations against every one placed before it, pair by pair, was
        quadratic in Python (minutes of its 78-layer plan)."""
        if y not in self.row:
            return [True] * len(xs)
        known = [x in self.row for x in xs]
        rows = np.array([self.row[x] for x, k in zip(xs, known) if k], dtype=np.int64)
        i = self.row[y]
        live = ((self.meet[i] < self.need[rows]).any(axis=1)
                & (self.meet[rows] < self.need[i]).any(axis=1)).tolist()
        it = iter(live)
        return [next(it) if k else True for k in known]


def touched_ranges(schedule: Schedule, buffers: list[Buffer]) -> dict[str, tuple[int, int]]:
    """Per buffer, the flat element range [lo, hi) the schedule's tasks read or write (lo
    aligned down, so the buffer's base stays aligned); (0, 0) for one no task touches.
    Boxes are of the buffer's own shape, flat indices of its layout (Buffer.shard: a
    shard's first element is at sum(start * stride), the rest follow it; its lo is that
    first element, not aligned down)."""
    want = {b.name: b for b in buffers}
    out = {name: (b.type.numel, 0) for name, b in want.items()}
    for task in schedule.taskgraph.tasks:
        for r in task.reads + task.writes:
            b = want.get(r.buffer)
            if b is None or r.numel == 0:
                continue
            strides = b.layout_strides()
            first = sum(a * s for (a, _), s in zip(r.box, strides))
            last = sum((z - 1) * s for (_, z), s in zip(r.box, strides))
            lo, hi = out[r.buffer]
            out[r.buffer] = (min(lo, first), max(hi, last + 1))
    # a shard stores exactly its box (checked at load), so its lo is not aligned down:
    # memplan aligns its base instead
    return {name: (lo if want[name].shard else (lo // ALIGN) * ALIGN, hi) if hi > lo
            else (0, 0) for name, (lo, hi) in out.items()}


def first_fit(size: int, taken: list[tuple[int, int]]) -> int:
    """Lowest aligned offset where [offset, offset + size) misses every interval."""
    offset = 0
    for start, stop in sorted(taken):
        if offset + size <= start:
            break
        offset = max(offset, align(stop))
    return offset


def memplan(schedule: Schedule) -> Schedule:
    buffers = schedule.taskgraph.buffers
    by_buffer = accesses(schedule)
    rank = {t: i for i, t in enumerate(schedule.order)}
    offsets: dict[str, int] = {}
    ends: dict[str, int] = {}                      # pool -> end of its last buffer
    tails: dict[str, int] = {}                     # pool -> end of its partly stored buffers
    placed: dict[str, list[Buffer]] = {}           # arena pool -> placed buffers
    index = {b.name: i for i, b in enumerate(buffers)}
    lifetimes = None

    def first_use(b: Buffer) -> tuple[int, int]:
        ts = by_buffer.get(b.name, [])
        return min((rank.get(t, len(rank)) for t in ts), default=len(rank)), index[b.name]

    # Fixed buffers first (they pin their bytes), then activations by first use.
    fixed = [b for b in buffers if b.kind != "activation"]
    stored: dict[str, tuple[int, int]] = {}
    if schedule.taskgraph.devices > 1:   # each device holds the part of a weight or
        # state buffer (a KV cache) its tasks touch
        stored = touched_ranges(schedule, [b for b in fixed if b.kind in ("weight", "state")])
        # lowest parts first: each starts at or after its `lo`, so its base, start - lo,
        # is not below the pool; what a part does not store may overlap its neighbours
        for b in sorted((b for b in fixed if b.name in stored),
                        key=lambda b: (stored[b.name][0], index[b.name])):
            pool, _ = pool_of(b)
            lo, hi = stored[b.name]
            if lo == hi:   # no task here touches it: it takes no bytes of the pool
                offsets[b.name] = 0
                continue
            # the base (start - lo) aligned: start keeps lo's distance from alignment
            skew = lo % ALIGN
            start = max(align(ends.get(pool, 0)), lo - skew) + skew
            offsets[b.name] = start - lo
            ends[pool] = start + (hi - lo)
            tails[pool] = max(tails.get(pool, 0), offsets[b.name] + b.extent())
        fixed = [b for b in fixed if b.name not in stored]
    scratch = sorted((b for b in buffers if b.kind == "activation"), key=first_use)
    for b in fixed:
        pool, kind = pool_of(b)
        if kind == "arena":
            taken = [(offsets[p.name], offsets[p.name] + size_of(p))
                     for p in placed.get(pool, [])]
            offsets[b.name] = first_fit(size_of(b), taken)
            placed.setdefault(pool, []).append(b)
        else:
            offsets[b.name] = align(ends.get(pool, 0))
        ends[pool] = max(ends.get(pool, 0), offsets[b.name] + size_of(b))
    for b in scratch:
        if lifetimes is None:
            lifetimes = Lifetimes(schedule, by_buffer)
        pool, _ = pool_of(b)
        others = placed.get(pool, [])
        live = lifetimes.overlapping(b.name, [p.name for p in others])
        taken = [(offsets[p.name], offsets[p.name] + size_of(p))
                 for p, overlaps in zip(others, live) if p.kind != "activation" or overlaps]
        offsets[b.name] = first_fit(size_of(b), taken)
        placed.setdefault(pool, []).append(b)
        ends[pool] = max(ends.get(pool, 0), offsets[b.name] + size_of(b))

    for pool, tail in tails.items():   # a partly stored buffer still fits in its pool
        ends[pool] = max(ends[pool], tail)
    planned = tuple(replace(b, pool=pool_of(b)[0], offset=offsets[b.name],
                            stored=stored.get(b.name, ())) for b in buffers)
    return replace(schedule, buffers=planned, pools=_pools(buffers, ends))


def _pools(buffers: tuple[Buffer, ...], ends: dict[str, int]) -> tuple[Pool, ...]:
    """The pools, in the kernel's argument order, each `ends[name]` elements long."""
    pools, seen = [], set()
    for b in buffers:
        name, kind = pool_of(b)
        if name not in seen:
            seen.add(name)
            pools.append(Pool(name, b.type.dtype, max(1, ends.get(name, 0)), kind))
    order = {"weight": 0, "state": 1, "arena": 2}
    pools.sort(key=lambda p: order[p.kind])
    return tuple(pools)


def unplaced(buffers: tuple[Buffer, ...]) -> tuple[tuple[Buffer, ...], tuple[Pool, ...]]:
    """Every buffer in the pool memplan puts it in, at offset 0, and those pools, with no
    sizes: before there is a schedule to place buffers by, what the kernel's source
    depends on (which pool holds a buffer, the pools' order; offsets only by alignment,
    and every offset memplan chooses is aligned). The compiler renders a provisional
    kernel with them, to start compiling it for the GPU early (hooks.SpeculativeAOT)."""
    return tuple(replace(b, pool=pool_of(b)[0], offset=0) for b in buffers), _pools(buffers, {})


def share_fixed(scheds: tuple[Schedule, ...]) -> tuple[Schedule, ...]:
    """The entries of one engine (its decode step, its prefill), each placed by memplan,
    with every weight and state buffer moved to one place for all, by name: the first
    entry's layout, then the buffers only a later entry has after it, in its pool. So
    the entries share their weight and state pools (stored once in the engine file, one
    KV cache at run time) and each keeps its own arena. A name two entries give different
    kinds, shapes or dtypes is a ScheduleError: sharing it would be wrong."""
    offsets: dict[str, int] = {}
    ends: dict[str, int] = {}
    types: dict[str, tuple] = {}
    for s in scheds:
        for b in s.buffers:
            if b.kind not in ("weight", "state"):
                continue
            if b.stored:
                raise ScheduleError("a multi-device engine has one entry (its decode step)")
            if b.name in types:
                if types[b.name] != (b.kind, b.type, b.pool):
                    raise ScheduleError(f"the engine's entries disagree on {b.name} "
                                        f"({types[b.name][1]} vs {b.type}): cannot share it")
                continue
            types[b.name] = (b.kind, b.type, b.pool)
            offsets[b.name] = align(ends.get(b.pool, 0))
            ends[b.pool] = offsets[b.name] + size_of(b)
    shared = []
    for s in scheds:
        buffers = tuple(replace(b, offset=offsets[b.name]) if b.name in offsets else b
                        for b in s.buffers)
        pools = tuple(replace(p, numel=max(1, ends[p.name])) if p.name in ends else p
                      for p in s.pools)
        shared.append(replace(s, buffers=buffers, pools=pools))
    return tuple(shared)
