"""verify: prove a Schedule race- and deadlock-free (DESIGN.md, "Schedule invariants").

Every check is recomputed from what the kernel will actually run: the stored queues,
signals and waits, the tasks' regions and the planned buffers. Nothing the compiler
derived along the way (taskgraph.deps, schedule.order, predicted times) is trusted,
so a bug in any pass shows up here as a one-line violation.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from tilec.errors import ConfigError, ScheduleError
from tilec.ir.graph import is_indexed_matmul
from tilec.ir.schedule import Schedule
from tilec.ir.target import DEFAULT_ROLE
from tilec.ir.tasks import TRANSFER, Buffer, Region
from tilec.passes.roles import role_of_group, role_problems
from tilec.passes.sync import happens_before_clocks, wait_order

CHECKS = ("each_task_once", "global_order", "thresholds", "conflicts_ordered",
          "kv_appends_ordered", "indexed_reads_whole", "regions_in_buffers", "arena_disjoint",
          "roles_respected")
MAX_REPORTED = 50   # per check; a broken schedule can have millions of violations
BLOCK_CELLS = 1 << 22   # box comparisons per numpy sweep (bounds the temporary arrays)


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    checks: dict[str, bool]
    violations: tuple[str, ...]


def check(report: VerifyReport) -> None:
    """Raise ScheduleError naming the first violation of a verify report, if any."""
    if not report.ok:
        raise ScheduleError(report.violations[0])


def verify(schedule: Schedule) -> VerifyReport:
    ctx = _Context(schedule)
    found: dict[str, list[str]] = {}
    found["each_task_once"] = _each_task_once(ctx)
    found["global_order"] = _global_order(ctx) if not found["each_task_once"] else \
        ["global_order: not checkable until every task is queued exactly once"]
    found["thresholds"] = _thresholds(ctx)
    clocks_ok = not found["global_order"] and ctx.shapes_ok
    ctx.clocks = happens_before_clocks(schedule) if clocks_ok else None
    found["conflicts_ordered"] = _conflicts_ordered(ctx)
    found["kv_appends_ordered"] = _kv_appends_ordered(ctx)
    found["indexed_reads_whole"] = _indexed_reads_whole(ctx)
    found["regions_in_buffers"] = _regions_in_buffers(ctx)
    found["arena_disjoint"] = _arena_disjoint(ctx)
    found["roles_respected"] = _roles_respected(ctx)
    return report_of(found, CHECKS)


def report_of(found: dict[str, list[str]], names: tuple[str, ...]) -> VerifyReport:
    """The report of checks `names` (in that order) from each one's violations: at most
    MAX_REPORTED lines per check, then a count of the rest."""
    violations: list[str] = []
    for name in names:
        items = found[name]
        violations += items[:MAX_REPORTED]
        if len(items) > MAX_REPORTED:
            violations.append(f"{name}: ... and {len(items) - MAX_REPORTED} more")
    checks = {name: not found[name] for name in names}
    return VerifyReport(all(checks.values()), checks, tuple(violations))


class _Context:
    """What every check reads, computed once."""

    def __init__(self, schedule: Schedule):
        self.s = schedule
        self.tasks = schedule.taskgraph.tasks
        self.n = len(self.tasks)
        self.where = schedule.worker_of()
        self.shapes_ok = len(schedule.signal) == self.n and len(schedule.waits) == self.n \
            and all(0 <= e < len(schedule.events) for e in schedule.signal) \
            and all(0 <= w.event < len(schedule.events) for ws in schedule.waits for w in ws)
        # Per buffer, its accesses (task id, region, is a write) in task order, each
        # task's reads before its writes: several checks walk them, 100 k for Llama-1B.
        self.accesses: dict[str, list[tuple[int, Region, bool]]] = {}
        for task in self.tasks:
            for r in task.reads:
                self.accesses.setdefault(r.buffer, []).append((task.id, r, False))
            for r in task.writes:
                self.accesses.setdefault(r.buffer, []).append((task.id, r, True))
        self._bounds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.clocks = None
        self.before_clocks = None   # clocks just before each task runs (arena check)
        # Per buffer, for the arena check (_all_before): per worker, 1 + the position of
        # its last user there; and the least clock just before any of its users runs.
        self.last_done: dict[str, np.ndarray] = {}
        self.first_start: dict[str, np.ndarray] = {}

    def bounds(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """_bounds of the regions of `accesses[name]`, in that order (made once)."""
        if name not in self._bounds:
            self._bounds[name] = _bounds([r for _, r, _ in self.accesses[name]])
        return self._bounds[name]

    def who(self, t: int) -> str:
        group = self.tasks[t].group if 0 <= t < self.n else "?"
        w, i = self.where.get(t, ("?", "?"))
        return f"task {t} (group {group}, worker {w} #{i})"

    def hb(self, a: int, b: int) -> bool:
        """a happens-before b: b's clock covers a (queue order and waits, transitively)."""
        w, i = self.where[a]
        return a != b and self.clocks[b][w] > i


def _each_task_once(ctx: _Context) -> list[str]:
    out = []
    seen = Counter(t for q in ctx.s.queues for t in q)
    for w, q in enumerate(ctx.s.queues):
        for i, t in enumerate(q):
            if not 0 <= t < ctx.n:
                out.append(f"each_task_once: worker {w} #{i} holds unknown task id {t}")
    for t in range(ctx.n):
        if seen[t] == 0:
            out.append(f"each_task_once: task {t} (group {ctx.tasks[t].group}) is in no queue")
        elif seen[t] > 1:
            places = [f"worker {w} #{i}" for w, q in enumerate(ctx.s.queues)
                      for i, u in enumerate(q) if u == t]
            out.append(f"each_task_once: task {t} (group {ctx.tasks[t].group}) is queued "
                       f"{seen[t]} times: {', '.join(places)}")
    return out


def _global_order(ctx: _Context) -> list[str]:
    if not ctx.shapes_ok:
        return ["global_order: not checkable: signal/waits do not give one valid event "
                "per task"]
    s = ctx.s
    _, stuck = wait_order(s.queues, s.signal, s.waits)
    if not stuck:
        return []
    cycle = _find_cycle(ctx, set(stuck))
    path = " -> ".join(ctx.who(t) for t in cycle)
    return [f"global_order: no order fits every queue and wait (deadlock): {path} -> "
            f"task {cycle[0]}"]


def _find_cycle(ctx: _Context, stuck: set[int]) -> list[int]:
    """Walk back from a stuck task through stuck predecessors until one repeats.
    (A stuck task always has one: its queue predecessor or a signaller it waits on.)"""
    signallers: dict[int, list[int]] = {}
    for t, e in enumerate(ctx.s.signal):
        signallers.setdefault(e, []).append(t)

    def stuck_pred(t: int) -> int:
        w, i = ctx.where[t]
        if i and ctx.s.queues[w][i - 1] in stuck:
            return ctx.s.queues[w][i - 1]
        for wait in ctx.s.waits[t]:
            for u in signallers.get(wait.event, []):
                if u in stuck:
                    return u
        raise AssertionError(f"stuck task {t} without a stuck predecessor")

    path, index = [], {}
    t = min(stuck)
    while t not in index:
        index[t] = len(path)
        path.append(t)
        t = stuck_pred(t)
    return list(reversed(path[index[t]:]))


def _thresholds(ctx: _Context) -> list[str]:
    s, out = ctx.s, []
    if len(s.signal) != ctx.n or len(s.waits) != ctx.n:
        return [f"thresholds: {len(s.signal)} signals and {len(s.waits)} wait lists for "
                f"{ctx.n} tasks"]
    received = Counter(s.signal)
    for i, event in enumerate(s.events):
        if event.id != i:
            out.append(f"thresholds: event at index {i} has id {event.id}")
        if event.signals != received[i]:
            out.append(f"thresholds: event {i} expects {event.signals} signals but "
                       f"{received[i]} tasks signal it")
    for t, e in enumerate(s.signal):
        if not 0 <= e < len(s.events):
            out.append(f"thresholds: {ctx.who(t)} signals unknown event {e}")
    for t, ws in enumerate(s.waits):
        for w in ws:
            if not 0 <= w.event < len(s.events):
                out.append(f"thresholds: {ctx.who(t)} waits on unknown event {w.event}")
            elif w.count != s.events[w.event].signals:
                out.append(f"thresholds: {ctx.who(t)} waits for {w.count} signals of event "
                           f"{w.event}, which gets {s.events[w.event].signals}")
    return out


def _fmt(region: Region) -> str:
    return f"{region.buffer}[{','.join(f'{a}:{b}' for a, b in region.box)}]"


def _conflicts_ordered(ctx: _Context) -> list[str]:
    """Each write against every access of its buffer, a block of writes per numpy sweep:
    overlapping boxes, then the clock test in the direction of program order."""
    if ctx.clocks is None:
        return ["conflicts_ordered: not checkable without a valid global order"]
    worker = np.array([ctx.where[t][0] for t in range(ctx.n)], dtype=np.int64)
    pos = np.array([ctx.where[t][1] for t in range(ctx.n)], dtype=np.int64)
    found: dict[tuple[int, int], tuple] = {}
    for name, acc in ctx.accesses.items():
        lo, hi = ctx.bounds(name)
        ndim = lo.shape[1]
        task = np.array([t for t, _, _ in acc], dtype=np.int64)
        write = np.array([w for _, _, w in acc], dtype=bool)
        index = np.arange(len(acc))
        xs_all = np.flatnonzero(write)
        block = max(1, BLOCK_CELLS // (len(acc) * max(ndim, 1)))   # 0-d: one cell
        for start in range(0, len(xs_all), block):
            xs = xs_all[start:start + block]
            # Each unordered pair once: a write against reads, and writes after it.
            candidates = (task[None, :] != task[xs, None]) & \
                (~write[None, :] | (index[None, :] > xs[:, None]))
            for d in range(ndim):   # overlapping boxes (one 2-D test per dim is faster
                candidates &= lo[None, :, d] < hi[xs, None, d]    # than a 3-D one)
                candidates &= lo[xs, None, d] < hi[None, :, d]
            xi, ys = np.nonzero(candidates)     # by write, then by access: the old order
            if not len(ys):
                continue
            a_ids, b_ids = task[xs[xi]], task[ys]
            first = np.minimum(a_ids, b_ids)
            second = np.maximum(a_ids, b_ids)
            ordered = ctx.clocks[second, worker[first]] > pos[first]
            for x, y in zip(xs[xi[~ordered]].tolist(), ys[~ordered].tolist()):
                a, b = int(task[x]), int(task[y])
                key = (min(a, b), max(a, b))
                if key not in found:
                    kind = "WAW" if write[y] else ("WAR" if b < a else "RAW")
                    r1, r2 = (acc[x][1], acc[y][1]) if a < b else (acc[y][1], acc[x][1])
                    found[key] = (kind, name, r1, r2)
    out = []
    for first, second in sorted(found)[:MAX_REPORTED]:
        kind, name, r1, r2 = found[(first, second)]
        out.append(f"conflicts_ordered: {kind} on buffer {name!r}: {ctx.who(first)} "
                   f"touches {_fmt(r1)}, {ctx.who(second)} touches {_fmt(r2)}, but "
                   f"nothing orders them (missing edge {first} -> {second})")
    if len(found) > MAX_REPORTED:
        out.append(f"conflicts_ordered: ... and {len(found) - MAX_REPORTED} more unordered pairs")
    return out


def _bounds(regions: list[Region]) -> tuple[np.ndarray, np.ndarray]:
    """The boxes' lower and upper bounds, int64 arrays [regions, dims]. A box with fewer
    dims than the widest (a malformed region) overlaps everything in the dims it lacks."""
    dims = {len(r.box) for r in regions}
    ndim = max(dims)
    if len(dims) == 1:
        box = np.array([r.box for r in regions], dtype=np.int64).reshape(len(regions), ndim, 2)
        return box[:, :, 0], box[:, :, 1]
    far = 1 << 62
    lo = np.array([[a for a, _ in r.box] + [-far] * (ndim - len(r.box)) for r in regions],
                  dtype=np.int64).reshape(len(regions), ndim)
    hi = np.array([[b for _, b in r.box] + [far] * (ndim - len(r.box)) for r in regions],
                  dtype=np.int64).reshape(len(regions), ndim)
    return lo, hi


def _kv_appends_ordered(ctx: _Context) -> list[str]:
    """Every write of a state buffer (a KV-cache append) happens-before every later task
    (in program order) that reads an overlapping region: the attention of this step must
    see this step's key and value. conflicts_ordered implies it; it is reported on its own
    because a stale cache read is the classic decode-step race."""
    kinds = {b.name: b.kind for b in _buffers(ctx).values()}
    writes = [(t.id, r) for t in ctx.tasks for r in t.writes if kinds.get(r.buffer) == "state"]
    if not writes:
        return []
    if ctx.clocks is None:
        return ["kv_appends_ordered: not checkable without a valid global order"]
    reads: dict[str, list[tuple[int, Region]]] = {}    # in task order, then read order
    for task in ctx.tasks:
        for r in task.reads:
            if kinds.get(r.buffer) == "state":
                reads.setdefault(r.buffer, []).append((task.id, r))
    out = []
    far = 1 << 62   # zip in Region.overlaps: dims past the shorter box overlap
    boxes: dict[tuple[str, int], tuple] = {}   # the reads of a buffer, once per width
    for a, w in writes:
        rs = reads.get(w.buffer, [])
        if not rs:
            continue
        ndim = max(len(w.box), max(len(r.box) for _, r in rs))
        if (w.buffer, ndim) not in boxes:
            boxes[w.buffer, ndim] = (
                np.array([[x for x, _ in r.box] + [-far] * (ndim - len(r.box)) for _, r in rs],
                         dtype=np.int64).reshape(len(rs), ndim),
                np.array([[y for _, y in r.box] + [far] * (ndim - len(r.box)) for _, r in rs],
                         dtype=np.int64).reshape(len(rs), ndim),
                np.array([t for t, _ in rs], dtype=np.int64))
        lo, hi, tid = boxes[w.buffer, ndim]
        w_lo = np.array([x for x, _ in w.box] + [-far] * (ndim - len(w.box)), dtype=np.int64)
        w_hi = np.array([y for _, y in w.box] + [far] * (ndim - len(w.box)), dtype=np.int64)
        wa, ia = ctx.where[a]
        racy = (tid > a) & np.all((lo < w_hi) & (w_lo < hi), axis=1) & \
            (ctx.clocks[tid, wa] <= ia)
        reported = set()
        for k in np.flatnonzero(racy).tolist():
            b, r = rs[k]
            if b not in reported:   # one line per reading task: its first racy read
                reported.add(b)
                out.append(f"kv_appends_ordered: {ctx.who(a)} appends {_fmt(w)} but "
                           f"{ctx.who(b)} reads {_fmt(r)} without waiting for it "
                           f"(missing edge {a} -> {b})")
    return out


def _indexed_reads_whole(ctx: _Context) -> list[str]:
    """A task that reads an expert pool through a run-time id (an indexed matmul) has a
    read region spanning every expert: which one it reads is unknown until it runs, so
    the ordering checks above are sound only if they see the whole pool."""
    graph = ctx.s.taskgraph.fused
    ops = graph.graph.by_name()
    pools = {g.name: ops[g.anchor].inputs[1].value for g in graph.groups
             if g.anchor is not None and is_indexed_matmul(ops[g.anchor])}
    if not pools:
        return []
    buffers = _buffers(ctx)
    out = []
    for task in ctx.tasks:
        pool = pools.get(task.group)
        if pool is None:
            continue
        experts = buffers[pool].type.shape[0]
        if not any(r.buffer == pool and r.box and r.box[0] == (0, experts) for r in task.reads):
            out.append(f"indexed_reads_whole: {ctx.who(task.id)} reads expert pool {pool} "
                       f"through a run-time id, but no read region of it spans all "
                       f"{experts} experts")
    return out


def _buffers(ctx: _Context) -> dict[str, Buffer]:
    planned = ctx.s.buffers or ctx.s.taskgraph.buffers
    return {b.name: b for b in planned}


def _regions_in_buffers(ctx: _Context) -> list[str]:
    buffers = _buffers(ctx)
    if _all_regions_inside(ctx, buffers):
        return []
    out = []   # the region by region walk below, only to say what is wrong where
    for task in ctx.tasks:
        for r in task.reads + task.writes:
            b = buffers.get(r.buffer)
            if b is None:
                out.append(f"regions_in_buffers: {ctx.who(task.id)} touches unknown buffer "
                           f"{r.buffer!r}")
                continue
            shape = b.type.shape
            ok = len(r.box) == len(shape) and all(
                0 <= lo < hi <= size for (lo, hi), size in zip(r.box, shape))
            if not ok:
                out.append(f"regions_in_buffers: {ctx.who(task.id)} touches {_fmt(r)}, "
                           f"outside or empty in buffer {r.buffer!r} of shape {list(shape)}")
            elif b.stored and not _within_stored(r, b):
                out.append(f"regions_in_buffers: {ctx.who(task.id)} touches {_fmt(r)}, "
                           f"outside the part [{b.stored[0]}, {b.stored[1]}) of buffer "
                           f"{r.buffer!r} this device holds"
                           + (f" (its shard {_fmt(Region(r.buffer, b.shard))})"
                              if b.shard else ""))
    return out


def _all_regions_inside(ctx: _Context, buffers: dict[str, Buffer]) -> bool:
    """Whether _regions_in_buffers finds nothing, tested a buffer at a time with numpy:
    every region names a known buffer, has its dims, is non-empty and inside it, and
    inside the part stored (Buffer.stored), if only a part is."""
    for name, acc in ctx.accesses.items():
        b = buffers.get(name)
        if b is None:
            return False
        shape = b.type.shape
        if any(len(r.box) != len(shape) for _, r, _ in acc):
            return False
        lo, hi = ctx.bounds(name)
        if not ((0 <= lo) & (lo < hi) & (hi <= np.array(shape, dtype=np.int64))).all():
            return False
        if b.stored:   # flat first and last element against the stored range
            strides = np.array(b.layout_strides(), dtype=np.int64)
            first, last = lo @ strides, (hi - 1) @ strides
            if not ((b.stored[0] <= first) & (last < b.stored[1])).all():
                return False
        if b.shard:    # and every region inside the box the device holds
            start, stop = (np.array(x, dtype=np.int64) for x in zip(*b.shard))
            if not ((start <= lo) & (hi <= stop)).all():
                return False
    return True


def _within_stored(region: Region, buffer: Buffer) -> bool:
    """A region of a partly stored buffer (Buffer.stored) lies in the stored flat range
    of its layout, and in its shard's box if it has one (Buffer.shard: indices outside
    the box address other bytes, even where their flat index falls in the range)."""
    if buffer.shard and not all(a <= r0 and r1 <= z
                                for (r0, r1), (a, z) in zip(region.box, buffer.shard)):
        return False
    strides = buffer.layout_strides()
    first = sum(a * st for (a, _), st in zip(region.box, strides))
    last = sum((z - 1) * st for (_, z), st in zip(region.box, strides))
    lo, hi = buffer.stored
    return lo <= first and last < hi


def _held(b: Buffer) -> bool:
    """Whether this device holds any of `b`: one it touches none of (Buffer.stored (0, 0),
    on a multi-device engine) takes no bytes and need not fit its pool (memplan); no
    region may touch it (regions_in_buffers: nothing lies in an empty stored part)."""
    return not b.stored or b.stored[0] != b.stored[1]


def _arena_disjoint(ctx: _Context) -> list[str]:
    s = ctx.s
    if not s.buffers:
        return ["arena_disjoint: no memory plan (run memplan)"] if s.taskgraph.buffers else []
    out = []
    declared = {b.name: b for b in s.taskgraph.buffers}
    pools = {p.name: p for p in s.pools}
    for b in s.buffers:
        d = declared.get(b.name)
        if d is None or (d.type, d.kind) != (b.type, b.kind):
            out.append(f"arena_disjoint: planned buffer {b.name!r} does not match the "
                       f"task graph's buffer of that name")
        p = pools.get(b.pool)
        if p is None:
            out.append(f"arena_disjoint: buffer {b.name!r} is in unknown pool {b.pool!r}")
        elif p.dtype != b.type.dtype or b.offset < 0 or (
                b.offset + _size(b) > p.numel and _held(b)):
            out.append(f"arena_disjoint: buffer {b.name!r} ({b.type.dtype}, "
                       f"[{b.offset}, {b.offset + _size(b)})) does not fit pool {p.name!r} "
                       f"({p.dtype}, {p.numel} elements)")
    missing = set(declared) - {b.name for b in s.buffers}
    out += [f"arena_disjoint: buffer {name!r} has no place in any pool" for name in sorted(missing)]
    by_pool: dict[str, list[Buffer]] = {}
    for b in s.buffers:
        by_pool.setdefault(b.pool, []).append(b)
    users = _users(ctx)
    for name, bs in by_pool.items():
        bs = sorted((b for b in bs if _span(b)[0] < _span(b)[1]), key=lambda b: _span(b)[0])
        for i, x in enumerate(bs):
            for y in bs[i + 1:]:
                if _span(y)[0] >= _span(x)[1]:
                    break
                problem = _sharing_problem(ctx, x, y, users)
                if problem:
                    out.append(f"arena_disjoint: buffers {x.name!r} {list(_span(x))} and "
                               f"{y.name!r} {list(_span(y))} overlap in pool {name!r}: "
                               f"{problem}")
    return out


def _size(b: Buffer) -> int:
    """Pool elements a view of the whole buffer may address (Buffer.extent)."""
    return b.extent()


def _span(b: Buffer) -> tuple[int, int]:
    """The pool elements holding the buffer's values: all of it, or the part a device
    stores (Buffer.stored; the rest of its range may hold other buffers)."""
    if b.stored:
        return b.offset + b.stored[0], b.offset + b.stored[1]
    return b.offset, b.offset + _size(b)


def _users(ctx: _Context) -> dict[str, list[int]]:
    return {name: sorted({t for t, _, _ in acc}) for name, acc in ctx.accesses.items()}


def _sharing_problem(ctx: _Context, x: Buffer, y: Buffer, users) -> str:
    """Why x and y may not share bytes, or "" when one is dead before the other lives."""
    for b in (x, y):
        if b.kind != "activation":
            return f"{b.name!r} is {b.kind} (live for the whole step)"
        if not users.get(b.name):
            return f"no task touches {b.name!r}, so its lifetime is unknown"
    if ctx.clocks is None:
        return "lifetimes not checkable without a valid global order"
    if _all_before(ctx, users, x.name, y.name) or _all_before(ctx, users, y.name, x.name):
        return ""
    a, b = _witness(ctx, users[x.name], users[y.name])
    c, d = _witness(ctx, users[y.name], users[x.name])
    return (f"both live at once ({ctx.who(a)} on {x.name!r} does not happen-before "
            f"{ctx.who(b)} on {y.name!r}, and {ctx.who(c)} on {y.name!r} does not "
            f"happen-before {ctx.who(d)} on {x.name!r})")


def _all_before(ctx: _Context, users: dict[str, list[int]], first: str, then: str) -> bool:
    """Every task touching buffer `first` happens-before every task touching `then`:
    first's last position per worker against the least of then's clocks just before
    each of its tasks. Both summaries are kept per buffer: a pool has thousands of
    overlapping pairs."""
    if ctx.before_clocks is None:
        ctx.before_clocks = np.array(ctx.clocks, dtype=np.int64)
        for t, (w, i) in ctx.where.items():
            ctx.before_clocks[t, w] = i
    if first not in ctx.last_done:
        need = np.zeros(ctx.before_clocks.shape[1], dtype=np.int64)
        places = np.array([ctx.where[t] for t in users[first]], dtype=np.int64)
        np.maximum.at(need, places[:, 0], places[:, 1] + 1)
        ctx.last_done[first] = need
    if then not in ctx.first_start:
        ctx.first_start[then] = ctx.before_clocks[users[then]].min(axis=0)
    return not (ctx.first_start[then] < ctx.last_done[first]).any()


def _witness(ctx: _Context, first: list[int], then: list[int]) -> tuple[int, int]:
    for b in then:
        for a in first:
            if not ctx.hb(a, b):
                return a, b
    raise AssertionError("no witness for an unordered pair")


def _roles_respected(ctx: _Context) -> list[str]:
    """Every task runs on a worker of its role, and its role is the one the target's
    role definitions give its group (recomputed, not taken from the roles pass)."""
    s, target = ctx.s, ctx.s.target
    defined = target.all_roles()
    out = [f"roles_respected: {p}" for p in role_problems(defined, target.workers)]
    if len(s.taskgraph.roles) not in (0, ctx.n) or (target.roles and not s.taskgraph.roles):
        return out + [f"roles_respected: {len(s.taskgraph.roles)} task roles for {ctx.n} "
                      f"tasks and {len(target.roles)} roles"]
    owner = {}   # group -> the role its definition gives it
    if target.roles:
        ops = s.taskgraph.fused.graph.by_name()
        present = {t.group for t in ctx.tasks}   # a device runs only its device role's
        for g in (g for g in s.taskgraph.fused.groups if g.name in present):
            try:
                owner[g.name] = role_of_group(g, ops, target.roles)
            except ConfigError as e:
                out.append(f"roles_respected: {e}")
    # transfers (multi-device) belong to the role that names them: the comm worker's
    owner[TRANSFER] = next((r.name for r in defined if TRANSFER in r.kinds), DEFAULT_ROLE)
    workers = {r.name: set(r.workers) for r in defined}
    worker_role = target.worker_roles()
    for task, role in zip(ctx.tasks, s.task_roles()):
        want = owner.get(task.group, role)
        if role != want:
            out.append(f"roles_respected: {ctx.who(task.id)} has role {role!r}, but the "
                       f"target's roles give group {task.group} to role {want!r}")
        elif role not in workers:
            out.append(f"roles_respected: {ctx.who(task.id)} has unknown role {role!r}")
        elif task.id in ctx.where and ctx.where[task.id][0] not in workers[role]:
            w = ctx.where[task.id][0]
            other = worker_role[w] if 0 <= w < len(worker_role) and worker_role[w] else None
            out.append(f"roles_respected: {ctx.who(task.id)} has role {role!r} but runs on "
                       f"worker {w}, " + (f"which belongs to role {other!r}" if other else
                                          "which belongs to no role"))
    return out
