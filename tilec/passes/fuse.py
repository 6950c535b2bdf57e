"""fuse: Graph -> FusedGraph.

Elementwise chains and last-dim reductions join a neighbouring group, so the values
they pass around never get a global buffer:
  * a "row" group computes elementwise ops, last-dim reductions, gathers and concats
    over one [rows, cols] space (a reduction's result is a [rows, 1] column), and
    top-k selections (row groups only; their results go to a buffer);
  * a "matmul" group is one matmul with an epilogue (ops over its [rows, N] result,
    reductions over N allowed when N fits one tile) and a prologue: a row group whose
    only consumers are matmul A operands is copied into each of them, so e.g. an
    RMSNorm is recomputed by every tile of the projections that read it;
  * an "attention" group is a score matmul whose epilogue ends in a row softmax,
    joined with the matmul that multiplies the probabilities by the values: tiling
    splits it over chunks of keys (partial tasks plus a merge).
Members may only read other members through "row-aligned" views (same rows, same
width, or a [rows, 1] column broadcast along the row); any other view is a load from
a buffer. One exception: a state update (a KV-cache append) may read a matmul
epilogue's value through a view that keeps its elements in order (heads split out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tilec.ir.attention import depends_on, find_softmax
from tilec.ir.graph import (FusedGraph, Graph, Group, Op, Operand, PLACEHOLDER_KINDS,
                            reads_in_order)

# A matmul epilogue may reduce over N only when a whole row of the result is one tile.
MAX_EPILOGUE_REDUCE_N = 2048
SMALL_ROW = 64   # a weight matmul this narrow is one tile per row block anyway


# Ops whose inputs are loads with masks or indirection, never registers: they never
# share a group with the ops that compute their inputs.
READ_FROM_BUFFERS = ("concat", "gather")


def epilogue_may_reduce(grp, ops: dict[str, Op]) -> bool:
    """A reduction in a matmul epilogue makes one task own whole rows of the result.
    That is right for attention scores (short rows, the other operand a cache), and
    wrong for a projection: its weight would stream through a single worker."""
    if grp.cols > MAX_EPILOGUE_REDUCE_N:
        return False
    b = ops[grp.anchor].inputs[1].value
    return ops[b].kind != "weight" or grp.cols <= SMALL_ROW


def row_layout(operand: Operand) -> tuple[int, int, str] | None:
    """(rows, width, 'dense' | 'bcast') if `operand` reads a contiguous [rows, width]
    value row by row, or broadcasts a [rows, 1] column along each row; else None."""
    if operand.offset != 0 or not operand.shape:
        return (1, 1, "dense") if operand.offset == 0 and not operand.shape else None
    *lead, width = operand.shape
    last_stride = operand.strides[-1]
    if width > 1 and last_stride not in (0, 1):
        return None
    kind = "bcast" if (width > 1 and last_stride == 0) else "dense"
    inner = 1 if kind == "bcast" else width
    expect = inner
    for size, stride in zip(reversed(lead), reversed(operand.strides[:-1])):
        if size != 1 and stride != expect:
            return None
        expect *= size
    return math.prod(lead), width, kind


REDUCTIONS = ("reduce", "argmax", "topk")
# Never recomputed by another group's tiles: side effects and selections (indices)
NOT_RECOMPUTED = ("argmax", "topk", "state_update")


def iteration_space(op: Op) -> tuple[int, int]:
    """(rows, width) an op iterates over: a reduction walks its input's rows; a state
    update walks the value it writes."""
    if op.kind in REDUCTIONS:
        shape = op.inputs[0].shape
    elif op.kind == "state_update":
        shape = op.inputs[1].shape
    else:
        shape = op.type.shape
    return (math.prod(shape[:-1]), shape[-1]) if shape else (1, 1)


def iteration_width(op: Op) -> int:
    return iteration_space(op)[1]


@dataclass
class _Group:
    kind: str
    rows: int
    cols: int
    anchor: str | None = None
    prologue: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)   # anchor-less members / epilogue
    has_reduce: bool = False

    def all(self) -> list[str]:
        return self.prologue + ([self.anchor] if self.anchor else []) + self.members


def _aligned(operand: Operand, producer: Op, rows: int, width: int) -> bool:
    layout = row_layout(operand)
    if layout is None:
        return False
    r, w, kind = layout
    prod_rows, prod_width = producer.type.rows, producer.type.cols
    if r != rows or prod_rows != rows or w != width:
        return False
    if kind == "dense":
        return prod_width == width
    return prod_width == 1


class _Fusion:
    """The groups being formed over one graph, with the questions the phases ask of
    them (which groups read a group, whether one reaches another, whether an op may
    join a group). Mutable while `fuse` runs; `fuse` returns frozen `Group`s."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.ops = graph.by_name()
        self.index = {o.name: i for i, o in enumerate(graph.ops)}
        self.users = graph.users()
        self.outputs = {operand.value for _, operand in graph.outputs}
        self.groups: list[_Group] = []
        self.group_of: dict[str, int] = {}

    def successors(self, g: int) -> set[int]:
        out = set()
        for name in self.groups[g].all():
            for u in self.users[name]:
                if u in self.group_of and self.group_of[u] != g:
                    out.add(self.group_of[u])
        return out

    def reaches(self, src: int, dst: int) -> bool:
        seen, stack = set(), [src]
        while stack:
            g = stack.pop()
            if g == dst:
                return True
            if g in seen:
                continue
            seen.add(g)
            stack.extend(self.successors(g))
        return False

    def no_cycle(self, op: Op, g: int) -> bool:
        return not any(h is not None and h != g and self.reaches(g, h)
                       for h in (self.group_of.get(o.value) for o in op.inputs))

    def can_join(self, op: Op, g: int) -> bool:
        ops, grp = self.ops, self.groups[g]
        members = set(grp.all())
        if _appends_in_epilogue(op, grp, members, ops):
            return self.no_cycle(op, g)
        if op.kind == "state_update" and grp.kind == "matmul" and \
                op.inputs[1].shape[op.attr("dim")] > 1:
            # n positions (a prefill's append): a row group walks them, never an epilogue
            # (with one KV head its value has the projection's rows and would pass below)
            return False
        rows, width = iteration_space(op)
        if rows != grp.rows:
            return False
        if op.kind in READ_FROM_BUFFERS and any(o.value in members for o in op.inputs):
            return False
        if op.kind == "topk" and grp.kind != "row":
            return False  # its k rounds each walk the row: a loop only a row task has
        if any(o.value in members and ops[o.value].kind == "topk" for o in op.inputs):
            return False  # a topk stores one column per round: its readers load them
        if grp.kind == "row":
            if width not in (grp.cols, 1) and not (grp.cols == 1 and not grp.has_reduce):
                return False
        else:  # matmul epilogue
            if width not in (grp.cols, 1):
                return False
            if op.kind in REDUCTIONS and not epilogue_may_reduce(grp, ops):
                return False
        for operand in op.inputs:
            if operand.value in members:
                producer = ops[operand.value]
                opw = operand.shape[-1] if operand.shape else 1
                rows = math.prod(operand.shape[:-1]) if operand.shape else 1
                if not _aligned(operand, producer, rows, opw):
                    return False
                if grp.kind == "matmul" and operand.value in grp.prologue:
                    return False
        return self.no_cycle(op, g)  # joining must not make a cycle g -> h -> g

    def escapes(self, m: str, g: int) -> bool:
        """Whether member `m` of group `g` is a graph output or read outside `g`."""
        return m in self.outputs or any(self.group_of.get(u) != g for u in self.users[m])


def fuse(graph: Graph) -> FusedGraph:
    f = _Fusion(graph)
    _join_greedily(f)
    _merge_row_producers(f)
    _move_prologues(f)
    _join_attention(f)
    return FusedGraph(graph, _frozen(f, _topological_order(f)))


def _join_greedily(f: _Fusion) -> None:
    """In program order: each matmul starts a group; any other op joins the first group
    of an input that `can_join` allows, or starts a row group."""
    for op in f.graph.ops:
        if op.kind in PLACEHOLDER_KINDS:
            continue
        if op.kind == "matmul":
            f.groups.append(_Group("matmul", op.type.rows, op.type.cols, anchor=op.name))
            f.group_of[op.name] = len(f.groups) - 1
            continue
        joined = False
        for operand in op.inputs:
            g = f.group_of.get(operand.value)
            if g is not None and f.can_join(op, g):
                grp = f.groups[g]
                grp.members.append(op.name)
                if grp.kind == "row":
                    grp.cols = max(grp.cols, iteration_width(op))
                if op.kind in REDUCTIONS:
                    grp.has_reduce = True
                f.group_of[op.name] = g
                joined = True
                break
        if not joined:
            rows, width = iteration_space(op)
            f.groups.append(_Group("row", rows, width, members=[op.name],
                                   has_reduce=op.kind in REDUCTIONS))
            f.group_of[op.name] = len(f.groups) - 1


def _merge_row_producers(f: _Fusion) -> None:
    """The greedy pass joins an op to a group it reads from; an op that reads only
    values from elsewhere starts a group, even when all it feeds is one other row
    group (RoPE's swap_halves(k) * sin feeding k * cos + ...): merge such a producer
    into its consumer when they walk the same rows and columns."""
    groups, group_of = f.groups, f.group_of
    merged = True
    while merged:
        merged = False
        for b, producer in enumerate(groups):
            a = _row_consumer(producer, b, groups, group_of, f.ops, f.users, f.outputs)
            if a is None or any(f.reaches(x, a) for x in f.successors(b) if x != a):
                continue
            groups[a].members = producer.members + groups[a].members
            groups[a].has_reduce |= producer.has_reduce
            for m in producer.members:
                group_of[m] = a
            producer.members = []
            merged = True


def _move_prologues(f: _Fusion) -> None:
    """A row group feeding only matmul A operands moves into each of them (when none of
    them has a prologue yet)."""
    groups, group_of, ops = f.groups, f.group_of, f.ops
    for g, grp in enumerate(groups):
        if grp.kind != "row" or not grp.members:
            continue
        escaping = [m for m in grp.members if f.escapes(m, g)]
        if len(escaping) != 1 or escaping[0] in f.outputs:
            continue
        value = escaping[0]
        if any(ops[m].kind in NOT_RECOMPUTED for m in grp.members):
            continue  # side effects and index results are never recomputed per tile
        outside = [u for u in f.users[value] if group_of.get(u) != g]
        consumers = [ops[u] for u in outside]
        if not consumers or not all(
            c.kind == "matmul" and c.inputs[0].value == value
            and c.inputs[1].value != value
            and _aligned(c.inputs[0], ops[value], grp.rows, grp.cols)
            and c.inputs[0].shape[-1] == grp.cols
            for c in consumers
        ):
            continue
        if any(groups[group_of[c.name]].prologue for c in consumers):
            continue
        for c in consumers:
            groups[group_of[c.name]].prologue = list(grp.members)
        for m in grp.members:
            group_of.pop(m)
        grp.members = []


def _join_attention(f: _Fusion) -> None:
    """scores -> softmax -> probs @ V becomes one group, so the probabilities never get
    a buffer and tiling can split the keys (tilec/ir/attention.py)."""
    groups, group_of, ops = f.groups, f.group_of, f.ops
    for g, grp in enumerate(groups):
        h = _attention_partner(grp, g, groups, group_of, ops, f.users, f.outputs)
        if h is None or any(f.reaches(g, group_of[o.value])
                            for m in groups[h].all() for o in ops[m].inputs
                            if group_of.get(o.value, g) not in (g, h)):
            continue
        grp.kind = "attention"
        grp.members += groups[h].all()
        for m in groups[h].all():
            group_of[m] = g
        groups[h].anchor, groups[h].members = None, []


def _topological_order(f: _Fusion) -> list[int]:
    """The non-empty groups in a topological order of the group DAG, ties broken by
    program position."""
    groups, group_of = f.groups, f.group_of
    live = [g for g in range(len(groups)) if groups[g].all()]
    deps: dict[int, set[int]] = {g: set() for g in live}
    for g in live:
        for name in groups[g].all():
            for operand in f.ops[name].inputs:
                h = group_of.get(operand.value)
                if h is not None and h != g:
                    deps[g].add(h)
    order: list[int] = []
    done: set[int] = set()
    pending = sorted(live, key=lambda g: min(f.index[n] for n in groups[g].all()))
    while pending:
        for g in pending:
            if deps[g] <= done:
                order.append(g)
                done.add(g)
                pending.remove(g)
                break
        else:  # pragma: no cover - prevented by the cycle check in can_join
            raise AssertionError("fusion produced a cycle")
    return order


def _frozen(f: _Fusion, order: list[int]) -> tuple[Group, ...]:
    """The groups as IR, named by position and label, with the members they store."""
    result = []
    for n, g in enumerate(order):
        grp = f.groups[g]
        # a state update is a side effect: it always stores, read later or not
        outs = tuple(m for m in grp.all()
                     if m not in grp.prologue
                     and (f.escapes(m, g) or f.ops[m].kind == "state_update"))
        result.append(Group(
            name=f"g{n}_{_label(grp, f.ops)}", kind=grp.kind, anchor=grp.anchor,
            prologue=tuple(grp.prologue),
            epilogue=tuple(sorted(grp.members, key=f.index.__getitem__)),
            outputs=outs, rows=grp.rows, cols=grp.cols,
        ))
    return tuple(result)


def _appends_in_epilogue(op: Op, grp: _Group, members: set[str], ops) -> bool:
    """A state update (a KV-cache append) of a matmul's result, or of an epilogue value,
    only viewed in another shape (heads split out): it joins the epilogue, which stores
    each element of its tile where the view puts it (`ir.graph.reads_in_order`)."""
    if grp.kind != "matmul" or op.kind != "state_update":
        return False
    state, value, index = op.inputs
    # n positions: the kernel reads each row's position by its row; a row group does
    if value.value not in members or value.value in grp.prologue or value.shape[op.attr("dim")] > 1:
        return False
    source = ops[value.value].type
    # per-slot positions (slot_dim): the kernel finds a row's slot from the row alone
    whole_rows = op.attr("slot_dim") is None or math.prod(value.shape[1:]) % grp.cols == 0
    return (state.value not in members and index.value not in members and whole_rows
            and source.numel == grp.rows * grp.cols and reads_in_order(value, source))


def _row_consumer(producer: _Group, b: int, groups: list[_Group], group_of, ops, users,
                  outputs) -> int | None:
    """The one row group that every value escaping `producer` (a row group) feeds, if
    it has the same shape and reads those values row-aligned; else None."""
    if producer.kind != "row" or not producer.members or producer.has_reduce:
        return None
    if any(ops[m].kind in NOT_RECOMPUTED for m in producer.members):
        return None
    consumer = None
    for m in producer.members:
        outside = [u for u in users[m] if group_of.get(u) != b]
        if m in outputs:
            return None
        for u in outside:
            a = group_of.get(u)
            if a is None or (consumer is not None and a != consumer):
                return None
            consumer = a
            if any(o.value == m and not _aligned(o, ops[m], producer.rows, producer.cols)
                   for o in ops[u].inputs) or ops[u].kind in READ_FROM_BUFFERS:
                return None
    if consumer is None:
        return None
    grp = groups[consumer]
    if grp.kind != "row" or (grp.rows, grp.cols) != (producer.rows, producer.cols):
        return None
    return consumer


MAX_HEAD_DIM = 256   # an attention task holds a whole query and output row per head


def _attention_partner(grp: _Group, g: int, groups: list[_Group], group_of, ops, users,
                       outputs) -> int | None:
    """The group of the value matmul that `grp` (scores with a softmax epilogue) feeds,
    if the two make an attention group; else None."""
    if grp.kind != "matmul" or not grp.members:
        return None
    found = find_softmax(grp.members, ops)
    if found is None:
        return None
    x, p = found[0], found[-1]
    members = set(grp.all())
    softmax = set(found[1:])
    for m in [grp.anchor] + grp.members:
        op = ops[m]
        if m not in softmax and m != grp.anchor and op.kind != "elementwise":
            return None   # another reduction or a side effect: not a plain attention
        escapes = m in outputs or any(group_of.get(u) != g for u in users[m])
        if escapes != (m == p):
            return None
    if x != grp.anchor and not depends_on(x, grp.anchor, ops, members):
        return None
    if p in outputs or len(users[p]) != 1:
        return None   # the probabilities are needed elsewhere: they must get a buffer
    pv = ops[users[p][0]]
    h = group_of.get(pv.name)
    if pv.kind != "matmul" or h is None or groups[h].anchor != pv.name or groups[h].prologue:
        return None
    a, b = pv.inputs
    if a.value != p or b.value == p or not _aligned(a, ops[p], grp.rows, grp.cols):
        return None
    if pv.type.shape[:-1] != ops[grp.anchor].type.shape[:-1] or a.shape[-1] != grp.cols:
        return None   # tiles index both products by the scores' batch and rows
    head_dim = ops[grp.anchor].inputs[0].shape[-1]
    if head_dim > MAX_HEAD_DIM or pv.type.cols > MAX_HEAD_DIM:
        return None
    return h


def _label(grp: _Group, ops: dict[str, Op]) -> str:
    if grp.kind == "attention":
        return "attention"
    if grp.kind == "matmul":
        parts = ["matmul"]
        if grp.prologue:
            parts.insert(0, "norm" if any(ops[m].kind == "reduce" for m in grp.prologue) else "pre")
        if any(ops[m].kind == "reduce" for m in grp.members):
            parts.append("softmax" if any(ops[m].attr("fn") == "exp" for m in grp.members) else "reduce")
        elif any(ops[m].kind == "state_update" for m in grp.members):
            parts.append("append")
        elif grp.members:
            parts.append("epilogue")
        return "_".join(parts)
    kinds = {ops[m].kind for m in grp.members}
    for k in ("state_update", "argmax", "topk", "gather", "concat"):
        if k in kinds:
            return k
    return "reduce" if "reduce" in kinds else "elementwise"
