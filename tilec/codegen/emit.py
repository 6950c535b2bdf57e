"""Turn one fused group into the code its task kind's template lays out.

Each group kind has one code type and one emitter (`KINDS`); the code type names its
template (`templates/<kind>.py.j2`). The templates own the algorithms (the K loop, the
split-KV attention and its merge, the top-k rounds); the emitters decide *what* each
line computes and supply it as the templates' hooks, with the lines of the group's ops
from `group_emitter.GroupEmitter`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tilec.codegen.exprs import TL_DTYPES, cast, downcast, upcast
from tilec.codegen.group_emitter import REDUCTIONS, GroupCode, GroupEmitter, pow2
from tilec.ir.attention import attention_chunks, attention_parts, partial_names
from tilec.ir.graph import Group, Op, is_indexed_matmul
from tilec.ir.stream import (PROLOGUE_CHUNK, is_matvec, matmul_ring, ring_stages,
                              takes_gemm_loop)
from tilec.ir.tasks import Buffer, GroupTiling


@dataclass
class RowCode(GroupCode):
    """templates/row.py.j2: reduction phases, then the final loop over the columns."""

    template: ClassVar[str] = "row.py.j2"
    stores: list[str] = field(default_factory=list)     # narrow stores after the loop


@dataclass
class MatmulCode(GroupCode):
    """templates/matmul.py.j2: the prologue's phases, the K loop (`main` computes the A
    tile), then the epilogue on the accumulator."""

    template: ClassVar[str] = "matmul.py.j2"
    epilogue: list[str] = field(default_factory=list)   # after the K loop, stores included
    dot: str = ""
    # matmul K loop: tensor-core tiles (16 rows or more) load B chunk 0 (`b_first`, at
    # kb) and the next (`b_next`, at kn); matvec tiles stream B through a ring of
    # `stages` chunks (`b_tile` at cols) into an `acc_shape` accumulator, `acc_finish`
    # reducing it to [BM, BN] after the loop
    b_first: str = ""
    b_next: str = ""
    b_tile: str = ""
    stages: int = 1
    acc_shape: list[int] = field(default_factory=list)
    acc_finish: str = ""


@dataclass
class AttentionCode(MatmulCode):
    """templates/attention.py.j2, which lays out split-KV attention (see
    `emit_attention`); these are the expressions it is written over. `epilogue` is the
    output's, over the head dim."""

    template: ClassVar[str] = "attention.py.j2"
    scores: list[str] = field(default_factory=list)     # the score epilogue and softmax
    p: str = ""                                         # the probabilities
    v_ptr: str = ""                                     # the values of batch t0
    v_strides: tuple[int, int] = (0, 0)                 # their (key, head dim) strides
    pv_dot: str = ""                                    # p_tile @ v_tile
    out: str = ""                                       # the product's variable
    # with several chunks: the partials' buffers and the chunk's row max and row sum
    partial_out: str = ""
    partial_max: str = ""
    partial_sum: str = ""
    row_max: str = ""
    row_sum: str = ""
    hidden: list[str] = field(default_factory=list)     # [BM, BN] masks hiding keys


def emit_row(e: GroupEmitter) -> RowCode:
    """Reductions (and top-k rounds) as phases, then the wide outputs over the columns."""
    c, group = e.code, e.g
    c.consts.update(R=group.rows, C=group.cols)
    avail: set[str] = set()
    scope = list(group.epilogue)
    e.row_phases(scope, avail)
    wide, narrow = e.split_outputs(group.outputs)
    c.main = [e.assign(m) for m in e.needed(wide, avail, scope)]
    c.main += e.stores(wide, narrow=False)
    c.stores = e.stores(narrow, narrow=True)
    return c


def emit_matmul(e: GroupEmitter, epilogue: tuple[str, ...]) -> list[str]:
    """The anchor's K loop (prologue, prefetched B chunks, the product) into `e.code`;
    returns the lines that compute `epilogue` on the accumulator (stores not included)."""
    c, group, ops, tiling = e.code, e.g, e.ops, e.tiling
    anchor = ops[group.anchor]
    m, n = anchor.type.shape[-2], anchor.type.shape[-1]
    k = anchor.inputs[0].shape[-1]
    c.consts.update(M=m, N=n, K=k)
    if group.prologue and is_matvec(tiling):
        # the prologue's row reductions (an RMSNorm's sum of squares) in as few passes
        # as registers allow: each pass is a dependent round trip to memory before the
        # first weight chunk can be used (K = 2048 in BK = 64 chunks was 32 of them)
        c.consts["PK"] = min(pow2(k), PROLOGUE_CHUNK)
    a, b = anchor.inputs[:2]
    avail: set[str] = set()
    prologue = list(group.prologue)
    e.row_phases(prologue, avail)
    if a.value in e.var:
        a_lines = [e.assign(x) for x in e.needed([a.value], avail, prologue)]
        a_expr = e.var[a.value]
    else:
        a_lines, a_expr = [], e.load(a, narrow=False)
    a_dtype = ops[a.value].type.dtype
    b_ptr = e.pool_pointer(anchor, "boff") if is_indexed_matmul(anchor) else \
        e.batch_pointer(b, "boff")
    a_round = cast("a_tile", "float32", a_dtype) if a_dtype in ("bfloat16", "float16") else "a_tile"
    c.main = a_lines + [f"a_tile = tl.where(mask, {a_expr}, 0.0)", f"a_tile = {a_round}"]
    b_dtype = ops[b.value].type.dtype
    weight = e.storage(b.value).kind == "weight"
    if group.kind == "matmul" and takes_gemm_loop(tiling):
        c.stages = matmul_ring(group, ops, tiling).stages
        _gemm_loop(c, b_ptr, b.strides[-2:], (n, k), tiling, weight)
        c.dot = "acc = " + dot("a_tile", "b_tile", b_dtype, "acc")
    elif not is_matvec(tiling) and tiling.block_k >= 16 and tiling.block_n >= 16:
        _tensor_core_loop(c, b_ptr, b.strides[-2:], k)
        c.dot = "acc = " + dot("a_tile", "b_tile", b_dtype, "acc")
    else:
        _stream_loop(c, b_ptr, b.strides[-2:], (n, k), tiling, weight, b_dtype)
    lines = [f"{e.var[group.anchor]} = acc"]
    for name in epilogue:
        if ops[name].kind in REDUCTIONS:
            init, upd, finish = e.reduce_lines(name, col0=f"t2 * {tiling.block_n}")
            lines += init + upd + [finish]
        else:
            lines.append(e.assign(name))
    return lines


def _tensor_core_loop(c: MatmulCode, b_ptr: str, strides: tuple[int, int], k: int) -> None:
    """A [BK, BN] B chunk per trip of the K loop, the next one loaded (into registers)
    before this one's product: two chunks in flight per worker."""
    sk, sn = strides

    def b_load(kk: str) -> str:
        return (f"tl.load({b_ptr} + {kk}[:, None] * {sk} + ncols[None, :] * {sn}, "
                f"mask=({kk} < {k})[:, None] & nmask[None, :], other=0)")
    c.b_first = b_load("kb")
    c.b_next = b_load("kn")


def _gemm_loop(c: MatmulCode, b_ptr: str, strides: tuple[int, int], nk: tuple[int, int],
               tiling: GroupTiling, weight: bool) -> None:
    """The K loop of a GEMM tile (a batched decode step's or a prefill chunk's rows): each
    trip loads its [BM, BK] A chunk and [BK, BN] B chunk, which Triton's pipeliner
    (`tl.range(num_stages=c.stages)`, `ir/stream.matmul_ring`: deep enough for
    GEMM_IN_FLIGHT bytes of B where shared memory allows) copies ahead asynchronously,
    and one `tl.dot` applies the B chunk to all BM rows: each weight tile is read once per
    launch for every row of the tile. Weights are loaded evict-first (read once per step)
    and without a mask where the shapes make it always true."""
    sk, sn = strides
    n, k = nk
    exact = n % tiling.block_n == 0 and k % tiling.block_k == 0
    mask = "" if exact else ", mask=cmask[:, None] & nmask[None, :], other=0"
    hint = ', eviction_policy="evict_first"' if weight else ""
    c.b_tile = f"tl.load({b_ptr} + cols[:, None] * {sk} + ncols[None, :] * {sn}{mask}{hint})"
    c.acc_shape = [tiling.block_m, tiling.block_n]
    c.acc_finish = ""


def _stream_loop(c: MatmulCode, b_ptr: str, strides: tuple[int, int], nk: tuple[int, int],
                 tiling: GroupTiling, weight: bool, b_dtype: str) -> None:
    """The K loop of a matvec-shaped task (fewer than 16 rows), the weight stream of a
    decode step: B chunks go through a `ring_stages`-deep shared-memory ring (the loop is
    a `tl.range(num_stages=...)`, which Triton software-pipelines with asynchronous
    copies, cp.async on sm_90), loaded in B's own layout (the contiguous dim innermost,
    16-byte vectors, no transpose through shared memory). With one row the product is
    FMAs into a [BN, BK] (or [BK, BN]) float32 accumulator, reduced once after the loop;
    with 2..15 rows each chunk is reduced. Weights are read once per step: loaded
    evict-first, so they do not push the activations out of L2."""
    sk, sn = strides
    n, k = nk
    bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
    c.stages = ring_stages(tiling, k)
    rows_major = sk == 1 or sn != 1          # [BN, BK]: K innermost (nn.Linear's [N, K])
    if rows_major:
        ptr = f"{b_ptr} + ncols[:, None] * {sn} + cols[None, :]" + (f" * {sk}" if sk != 1 else "")
        bounds = "nmask[:, None] & cmask[None, :]"
    else:
        ptr = f"{b_ptr} + cols[:, None] * {sk} + ncols[None, :]"
        bounds = "cmask[:, None] & nmask[None, :]"
    # A mask the shapes make always true is left out: a masked copy needs a predicate
    # per vector, and its zero fill
    exact = n % bn == 0 and k % bk == 0
    mask = "" if exact else f", mask={bounds}, other=0"
    hint = ', eviction_policy="evict_first"' if weight else ""
    c.b_tile = f"tl.load({ptr}{mask}{hint})"
    b = upcast("b_tile", b_dtype)
    if bm == 1:
        c.acc_shape = [bn, bk] if rows_major else [bk, bn]
        a_col = "a_tile" if rows_major else "tl.trans(a_tile)"
        c.dot = f"acc += {b} * {a_col}"
        c.acc_finish = f"acc = tl.sum(acc, axis={1 if rows_major else 0})[None, :]"
    else:
        c.acc_shape = [bm, bn]
        c.dot = (f"acc += tl.sum(a_tile[:, None, :] * {b}[None, :, :], axis=2)"
                 if rows_major else
                 f"acc += tl.sum(a_tile[:, :, None] * {b}[None, :, :], axis=1)")
        c.acc_finish = ""


def dot(a: str, b: str, b_dtype: str, acc: str | None = None) -> str:
    """A tensor-core product of float32 registers `a` and a `b` load of `b_dtype`:
    low-precision operands go in as themselves; float32 stays exact (ieee)."""
    tail = f", {acc}" if acc else ""
    if b_dtype in ("bfloat16", "float16"):
        dt = TL_DTYPES[b_dtype]
        return f"tl.dot({downcast(a, b_dtype)}, {b}.to({dt}){tail})"
    return f"tl.dot({a}, {b}.to(tl.float32){tail}, input_precision=\"ieee\")"


def emit_attention(e: GroupEmitter) -> AttentionCode:
    """Split-KV decode attention (templates/attention.py.j2 lays the algorithm out).

    A partial task takes one chunk of BN keys: the score product and its epilogue up to
    the softmax are the matmul code above, over the chunk; the probabilities, softmax-
    normalised within the chunk, multiply the chunk's values. With one chunk that is
    the whole attention. With several, each partial stores its output, row max and row
    sum, and a merge task rescales them: out = sum_c w_c o_c / sum_c w_c with
    w_c = exp(max_c - max) * sum_c. A chunk whose -inf masks (a causal mask beyond the
    decode position) hide every key loads nothing and stores an empty partial."""
    c, group, ops, tiling = e.code, e.g, e.ops, e.tiling
    parts = attention_parts(group, ops)
    chunks = attention_chunks(tiling)
    pv = ops[parts.pv]
    dv = pv.type.cols
    c.consts.update(DV=dv, BDV=max(16, pow2(dv)), NC=chunks)
    c.scores = emit_matmul(e, parts.score_ops + parts.softmax_ops)
    values = pv.inputs[1]
    c.p, c.out = e.var[parts.p], e.var[parts.pv]
    c.v_ptr = e.batch_pointer(values, "voff")
    c.v_strides = (values.strides[-2], values.strides[-1])
    c.pv_dot = dot("p_tile", "v_tile", ops[values.value].type.dtype)
    c.epilogue = [e.assign(name) for name in parts.out_ops] + e.final_stores(group.outputs)
    if chunks == 1:
        return c
    c.partial_out, c.partial_max, c.partial_sum = (
        e.buffer_pointer(e.buffers[name]) for name in partial_names(group.name))
    c.row_max, c.row_sum = e.var[parts.row_max], e.var[parts.row_sum]
    for name, cond, hides_when_true in parts.masks:
        value = e.load(ops[name].inputs[cond], narrow=False)
        c.hidden.append(f"(({value}) {'!=' if hides_when_true else '=='} 0)")
    return c


def emit_matmul_group(e: GroupEmitter) -> MatmulCode:
    """One matmul tile: the K loop, then its epilogue and stores."""
    e.code.epilogue = emit_matmul(e, e.g.epilogue) + e.final_stores(e.g.outputs)
    return e.code


# Each group kind: its code type (which names its template) and its emitter.
KINDS = {
    "row": (RowCode, emit_row),
    "matmul": (MatmulCode, emit_matmul_group),
    "attention": (AttentionCode, emit_attention),
}


def emit_group(group: Group, ops: dict[str, Op], tiling: GroupTiling,
               buffers: dict[str, Buffer]) -> GroupCode:
    code_type, emit = KINDS[group.kind]
    e = GroupEmitter(group, ops, tiling, buffers, code_type(group.kind, group.name, {}))
    e.code.consts = {"BM": tiling.block_m, "BN": tiling.block_n, "BK": tiling.block_k}
    return emit(e)
