"""The hooks of a top-k phase: templates/row.py.j2's `topk` macro lays out the
algorithm (k rounds over the row, one result column per round, in torch.topk's order);
this module supplies what it is written over.

A phase of a top-k is shared by the group's other top-k of the same row, k and order
(its values and its indices): one walk of the row finds both.
"""
from __future__ import annotations

from typing import Protocol

from tilec.codegen.exprs import TL_DTYPES
from tilec.codegen.safety import integer
from tilec.ir.graph import Group, Op, Operand

RESULTS = ("values", "indices")   # what a topk op's `result` attribute names


class Emitter(Protocol):
    """What a phase uses of the group's emitter (group_emitter.GroupEmitter), named
    here rather than imported: group_emitter imports this module, and modules import in
    one direction."""

    g: Group
    ops: dict[str, Op]
    members: list[str]
    var: dict[str, str]

    def pointer(self, value: str, offset: int = 0) -> str: ...

    def load(self, operand: Operand, narrow: bool) -> str: ...


def topk_phase(e: Emitter, name: str, body: list[str]) -> tuple[dict, list[str]]:
    """The phase of topk op `name` and its twins: (phase, the ops it computes). `body`
    computes the members the row needs, per chunk. The phase's keys are the `topk`
    macro's hooks: `rounds` (k), `x` (the row's element), `largest`, `v` (the suffix of
    the macro's variables), `body`, and `stores` (each output's address, result, dtype)."""
    op = e.ops[name]
    k, largest = integer(op.attr("k"), "topk k"), op.attr("largest")
    twins = [m for m in e.members
             if e.ops[m].kind == "topk" and e.ops[m].inputs[0] == op.inputs[0]
             and (e.ops[m].attr("k"), e.ops[m].attr("largest")) == (k, largest)]
    src = op.inputs[0]
    x = e.var[src.value] if src.value in e.var else e.load(src, narrow=False)
    stores = []
    for m in twins:
        if m not in e.g.outputs:
            continue
        result = e.ops[m].attr("result")
        if result not in RESULTS:
            raise NotImplementedError(f"topk result {result!r}")
        stores.append({"ptr": e.pointer(m), "result": result,
                       "dtype": TL_DTYPES[e.ops[m].type.dtype]})
    phase = {"rounds": k, "x": x, "largest": largest, "v": e.var[name], "body": body,
             "stores": stores}
    return phase, twins
