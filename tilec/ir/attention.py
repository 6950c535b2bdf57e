"""The structure of an attention group, read back from its member ops.

The fuse pass makes a group of kind "attention" out of a score matmul whose epilogue
ends in a row softmax and the matmul that multiplies those probabilities by a value
operand (decode attention: scores = q @ K^T, probs = softmax(f(scores)), out = probs @ V).
Tiling, codegen and the reference executor all need to know which member plays which
part; this module finds out from the ops alone, so the group needs no extra fields
and an engine stores nothing new.

A softmax here is the exact op pattern the frontend lowers `aten._softmax` to (and a
hand-written `exp(x - max) / sum` traces to): max over x, x - max, exp, sum, div,
optionally followed by one cast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tilec.ir.graph import Group, Op

NEG_INF = float("-inf")


@dataclass(frozen=True)
class AttentionParts:
    scores: str                  # the score matmul (the group's anchor)
    score_ops: tuple[str, ...]   # elementwise members between the scores and x
    x: str                       # the softmax input (the scores themselves, or a member)
    row_max: str
    shifted: str
    exp: str
    row_sum: str
    probs: str                   # the division; `p` (what the value matmul reads) may be a cast of it
    p: str
    pv: str                      # the value matmul
    out_ops: tuple[str, ...]     # members after the value matmul (its epilogue)
    # where-ops that set scores to -inf from a condition that does not depend on the
    # scores: (op name, index of the condition input, True if -inf is the "true" branch)
    masks: tuple[tuple[str, int, bool], ...]

    @property
    def softmax_ops(self) -> tuple[str, ...]:
        ops = (self.row_max, self.shifted, self.exp, self.row_sum, self.probs)
        return ops + ((self.p,) if self.p != self.probs else ())


def reads(op: Op, value: str) -> bool:
    return any(o.value == value for o in op.inputs)


def _fn(op: Op, kind: str, fn: str) -> bool:
    return op.kind == kind and op.attr("fn") == fn


def find_softmax(members: list[str], ops: dict[str, Op]) -> tuple[str, ...] | None:
    """(x, max, shifted, exp, sum, div, p) of the last softmax among `members`, or None."""
    for name in reversed(members):
        div = ops[name]
        if not (_fn(div, "elementwise", "div") and len(div.inputs) == 2):
            continue
        e, s = (ops.get(o.value) for o in div.inputs)
        if not (e and s and _fn(e, "elementwise", "exp") and _fn(s, "reduce", "sum")
                and s.attr("scale", 1.0) == 1.0 and reads(s, e.name)):
            continue
        sub = ops.get(e.inputs[0].value)
        if not (sub and _fn(sub, "elementwise", "sub") and len(sub.inputs) == 2):
            continue
        x, mx = (ops.get(o.value) for o in sub.inputs)
        if not (x and mx and _fn(mx, "reduce", "max") and mx.attr("scale", 1.0) == 1.0
                and reads(mx, x.name)):
            continue
        p = name
        users = [m for m in members if reads(ops[m], name)]
        if len(users) == 1 and _fn(ops[users[0]], "elementwise", "cast"):
            p = users[0]
        return (x.name, mx.name, sub.name, e.name, s.name, div.name, p)
    return None


def depends_on(name: str, root: str, ops: dict[str, Op], members: set[str]) -> bool:
    """Whether member `name` reads `root`, directly or through other members."""
    stack, seen = [name], set()
    while stack:
        n = stack.pop()
        if n == root:
            return True
        if n in seen or n not in members:
            continue
        seen.add(n)
        stack.extend(o.value for o in ops[n].inputs)
    return False


def score_masks(score_ops, ops: dict[str, Op], members: set[str]):
    """where(cond, -inf, s) / where(cond, s, -inf) whose cond is read from a buffer (so
    not from the scores): a chunk of keys where such masks hide every column does no
    work."""
    found = []
    for name in score_ops:
        op = ops[name]
        if not _fn(op, "elementwise", "where"):
            continue
        enc = op.attr("args")
        if len(enc) != 3 or not isinstance(enc[0], tuple):
            continue
        cond = enc[0][1]
        if op.inputs[cond].value in members:
            continue   # the skip test loads the condition before the product: a buffer only
        for branch, hides_when_true in ((1, True), (2, False)):
            value = enc[branch]
            if not isinstance(value, tuple) and math.isinf(value) and value < 0:
                found.append((name, cond, hides_when_true))
    return tuple(found)


def attention_chunks(tiling) -> int:
    """Chunks of keys of an attention group's tiling: its grid's column count, less the
    merge column when there is more than one chunk."""
    return max(1, tiling.grid[2] - 1)


def partial_names(group: str) -> tuple[str, str, str]:
    """Scratch buffers of a split attention group: partial outputs, row maxima, row sums."""
    return f"{group}_partial_out", f"{group}_partial_max", f"{group}_partial_sum"


def attention_parts(group: Group, ops: dict[str, Op]) -> AttentionParts:
    """The parts of an attention group (as fuse built it)."""
    members = list(group.epilogue)
    pv = next(m for m in members if ops[m].kind == "matmul")
    before = members[:members.index(pv)]
    x, mx, sub, e, s, div, p = find_softmax(before, ops)
    softmax = {mx, sub, e, s, div, p}
    score_ops = tuple(m for m in before if m not in softmax)
    masks = score_masks(score_ops, ops, set(group.members))
    return AttentionParts(group.anchor, score_ops, x, mx, sub, e, s, div, p, pv,
                          tuple(members[members.index(pv) + 1:]), masks)
