"""verify_devices: the checks a multi-device engine needs beyond each device's own.

`verify` proves each device's schedule race- and deadlock-free on its own, transfer
tasks included (on the destination a transfer writes its region, so a reader that
does not wait for it is an unordered RAW). What only the devices together show:

* devices_agree: every part names the same devices, transfers and model (each lays
  out its own pools: it holds its own parts of the weights and the state);
* transfers_matched: each transfer has one task on its source that reads exactly its
  region, one on each destination that writes it, and none elsewhere; each device
  runs its transfers on its comm worker in sequence order;
* reads_delivered: every region a device reads, written earlier in the step by a
  tile that runs on another device, reaches it by a transfer from that device (so a
  transfer the partitioner forgot is caught, not read as stale memory);
* progress_across_devices: all devices run to the end together. A simulation with
  the stored queues, signals and waits, where a transfer completes only when every
  device taking part has it next on its comm worker and ready;
* device_roles: every tile runs on a device of its device role, with the worker role
  its device role gives it there, each device is scheduled for its device role's
  worker roles, and every tile runs somewhere.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from tilec.ir.graph import FusedGraph, Operand
from tilec.ir.schedule import Schedule
from tilec.ir.tasks import TRANSFER, Region
from tilec.passes.geometry import box_array, overlap_matrix
from tilec.passes.partition import device_role_problems, engine_target
from tilec.passes.verify import VerifyReport, report_of, verify

CHECKS = ("devices_agree", "transfers_matched", "reads_delivered",
          "progress_across_devices", "device_roles")


def verify_parts(parts: tuple[Schedule, ...]) -> VerifyReport:
    """An engine's schedules as one report: a one-device engine's own, or every device's
    checks (named `device D: <check>`, violations likewise), then the devices'
    together."""
    if len(parts) == 1:
        return verify(parts[0])
    reports = [(f"device {d}: ", verify(s)) for d, s in enumerate(parts)]
    reports.append(("", verify_devices(parts, engine_target(parts[0].target))))
    checks = {f"{prefix}{name}": ok for prefix, r in reports for name, ok in r.checks.items()}
    violations = tuple(f"{prefix}{v}" for prefix, r in reports for v in r.violations)
    return VerifyReport(all(checks.values()), checks, violations)


def verify_devices(parts: tuple[Schedule, ...], target) -> VerifyReport:
    """The cross-device checks. `target`: the engine's multi-device target, with its
    device roles (`engine_target` of any part's)."""
    found: dict[str, list[str]] = {name: [] for name in CHECKS}
    found["devices_agree"] = _agree(parts)
    if not found["devices_agree"]:
        found["transfers_matched"] = _matched(parts)
        found["reads_delivered"] = _delivered(parts)
        if not found["transfers_matched"]:
            found["progress_across_devices"] = _progress(parts)
        else:
            found["progress_across_devices"] = [
                "progress_across_devices: not checkable until transfers match"]
        found["device_roles"] = [f"device_roles: {p}" for p in
                                 device_role_problems(parts, target)]
    else:
        for name in CHECKS[1:]:
            found[name] = [f"{name}: not checkable while the devices disagree"]
    return report_of(found, CHECKS)


def _unsharded(fused: FusedGraph, sharded: set[str]) -> FusedGraph:
    """The model a device compiles, less the layout of its views of weights some device
    holds as a shard (passes/shard.py: each device's views of those follow its own
    shard's strides; verify checks each device's views against its own buffers)."""
    if not sharded:
        return fused
    ops = tuple(replace(op, inputs=tuple(Operand(x.value, x.shape, (), 0)
                                         if x.value in sharded else x for x in op.inputs))
                for op in fused.graph.ops)
    return replace(fused, graph=replace(fused.graph, ops=ops))


def _agree(parts: tuple[Schedule, ...]) -> list[str]:
    out = []
    first = parts[0].taskgraph
    sharded = {b.name for p in parts for b in p.taskgraph.buffers if b.shard}
    model = _unsharded(first.fused, sharded)
    for d, p in enumerate(parts):
        tg = p.taskgraph
        if tg.device != d or tg.devices != len(parts):
            out.append(f"devices_agree: part {d} says it is device {tg.device} of {tg.devices}")
        if tg.transfers != first.transfers:
            out.append(f"devices_agree: device {d} lists other transfers than device 0")
        if _unsharded(tg.fused, sharded) != model or tg.tilings != first.tilings:
            out.append(f"devices_agree: device {d} compiles another model than device 0")
        if p.target.comm_worker() is None:
            out.append(f"devices_agree: device {d}'s schedule has no comm worker")
    for k, t in enumerate(first.transfers):
        if t.seq != k or not t.parts or any(
                not 0 <= x.src < len(parts) or x.src in x.dsts or not x.dsts or
                any(not 0 <= d < len(parts) for d in x.dsts) for x in t.parts):
            out.append(f"devices_agree: transfer {k} is malformed "
                       f"({[(x.src, list(x.dsts)) for x in t.parts]})")
    return out


def _matched(parts: tuple[Schedule, ...]) -> list[str]:
    out = []
    transfers = parts[0].taskgraph.transfers
    for d, p in enumerate(parts):
        comm = p.target.comm_worker()
        tasks = p.taskgraph.tasks
        held = [t for t in tasks if t.group == TRANSFER]
        seqs = [t.tile[0] for t in held]
        want = [k for k, tr in enumerate(transfers) if d in tr.members]
        if sorted(seqs) != want:
            missing = sorted(set(want) - set(seqs))
            extra = sorted(set(seqs) - set(want))
            out.append(f"transfers_matched: device {d} holds transfers {_few(seqs)}; it takes "
                       f"part in {_few(want)} (missing {_few(missing)}, extra {_few(extra)})")
            continue
        for t in held:
            tr = transfers[t.tile[0]]
            if (t.reads, t.writes) != (tr.sends(d), tr.receives(d)):
                out.append(f"transfers_matched: device {d} task {t.id} does not send and "
                           f"receive the regions of transfer {tr.seq} that are its part")
        if comm is not None and comm < len(p.queues):
            queued = [tasks[t].tile[0] for t in p.queues[comm] if tasks[t].group == TRANSFER]
            if len(p.queues[comm]) != len(queued) or queued != want:
                out.append(f"transfers_matched: device {d}'s comm worker runs "
                           f"{_few(queued)}, not the transfers {_few(want)} alone, in order")
    return out


def _few(xs) -> str:
    xs = list(xs)
    return str(xs) if len(xs) <= 8 else f"[{', '.join(map(str, xs[:8]))}, ...] ({len(xs)})"


def _program_key(parts: tuple[Schedule, ...]):
    """(group, tile) -> its place in the step's program order: the order `tile` made
    the tasks in (groups in fused order, then tiles row-major)."""
    index = {g.name: i for i, g in enumerate(parts[0].taskgraph.fused.groups)}
    return lambda task: (index[task.group], task.tile)


def _delivered(parts: tuple[Schedule, ...]) -> list[str]:
    """Per device and buffer, with numpy: the (reader, earlier writer elsewhere) pairs of
    overlapping regions, and for each the received region from a device that ran the
    writer which contains their intersection."""
    key = _program_key(parts)
    runs: dict[tuple, int] = {}                   # tile -> mask of the devices running it
    writes: dict[str, dict[tuple, Region]] = {}   # buffer -> tile -> region it writes
    keys = []                                     # per device: each task's tile key
    for d, p in enumerate(parts):
        keys.append([None if t.group == TRANSFER else key(t) for t in p.taskgraph.tasks])
        for t, k in zip(p.taskgraph.tasks, keys[d]):
            if k is not None:
                runs[k] = runs.get(k, 0) | 1 << d
                for r in t.writes:
                    writes.setdefault(r.buffer, {})[k] = r
    rank = {k: i for i, k in enumerate(sorted(runs))}   # program order
    writers = {b: (list(ws), box_array(list(ws.values())),
                   np.array([rank[k] for k in ws], dtype=np.int64),
                   np.array([runs[k] for k in ws], dtype=np.int64))
               for b, ws in writes.items()}
    transfers = parts[0].taskgraph.transfers
    out = []
    for d, p in enumerate(parts):
        received: dict[str, list[tuple[int, Region]]] = {}   # buffer -> (src, region)
        reads: dict[str, list[tuple[object, Region, int]]] = {}  # buffer -> (task, region, rank)
        for t, k in zip(p.taskgraph.tasks, keys[d]):
            if k is None and 0 <= t.tile[0] < len(transfers):
                for part in transfers[t.tile[0]].parts:
                    if d in part.dsts and part.region in t.writes:
                        received.setdefault(part.region.buffer, []).append(
                            (part.src, part.region))
            elif k is not None:
                for r in t.reads:
                    if r.buffer in writers:
                        reads.setdefault(r.buffer, []).append((t, r, rank[k]))
        for buffer, rs in reads.items():
            _, w_box, w_rank, w_mask = writers[buffer]
            r_box = box_array([r for _, r, _ in rs])
            r_rank = np.array([k for _, _, k in rs], dtype=np.int64)
            pairs = overlap_matrix(r_box, w_box)
            pairs &= (w_rank[None, :] < r_rank[:, None]) & ((w_mask[None, :] >> d) & 1 == 0)
            ri, wi = np.nonzero(pairs)
            if not len(ri):
                continue
            lo = np.maximum(r_box[ri, :, 0], w_box[wi, :, 0])
            hi = np.minimum(r_box[ri, :, 1], w_box[wi, :, 1])
            got = received.get(buffer, [])
            ok = np.zeros(len(ri), dtype=bool)
            if got:
                x_box = box_array([x for _, x in got])
                x_src = np.array([src for src, _ in got], dtype=np.int64)
                inside = np.all((x_box[None, :, :, 0] <= lo[:, None, :])
                                & (hi[:, None, :] <= x_box[None, :, :, 1]), axis=2)
                ok = np.any(inside & ((w_mask[wi][:, None] >> x_src[None, :]) & 1 == 1), axis=1)
            reported = set()
            for i in np.flatnonzero(~ok).tolist():
                t = rs[ri[i]][0]
                if t.id in reported:
                    continue   # one line per reading task
                reported.add(t.id)
                src = (int(w_mask[wi[i]]) & -int(w_mask[wi[i]])).bit_length() - 1
                box = [(int(a), int(b)) for a, b in zip(lo[i], hi[i])]
                out.append(f"reads_delivered: device {d} task {t.id} ({t.group} tile "
                           f"{t.tile}) reads {buffer} {box}, written on device {src}, and "
                           "no transfer brings it")
    return out


def _progress(parts: tuple[Schedule, ...]) -> list[str]:
    """Run every device's queues together on event counters (one step)."""
    n_dev = len(parts)
    cursor = [[0] * len(p.queues) for p in parts]
    events = [[0] * len(p.events) for p in parts]
    comm = [p.target.comm_worker() for p in parts]

    def ready(d: int, t: int) -> bool:
        return all(events[d][w.event] >= w.count for w in parts[d].waits[t])

    def head(d: int, w: int) -> int | None:
        q = parts[d].queues[w]
        return q[cursor[d][w]] if cursor[d][w] < len(q) else None

    def finish(d: int, w: int, t: int) -> None:
        events[d][parts[d].signal[t]] += 1
        cursor[d][w] += 1

    transfers = parts[0].taskgraph.transfers
    while True:
        progressed = False
        for d, p in enumerate(parts):
            for w in range(len(p.queues)):
                if w == comm[d]:
                    continue
                t = head(d, w)
                while t is not None and ready(d, t):
                    finish(d, w, t)
                    progressed = True
                    t = head(d, w)
        # a transfer completes when every device taking part has it next and ready
        for k, tr in enumerate(transfers):
            members = tr.members
            heads = [head(d, comm[d]) for d in members]
            if all(h is not None and parts[d].taskgraph.tasks[h].tile[0] == k and ready(d, h)
                   for d, h in zip(members, heads)):
                for d, h in zip(members, heads):
                    finish(d, comm[d], h)
                progressed = True
        if not progressed:
            break
    stuck = []
    for d, p in enumerate(parts):
        for w in range(len(p.queues)):
            t = head(d, w)
            if t is not None:
                task = p.taskgraph.tasks[t]
                what = f"transfer {task.tile[0]}" if task.group == TRANSFER else \
                    f"{task.group} tile {task.tile}"
                stuck.append(f"device {d} worker {w} at task {t} ({what})")
    if not stuck:
        return []
    return [f"progress_across_devices: the devices stop before the end of a step: "
            f"{'; '.join(stuck[:6])}" + (f"; ... ({len(stuck)} workers)" if len(stuck) > 6 else "")]
