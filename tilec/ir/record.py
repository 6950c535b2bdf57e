"""What goes into a task record's weight prefetch fields (the record's layout, the kernel
protocol, is in ir/abi.py; docs/engine-format.md).

The weight prefetch names the span of weight memory a task streams. Weights never
depend on events, so a GPU worker asks L2 for that span PREFETCH_DEPTH tasks ahead,
before it waits on anything: HBM streams the weights while the worker waits, instead
of after.
"""
from __future__ import annotations

from tilec.ir.abi import NO_PREFETCH, PREFETCH_MAX_BYTES, PREFETCH_UNIT
from tilec.ir.graph import DTYPE_BYTES
from tilec.ir.schedule import Pool
from tilec.ir.tasks import Buffer, Task

# Spans shorter than this are not worth an instruction
PREFETCH_MIN_BYTES = 8 * 1024
INT32_MAX = (1 << 31) - 1   # the record's fields are int32


def weight_pools(pools: tuple[Pool, ...]) -> tuple[Pool, ...]:
    """The pools a prefetch may name, by slot: the weight pools in schedule order."""
    return tuple(p for p in pools if p.kind == "weight")


def prefetch_region(task: Task, buffers: dict[str, Buffer]) -> tuple[Buffer, int, int] | None:
    """(buffer, first element, bytes) of the largest weight region the task reads whole
    and contiguously (a gather reads rows of its table's region: never one), if it
    has PREFETCH_MIN_BYTES; bytes not cut to PREFETCH_MAX_BYTES."""
    moved = None   # made at the first weight read: most tasks read none
    best = None
    for r in task.reads:
        b = buffers.get(r.buffer)
        if b is None or b.kind != "weight":
            continue
        if moved is None:
            moved = dict(task.moved)
        numel = r.numel
        nbytes = numel * DTYPE_BYTES[b.type.dtype]
        if moved and moved.get(r.buffer, 0) < nbytes:
            continue   # read in part (a gather's rows): the region is not what it reads
        first, last = _flat_span(r.box, b.layout_strides())
        if last - first + 1 != numel:
            continue   # not contiguous: a prefetch would fetch what it does not read
        if best is None or nbytes > best[2]:
            best = (b, first, nbytes)
    return best if best is not None and best[2] >= PREFETCH_MIN_BYTES else None


def prefetch_bytes(task: Task, buffers: dict[str, Buffer]) -> int:
    """Bytes of weights a GPU worker asks L2 for before the task's waits (0: none)."""
    region = prefetch_region(task, buffers)
    return min(region[2], PREFETCH_MAX_BYTES) if region else 0


def weight_prefetch(task: Task, buffers: dict[str, Buffer],
                    slots: dict[str, int]) -> tuple[int, int, int]:
    """The record's prefetch fields: (weight pool slot, first unit, units; units of
    PREFETCH_UNIT bytes) of `prefetch_region`, cut to PREFETCH_MAX_BYTES, or NO_PREFETCH. `buffers`
    placed by memplan; `slots`: weight pool name -> slot."""
    region = prefetch_region(task, buffers)
    if region is None or region[0].pool not in slots:
        return NO_PREFETCH
    b, first, nbytes = region
    lo = (b.offset + first) * DTYPE_BYTES[b.type.dtype]
    hi = lo + min(nbytes, PREFETCH_MAX_BYTES)
    # whole units inside the span (cp.async.bulk.prefetch wants 16-byte alignment)
    first_unit, end_unit = -(-lo // PREFETCH_UNIT), hi // PREFETCH_UNIT
    if end_unit <= first_unit or end_unit > INT32_MAX:
        # past the 512 GB an int32 of units addresses: a pool bigger than any GPU's
        # memory, so only a plan that does not fit (GLM-5 in bf16 on 8 h200s) has one
        return NO_PREFETCH
    return slots[b.pool], first_unit, end_unit - first_unit


def _flat_span(box: tuple[tuple[int, int], ...], strides: tuple[int, ...]) -> tuple[int, int]:
    """Flat indices of a box's first and last elements in a layout of these strides."""
    first = sum(a * s for (a, _), s in zip(box, strides))
    last = sum((b - 1) * s for (_, b), s in zip(box, strides))
    return first, last
