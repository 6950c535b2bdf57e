"""shard: TaskGraph -> TaskGraph where a device holds only the box of a weight its tasks touch.

On a multi-device engine memplan stores, of each weight, the flat element range its
device's tasks touch. That range is small only when the touched part is a slice of the
leading dim. Tensor parallelism splits a weight on another dim as often: an expert pool
[E, 2I, H] cut on its output columns (dim 1) is touched by device d in a slice of every
expert, whose flat range covers almost the whole pool, so each device would hold every
pool nearly whole. This pass gives such a weight a shard: the box (per-dim [start,
stop)) of the buffer that the device's tasks touch, stored compactly as a row-major
tensor of the box's shape (`Buffer.shard`).

The buffer keeps its shape and its tasks their regions (deps, transfers and verify
reason in the buffer's own indices); what changes is where an element lies: element i
at the buffer's base + sum(i[k] * shard_stride[k]). Every view an op takes of the
buffer (`Operand`: shape, strides, offset over the buffer's row-major layout) is
rewritten to the same elements in the shard layout: each view dim must step along one
buffer dim, and no index in the view may carry into the next dim, so the map stays
linear; a buffer some view of which is not so (a flattening reshape across the cut) is
left whole. memplan then places the shard (its flat range under the shard strides is
[sum(start[k] * shard_stride[k]), + the box's numel)), pack copies the box from the full
tensor, and the kernel, the reference executor and the load checks read the new strides
from the views, as for any strided view.

A weight is sharded only when its box holds fewer elements than the flat range memplan
would store otherwise (a slice of the leading dim already is compact). An indexed read
(an expert slot) has a region over every expert: the box still spans the whole expert
dim, so it reads the whole (sharded) pool on this device.
"""
from __future__ import annotations

from dataclasses import replace

from tilec.ir.graph import Operand, contiguous_strides
from tilec.ir.tasks import Buffer, TaskGraph

Box = tuple[tuple[int, int], ...]


def shard_weights(tg: TaskGraph) -> TaskGraph:
    if tg.devices <= 1:
        return tg
    boxes = touched_boxes(tg)
    views: dict[str, list[Operand]] = {}
    for op in tg.fused.graph.ops:
        for x in op.inputs:
            if x.value in boxes:
                views.setdefault(x.value, []).append(x)
    shards: dict[str, tuple[Box, dict[Operand, Operand]]] = {}
    for b in tg.buffers:
        box = boxes.get(b.name)
        if box is None or not _worth_it(b, box):
            continue
        strides = contiguous_strides(tuple(z - a for a, z in box))
        moved = {x: shard_view(x, b.type.shape, strides) for x in views.get(b.name, [])}
        if all(v is not None for v in moved.values()):
            shards[b.name] = (box, moved)
    if not shards:
        return tg
    ops = tuple(replace(op, inputs=tuple(shards[x.value][1][x] if x.value in shards else x
                                         for x in op.inputs))
                if any(x.value in shards for x in op.inputs) else op
                for op in tg.fused.graph.ops)
    fused = replace(tg.fused, graph=replace(tg.fused.graph, ops=ops))
    buffers = tuple(replace(b, shard=shards[b.name][0]) if b.name in shards else b
                    for b in tg.buffers)
    return replace(tg, fused=fused, buffers=buffers)


def touched_boxes(tg: TaskGraph) -> dict[str, Box]:
    """Per weight buffer some task of this device touches, the bounding box of its
    regions there."""
    weights = {b.name for b in tg.buffers if b.kind == "weight"}
    lo: dict[str, list[int]] = {}
    hi: dict[str, list[int]] = {}
    for task in tg.tasks:
        for r in task.reads + task.writes:
            if r.buffer not in weights or r.numel == 0:
                continue
            if r.buffer not in lo:
                lo[r.buffer] = [a for a, _ in r.box]
                hi[r.buffer] = [z for _, z in r.box]
                continue
            lo[r.buffer] = [min(x, a) for x, (a, _) in zip(lo[r.buffer], r.box)]
            hi[r.buffer] = [max(x, z) for x, (_, z) in zip(hi[r.buffer], r.box)]
    return {name: tuple(zip(lo[name], hi[name])) for name in lo}


def _worth_it(b: Buffer, box: Box) -> bool:
    """Whether the box holds fewer elements than the flat range from its first element
    to its last (what memplan stores of an unsharded buffer)."""
    strides = contiguous_strides(b.type.shape)
    first = sum(a * s for (a, _), s in zip(box, strides))
    last = sum((z - 1) * s for (_, z), s in zip(box, strides))
    numel = 1
    for a, z in box:
        numel *= z - a
    return numel < last - first + 1


def shard_view(view: Operand, shape: tuple[int, ...],
               strides: tuple[int, ...]) -> Operand | None:
    """`view` (of a row-major buffer of `shape`) as the same elements of the buffer laid
    out with `strides`, or None where that is not one strided view: a view dim stepping
    along more than one buffer dim, or an index carrying from one dim into the next."""
    start = _coords(view.offset, shape)
    if start is None:
        return None
    reach = list(start)
    moved = []
    for n, s in zip(view.shape, view.strides):
        step = _coords(s, shape) if n > 1 else None
        if n > 1 and (step is None or sum(c != 0 for c in step) > 1):
            return None
        if step is None:   # a dim of one element: its stride is never multiplied
            moved.append(0)
            continue
        reach = [r + (n - 1) * c for r, c in zip(reach, step)]
        moved.append(sum(c * t for c, t in zip(step, strides)))
    if any(r >= d for r, d in zip(reach, shape)):
        return None
    offset = sum(c * t for c, t in zip(start, strides))
    return Operand(view.value, view.shape, tuple(moved), offset)


def _coords(flat: int, shape: tuple[int, ...]) -> list[int] | None:
    """Per-dim indices of row-major element `flat` of `shape` (None: outside it)."""
    out = []
    for n in reversed(shape):
        if n == 0:
            return None
        out.append(flat % n)
        flat //= n
    return None if flat else out[::-1]
