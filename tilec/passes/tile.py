"""tile: FusedGraph -> TaskGraph.

Each fused group is cut into tiles over its output: (batch, row block, col block); an
attention group's column is a chunk of keys, or the merge (tilec/ir/attention.py).
A task's reads and writes are boxes in buffers (through the views its ops read), so
the deps pass can find conflicts by intersection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tilec.ir.attention import attention_chunks, attention_parts, partial_names
from tilec.ir.graph import DTYPE_BYTES, FusedGraph, Group, Op, Operand, TensorType
from tilec.ir.tasks import Buffer, GroupTiling, Region, Task, TaskGraph
from tilec.passes.geometry import Box, range_to_box, rows_box, view_region


@dataclass(frozen=True)
class TileOptions:
    tile_m: int = 16      # rows per task
    tile_n: int = 64      # output columns per task (at most)
    tile_k: int = 64      # reduction chunk of a matmul
    row_chunk: int = 1024  # column chunk of a row group that walks whole rows
    workers: int = 1      # narrow a matmul's column tiles until it has a task per worker
    min_tile_n: int = 16
    max_tile_elems: int = 8192  # a whole-row matmul's K chunk keeps BK x BN under this
    kv_chunk: int = 0     # keys per attention partial task; 0: enough chunks for the workers


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def matmul_dims(op: Op) -> tuple[int, int, int, int]:
    """(batch, M, N, K) of a matmul op."""
    shape = op.type.shape
    return math.prod(shape[:-2]), shape[-2], shape[-1], op.inputs[0].shape[-1]


def needs_whole_rows(group: Group, ops: dict[str, Op]) -> bool:
    """A group whose tasks must see whole rows: it reduces along them, or it writes
    per-row [rows, 1] results that column tiles would each write again."""
    members = group.epilogue if group.kind == "matmul" else group.members
    if any(ops[m].kind in ("reduce", "argmax", "topk") for m in members):
        return True
    return group.cols > 1 and any(ops[m].type.cols == 1 for m in group.outputs)


def attention_tiling(group: Group, ops: dict[str, Op], opt: TileOptions) -> GroupTiling:
    """Split-KV decode attention: a partial task per (batch, row block, chunk of keys),
    then, when there is more than one chunk, a merge task per (batch, row block) at
    column index `chunks`. Rows are padded to 16 and head dims to powers of two >= 16
    so both products are tensor-core dots."""
    batch, m, n, k = matmul_dims(ops[group.anchor])
    dv = ops[attention_parts(group, ops).pv].type.cols
    bm = min(64, max(16, pow2(m)))
    bk = max(16, pow2(k))
    row_blocks = -(-m // bm)
    if opt.kv_chunk:
        chunk = opt.kv_chunk
    else:
        wanted = max(1, -(-opt.workers // (batch * row_blocks)))
        chunk = pow2(-(-n // wanted))
        # a key chunk is held as [head dim, chunk] in registers: bound it like a matmul tile
        chunk = min(chunk, max(16, opt.max_tile_elems // max(bk, pow2(dv))))
    chunk = max(16, min(chunk, pow2(n)))
    chunks = -(-n // chunk)
    return GroupTiling(group.name, bm, chunk, bk,
                       (batch, row_blocks, chunks + 1 if chunks > 1 else 1))


def partial_buffers(group: Group, ops: dict[str, Op], tiling: GroupTiling) -> list[Buffer]:
    """Scratch of a split attention group: per row and chunk the normalised partial
    output, the row max and the row sum of exponentials (float32, whatever the model's
    dtype, like the accumulators they come from)."""
    chunks = attention_chunks(tiling)
    if chunks == 1:
        return []
    dv = ops[attention_parts(group, ops).pv].type.cols
    o, mx, sm = partial_names(group.name)
    return [Buffer(o, TensorType((group.rows, chunks, dv), "float32"), "activation"),
            Buffer(mx, TensorType((group.rows, chunks), "float32"), "activation"),
            Buffer(sm, TensorType((group.rows, chunks), "float32"), "activation")]


def group_tiling(group: Group, ops: dict[str, Op], opt: TileOptions) -> GroupTiling:
    if group.kind == "attention":
        return attention_tiling(group, ops, opt)
    whole = needs_whole_rows(group, ops)
    if group.kind == "matmul":
        batch, m, n, k = matmul_dims(ops[group.anchor])
        bm = min(opt.tile_m, pow2(m))
        bk = min(opt.tile_k, pow2(k))
        if whole:
            bn = pow2(n)
        else:
            # every stage should give each worker a tile: narrow the columns until it does
            bn = min(opt.tile_n, pow2(n))
            while bn > opt.min_tile_n and batch * -(-m // bm) * -(-n // bn) < opt.workers:
                bn //= 2
        # Below 16 rows the product is a broadcast multiply and a sum over a
        # [BM, BK, BN] block held in registers: bound it (tensor-core tiles need BK >= 16).
        limit = opt.max_tile_elems // (bm * bn)
        while bk > 1 and bk > limit and (bm < 16 or bk > 16):
            bk //= 2
        return GroupTiling(group.name, bm, bn, bk, (batch, -(-m // bm), -(-n // bn)))
    rows, cols = group.rows, group.cols
    bm = min(opt.tile_m, pow2(rows))
    if whole:
        return GroupTiling(group.name, bm, cols, min(opt.row_chunk, pow2(cols)),
                           (1, -(-rows // bm), 1))
    bn = min(opt.tile_n, pow2(cols))
    return GroupTiling(group.name, bm, bn, bn, (1, -(-rows // bm), -(-cols // bn)))


def _width(op: Op) -> int:
    return op.type.cols


def tile(fused: FusedGraph, opt: TileOptions = TileOptions()) -> TaskGraph:
    graph = fused.graph
    ops = graph.by_name()
    outputs = {o.value for _, o in graph.outputs}
    buffers: list[Buffer] = []
    for op in graph.ops:
        if op.kind in ("input", "weight", "state"):
            buffers.append(Buffer(op.name, op.type, op.kind))
    for g in fused.groups:
        for v in g.outputs:
            if ops[v].kind == "state_update":
                continue  # writes its state buffer in place
            buffers.append(Buffer(v, ops[v].type, "output" if v in outputs else "activation"))

    def storage(value: str) -> str:
        """Buffer holding `value` (a state update aliases its state)."""
        op = ops[value]
        return storage(op.inputs[0].value) if op.kind == "state_update" else value

    tilings = [group_tiling(g, ops, opt) for g in fused.groups]
    for g, tl in zip(fused.groups, tilings):
        if g.kind == "attention":
            buffers += partial_buffers(g, ops, tl)
    buffer_of = {b.name: b for b in buffers}
    tasks: list[Task] = []
    for g, tl in zip(fused.groups, tilings):
        nb, nm, nn = tl.grid
        for b in range(nb):
            for mi in range(nm):
                for ni in range(nn):
                    reads, writes, flops, indirect = _task_regions(g, tl, (b, mi, ni), ops,
                                                                    storage)
                    # bytes moved: what the regions cover, except that a gather reads
                    # only the rows it looks up, not the whole table its region spans,
                    # and a state update writes one position, not the whole dim
                    moved = dict(indirect)
                    for r in reads + writes:
                        if r.buffer not in indirect:
                            moved[r.buffer] = moved.get(r.buffer, 0) + \
                                r.numel * DTYPE_BYTES[buffer_of[r.buffer].type.dtype]
                    tasks.append(Task(len(tasks), g.name, (b, mi, ni), reads, writes,
                                      flops, sum(moved.values()), tuple(moved.items())))
    return TaskGraph(fused, tuple(buffers), tuple(tilings), tuple(tasks))


def _task_regions(g: Group, tl: GroupTiling, tile_idx, ops, storage):
    b, mi, ni = tile_idx
    reads: dict[tuple, Region] = {}
    writes: list[Region] = []
    flops = 0
    indirect: dict[str, int] = {}   # gathered tables, updated states: bytes actually moved

    def read(operand: Operand, box: Box | None):
        if box is None:
            return
        buf = storage(operand.value)
        region = view_region(operand, box, ops[buf].type.shape)
        if region is not None:
            reads.setdefault((buf, region), Region(buf, region))

    members = set(g.members)
    if g.kind == "attention":
        scratch: list[Region] = []
        spaces, flops = _attention_spaces(g, tl, tile_idx, ops, read, writes, scratch)
        for region in scratch:
            reads.setdefault((region.buffer, region.box), region)
    elif g.kind == "matmul":
        anchor = ops[g.anchor]
        _, m, n, k = matmul_dims(anchor)
        r0, r1 = b * m + mi * tl.block_m, b * m + min(m, (mi + 1) * tl.block_m)
        c0, c1 = ni * tl.block_n, min(n, (ni + 1) * tl.block_n)
        a, bop = anchor.inputs
        if a.value not in members:
            read(a, rows_box(a.shape, r0, r1, 0, k))
        batch_shape = bop.shape[:-2]
        bbox = range_to_box(b, b, batch_shape) if batch_shape else ()
        read(bop, bbox + ((0, k), (c0, c1)))
        flops += 2 * (r1 - r0) * (c1 - c0) * k
        if g.anchor in g.outputs:
            writes.append(Region(g.anchor, rows_box(anchor.type.shape, r0, r1, c0, c1)))
        spaces = [(name, (r0, r1, 0, k)) for name in g.prologue] + \
                 [(name, (r0, r1, c0, c1)) for name in g.epilogue]
    else:
        r0, r1 = mi * tl.block_m, min(g.rows, (mi + 1) * tl.block_m)
        c0, c1 = ni * tl.block_n, min(g.cols, (ni + 1) * tl.block_n)
        spaces = [(name, (r0, r1, c0, c1)) for name in g.epilogue]

    for name, (ra, rb, ca, cb) in spaces:
        op = ops[name]
        out_cols = (0, 1) if _width(op) == 1 else (ca, cb)
        if op.kind in ("reduce", "argmax", "topk") and g.kind != "attention":  # whole input row
            ca, cb = 0, op.inputs[0].shape[-1]
            if op.kind == "topk":
                out_cols = (0, _width(op))   # its k results per row, however wide the row
        elif op.kind == "state_update":
            out_cols = (ca, cb)
        else:
            ca, cb = out_cols
        flops += (rb - ra) * (cb - ca)
        for pos, operand in enumerate(op.inputs):
            if operand.value in members:
                continue
            if op.kind == "gather" and pos == 0:  # table: any row, data-dependent
                read(operand, ((0, operand.shape[0]), (ca, cb)))
                table = storage(operand.value)
                indirect[table] = indirect.get(table, 0) + (rb - ra) * (cb - ca) * \
                    DTYPE_BYTES[ops[table].type.dtype]
            elif op.kind == "gather":
                read(operand, range_to_box(ra, rb - 1, operand.shape) if operand.shape else ())
            elif op.kind == "concat":
                read(operand, _concat_piece_box(op, pos, ra, rb, ca, cb))
            elif op.kind == "state_update" and pos == 0:
                continue  # the state itself is written, not read
            elif op.kind == "state_update" and pos == 2:
                read(operand, tuple((0, n) for n in operand.shape))
            else:
                read(operand, rows_box(operand.shape, ra, rb, ca, cb))
        if op.kind == "state_update":
            # in a matmul epilogue the tile is in the product's [rows, N] space, which
            # the appended value may only view in another shape
            space = g.cols if g.kind == "matmul" else None
            writes.append(_state_write(op, storage, ra, rb, *out_cols, space=space))
            # the region spans every position; the task writes one
            state = storage(op.name)
            indirect[state] = indirect.get(state, 0) + (rb - ra) * (out_cols[1] - out_cols[0]) \
                * DTYPE_BYTES[ops[state].type.dtype]
        elif name in g.outputs:
            writes.append(Region(name, rows_box(op.type.shape, ra, rb, *out_cols)))
    return tuple(reads.values()), tuple(writes), flops, indirect


def _attention_spaces(g: Group, tl: GroupTiling, tile_idx, ops, read, writes, scratch_reads):
    """Reads and writes of an attention task beyond its members' own operands, and the
    (member, box) spaces those members compute over."""
    b, mi, ni = tile_idx
    parts = attention_parts(g, ops)
    scores, pv = ops[g.anchor], ops[parts.pv]
    _, m, n, k = matmul_dims(scores)
    dv = pv.type.cols
    chunks = attention_chunks(tl)
    r0, r1 = b * m + mi * tl.block_m, b * m + min(m, (mi + 1) * tl.block_m)
    partial, final = ni < chunks, chunks == 1 or ni == chunks
    spaces, flops = [], 0
    if partial:
        c0, c1 = ni * tl.block_n, min(n, (ni + 1) * tl.block_n)
        q, keys = scores.inputs
        if q.value not in g.members:
            read(q, rows_box(q.shape, r0, r1, 0, k))
        for operand, box in ((keys, ((0, k), (c0, c1))), (pv.inputs[1], ((c0, c1), (0, dv)))):
            batch_shape = operand.shape[:-2]
            read(operand, (range_to_box(b, b, batch_shape) if batch_shape else ()) + box)
        flops += 2 * (r1 - r0) * (c1 - c0) * (k + dv)
        spaces += [(name, (r0, r1, 0, k)) for name in g.prologue]
        spaces += [(name, (r0, r1, c0, c1)) for name in parts.score_ops + parts.softmax_ops]
    if chunks > 1:
        o, mx, sm = partial_names(g.name)
        cols = (ni, ni + 1) if partial else (0, chunks)
        boxes = [Region(o, ((r0, r1), cols, (0, dv))), Region(mx, ((r0, r1), cols)),
                 Region(sm, ((r0, r1), cols))]
        (writes if partial else scratch_reads).extend(boxes)
    if final:
        spaces += [(name, (r0, r1, 0, dv)) for name in parts.out_ops]
        if parts.pv in g.outputs:
            writes.append(Region(parts.pv, rows_box(pv.type.shape, r0, r1, 0, dv)))
    return spaces, flops


def _state_write(op: Op, storage, r0: int, r1: int, c0: int, c1: int,
                 space: int | None = None) -> Region:
    """A state update writes rows [r0, r1) x cols [c0, c1) of its value at a position
    known only at run time: the region spans the whole updated dim (sound, if coarse).
    With `space`, the tile is in a [rows, space] view of the value's elements in order:
    the region bounds that flat range."""
    dim = op.attr("dim")
    value = op.inputs[1]
    if space is None:
        box = list(rows_box(value.shape, r0, r1, c0, c1))
    else:
        box = list(range_to_box(r0 * space + c0, (r1 - 1) * space + c1 - 1, value.shape))
    box[dim] = (0, op.type.shape[dim])
    return Region(storage(op.name), tuple(box))


def _concat_piece_box(op: Op, pos: int, r0: int, r1: int, c0: int, c1: int) -> Box | None:
    dim = op.attr("dim")
    out_box = list(rows_box(op.type.shape, r0, r1, c0, c1))
    start = sum(p.shape[dim] for p in op.inputs[:pos])
    stop = start + op.inputs[pos].shape[dim]
    a, b = out_box[dim]
    a, b = max(a, start), min(b, stop)
    if b <= a:
        return None
    out_box[dim] = (a - start, b - start)
    return tuple(out_box)
