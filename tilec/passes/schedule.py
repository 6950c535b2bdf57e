"""schedule: TaskGraph -> Schedule (queues, global order, predicted times).

List scheduling onto the target's workers. The scheduler trusts `taskgraph.deps`
(the deps pass runs first); `verify` later re-derives conflicts from the regions.
A dependency between tasks on different workers costs a sync latency (half a task
overhead: one release/acquire round trip), one on the same worker costs nothing,
which pulls chains onto one worker.

With roles (the roles pass gives every task one), a task is placed only on the workers
of its role; the global order stays the list-scheduling order, so it is still one
order consistent with every queue. Without roles every worker is a candidate.

Events, waits and the memory plan are left empty: `sync` and `memplan` fill them.
"""
from __future__ import annotations

import heapq

from tilec.errors import ScheduleError
from tilec.ir.schedule import Schedule
from tilec.ir.target import Target
from tilec.ir.tasks import TaskGraph
from tilec.passes.cost import bottom_levels, predecessors, successors, task_times

POLICIES = ("critical_path", "round_robin")


def sync_latency_us(target: Target) -> float:
    return 0.5 * target.task_overhead_us


def schedule(taskgraph: TaskGraph, target: Target, policy: str = "critical_path") -> Schedule:
    if policy not in POLICIES:
        raise ScheduleError(f"unknown scheduling policy {policy!r}; use one of {POLICIES}")
    n = len(taskgraph.tasks)
    for i, task in enumerate(taskgraph.tasks):
        if task.id != i:
            raise ScheduleError(f"task at index {i} has id {task.id}; ids must be 0..n-1")
    for dep in taskgraph.deps:
        if not 0 <= dep.before < dep.after < n:
            raise ScheduleError(f"dep {dep.before} -> {dep.after} on buffer {dep.buffer!r} "
                                f"does not point forward in program order")
    workers = max(1, target.workers)
    role_workers, role = _roles(taskgraph, target, workers)
    if policy == "critical_path":
        sequence = _critical_path_sequence(taskgraph, target)
        place = _earliest_start
    else:
        sequence = list(range(n))
        place = _round_robin
    return _place(taskgraph, target, workers, sequence, place, role_workers, role)


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


def _critical_path_sequence(taskgraph: TaskGraph, target: Target) -> list[int]:
    """Tasks in the order list scheduling picks them: among ready tasks, the largest
    bottom level first (ties: lowest id). The result is a topological order."""
    level = bottom_levels(taskgraph, target)
    succ = successors(taskgraph)
    missing = [0] * len(level)
    for dep in taskgraph.deps:
        missing[dep.after] += 1
    ready = [(-level[t], t) for t in range(len(level)) if missing[t] == 0]
    heapq.heapify(ready)
    sequence = []
    while ready:
        _, t = heapq.heappop(ready)
        sequence.append(t)
        for s in succ[t]:
            missing[s] -= 1
            if missing[s] == 0:
                heapq.heappush(ready, (-level[s], s))
    return sequence


def _earliest_start(task, preds, worker_of, finish, free, latency, allowed, rank):
    """The worker of `allowed` on which `task` can start first (ties: lowest index),
    and when.

    Every worker sees the remote arrival time of the latest predecessor, except the
    few workers that ran predecessors themselves: only those need a closer look."""
    latest: dict[int, float] = {}   # worker -> latest finish of a predecessor on it
    for p in preds:
        w = worker_of[p]
        if finish[p] > latest.get(w, -1.0):
            latest[w] = finish[p]
    # The two latest finishing workers: a worker's remote arrival is the latest
    # finish among the OTHER workers, plus the sync latency.
    top = sorted(latest.items(), key=lambda item: (-item[1], item[0]))[:2]
    remote = top[0][1] + latency if top else 0.0
    best_w, best_t = -1, float("inf")
    for w in allowed:
        if w in latest:
            continue
        f = free[w]
        t = f if f > remote else remote
        if t < best_t:
            best_w, best_t = w, t
            if f <= remote:
                break  # every later worker starts at `remote` or later
    for w, mine in latest.items():
        if len(allowed) != len(free) and w not in allowed:
            continue
        others = top[1][1] + latency if top[0][0] == w and len(top) > 1 else \
            (0.0 if top[0][0] == w else remote)
        t = max(free[w], mine, others)
        if t < best_t or (t == best_t and w < best_w):
            best_w, best_t = w, t
    return best_w, best_t


def _round_robin(task, preds, worker_of, finish, free, latency, allowed, rank):
    """Tasks dealt to their role's workers in turn (`rank`: earlier tasks of the role)."""
    w = allowed[rank % len(allowed)]
    ready = max((finish[p] + (0.0 if worker_of[p] == w else latency) for p in preds),
                default=0.0)
    return w, max(free[w], ready)


def _place(taskgraph: TaskGraph, target: Target, workers: int, sequence: list[int],
           place, role_workers: list[tuple[int, ...]], role: list[int]) -> Schedule:
    n = len(taskgraph.tasks)
    times = task_times(taskgraph, target)
    preds = predecessors(taskgraph)
    latency = sync_latency_us(target)
    queues: list[list[int]] = [[] for _ in range(workers)]
    free = [0.0] * workers
    worker_of = [-1] * n
    start = [0.0] * n
    finish = [0.0] * n
    placed_in_role = [0] * len(role_workers)
    for t in sequence:
        r = role[t]
        w, s = place(t, preds[t], worker_of, finish, free, latency, role_workers[r],
                     placed_in_role[r])
        placed_in_role[r] += 1
        worker_of[t] = w
        start[t], finish[t] = s, s + times[t]
        free[w] = finish[t]
        queues[w].append(t)
    if len(sequence) != n:
        raise ScheduleError(f"deps contain a cycle: only {len(sequence)} of {n} tasks "
                            f"could be ordered")
    return Schedule(taskgraph=taskgraph, target=target,
                    queues=tuple(tuple(q) for q in queues), order=tuple(sequence),
                    start_us=tuple(start), finish_us=tuple(finish))
