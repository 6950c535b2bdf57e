"""sync: Schedule -> Schedule with events, one signal per task, and waits.

Events. A consumer needs, from each producer group, some set of that group's tasks.
The group's tasks are split into the coarsest blocks such that every consumer's
needed set is a union of blocks (tasks with the same set of consumers share a block);
a block is one event counter that each of its tasks signals once. A consumer then
waits on each block it needs for the block's full count, so a wait never depends on
which of the signallers arrive first. Producers on the consumer's own worker are left
out of the needed sets before blocking: queue order already covers them, and fewer
constraints give coarser blocks (fewer events).

Pruning. Many waits are implied: by queue order, or transitively by another wait.
Walking the tasks in the global order, each task carries a vector clock (per worker,
how many of its tasks are known complete); a wait whose signallers are all already
covered is dropped, otherwise it is kept and its signallers' clocks are joined in.

Whole-group events. When a group's blocks fragment (more than a few), and every task
of the group precedes all its consumers in the global order, the group gets one event
instead (see `_whole_group_events`).

Cap. The task record has room for `max_waits` waits (by default the kernel
interface's cap, ir/abi.py MAX_WAITS). A task that still needs more
has pairs of its events merged into one counter, when that is safe: every waiter of
the merged event comes after every one of its signallers in the global order (so a
waiter that now waits for extra signallers cannot deadlock; it only waits longer).
When no such pair is left the task keeps more waits than `max_waits`: correctness
first; codegen sizes the record by `max(len(w) for w in schedule.waits)`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np

from tilec.errors import ScheduleError
from tilec.ir.abi import MAX_WAITS
from tilec.ir.schedule import Event, Schedule, Wait
from tilec.passes.cost import adjacency, edges, sorted_unique


def sync(schedule: Schedule, max_waits: int = MAX_WAITS) -> Schedule:
    tasks = schedule.taskgraph.tasks
    where = _positions(schedule.queues, len(tasks))
    needs = _cross_worker_needs(schedule, where)
    event_of, members = _blocks(schedule, needs)
    wanted = _wanted(needs, event_of, len(tasks))
    kept = _prune(schedule, where, event_of, members, wanted)
    kept, event_of, members = _cap(schedule, kept, event_of, members, max_waits)
    events = tuple(Event(e, len(m)) for e, m in enumerate(members))
    waits = tuple(tuple(Wait(e, len(members[e])) for e in sorted(kept[t]))
                  for t in range(len(tasks)))
    return replace(schedule, events=events, signal=tuple(event_of), waits=waits)


def _positions(queues, n: int) -> list[tuple[int, int]]:
    """task id -> (worker, position in its queue); every task must be queued once."""
    where: list = [None] * n
    for w, queue in enumerate(queues):
        for i, t in enumerate(queue):
            if not 0 <= t < n or where[t] is not None:
                raise ScheduleError(f"task {t} (worker {w}, #{i}) is unknown or queued twice")
            where[t] = (w, i)
    missing = [t for t in range(n) if where[t] is None]
    if missing:
        raise ScheduleError(f"task {missing[0]} is in no queue")
    return where


def _cross_worker_needs(schedule: Schedule, where) -> tuple[np.ndarray, np.ndarray]:
    """(producer, consumer) pairs, unique and sorted by consumer then producer: the
    producers on other workers each task must wait for. Arrays, not per-task sets: a
    decode step has millions of deps."""
    n = len(schedule.taskgraph.tasks)
    before, after = edges(schedule.taskgraph)
    worker = np.array([w for w, _ in where], dtype=np.int64).reshape(n)
    pos = np.array([i for _, i in where], dtype=np.int64).reshape(n)
    same = worker[before] == worker[after]
    wrong = np.flatnonzero(same & (pos[before] > pos[after]))
    if len(wrong):
        dep = schedule.taskgraph.deps[wrong[0]]
        raise ScheduleError(
            f"task {dep.after} runs before task {dep.before} on worker {worker[dep.after]} "
            f"but depends on it ({dep.kind} on buffer {dep.buffer!r})")
    key = sorted_unique(after[~same] * n + before[~same])
    return key % n, key // n


def _wanted(needs, event_of: list[int], n: int) -> list[list[int]]:
    """Per task, the events (ascending) of the producers it needs."""
    producer, consumer = needs
    events = max(event_of, default=0) + 1
    key = sorted_unique(consumer * events + np.array(event_of, dtype=np.int64)[producer])
    flat, bounds = adjacency(n, key // events, key % events)
    flat = flat.tolist()
    return [flat[a:b] for a, b in zip(bounds, bounds[1:])]


def _blocks(schedule: Schedule, needs) -> tuple[list[int], list[list[int]]]:
    """event id per task, and the tasks of each event. Tasks of one group with the
    same consumers form one block; ids follow the lowest task id of each block."""
    tasks = schedule.taskgraph.tasks
    producer, consumer = needs
    flat, bounds = adjacency(len(tasks), producer, consumer)   # consumers ascending
    # Each task's consumers as bytes: equal exactly when the id lists are, and unlike a
    # tuple's, a bytes object's hash is computed once (the sets are hashed repeatedly).
    consumers = [flat[a:b].tobytes() for a, b in zip(bounds, bounds[1:])]
    whole = _whole_group_events(schedule, consumers, needs)
    ids: dict[tuple, int] = {}
    event_of, members = [], []
    for task in tasks:
        key = (task.group,) if task.group in whole else (task.group, consumers[task.id])
        if key not in ids:
            ids[key] = len(members)
            members.append([])
        event_of.append(ids[key])
        members[ids[key]].append(task.id)
    return event_of, members


def _whole_group_events(schedule: Schedule, consumers, needs, max_blocks: int = 4) -> set[str]:
    """Groups that get one event for all their tasks instead of one per block.

    Exact blocks fragment when consumers need different subsets (e.g. a residual add
    reads one tile, a norm reads them all), and every consumer then waits on many
    blocks. One event per group is safe when every task of the group precedes every
    consumer in the global order (a consumer then waits only for tasks that come
    first: no deadlock); it only makes some consumers wait for tiles they do not read,
    which in a decode step they mostly depend on transitively anyway."""
    tasks = schedule.taskgraph.tasks
    names = list(dict.fromkeys(task.group for task in tasks))
    index = {g: i for i, g in enumerate(names)}
    group = np.array([index[task.group] for task in tasks], dtype=np.int64)
    rank = np.empty(len(tasks), dtype=np.int64)
    rank[np.array(schedule.order, dtype=np.int64)] = np.arange(len(schedule.order))
    last = np.full(len(names), -1, dtype=np.int64)
    np.maximum.at(last, group, rank)
    first_consumer = np.full(len(names), len(tasks), dtype=np.int64)
    producer, consumer = needs
    np.minimum.at(first_consumer, group[producer], rank[consumer])
    blocks: list[set] = [set() for _ in names]
    for task in tasks:
        blocks[group[task.id]].add(consumers[task.id])
    return {g for i, g in enumerate(names)
            if len(blocks[i]) > max_blocks and last[i] < first_consumer[i]}


def _join(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(a, b)


def _covers(clock: np.ndarray, need: np.ndarray) -> bool:
    return not (clock < need).any()


def _prune(schedule: Schedule, where, event_of, members, wanted) -> list[list[int]]:
    """The waits left once those implied by queue order or other waits are dropped."""
    workers = len(schedule.queues)
    rank = {t: i for i, t in enumerate(schedule.order)}
    latest = [max(rank[t] for t in m) for m in members]
    # need[e][w]: 1 + the queue position of event e's last signaller on worker w (0: none)
    need = np.zeros((len(members), workers), dtype=np.int64)
    np.maximum.at(need, (np.array(event_of, dtype=np.int64),
                         np.array([w for w, _ in where], dtype=np.int64)),
                  np.array([i + 1 for _, i in where], dtype=np.int64))
    after: list = [None] * len(event_of)     # VC-after per task
    event_clock: dict[int, np.ndarray] = {}
    zero = np.zeros(workers, dtype=np.int64)
    kept: list[list[int]] = [[] for _ in event_of]

    def clock_of(e: int) -> np.ndarray:
        if e not in event_clock:
            clock = zero
            for t in members[e]:
                if after[t] is None:
                    raise ScheduleError(f"task {t} signals event {e} but comes after a "
                                        f"waiter in the global order")
                clock = _join(clock, after[t])
            event_clock[e] = clock
        return event_clock[e]

    for t in schedule.order:
        w, i = where[t]
        base = after[schedule.queues[w][i - 1]] if i else zero
        clock = base.copy()
        # Latest signallers first: their clocks know the most, so they imply the rest.
        for e in sorted(wanted[t], key=lambda e: (-latest[e], e)):
            if not _covers(clock, need[e]):
                kept[t].append(e)
                clock = _join(clock, clock_of(e))
        # A wait kept early may be implied by ones kept after it: each is checked, in
        # turn, against the base and the other waits still kept (those before it that
        # stayed, joined as we go, and all after it: suffix joins). A single kept wait
        # is not implied: the base alone did not cover it.
        waits = kept[t]
        if len(waits) > 1:
            suffix = [zero] * (len(waits) + 1)
            for j in range(len(waits) - 1, 0, -1):
                suffix[j] = _join(suffix[j + 1], clock_of(waits[j]))
            others, kept[t] = base, []
            for j, e in enumerate(waits):
                if not _covers(_join(others, suffix[j + 1]), need[e]):
                    kept[t].append(e)
                    others = _join(others, clock_of(e))
        clock[w] = i + 1
        after[t] = clock
    return kept


def _cap(schedule: Schedule, kept, event_of, members, max_waits: int):
    """Merge events of tasks with more than `max_waits` waits, where safe (see the
    module docstring); then renumber events by their lowest signalling task."""
    if all(len(k) <= max_waits for k in kept):
        return kept, event_of, members
    rank = {t: i for i, t in enumerate(schedule.order)}
    last_signal = [max(rank[t] for t in m) for m in members]
    waiters: list[set[int]] = [set() for _ in members]
    for t, events in enumerate(kept):
        for e in events:
            waiters[e].add(t)
    first_wait = [min((rank[t] for t in ws), default=len(rank)) for ws in waiters]
    parent = list(range(len(members)))
    kept = [set(k) for k in kept]
    for t in sorted(range(len(kept)), key=lambda t: rank[t]):
        while len(kept[t]) > max_waits:
            pair = _mergeable(sorted(kept[t]), last_signal, first_wait)
            if pair is None:
                break
            a, b = pair
            parent[b] = a
            last_signal[a] = max(last_signal[a], last_signal[b])
            first_wait[a] = min(first_wait[a], first_wait[b])
            for u in waiters[b]:
                kept[u].discard(b)
                kept[u].add(a)
            waiters[a] |= waiters[b]
            waiters[b] = set()

    def root(e: int) -> int:
        while parent[e] != e:
            e = parent[e]
        return e

    merged: dict[int, list[int]] = {}
    for t, e in enumerate(event_of):
        merged.setdefault(root(e), []).append(t)
    renumber = {old: new for new, old in enumerate(sorted(merged, key=lambda r: merged[r][0]))}
    event_of = [renumber[root(e)] for e in event_of]
    members = [merged[old] for old in sorted(merged, key=renumber.get)]
    kept = [sorted(renumber[root(e)] for e in k) for k in kept]
    return kept, event_of, members


def _mergeable(events, last_signal, first_wait):
    for x in range(len(events)):
        for y in range(x + 1, len(events)):
            a, b = events[x], events[y]
            if max(last_signal[a], last_signal[b]) < min(first_wait[a], first_wait[b]):
                return a, b
    return None


def wait_order(queues, signal, waits) -> tuple[list[int], list[int]]:
    """A global order consistent with every queue and every wait (Kahn's algorithm
    over queue edges and signaller -> event -> waiter edges), and the tasks left
    out of it because they sit on (or behind) a cycle. Uses only the stored queues,
    signals and waits, so `verify` can trust it."""
    n = len(signal)
    n_events = max([*signal, *(w.event for ws in waits for w in ws)], default=-1) + 1
    indegree = [0] * (n + n_events)
    out: list[list[int]] = [[] for _ in range(n + n_events)]
    for queue in queues:
        for a, b in zip(queue, queue[1:]):
            out[a].append(b)
            indegree[b] += 1
    for t, e in enumerate(signal):
        out[t].append(n + e)
        indegree[n + e] += 1
    for t, ws in enumerate(waits):
        for w in ws:
            out[n + w.event].append(t)
            indegree[t] += 1
    ready = deque(v for v in range(n + n_events) if indegree[v] == 0)
    order = []
    while ready:
        v = ready.popleft()
        if v < n:
            order.append(v)
        for u in out[v]:
            indegree[u] -= 1
            if indegree[u] == 0:
                ready.append(u)
    done = set(order)
    return order, [t for t in range(n) if t not in done]


def happens_before_clocks(schedule: Schedule) -> np.ndarray:
    """Per task id, its vector clock after it completes (an int64 array [tasks,
    workers], read as clocks[task][worker]): entry w = how many of worker w's first
    tasks are known complete. Task a happens-before task b (a != b) iff
    clocks[b][worker(a)] > position(a). Built only from queues, signals and waits;
    a wait implies its signallers only when it waits for all of them."""
    n = len(schedule.taskgraph.tasks)
    if len(schedule.signal) != n or len(schedule.waits) != n:
        raise ScheduleError("the schedule has no signal and wait per task: run sync first")
    where = _positions(schedule.queues, n)
    order, stuck = wait_order(schedule.queues, schedule.signal, schedule.waits)
    if stuck:
        t = stuck[0]
        raise ScheduleError(f"task {t} (worker {where[t][0]}) is on a wait cycle: no "
                            f"global order fits its queue and waits")
    signallers: dict[int, list[int]] = {}
    for t, e in enumerate(schedule.signal):
        signallers.setdefault(e, []).append(t)
    clocks = np.zeros((n, max(1, len(schedule.queues))), dtype=np.int64)
    # An event's clock (the join of its signallers'), once per event: every signaller
    # of an event waited on in full comes before the waiter in `order`.
    event_clock: dict[int, np.ndarray] = {}
    for t in order:
        w, i = where[t]
        if i:
            clocks[t] = clocks[schedule.queues[w][i - 1]]
        for wait in schedule.waits[t]:
            ss = signallers.get(wait.event, [])
            if ss and wait.count >= len(ss):
                if wait.event not in event_clock:
                    event_clock[wait.event] = clocks[ss].max(axis=0)
                np.maximum(clocks[t], event_clock[wait.event], out=clocks[t])
        clocks[t, w] = i + 1
    return clocks
