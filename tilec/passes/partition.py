"""partition: TaskGraph -> one TaskGraph per device, with transfers (multi-device engines).

Tensor parallelism at the tile level. Each fused group belongs to a device role
(model.yaml `target.roles` with `devices:`; without any, one role with every device):

* a group of one task (a norm, a residual add, the last argmax stage) is replicated:
  every device of its role runs it on its own copy of the data, so what it computes
  is local wherever it is read next;
* a group of several tasks is split into contiguous runs of tiles, one run per device
  of its role: attention by head (tile axis 0: the KV head), other groups along the
  tile axis with the most blocks (matmuls: output columns). Contiguous runs line up
  across groups, so the projection of a head's query, key and value lands on the
  device whose attention reads them.

Every region a task reads on a device where no task writes it is sent there from a
device that computed it, as a part of a `Transfer`: each device taking part holds one
transfer task, which reads the regions it sends and writes those it receives. The
parts of a split group (every device's tiles of its output) form one transfer, an
all-gather, when nothing reads them before the group's last tile; a device's tiles of
one buffer travel as one region when they make one box. The graph outputs are read by
the host on every device (each device runs the same generation loop), so they reach
all.

Within each device, program order is the order of the tasks in the whole graph, each
transfer placed right after the last task it carries, so the deps pass derives, on
each device, what waits for a transfer and what a transfer waits for. Transfers run
on each device's comm worker in sequence order: the deps pass chains them.

Each device is then scheduled on its own; `time_devices` (after sync) predicts the
times of all devices together, a transfer starting when all its parties are ready.
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import replace

import numpy as np

from tilec.errors import ConfigError
from tilec.ir.graph import DTYPE_BYTES, Group
from tilec.ir.schedule import Schedule
from tilec.ir.target import MAX_DEVICES, Role, Target
from tilec.ir.tasks import TRANSFER, Region, Task, TaskGraph, Transfer, TransferPart
from tilec.passes.cost import task_times
from tilec.passes.geometry import box_array, overlap_matrix
from tilec.passes.roles import (COMM_ROLE, check_names_match, role_of_group,
                                worker_roles_of_groups)


COMPUTE_ROLE = "compute"    # a device's kernel workers' role, unless its device role splits them
BLOCK = 1 << 22             # box comparisons per numpy sweep


def device_target(target: Target, device: int) -> Target:
    """The target of one device's schedule: the kernel's workers, in the worker roles of
    the device's role (model.yaml `roles:` inside a device role; without them one role,
    COMPUTE_ROLE, with every kernel worker), plus one comm worker (the last) that only
    runs transfers, driven by the host."""
    inner = target.device_role(device).roles or (Role(COMPUTE_ROLE, tuple(range(target.workers))),)
    return replace(target, workers=target.workers + 1,
                   roles=inner + (Role(COMM_ROLE, (target.workers,), kinds=(TRANSFER,)),))


def engine_target(part_target: Target) -> Target:
    """The multi-device target a device's schedule target was made from (the inverse of
    device_target): its device roles, without the comm worker and the worker roles."""
    return replace(part_target, workers=part_target.workers - 1, roles=())


def group_roles(taskgraph: TaskGraph, target: Target) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per group: the devices of its device role, and its worker role on them. Checks
    the role definitions against the model (a ConfigError naming the key path)."""
    groups = taskgraph.fused.groups
    ops = taskgraph.fused.graph.by_name()
    roles = target.all_device_roles()
    if target.device_roles:
        check_names_match(groups, ops, target.device_roles)
        owner = {g.name: role_of_group(g, ops, roles) for g in groups}
    else:
        owner = {g.name: roles[0].name for g in groups}
    inner = worker_roles_of_groups(groups, ops, roles, owner)
    devices = {r.name: r.devices for r in roles}
    return {g.name: (devices[owner[g.name]], inner.get(g.name, COMPUTE_ROLE)) for g in groups}


def split_axis(group: Group, grid: tuple[int, int, int]) -> int:
    """The tile axis a group is split along across devices."""
    if group.kind == "attention":
        return 0   # KV heads: a head's partial and merge tasks stay on one device
    return max((2, 0, 1), key=lambda a: grid[a])   # most blocks; ties: columns first


def assign_devices(taskgraph: TaskGraph,
                   roles: dict[str, tuple[tuple[int, ...], str]]) -> list[tuple[int, ...]]:
    """The devices each task runs on (several: a replicated task), by task id, from
    each group's devices (`group_roles`)."""
    tilings = {t.group: t for t in taskgraph.tilings}
    by_group: dict[str, list[Task]] = {}
    for t in taskgraph.tasks:
        by_group.setdefault(t.group, []).append(t)
    out: list[tuple[int, ...]] = [()] * len(taskgraph.tasks)
    for g in taskgraph.fused.groups:
        tasks = by_group.get(g.name, [])
        devices = roles[g.name][0]
        if len(tasks) == 1:
            out[tasks[0].id] = devices
            continue
        axis = split_axis(g, tilings[g.name].grid)
        blocks = sorted({t.tile[axis] for t in tasks})
        index = {b: i for i, b in enumerate(blocks)}
        for t in tasks:
            out[t.id] = (devices[index[t.tile[axis]] * len(devices) // len(blocks)],)
    return out


def _masks(devices: list[tuple[int, ...]]) -> np.ndarray:
    masks = np.zeros(len(devices), dtype=np.int64)
    for i, ds in enumerate(devices):
        for d in ds:
            masks[i] |= 1 << d
    return masks


def _needs(taskgraph: TaskGraph, masks: np.ndarray, host_mask: int):
    """Per write (task id, region, device mask, first reader): the devices that read an
    overlapping region but do not run the writer, and the first later task reading it
    on one of them (n: only the host, which reads the outputs after the step; n + 1:
    no later reader)."""
    n = len(taskgraph.tasks)
    outputs = {o.value for _, o in taskgraph.fused.graph.outputs}
    reads: dict[str, list[tuple[int, Region]]] = {}
    for t in taskgraph.tasks:
        for r in t.reads:
            reads.setdefault(r.buffer, []).append((t.id, r))
    for b in taskgraph.buffers:   # the host reads every output on every device, last
        if b.name in outputs:
            whole = Region(b.name, tuple((0, s) for s in b.type.shape))
            reads.setdefault(b.name, []).append((n, whole))
    writes: dict[str, list[tuple[int, Region]]] = {}
    for t in taskgraph.tasks:
        for r in t.writes:
            writes.setdefault(r.buffer, []).append((t.id, r))
    found = []
    for buffer, ws in writes.items():
        rs = reads.get(buffer, [])
        if not rs:
            continue
        w_id = np.array([t for t, _ in ws], dtype=np.int64)
        r_id = np.array([t for t, _ in rs], dtype=np.int64)
        w_box, r_box = box_array([r for _, r in ws]), box_array([r for _, r in rs])
        r_mask = np.array([host_mask if t == n else masks[t] for t in r_id.tolist()],
                          dtype=np.int64)
        need = np.zeros(len(ws), dtype=np.int64)
        first = np.full(len(ws), n + 1, dtype=np.int64)
        step = max(1, BLOCK // max(1, len(rs) * w_box.shape[1]))
        for a in range(0, len(ws), step):
            wb = w_box[a:a + step]
            overlap = overlap_matrix(wb, r_box)
            missing = r_mask[None, :] & ~masks[w_id[a:a + step]][:, None]
            hit = overlap & (missing != 0)
            need[a:a + step] = np.bitwise_or.reduce(np.where(hit, missing, 0), axis=1)
            later = hit & (r_id[None, :] > w_id[a:a + step, None])
            first[a:a + step] = np.where(later, r_id[None, :], n + 1).min(axis=1)
        for k in np.flatnonzero(need).tolist():
            found.append((ws[k][0], ws[k][1], int(need[k]), int(first[k])))
    return found


def _one_box(boxes: list[tuple[tuple[int, int], ...]]) -> tuple[tuple[int, int], ...] | None:
    """The one box that `boxes` tile exactly (no overlaps, no gaps), or None."""
    lo = [min(b[d][0] for b in boxes) for d in range(len(boxes[0]))]
    hi = [max(b[d][1] for b in boxes) for d in range(len(boxes[0]))]
    total = int(np.prod([h - l for l, h in zip(lo, hi)]))
    if sum(Region("", b).numel for b in boxes) != total:
        return None
    arr = np.array(boxes, dtype=np.int64)
    if np.count_nonzero(overlap_matrix(arr, arr)) != len(boxes):   # each with itself only
        return None
    return tuple(zip(lo, hi))


def _bits(mask: int) -> tuple[int, ...]:
    return tuple(d for d in range(MAX_DEVICES) if mask >> d & 1)


def plan_transfers(taskgraph: TaskGraph, devices: list[tuple[int, ...]],
                   n_devices: int) -> list[tuple[int, Transfer]]:
    """(last task carried, transfer) pairs, in the order the transfers run.

    A part is what one device sends of one group's output buffer: one box when its
    tiles make one and nothing reads them before the last of them, else a part per
    tile. A group's parts, from every device and buffer, make one transfer (the
    all-gather of a split group) when nothing reads any of them before the last;
    else each part is its own transfer, right after its writer."""
    masks = _masks(devices)
    tasks = taskgraph.tasks
    buckets: dict[tuple[str, str, int], list[tuple[int, Region, int, int]]] = {}
    for t, region, need, first in _needs(taskgraph, masks, (1 << n_devices) - 1):
        buckets.setdefault((tasks[t].group, region.buffer, devices[t][0]), []).append(
            (t, region, need, first))
    by_group: dict[str, list[tuple[int, int, TransferPart]]] = {}   # (last, first, part)
    for (group, _, src), items in buckets.items():
        last = max(t for t, *_ in items)
        first = min(f for *_, f in items)
        box = _one_box([r.box for _, r, _, _ in items]) if len(items) > 1 else None
        if box is not None and first > last:
            mask = 0
            for _, _, need, _ in items:
                mask |= need
            parts = [(last, first, TransferPart(src, Region(items[0][1].buffer, box),
                                                _bits(mask)))]
        else:
            parts = [(t, f, TransferPart(src, r, _bits(need))) for t, r, need, f in items]
        by_group.setdefault(group, []).extend(parts)
    planned: list[tuple[int, tuple[TransferPart, ...]]] = []
    for items in by_group.values():
        last = max(t for t, _, _ in items)
        if min(f for _, f, _ in items) > last:
            planned.append((last, tuple(sorted((p for *_, p in items), key=_part_key))))
        else:
            planned += [(t, (p,)) for t, _, p in items]
    planned.sort(key=lambda p: (p[0], [_part_key(x) for x in p[1]]))
    return [(after, Transfer(seq, parts)) for seq, (after, parts) in enumerate(planned)]


def _part_key(part: TransferPart):
    return part.region.buffer, part.src, part.region.box


def _transfer_task(tid: int, transfer: Transfer, device: int, dtypes: dict[str, str]) -> Task:
    reads, writes = transfer.sends(device), transfer.receives(device)
    moved: dict[str, int] = {}
    for r in reads + writes:
        moved[r.buffer] = moved.get(r.buffer, 0) + r.numel * DTYPE_BYTES[dtypes[r.buffer]]
    return Task(tid, TRANSFER, (transfer.seq, 0, 0), reads=reads, writes=writes, flops=0,
                bytes=sum(moved.values()), moved=tuple(moved.items()))


def partition(taskgraph: TaskGraph, target: Target) -> tuple[TaskGraph, ...]:
    n_devices = target.devices
    if not 1 < n_devices <= MAX_DEVICES:
        raise ConfigError(f"target.devices: a multi-device engine has 2 to {MAX_DEVICES} "
                          f"devices, not {n_devices}")
    roles = group_roles(taskgraph, target)
    devices = assign_devices(taskgraph, roles)
    planned = plan_transfers(taskgraph, devices, n_devices)
    transfers = tuple(t for _, t in planned)
    dtypes = {b.name: b.type.dtype for b in taskgraph.buffers}
    after: dict[int, list[Transfer]] = {}
    for last, t in planned:
        after.setdefault(last, []).append(t)
    parts = []
    for d in range(n_devices):
        tasks: list[Task] = []
        task_roles: list[str] = []
        for task in taskgraph.tasks:
            if d in devices[task.id]:
                tasks.append(replace(task, id=len(tasks)))
                task_roles.append(roles[task.group][1])
            for t in after.get(task.id, ()):
                if d in t.members:
                    tasks.append(_transfer_task(len(tasks), t, d, dtypes))
                    task_roles.append(COMM_ROLE)
        parts.append(replace(taskgraph, tasks=tuple(tasks), deps=(), roles=tuple(task_roles),
                             device=d, devices=n_devices, transfers=transfers))
    return tuple(parts)


def device_role_problems(parts: tuple[Schedule, ...], target: Target) -> list[str]:
    """Every compute task runs on a device of the device role its group belongs to and
    has the worker role its group has there (both recomputed from the role definitions
    of `target`, which carries the engine's device roles); each device's schedule is
    made for the worker roles its device role defines (its own verify then checks each
    task's worker); and every tile of the model runs on some device."""
    if not parts:
        return []
    first = parts[0].taskgraph
    try:
        roles = group_roles(first, target)
    except ConfigError as e:
        return [str(e)]
    out = []
    seen: set[tuple[str, tuple[int, int, int]]] = set()
    for part in parts:
        tg, d = part.taskgraph, part.taskgraph.device
        want = device_target(target, d).roles
        if part.target.roles != want:
            out.append(f"device {d}: its schedule's worker roles "
                       f"{[(r.name, list(r.workers)) for r in part.target.roles]} are not "
                       f"those of its device role {target.device_role(d).name!r} "
                       f"{[(r.name, list(r.workers)) for r in want]}")
        task_roles = tg.roles if len(tg.roles) == len(tg.tasks) else ("?",) * len(tg.tasks)
        for task, role in zip(tg.tasks, task_roles):
            if task.group == TRANSFER:
                continue
            seen.add((task.group, task.tile))
            if task.group not in roles:
                out.append(f"device {d}: task {task.id} names unknown group {task.group}")
                continue
            allowed, worker_role = roles[task.group]
            if d not in allowed:
                out.append(f"device {d}: task {task.id} (group {task.group}) runs outside "
                           f"its role's devices {list(allowed)}")
            elif role != worker_role:
                out.append(f"device {d}: task {task.id} (group {task.group}) has worker "
                           f"role {role!r}, but its device role gives the group to worker "
                           f"role {worker_role!r}")
    for tl in first.tilings:
        nb, nm, nn = tl.grid
        missing = [(b, m, c) for b in range(nb) for m in range(nm) for c in range(nn)
                   if (tl.group, (b, m, c)) not in seen]
        if missing:
            out.append(f"tile {missing[0]} of group {tl.group} runs on no device")
    return out


def time_devices(scheds: tuple[Schedule, ...]) -> tuple[Schedule, ...]:
    """Predicted times of every device's tasks, with the devices run together: each
    device's schedule was timed alone, as if its received regions came at once. Here a
    transfer starts when every party has it next on its comm worker and is ready, and
    ends for all of them when the party with the most bytes is done (cost.task_times),
    so a device waits for the others where it really would. Replaces each schedule's
    start and finish times."""
    times = [task_times(s.taskgraph, s.target) for s in scheds]
    comm = [s.target.comm_worker() for s in scheds]
    cursor = [[0] * len(s.queues) for s in scheds]
    free = [[0.0] * len(s.queues) for s in scheds]
    signalled: list[list[list[float]]] = [[[] for _ in s.events] for s in scheds]
    start = [[0.0] * len(s.taskgraph.tasks) for s in scheds]
    finish = [[0.0] * len(s.taskgraph.tasks) for s in scheds]

    def ready_at(d: int, t: int) -> float | None:
        """When task t's waits are met, or None if not yet known."""
        at = 0.0
        for w in scheds[d].waits[t]:
            got = signalled[d][w.event]
            if len(got) < scheds[d].events[w.event].signals:   # wait for all of them
                return None
            at = max(at, got[w.count - 1])   # kept sorted by run()
        return at

    def run(d: int, w: int, t: int, begin: float, length: float) -> None:
        start[d][t], finish[d][t] = begin, begin + length
        free[d][w] = begin + length
        bisect.insort(signalled[d][scheds[d].signal[t]], begin + length)
        cursor[d][w] += 1

    def head(d: int, w: int) -> int | None:
        q = scheds[d].queues[w]
        return q[cursor[d][w]] if cursor[d][w] < len(q) else None

    transfers = scheds[0].taskgraph.transfers
    progressed = True
    while progressed:
        progressed = False
        for d, s in enumerate(scheds):
            for w in range(len(s.queues)):
                while w != comm[d] and (t := head(d, w)) is not None:
                    at = ready_at(d, t)
                    if at is None:
                        break
                    run(d, w, t, max(free[d][w], at), times[d][t])
                    progressed = True
        # a transfer can run only at the head of every party's comm worker: the heads'
        # transfers, in sequence order as a scan of all would meet them (a transfer
        # that runs exposes the next, met in this pass if its number is higher); a scan
        # of every transfer per pass took 29 s of GLM-5's 78-layer plan
        heads_seq = {seq for seq in (_comm_head(scheds, d, head(d, comm[d]))
                                     for d in range(len(scheds))) if seq is not None}
        pending = sorted(heads_seq)
        while pending:
            tr = transfers[heapq.heappop(pending)]
            parties = tr.members
            heads = [head(p, comm[p]) for p in parties]
            if any(h is None or scheds[p].taskgraph.tasks[h].tile[0] != tr.seq
                   for p, h in zip(parties, heads)):
                continue
            ready = [ready_at(p, h) for p, h in zip(parties, heads)]
            if any(r is None for r in ready):
                continue
            begin = max(max(free[p][comm[p]], r) for p, r in zip(parties, ready))
            length = max(times[p][h] for p, h in zip(parties, heads))   # ends together
            for p, h in zip(parties, heads):
                run(p, comm[p], h, begin, length)
                seq = _comm_head(scheds, p, head(p, comm[p]))
                if seq is not None and seq > tr.seq and seq not in heads_seq:
                    heads_seq.add(seq)
                    heapq.heappush(pending, seq)
            progressed = True
    if any(head(d, w) is not None for d, s in enumerate(scheds) for w in range(len(s.queues))):
        return scheds   # the devices cannot finish a step: verify_devices says why
    return tuple(replace(s, start_us=tuple(a), finish_us=tuple(b))
                 for s, a, b in zip(scheds, start, finish))


def _comm_head(scheds: tuple[Schedule, ...], d: int, t: int | None) -> int | None:
    """The sequence number of device d's task `t` if it is a transfer (else None)."""
    if t is None:
        return None
    task = scheds[d].taskgraph.tasks[t]
    seq = task.tile[0]
    ok = task.group == TRANSFER and 0 <= seq < len(scheds[0].taskgraph.transfers)
    return seq if ok else None
