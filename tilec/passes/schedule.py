"""schedule: TaskGraph -> Schedule (queues, global order, predicted times).

List scheduling onto the target's workers: each task, in priority order among the
ready ones, goes where it can start first (`schedule` tries two priority rules and
keeps the shorter schedule). The scheduler trusts `taskgraph.deps`
(the deps pass runs first); `verify` later re-derives conflicts from the regions.
A dependency between tasks on different workers costs a sync latency (one
release/acquire round trip: `sync_latency_us`), one on the same worker costs nothing,
which pulls chains onto one worker.

With roles (the roles pass gives every task one), a task is placed only on the workers
of its role; the global order stays the list-scheduling order, so it is still one
order consistent with every queue. Without roles every worker is a candidate.

Events, waits and the memory plan are left empty: `sync` and `memplan` fill them.
"""
from __future__ import annotations

import heapq

import numpy as np

from tilec.errors import ScheduleError
from tilec.ir.abi import PREFETCH_DEPTH
from tilec.ir.schedule import Schedule
from tilec.ir.target import Target
from tilec.ir.tasks import TaskGraph
from tilec.passes.cost import (Prefetch, adjacency, bottom_levels, edges, sorted_unique,
                               task_costs)

POLICIES = ("critical_path", "round_robin")


def sync_latency_us(target: Target) -> float:
    """From a producer's signal to a consumer on another worker seeing it: one L2 round
    trip on a target with latencies (the release lands, the next poll reads it), else
    half the flat task overhead."""
    if target.l2_latency_us > 0:
        return target.l2_latency_us
    return 0.5 * target.task_overhead_us


def schedule(taskgraph: TaskGraph, target: Target, policy: str = "critical_path") -> Schedule:
    if policy not in POLICIES:
        raise ScheduleError(f"unknown scheduling policy {policy!r}; use one of {POLICIES}")
    n = len(taskgraph.tasks)
    for i, task in enumerate(taskgraph.tasks):
        if task.id != i:
            raise ScheduleError(f"task at index {i} has id {task.id}; ids must be 0..n-1")
    before, after = edges(taskgraph)
    bad = np.flatnonzero(~((0 <= before) & (before < after) & (after < n)))
    if len(bad):
        dep = taskgraph.deps[bad[0]]
        raise ScheduleError(f"dep {dep.before} -> {dep.after} on buffer {dep.buffer!r} "
                            f"does not point forward in program order")
    workers = max(1, target.workers)
    role_workers, role = _roles(taskgraph, target, workers)
    preds = adjacency(n, after, before)
    costs = task_costs(taskgraph, target)
    if policy == "round_robin":
        return _place(taskgraph, target, workers, list(range(n)), _round_robin,
                      role_workers, role, preds, costs)
    # Two priority rules, the schedule that finishes first kept (ties: the first rule).
    # The longest path from a task to the end, the task included (bottom level), is the
    # classic rule; the same without the task's own time (its latest finish, reversed)
    # ranks a short task with a long chain behind it higher. In a decode layer the k and
    # v projections (8 us tiles) lead through RoPE and the cache append to attention,
    # the q projection (12 us tiles) leads there directly: with 256 tiles on 132 workers
    # one of them runs in a second wave, and that should be q, whose chain is shorter.
    times = costs[0]
    level = np.array(bottom_levels(taskgraph, target, (before, after), times))
    rules = (level, level - np.array(times))
    schedules = [_place(taskgraph, target, workers, _priority_sequence(rule, before, after),
                        _earliest_start, role_workers, role, preds, costs) for rule in rules]
    return min(schedules, key=lambda s: max(s.finish_us, default=0.0))


def _roles(taskgraph: TaskGraph, target: Target,
           workers: int) -> tuple[list[tuple[int, ...]], list[int]]:
    """The workers of each role (ascending) and the role of each task, as indices;
    without roles, one role with every worker."""
    n = len(taskgraph.tasks)
    if not target.roles:
        return [tuple(range(workers))], [0] * n
    if len(taskgraph.roles) != n:
        raise ScheduleError(f"the target has roles but {len(taskgraph.roles)} of {n} tasks "
                            "have one (run the roles pass before schedule)")
    index = {r.name: i for i, r in enumerate(target.roles)}
    role_workers = [tuple(sorted(w for w in r.workers if 0 <= w < workers))
                    for r in target.roles]
    for task, role in zip(taskgraph.tasks, taskgraph.roles):
        if role not in index or not role_workers[index[role]]:
            raise ScheduleError(f"task {task.id} (group {task.group}) has role {role!r}, "
                                "which has no workers on this target")
    return role_workers, [index[role] for role in taskgraph.roles]


def _priority_sequence(priority: np.ndarray, before: np.ndarray,
                       after: np.ndarray) -> list[int]:
    """Tasks in the order list scheduling picks them: among ready tasks, the largest
    priority first (ties: lowest id). The result is a topological order."""
    n = len(priority)
    if bool((priority[before] > priority[after]).all()):
        # Every task ranks below all its predecessors (the rules' priorities are path
        # lengths, and each task takes time; checked here, since rounding could tie):
        # then the most urgent task not yet picked is always ready, and the picking
        # order is simply the tasks by priority, descending (ties: lowest id).
        return np.lexsort((np.arange(n), -priority)).tolist()
    level = priority.tolist()
    succ, bounds = adjacency(n, before, after)
    missing = np.bincount(after, minlength=n)
    ready = [(-level[t], t) for t in np.flatnonzero(missing == 0).tolist()]
    heapq.heapify(ready)
    sequence = []
    while ready:
        _, t = heapq.heappop(ready)
        sequence.append(t)
        s = succ[bounds[t]:bounds[t + 1]]
        if len(s):
            np.subtract.at(missing, s, 1)     # .at: a repeated dep counts each time
            for u in sorted_unique(s[missing[s] == 0]).tolist():
                heapq.heappush(ready, (-level[u], u))
    return sequence


def _earliest_start(preds, worker_of, finish, free, latency, allowed, rank):
    """The worker of `allowed` (ascending) on which a task with predecessors `preds` can
    start first (ties: lowest index), and when.

    Every worker sees the remote arrival time of the latest predecessor, plus the sync
    latency, except the worker that ran that predecessor (the top worker; ties: the
    lowest): there the task may start after its own latest predecessor and the latest
    finish among the OTHER workers (plus the latency). Any other worker that ran a
    predecessor gains nothing from it: that one finished no later than the latest, so
    the remote arrival (latest finish + latency >= 0) covers it."""
    remote, top = 0.0, -1
    if len(preds) == 1:   # most tasks: the same values without five numpy calls
        latest = finish[preds[0]]
        top = int(worker_of[preds[0]])
        remote = latest + latency
        second = 0.0
    elif len(preds):
        f = finish[preds]
        w = worker_of[preds]
        latest = f.max()
        top = int(w[f == latest].min())
        remote = latest + latency
        rest = f[w != top]
        second = rest.max() + latency if len(rest) else 0.0
    t = np.maximum(free[allowed], remote)
    if top >= 0:
        k = int(allowed.searchsorted(top))
        if k < len(allowed) and allowed[k] == top:
            t[k] = max(free[top], latest, second)
    i = int(t.argmin())                  # first minimum: ties go to the lowest worker
    return int(allowed[i]), float(t[i])


def _round_robin(preds, worker_of, finish, free, latency, allowed, rank):
    """Tasks dealt to their role's workers in turn (`rank`: earlier tasks of the role)."""
    w = int(allowed[rank % len(allowed)])
    arrival = finish[preds] + np.where(worker_of[preds] == w, 0.0, latency)
    ready = float(arrival.max()) if len(preds) else 0.0
    return w, max(float(free[w]), ready)


def _prefetched(p: Prefetch, wait: float, follows: bool,
                credit: float) -> tuple[float, float, float]:
    """(what a task's weight prefetch, cost.Prefetch, takes off its time; how much of
    `credit` it used; how much of the wait it left). `wait`: how long the worker waits
    for the task's inputs; `follows`: another task ran before it on the worker (the
    latency hides behind that one, else behind the wait); `credit`: HBM slack since the
    prefetch was asked for. The prefetch streams in the credit first, then in the wait."""
    hidden = p.latency if follows else min(wait, p.latency)
    window = max(0.0, wait - (0.0 if follows else hidden))
    from_credit = min(credit, p.stream)
    from_window = min(window, p.stream - from_credit)
    return hidden + from_credit + from_window, from_credit, window - from_window


class _Slack:
    """One worker's HBM slack not yet used by a prefetch, as (us, index of the last
    task of the queue that may use it): slack during the worker's k-th task (its wait
    or its run) can stream the weights of tasks up to k + PREFETCH_DEPTH, whose
    prefetches have been asked for by then, no later ones."""

    def __init__(self):
        self.parts: list[list[float]] = []

    def usable(self, k: int) -> float:
        self.parts = [p for p in self.parts if p[1] >= k]
        return sum(p[0] for p in self.parts)

    def use(self, amount: float) -> None:
        for p in self.parts:   # the oldest first
            taken = min(p[0], amount)
            p[0] -= taken
            amount -= taken

    def add(self, amount: float, k: int) -> None:
        if amount > 0:
            self.parts.append([amount, k + PREFETCH_DEPTH])


def _place(taskgraph: TaskGraph, target: Target, workers: int, sequence: list[int],
           place, role_workers: list[tuple[int, ...]], role: list[int],
           preds: tuple[np.ndarray, list[int]],
           costs: tuple[list[float], list[Prefetch]]) -> Schedule:
    """Each task of `sequence` onto the worker `place` picks. `preds`: predecessor ids
    grouped by task (cost.adjacency); `costs`: cost.task_costs (a task ends sooner by
    what its weight prefetch saves: `_prefetched`)."""
    times, savings = costs
    n = len(taskgraph.tasks)
    pred_ids, bounds = preds
    latency = sync_latency_us(target)
    queues: list[list[int]] = [[] for _ in range(workers)]
    free = np.zeros(workers)
    slack = [_Slack() for _ in range(workers)]   # HBM slack for the next prefetches
    worker_of = np.full(n, -1, dtype=np.int64)
    start = np.zeros(n)
    finish = np.zeros(n)
    allowed = [np.array(ws, dtype=np.int64) for ws in role_workers]
    placed_in_role = [0] * len(role_workers)
    for t in sequence:
        r = role[t]
        w, s = place(pred_ids[bounds[t]:bounds[t + 1]], worker_of, finish, free, latency,
                     allowed[r], placed_in_role[r])
        placed_in_role[r] += 1
        worker_of[t] = w
        k, p = len(queues[w]), savings[t]
        saved, used, left = _prefetched(p, s - free[w], k > 0, slack[w].usable(k))
        slack[w].use(used)
        took = times[t] - saved
        # the next prefetches stream in what the wait left, and in what this task's run
        # leaves of the share (its time beyond its own bytes)
        slack[w].add(left + max(0.0, took - p.busy), k)
        start[t], finish[t] = s, s + took
        free[w] = finish[t]
        queues[w].append(t)
    if len(sequence) != n:
        raise ScheduleError(f"deps contain a cycle: only {len(sequence)} of {n} tasks "
                            f"could be ordered")
    return Schedule(taskgraph=taskgraph, target=target,
                    queues=tuple(tuple(q) for q in queues), order=tuple(sequence),
                    start_us=tuple(start.tolist()), finish_us=tuple(finish.tolist()))
