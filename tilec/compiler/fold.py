"""Folding: an FX node computed at compile time when every tensor it reads is known.

What a model derives from shapes and constant buffers only (transformers' causal mask
from arange and comparisons, position ids, RoPE's cos and sin) becomes a constant of
the graph instead of ops (the frontend's `_Lowering.constant` decides weight or fill).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

aten = torch.ops.aten

# The most elements a value folded at compile time may have (a float32 mask over 2048
# queries and keys): larger ones are lowered as ops, so the engine file stays small.
FOLD_LIMIT = 1 << 22
# ops whose values are whatever memory held: never constants
_UNSET = (aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
          aten.new_empty_strided)


@dataclass(frozen=True)
class Folded:
    value: Any          # a tensor, or a tuple of them and numbers
    is_view: bool       # a view of a value it read (lowered as that view, not copied)


def evaluate(node: torch.fx.Node, known: dict) -> Folded | None:
    """`node`'s value if every tensor it reads is in `known`, else None. Not folded:
    random ops, uninitialised memory, values over FOLD_LIMIT elements, and anything that
    reads a parameter (the caller keeps parameters out of `known`: a weight's view or
    cast would become a copy), nor a plan's meta values (they have none)."""
    target = node.target
    if target is operator.getitem:
        if node.args[0] not in known:
            return None
        return Folded(known[node.args[0]][node.args[1]], is_view=False)
    if not isinstance(target, torch._ops.OpOverload) or target.overloadpacket in _UNSET \
            or torch.Tag.nondeterministic_seeded in target.tags:
        return None
    if not all(a in known for a in node.all_input_nodes):
        return None
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: known[a])
    if any(t.is_meta for t in args_tensors(args, kwargs)):
        return None   # a plan's buffers (compile --plan) have no values to fold
    if kwargs.get("device") == torch.device("meta"):
        kwargs = {**kwargs, "device": torch.device("cpu")}   # traced on meta: a plan
    try:
        value = target(*args, **kwargs)
    except Exception:   # lowered as an op instead, whose handler says what is wrong
        return None
    tensors = [t for t in (value if isinstance(value, (list, tuple)) else [value])
               if isinstance(t, torch.Tensor)]
    if any(t.numel() > FOLD_LIMIT for t in tensors):
        return None
    read = {t.untyped_storage().data_ptr() for t in args_tensors(args, kwargs)}
    return Folded(value, any(t.untyped_storage().data_ptr() in read for t in tensors))


def args_tensors(args, kwargs) -> list[torch.Tensor]:
    """The tensors among an op's arguments (in lists too)."""
    flat = list(args) + list(kwargs.values())
    flat += [x for a in flat if isinstance(a, (list, tuple)) for x in a]
    return [a for a in flat if isinstance(a, torch.Tensor)]
