"""Op-level IR: a small, closed set of op kinds over strided views of values.

Layout ops (view, permute, slice, expand, ...) never become ops: the frontend folds
them into the `Operand` that a compute op reads (a shape, strides and an offset over
the value's contiguous storage). Only compute ops and placeholders remain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "bool": 1}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")

# Placeholders hold data from outside the graph; everything else computes.
PLACEHOLDER_KINDS = ("input", "weight", "state")
# The closed set of compute kinds (DESIGN.md, "IR").
COMPUTE_KINDS = ("matmul", "elementwise", "reduce", "gather", "concat", "state_update", "argmax",
                 "topk")
OP_KINDS = PLACEHOLDER_KINDS + COMPUTE_KINDS


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def rows(self) -> int:
        """Number of rows when viewed as [rows, last dim] (the tiling view)."""
        return math.prod(self.shape[:-1])

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1


@dataclass(frozen=True)
class Operand:
    """A strided view of `value`'s contiguous storage, as a compute op reads it."""

    value: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0

    @staticmethod
    def whole(value: str, shape: tuple[int, ...]) -> "Operand":
        return Operand(value, tuple(shape), contiguous_strides(tuple(shape)), 0)


def reads_in_order(operand: Operand, value: TensorType) -> bool:
    """Whether `operand` views all of a contiguous `value` in its own element order,
    only shaped differently (view, unsqueeze): element i of the view is element i."""
    if operand.offset != 0 or math.prod(operand.shape) != value.numel:
        return False
    expect = contiguous_strides(operand.shape)
    return all(s == e for n, s, e in zip(operand.shape, operand.strides, expect) if n != 1)


@dataclass(frozen=True)
class Op:
    """One op. `attrs` is a tuple of (key, value) pairs so the op stays hashable.

    Kinds and their attrs:
      input / weight / state  -- placeholders; no inputs.
      matmul       inputs (a [B.., M, K], b [B.., K, N]) broadcast to the output's batch;
                   or (a [J, M, K], pool [E, K, N], ids [J]): out[j] = a[j] @ pool[ids[j]]
                   (is_indexed_matmul: experts chosen at run time).
      elementwise  fn, args: each arg is ["in", i] (the i-th input) or a number; every
                   input is already broadcast to the output shape by its strides.
      reduce       fn (sum | max), scale; over the last dim, output keeps it as size 1.
      gather       inputs (table [V, D], index [...]) -> [..., D]  (embedding).
      concat       dim; inputs are the pieces in order.
      state_update inputs (state, value, index); writes value into state at index along
                   `dim` in place; the result aliases the state. The value is the state's
                   shape with 1 at `dim`; the index one position, or with `slot_dim` (0)
                   one per slot: value[b, ...] goes to position index[b] of slot b.
      argmax       over the last dim; output int64 [..., 1].
      topk         k, largest, result (values | indices): the k largest (smallest) of each
                   row, in order, ties to the lowest index; output [..., k] of the input's
                   dtype or int64. Values and indices are two ops over the same row.
    """

    name: str
    kind: str
    type: TensorType
    inputs: tuple[Operand, ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()
    source: str = ""
    # The module paths whose forward() produced the op, outermost first (e.g. ("",
    # "layers.0", "layers.0.indexer", "layers.0.indexer.index_q_proj")): model.yaml roles
    # claim ops by module (`modules:`).
    scope: tuple[str, ...] = ()

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default


@dataclass(frozen=True)
class Graph:
    """Ops in topological order; `inputs` are the runtime inputs in call order and
    `outputs` name the values the caller gets back (views of computed values)."""

    ops: tuple[Op, ...]
    inputs: tuple[str, ...]
    outputs: tuple[tuple[str, Operand], ...]

    def op(self, name: str) -> Op:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)

    def by_name(self) -> dict[str, Op]:
        return {o.name: o for o in self.ops}

    def users(self) -> dict[str, list[str]]:
        users: dict[str, list[str]] = {o.name: [] for o in self.ops}
        for o in self.ops:
            for operand in o.inputs:
                if o.name not in users[operand.value]:
                    users[operand.value].append(o.name)
        return users


@dataclass(frozen=True)
class Group:
    """A fused group: one task kind. Values inside never get a global buffer.

    kind "matmul": `anchor` is the matmul; `prologue` ops compute its A operand
    (row-wise over [rows, K], recomputed by every tile) and `epilogue` ops consume its
    result over [rows, N]. kind "row": elementwise / last-dim reductions / gathers
    over one [rows, cols] space, or a lone argmax / state update. kind "attention":
    `anchor` is the score matmul, its epilogue a softmax followed by the value matmul
    and that matmul's own epilogue (tilec/ir/attention.py names the parts); `cols` is
    the number of keys.
    `outputs` are the member values read outside the group: each gets a buffer.
    """

    name: str
    kind: str
    anchor: str | None
    prologue: tuple[str, ...]
    epilogue: tuple[str, ...]
    outputs: tuple[str, ...]
    rows: int
    cols: int

    @property
    def members(self) -> tuple[str, ...]:
        return self.prologue + ((self.anchor,) if self.anchor else ()) + self.epilogue

    @property
    def label(self) -> str:
        """What the group computes ("g12_attention" -> "attention"): the name of its
        task kind in the kernel, inspect and model.yaml roles."""
        return self.name.split("_", 1)[1] if "_" in self.name else self.name


# Ops that read or write at an index known only at run time. The kernel checks each
# such index against its bound (codegen/group_emitter.py check_index) and records the
# first one out of range in the error buffer, which the host reports after the step.
# A matmul is one only with a third input (`is_indexed_matmul`: B is a pool of
# matrices, each batch entry's chosen by a run-time id: the experts of a MoE layer).
INDEXED_KINDS = ("gather", "state_update", "matmul")


def is_indexed_matmul(op: Op) -> bool:
    """A matmul whose B operand is a pool [E, K, N] indexed per batch entry by the ids
    of its third input: out[j] = a[j] @ pool[ids[j]]."""
    return op.kind == "matmul" and len(op.inputs) == 3


def reads_run_time_index(op: Op) -> bool:
    return op.kind in INDEXED_KINDS and (op.kind != "matmul" or is_indexed_matmul(op))


def run_time_index(op: Op) -> tuple[Operand, int]:
    """The operand an indexed op (reads_run_time_index) reads its run-time index from,
    and the bound that index must stay below."""
    if op.kind == "gather":
        return op.inputs[1], op.inputs[0].shape[0]
    if op.kind == "matmul":
        return op.inputs[2], op.inputs[1].shape[0]   # an expert id of the pool
    return op.inputs[2], op.type.shape[op.attr("dim")]   # a state update's position


def index_checks(group: Group, ops: dict[str, Op]) -> tuple[str, ...]:
    """The ops of `group` whose run-time indices the kernel checks, in the order of
    their check numbers (the error buffer names a check by its position here)."""
    return tuple(m for m in group.members if reads_run_time_index(ops[m]))


@dataclass(frozen=True)
class FusedGraph:
    graph: Graph
    groups: tuple[Group, ...]  # topological order
