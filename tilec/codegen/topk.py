"""The task code of a top-k: k rounds over the row, one result column per round.

torch.topk's order ranks each element by (tier, key, -index): key is x (largest) or
-x (smallest); tier puts NaN above every number when largest, below when smallest,
as torch orders them; equal keys go to the lowest index first. A round is a chunked
pass over the row that finds the greatest element ranked below the previous round's
pick, so every pick removes itself from the next round: no mask of taken elements is
kept, and a row longer than one chunk needs nothing more than the chunk loop. Each
round stores its value and index at column `rnd` of the outputs.

The phase lays out as templates/row.py.j2 shows: `init` once, then `rounds` times
`round_init`, the chunk loop with `body`, and `round_finish`.
"""
from __future__ import annotations

from typing import Protocol

from tilec.codegen.exprs import TL_DTYPES
from tilec.codegen.safety import integer
from tilec.ir.graph import Group, Op, Operand
from tilec.ir.tasks import GroupTiling

NEG_INF = '-float("inf")'


class Emitter(Protocol):
    """What a phase uses of the group's emitter (emit.GroupEmitter), named here rather
    than imported: emit imports this module, and modules import in one direction."""

    g: Group
    ops: dict[str, Op]
    tiling: GroupTiling
    members: list[str]
    var: dict[str, str]

    def pointer(self, value: str, offset: int = 0) -> str: ...

    def load(self, operand: Operand, narrow: bool) -> str: ...


def topk_phase(e: Emitter, name: str, body: list[str]) -> tuple[dict, list[str]]:
    """The phase of topk op `name`, shared by the group's other topk of the same row,
    k and order (values and indices): (phase, the ops it computes). `body` computes
    the members the row needs, per chunk."""
    op = e.ops[name]
    k, largest = integer(op.attr("k"), "topk k"), op.attr("largest")
    twins = [m for m in e.members
             if e.ops[m].kind == "topk" and e.ops[m].inputs[0] == op.inputs[0]
             and (e.ops[m].attr("k"), e.ops[m].attr("largest")) == (k, largest)]
    src = op.inputs[0]
    x = e.var[src.value] if src.value in e.var else e.load(src, narrow=False)
    bm, width = e.tiling.block_m, e.g.cols
    v = e.var[name]
    prev = (f"pt_{v}[:, None]", f"pk_{v}[:, None]", f"pi_{v}[:, None]")
    best = (f"bt_{v}", f"bk_{v}", f"bi_{v}")
    below_prev = (f"(tk_tier < {prev[0]}) | ((tk_tier == {prev[0]}) & ((tk_key < {prev[1]}) | "
                  f"(((tk_key == {prev[1]}) | tk_nan) & (cols[None, :] > {prev[2]}))))")
    chunk = [
        f"tk_x = {x}",
        "tk_nan = tk_x != tk_x",
        f"tk_tier = {'tk_nan' if largest else '(tk_x == tk_x)'}.to(tl.int32)",
        f"tk_key = {'tk_x' if largest else '-tk_x'}",
        f"tk_open = mask & ({below_prev})",
        # the chunk's best: highest tier, then greatest key (NaN keys are all equal),
        # then lowest index
        "tk_ct = tl.max(tl.where(tk_open, tk_tier, -1), axis=1)",
        "tk_top = tk_open & (tk_tier == tk_ct[:, None])",
        f"tk_ck = tl.max(tl.where(tk_top & (tk_x == tk_x), tk_key, {NEG_INF}), axis=1)",
        "tk_ci = tl.min(tl.where(tk_top & (tk_nan | (tk_key == tk_ck[:, None])), "
        f"cols[None, :], {width}), axis=1)",
        # an earlier chunk holds lower indices: on a tie the running best stays
        f"tk_better = (tk_ct > {best[0]}) | ((tk_ct == {best[0]}) & (tk_ck > {best[1]}))",
        *(f"{b} = tl.where(tk_better, {c}, {b})"
          for b, c in zip(best, ("tk_ct", "tk_ck", "tk_ci"))),
    ]
    nan_tier, key = (1, best[1]) if largest else (0, f"-{best[1]}")
    value = f"tl.where({best[0]} == {nan_tier}, float(\"nan\"), {key})"
    results = {"values": value, "indices": best[2]}
    stores = [f"tl.store({e.pointer(m)} + rows * {k} + rnd, "
              f"{results[e.ops[m].attr('result')]}.to({TL_DTYPES[e.ops[m].type.dtype]}), "
              "mask=rmask)" for m in twins if m in e.g.outputs]
    phase = {
        "rounds": k,
        # before the first round every element ranks below the "previous pick"
        "init": [f"pt_{v} = tl.full([{bm}], 2, tl.int32)",
                 f"pk_{v} = tl.zeros([{bm}], dtype=tl.float32)",
                 f"pi_{v} = tl.zeros([{bm}], dtype=tl.int32)"],
        "round_init": [f"{best[0]} = tl.full([{bm}], -1, tl.int32)",
                       f"{best[1]} = tl.full([{bm}], {NEG_INF}, tl.float32)",
                       f"{best[2]} = tl.full([{bm}], {width}, tl.int32)"],
        "body": body + chunk,
        "round_finish": stores + [f"{p}_{v} = {b}" for p, b in zip(("pt", "pk", "pi"), best)],
    }
    return phase, twins
