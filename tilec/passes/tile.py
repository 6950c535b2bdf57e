"""tile: FusedGraph -> TaskGraph.

Each fused group is cut into tiles over its output: (batch, row block, col block); an
attention group's column is a chunk of keys, or the merge (tilec/ir/attention.py).
A task's reads and writes are boxes in buffers (through the views its ops read), so
the deps pass can find conflicts by intersection.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from tilec.errors import ConfigError
from tilec.ir.attention import attention_chunks, attention_parts, partial_names
from tilec.ir.graph import (DTYPE_BYTES, FusedGraph, Group, Op, Operand, TensorType,
                            is_indexed_matmul)
from tilec.ir.stream import MIN_MATVEC_BK, TENSOR_CORE_ROWS, is_gemm_rows
from tilec.ir.target import Target
from tilec.ir.tasks import Buffer, GroupTiling, Region, Task, TaskGraph
from tilec.passes.cost import Streams, list_makespan, task_dtype, task_time_us
from tilec.passes.geometry import Box, range_to_box, rows_box, view_region
from tilec.passes.roles import role_of_group


# `balance_widths` tries every combination of a stage's matmul widths up to this many
# (Llama-3.2-1B's q, k and v projections on a GPU: 5 x 5 x 5); beyond, one at a time.
MAX_COMBINATIONS = 512


@dataclass(frozen=True)
class TileOptions:
    tile_m: int = 16      # rows per task
    tile_n: int = 64      # output columns per task (at most)
    tile_k: int = 64      # reduction chunk of a matmul
    row_chunk: int = 1024  # column chunk of a row group that walks whole rows
    workers: int = 1      # spread each stage's matmul tiles over this many workers
    min_tile_n: int = 16  # narrowest matmul column tile
    max_tile_elems: int = 8192  # a whole-row matmul's K chunk keeps BK x BN under this
    kv_chunk: int = 0     # keys per attention partial task; 0: enough chunks for the workers
    # a matmul tile of more than one row holds at least this many (the rest masked): a
    # batched decode step's matmuls of a few rows then run as tensor-core tiles
    min_tile_m: int = 1
    # rows per tile of a matmul of more rows than `tile_m` (a prefill chunk's): a GEMM
    # tile, which streams each weight tile once for all its rows; 0: `tile_m`
    gemm_tile_m: int = 0


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def matmul_rows(m: int, opt: TileOptions, bn: int = 16) -> int:
    """Rows per tile of a matmul of `m` rows cut into `bn` columns: up to `tile_m` (one
    row for a decode step's matvec, 16 or more for a small batch's tensor-core tile);
    beyond, a GEMM tile of up to `gemm_tile_m` rows, so a weight tile serves every row
    of a prefill chunk, as long as its [rows, bn] float32 accumulator stays within
    `max_tile_elems` (registers: [128, 128] spilled on sm_90, [128, 64] did not)."""
    if m > opt.tile_m and opt.gemm_tile_m > opt.tile_m:
        rows = min(opt.gemm_tile_m, pow2(m))
        while rows > opt.tile_m and rows * bn > opt.max_tile_elems:
            rows //= 2
        if rows > opt.tile_m:
            return rows
    return min(opt.tile_m, pow2(m) if m == 1 else max(pow2(m), opt.min_tile_m))


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


def matmul_tiling(group: Group, ops: dict[str, Op], opt: TileOptions, bn: int) -> GroupTiling:
    """A matmul group cut into tiles of `bn` output columns."""
    batch, m, n, k = matmul_dims(ops[group.anchor])
    bm = matmul_rows(m, opt, bn)
    bk = min(opt.tile_k, pow2(k))
    # Below 16 rows the product is a broadcast multiply and a sum over a
    # [BM, BK, BN] block held in registers: bound it (tensor-core tiles need BK >= 16).
    # A GEMM tile's chunks go through shared memory (a pipelined K loop): bound its
    # [BM, BK] and [BK, BN] chunks, one stage of its ring.
    limit = opt.max_tile_elems // (max(bm, bn) if is_gemm_rows(bm) else bm * bn)
    while bk > 1 and bk > limit and (bm < 16 or bk > 16):
        bk //= 2
    return GroupTiling(group.name, bm, bn, bk, (batch, -(-m // bm), -(-n // bn)))


def width_choices(group: Group, ops: dict[str, Op], opt: TileOptions) -> list[int]:
    """The column widths a matmul group without whole rows may be cut into, widest
    first: powers of two from `tile_n` down to `min_tile_n`, and never below 16 for a
    tensor-core tile (16 rows or more), which `tl.dot` needs."""
    _, m, n, k = matmul_dims(ops[group.anchor])
    bm = matmul_rows(m, opt)
    low = opt.min_tile_n if bm < 16 else max(16, opt.min_tile_n)
    widest = min(opt.tile_n, pow2(n))
    if bm < TENSOR_CORE_ROWS:   # a matvec chunk keeps its K span at least MIN_MATVEC_BK
        widest = min(widest, max(low, opt.max_tile_elems // (bm * min(pow2(k), MIN_MATVEC_BK))))
    elif is_gemm_rows(bm):      # its accumulator's bound (matmul_rows)
        widest = min(widest, max(low, opt.max_tile_elems // bm))
    widths = [widest]
    while widths[-1] // 2 >= low:
        widths.append(widths[-1] // 2)
    return widths


def group_tiling(group: Group, ops: dict[str, Op], opt: TileOptions) -> GroupTiling:
    if group.kind == "attention":
        return attention_tiling(group, ops, opt)
    whole = needs_whole_rows(group, ops)
    if group.kind == "matmul":
        batch, m, n, k = matmul_dims(ops[group.anchor])
        bm = matmul_rows(m, opt)
        if whole:
            bn = pow2(n)
        else:
            # every stage should give each worker a tile: narrow the columns until it does
            # (without a target to price tasks with; `balance_widths` does better)
            bn = min(opt.tile_n, pow2(n))
            if is_gemm_rows(bm):     # its accumulator's bound (matmul_rows)
                bn = min(bn, max(16, opt.max_tile_elems // bm))
            while bn > opt.min_tile_n and batch * -(-m // bm) * -(-n // bn) < opt.workers:
                bn //= 2
        return matmul_tiling(group, ops, opt, bn)
    rows, cols = group.rows, group.cols
    bm = min(opt.tile_m, pow2(rows))
    if whole:
        return GroupTiling(group.name, bm, cols, min(opt.row_chunk, pow2(cols)),
                           (1, -(-rows // bm), 1))
    bn = min(opt.tile_n, pow2(cols))
    return GroupTiling(group.name, bm, bn, bn, (1, -(-rows // bm), -(-cols // bn)))


def storage_of(ops: dict[str, Op], value: str) -> str:
    """Buffer holding `value` (a state update aliases its state)."""
    op = ops[value]
    return storage_of(ops, op.inputs[0].value) if op.kind == "state_update" else value


def _width(op: Op) -> int:
    return op.type.cols


@dataclass(frozen=True)
class TilePlan:
    """What `tile` decides before it cuts a single task: every buffer, and every group's
    tiling. The kernel's source depends on nothing else of the task graph, so the
    compiler starts compiling it for the GPU from here (hooks.SpeculativeAOT)."""

    buffers: tuple[Buffer, ...]
    tilings: tuple[GroupTiling, ...]


def tile(fused: FusedGraph, opt: TileOptions = TileOptions(),
         target: Target | None = None, plan: TilePlan | None = None) -> TaskGraph:
    """`target`: price candidate tiles with its cost model and choose the matmul widths
    that spread each stage over its `opt.workers` workers (`balance_widths`); without
    one (or with one worker) matmuls are narrowed until they have a tile per worker.
    `plan`: `tile_plan(fused, opt, target)`, when the caller has it already."""
    plan = plan or tile_plan(fused, opt, target)
    make_task = _task_maker(fused, plan.buffers)
    tasks: list[Task] = []
    for g, tl in zip(fused.groups, plan.tilings):
        nb, nm, nn = tl.grid
        for b in range(nb):
            for mi in range(nm):
                for ni in range(nn):
                    tasks.append(make_task(len(tasks), g, tl, (b, mi, ni)))
    return TaskGraph(fused, plan.buffers, plan.tilings, tuple(tasks))


def tile_plan(fused: FusedGraph, opt: TileOptions = TileOptions(),
              target: Target | None = None) -> TilePlan:
    """The buffers and tilings of `tile(fused, opt, target)`."""
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
    tilings = [group_tiling(g, ops, opt) for g in fused.groups]
    for g, tl in zip(fused.groups, tilings):
        if g.kind == "attention":
            buffers += partial_buffers(g, ops, tl)
    if target is not None and opt.workers > 1:
        make_task = _task_maker(fused, buffers)
        dtypes = {b.name: b.type.dtype for b in buffers}
        streams = Streams(fused, tilings, buffers)

        def time_of(g: Group, tl: GroupTiling) -> float:
            """Predicted time of the group's first tile (a full one, unless the whole
            group is narrower than a tile)."""
            task = make_task(0, g, tl, (0, 0, 0))
            return task_time_us(task, target, task_dtype(task, dtypes), streams.of(task, tl))

        tilings = balance_widths(fused, tilings, opt, target, time_of)
    return TilePlan(tuple(buffers), tuple(tilings))


def _task_maker(fused: FusedGraph, buffers):
    """make_task(task_id, group, tiling, tile index) -> the Task of that tile."""
    ops = fused.graph.by_name()
    buffer_of = {b.name: b for b in buffers}

    storages: dict[str, str] = {}
    regions: dict[tuple, Box | None] = {}

    def storage(value: str) -> str:
        if value not in storages:
            storages[value] = storage_of(ops, value)
        return storages[value]

    def view(operand: Operand, box: Box, shape: tuple[int, ...]) -> Box | None:
        """view_region, once per distinct view and box: the layers repeat them."""
        key = (operand.shape, operand.strides, operand.offset, box, shape)
        if key not in regions:
            regions[key] = view_region(operand, box, shape)
        return regions[key]

    def make_task(task_id: int, g: Group, tl: GroupTiling, tile_idx) -> Task:
        reads, writes, flops, indirect = _task_regions(g, tl, tile_idx, ops, storage, view)
        # bytes moved: what the regions cover, except that a gather reads only the rows
        # it looks up, not the whole table its region spans, and a state update writes
        # one position, not the whole dim
        moved = dict(indirect)
        for r in reads + writes:
            if r.buffer not in indirect:
                moved[r.buffer] = moved.get(r.buffer, 0) + \
                    r.numel * DTYPE_BYTES[buffer_of[r.buffer].type.dtype]
        return Task(task_id, g.name, tile_idx, reads, writes, flops, sum(moved.values()),
                    tuple(moved.items()))
    return make_task


def group_depths(fused: FusedGraph) -> list[int]:
    """Each group's depth in the group DAG: 0 for a group that reads no other group's
    output, else one more than the deepest group whose output it reads. Groups of one
    depth can run side by side, so they are balanced together (a stage)."""
    ops = fused.graph.by_name()
    writer: dict[str, int] = {}     # buffer -> the latest group that writes it
    depth: list[int] = []
    for g in fused.groups:
        members = set(g.members)
        read = {storage_of(ops, o.value) for m in g.members for o in ops[m].inputs
                if o.value not in members}
        depth.append(1 + max((depth[writer[b]] for b in read if b in writer), default=-1))
        for v in g.outputs:
            writer[storage_of(ops, v)] = len(depth) - 1
    return depth


def balance_widths(fused: FusedGraph, tilings: list[GroupTiling], opt: TileOptions,
                   target: Target, time_of) -> list[GroupTiling]:
    """The column width of every matmul group that may choose one (`width_choices`),
    chosen per stage (groups of one depth) to minimise the stage's predicted span: its
    tasks, each priced by `time_of(group, tiling)`, dealt longest first to the workers
    of their role (`cost.list_makespan`); ties go to fewer tasks.

    At batch 1 a decode step is a chain of such stages (each matmul reads the whole
    vector the stage before wrote), so a stage's last, partly filled round of tasks
    idles the other workers: 192 equal tiles on 132 workers take two rounds where 128
    wide and 128 narrow ones take one and a half. Narrow tiles pay the per-task
    overhead and re-read the input row more often; the cost model weighs both.

    Every combination of a stage's widths is tried, up to MAX_COMBINATIONS; a stage
    with more is improved one group at a time instead (`_descend`)."""
    ops = fused.graph.by_name()
    groups = fused.groups
    workers = _role_workers(groups, ops, opt, target)
    choices: list[list[GroupTiling]] = []
    for g, tl in zip(groups, tilings):
        free = g.kind == "matmul" and not needs_whole_rows(g, ops)
        choices.append([matmul_tiling(g, ops, opt, bn) for bn in width_choices(g, ops, opt)]
                       if free else [tl])
    jobs = [[(time_of(g, tl), math.prod(tl.grid)) for tl in options]
            for g, options in zip(groups, choices)]
    stages: dict[int, list[int]] = {}
    for i, d in enumerate(group_depths(fused)):
        stages.setdefault(d, []).append(i)
    chosen = [0] * len(groups)
    spans: dict[tuple, float] = {}   # layers repeat: the same stage is priced once

    def cost(members: list[int], pick: dict[int, int]) -> tuple[float, int]:
        by_role: dict[int, list[tuple[float, int]]] = {}
        for i in members:
            by_role.setdefault(workers[i], []).append(jobs[i][pick[i]])
        span = 0.0
        for w, role_jobs in by_role.items():
            key = (w, tuple(sorted(role_jobs)))
            if key not in spans:
                spans[key] = list_makespan(role_jobs, w)
            span = max(span, spans[key])
        # rounded: spans equal but for float noise are a tie, which fewer tasks win
        return round(span, 6), sum(jobs[i][pick[i]][1] for i in members)

    for members in stages.values():
        free = [i for i in members if len(choices[i]) > 1]
        if not free:
            continue
        fixed = {i: 0 for i in members if i not in free}
        if math.prod(len(choices[i]) for i in free) <= MAX_COMBINATIONS:
            pick = min(({**fixed, **dict(zip(free, combo))} for combo in
                        itertools.product(*(range(len(choices[i])) for i in free))),
                       key=lambda p: cost(members, p))
        else:
            pick = _descend(members, free, fixed, choices, cost)
        for i in members:
            chosen[i] = pick[i]
    return [options[c] for options, c in zip(choices, chosen)]


def _descend(members: list[int], free: list[int], fixed: dict[int, int],
             choices: list[list[GroupTiling]], cost) -> dict[int, int]:
    """From each group's best width alone, the single change of one group's width that
    improves the stage most, until none does."""
    pick = {**fixed, **{i: min(range(len(choices[i])), key=lambda c: cost([i], {i: c}))
                        for i in free}}
    best = cost(members, pick)
    while True:
        trials = [(cost(members, {**pick, i: c}), i, c)
                  for i in free for c in range(len(choices[i])) if c != pick[i]]
        trial, i, c = min(trials)
        if trial >= best:
            return pick
        best, pick[i] = trial, c


def _role_workers(groups, ops: dict[str, Op], opt: TileOptions, target: Target) -> list[int]:
    """How many workers may run each group's tasks: its role's, or all `opt.workers`."""
    if not target.roles:
        return [opt.workers] * len(groups)
    try:
        return [len(next(r.workers for r in target.roles
                         if r.name == role_of_group(g, ops, target.roles)))
                for g in groups]
    except ConfigError:
        return [opt.workers] * len(groups)   # the roles pass reports the mistake


def _task_regions(g: Group, tl: GroupTiling, tile_idx, ops, storage, view=view_region):
    _, mi, ni = tile_idx
    reads: dict[tuple, Region] = {}
    writes: list[Region] = []
    flops = 0
    indirect: dict[str, int] = {}   # gathered tables, updated states: bytes actually moved

    def read(operand: Operand, box: Box | None):
        if box is None:
            return
        buf = storage(operand.value)
        region = view(operand, box, ops[buf].type.shape)
        if region is not None:
            reads.setdefault((buf, region), Region(buf, region))

    members = set(g.members)
    if g.kind == "attention":
        scratch: list[Region] = []
        spaces, flops = _attention_spaces(g, tl, tile_idx, ops, read, writes, scratch)
        for region in scratch:
            reads.setdefault((region.buffer, region.box), region)
    elif g.kind == "matmul":
        spaces, flops = _matmul_spaces(g, tl, tile_idx, ops, read, writes)
        if is_indexed_matmul(ops[g.anchor]):
            _indexed_pool_reads(ops[g.anchor], tl, tile_idx, ops, storage, read, indirect)
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
            region = _state_write(op, storage, ra, rb, *out_cols, space=space)
            # the box is in the state operand's shape, a view of its buffer (a slot
            # prefill's append sees the KV cache as [slots x heads x positions, dim])
            box = view(op.inputs[0], region.box, ops[region.buffer].type.shape)
            writes.append(Region(region.buffer, box))
            # the region spans every position; the task writes one
            state = storage(op.name)
            indirect[state] = indirect.get(state, 0) + (rb - ra) * (out_cols[1] - out_cols[0]) \
                * DTYPE_BYTES[ops[state].type.dtype]
        elif name in g.outputs:
            writes.append(Region(name, rows_box(op.type.shape, ra, rb, *out_cols)))
    return tuple(reads.values()), tuple(writes), flops, indirect


def _matmul_spaces(g: Group, tl: GroupTiling, tile_idx, ops, read, writes):
    """A matmul tile's reads of its operands (the A rows unless the prologue computes
    them, the B columns), its write of the product, its flops, and the index space of
    each prologue ([rows, K]) and epilogue ([rows, columns]) member."""
    b, mi, ni = tile_idx
    anchor = ops[g.anchor]
    _, m, n, k = matmul_dims(anchor)
    r0, r1 = b * m + mi * tl.block_m, b * m + min(m, (mi + 1) * tl.block_m)
    c0, c1 = ni * tl.block_n, min(n, (ni + 1) * tl.block_n)
    a, bop = anchor.inputs[:2]
    if a.value not in g.members:
        read(a, rows_box(a.shape, r0, r1, 0, k))
    if not is_indexed_matmul(anchor):   # (an expert pool's reads: _indexed_pool_reads)
        batch_shape = bop.shape[:-2]
        bbox = range_to_box(b, b, batch_shape) if batch_shape else ()
        read(bop, bbox + ((0, k), (c0, c1)))
    if g.anchor in g.outputs:
        writes.append(Region(g.anchor, rows_box(anchor.type.shape, r0, r1, c0, c1)))
    spaces = [(name, (r0, r1, 0, k)) for name in g.prologue] + \
             [(name, (r0, r1, c0, c1)) for name in g.epilogue]
    return spaces, 2 * (r1 - r0) * (c1 - c0) * k


def _indexed_pool_reads(anchor: Op, tl: GroupTiling, tile_idx, ops, storage, read,
                        indirect: dict[str, int]) -> None:
    """An expert slot's reads: its id, and the pool through it. Which expert is known
    only at run time, so the region is every expert's columns of the tile (what deps,
    sync and verify must assume); the bytes it moves are one expert's."""
    _, _, ni = tile_idx
    _, pool, ids = anchor.inputs
    experts, k, n = pool.shape
    c0, c1 = ni * tl.block_n, min(n, (ni + 1) * tl.block_n)
    read(ids, tuple((0, size) for size in ids.shape))
    read(pool, ((0, experts), (0, k), (c0, c1)))
    buf = storage(pool.value)
    indirect[buf] = indirect.get(buf, 0) + k * (c1 - c0) * DTYPE_BYTES[ops[buf].type.dtype]


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
    With `space`, the tile is in a [rows, space] view of the value's elements in order
    (`space_box`)."""
    dim = op.attr("dim")
    value = op.inputs[1]
    if space is None:
        box = list(rows_box(value.shape, r0, r1, c0, c1))
    else:
        box = list(space_box(value.shape, space, r0, r1, c0, c1))
    box[dim] = (0, op.type.shape[dim])
    return Region(storage(op.name), tuple(box))


def space_box(shape: tuple[int, ...], space: int, r0: int, r1: int, c0: int,
              c1: int) -> Box:
    """Bounding box, in `shape`, of rows [r0, r1) x cols [c0, c1) of its elements seen in
    order as [rows, space]: rows and columns apart where trailing dims of `shape` hold one
    row exactly (a batch's [B, kv heads, 1, head dim] append as [B, kv heads x head
    dim]), so column tiles of several rows write apart; else the flat range the tile
    spans (from its first row's first column to its last row's last)."""
    for j in range(len(shape) + 1):
        if math.prod(shape[j:]) == space:
            rows = range_to_box(r0, r1 - 1, shape[:j]) if j else ()
            return rows + range_to_box(c0, c1 - 1, shape[j:])
    return range_to_box(r0 * space + c0, (r1 - 1) * space + c1 - 1, shape)


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
