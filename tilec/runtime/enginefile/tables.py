"""The task table codec: a schedule's queues, waits and signals as the kernel reads them
(one record per task, ir/abi.py), and back."""
from __future__ import annotations

from dataclasses import replace

import torch

from tilec.ir.abi import (NO_PREFETCH, SIGNAL, TRANSFER_OPCODE, encode_record, record_waits,
                          record_width)
from tilec.ir.record import weight_pools, weight_prefetch
from tilec.ir.schedule import Schedule, Wait
from tilec.ir.tasks import TRANSFER


def encode_tables(schedule: Schedule, opcodes, max_waits: int) -> dict[str, torch.Tensor]:
    """One record per task, in queue order. A transfer's record (multi-device; the host
    runs it, never the kernel) has opcode and group TRANSFER_OPCODE and its sequence
    number as first tile coordinate."""
    groups = {g.name: i for i, g in enumerate(schedule.taskgraph.fused.groups)}
    tasks = schedule.taskgraph.tasks
    buffers = {b.name: b for b in schedule.buffers}
    slots = {p.name: i for i, p in enumerate(weight_pools(schedule.pools))}
    rows, ids, starts = [], [], [0]
    for queue in schedule.queues:
        for tid in queue:
            t = tasks[tid]
            waits = [(w.event, w.count) for w in schedule.waits[tid]]
            if t.group == TRANSFER:
                opcode = row = TRANSFER_OPCODE
                prefetch = NO_PREFETCH
            else:
                row = groups[t.group]
                opcode = opcodes[row]
                prefetch = weight_prefetch(t, buffers, slots)
            rows.append(encode_record(opcode, row, t.tile, waits, max_waits, prefetch,
                                      schedule.signal[tid]))
            ids.append(tid)
        starts.append(len(rows))
    table = torch.tensor(rows, dtype=torch.int32).reshape(len(rows), record_width(max_waits))
    return {"tasks": table, "task_ids": torch.tensor(ids, dtype=torch.int32),
            "queue_start": torch.tensor(starts, dtype=torch.int32)}


def decode_schedule(stored: Schedule, tensors: dict[str, torch.Tensor]) -> Schedule:
    """`stored` (a manifest's schedule) with the queues, signals and waits of the table."""
    table = tensors["tasks"].tolist()
    ids = tensors["task_ids"].tolist()
    starts = tensors["queue_start"].tolist()
    n = len(stored.taskgraph.tasks)
    signal = [0] * n
    waits: list[tuple[Wait, ...]] = [()] * n
    queues = []
    for w in range(len(starts) - 1):
        q = []
        for row in range(starts[w], starts[w + 1]):
            rec, tid = table[row], ids[row]
            waits[tid] = tuple(Wait(event, count) for event, count in record_waits(rec))
            signal[tid] = rec[SIGNAL]
            q.append(tid)
        queues.append(tuple(q))
    return replace(stored, queues=tuple(queues), signal=tuple(signal), waits=tuple(waits))
