"""Repeated layers: trace two, build the rest.

A decoder runs the same layer N times. torch.export traces each one again (about a
quarter of a second per Llama-1B layer on the 2-core CI machine, 5 s of a 16-layer
compile), though layer 2 to N-1 would lower to exactly the ops of layer 1 over other
weights and caches. So a module that says its layers repeat (a `repeated_layers`
attribute naming an nn.ModuleList, as the decoder families do) is traced with its
first two layers only, and `repeat_layers` builds layers 2..N-1 in the lowered graph
from layer 1: same ops and attributes, the weights and state of layer k (from the whole
module), and where layer 1 reads a value of layer 0 (the hidden state it is handed),
layer k reads that value of layer k-1. What followed layer 1 (the final norm, the
head) then reads layer N-1.

The attribute is a promise a trace of two layers cannot fully check: forward() runs
each layer once, in order, and does nothing between two layers that it does not do
between the others (code after the loop is read as such; code that ran only after
layer 1, and not after layer 2, would be taken for it). What the two traced layers do
show is checked: layer 0 and layer 1 must be alike (the same ops in the same order,
each reading the same outside value, the corresponding value of its own layer, or,
from layer 1, a value of layer 0 in place of one from outside), and nothing after the
layers may read layer 0; if anything differs, `repeat_layers` returns None and the
caller traces the whole module. The ops it builds are in
the order a whole trace gives: each run of layer-1 ops (weights, caches, compute) is
followed by the same run for layers 2..N-1, so pools and schedules come out as those of
the whole trace (tests/compiler/test_layers.py compares the two).

A module whose first layers differ from the rest (GLM-5: three dense layers, then 75
mixture-of-experts ones) says where the repeating run starts (`repeated_from = S`,
default 0): it is traced with layers 0..S+1, layers before S are read as code before
the layers, layers S and S+1 play the parts of layers 0 and 1 above, and layers
S+2..N-1 are built from layer S+1. Tracing GLM-5's 78 layers whole took most of its
plan; five of them are traced instead.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace

import torch

from tilec.compiler.lowered import Lowered
from tilec.ir.graph import Graph, Op, Operand


@dataclass(frozen=True)
class RepeatedLayers:
    """How a module's layers repeat: `module.<attr>` is an nn.ModuleList of `count`,
    whose layers `first`.. repeat."""

    attr: str
    count: int
    module: torch.nn.Module
    first: int = 0


def declared_layers(module: torch.nn.Module) -> RepeatedLayers | None:
    """The repeated layers `module` declares (`repeated_layers = "layers"`, and
    `repeated_from = S` if they repeat from layer S), if a layer is left to build after
    layer S+1 (else nothing to save)."""
    attr = getattr(module, "repeated_layers", None)
    layers = getattr(module, attr, None) if isinstance(attr, str) else None
    first = getattr(module, "repeated_from", 0)
    if not isinstance(layers, torch.nn.ModuleList) or type(first) is not int or \
            not 0 <= first < len(layers) - 2:
        return None
    return RepeatedLayers(attr, len(layers), module, first)


def first_traced(layers: RepeatedLayers) -> torch.nn.Module:
    """A shallow copy of the module holding only its layers up to layer first + 1 (the
    same layer objects, so the same parameters and buffers)."""
    short = copy.copy(layers.module)
    short._modules = dict(short._modules)
    short._modules[layers.attr] = torch.nn.ModuleList(
        list(getattr(short, layers.attr))[:layers.first + 2])
    return short


def repeat_layers(lowered: Lowered, layers: RepeatedLayers) -> Lowered | None:
    """The lowering of the whole module, from the lowering of its first two layers
    (see the module docstring); None if those two layers are not alike."""
    traced = _traced_layers(lowered.graph.ops, layers.attr, layers.first)
    if traced is None:
        return None
    reads = _layer_reads(traced, layers.attr)
    if reads is None or not _outside_reads_ok(lowered.graph, traced):
        return None
    built, names, constants, state_names = _build_layers(lowered, layers, traced, reads)
    last = {name: names[layers.count - 1][traced.position[name]]
            for name, w in traced.layer_of.items() if w == 1}
    out = _splice(traced, built, range(layers.first + 2, layers.count), last)
    if out is None:
        return None
    outputs = tuple((name, _renamed(o, last)) for name, o in lowered.graph.outputs)
    graph = Graph(tuple(out), lowered.graph.inputs, outputs)
    return replace(lowered, graph=graph, constants=constants, state_names=state_names)


@dataclass(frozen=True)
class _Traced:
    """The traced graph's ops split by layer: `which[i]` is op i's layer (0 or 1 for
    layers `first` and `first + 1`, None outside both), `block[j]` layer j's ops in
    order, `position` an op's index in its layer's block."""
    ops: tuple[Op, ...]
    which: tuple[int | None, ...]
    block: dict[int, list[Op]]
    layer_of: dict[str, int | None]
    position: dict[str, int]

    @property
    def last_layer_op(self) -> int:
        return max(i for i, w in enumerate(self.which) if w == 1)


def _traced_layers(ops, attr: str, first: int) -> _Traced | None:
    which = tuple(_layer_of(op, attr, first) for op in ops)
    block = {j: [op for op, w in zip(ops, which) if w == j] for j in (0, 1)}
    if not block[0] or len(block[0]) != len(block[1]):
        return None
    return _Traced(tuple(ops), which, block,
                   layer_of={op.name: w for op, w in zip(ops, which)},
                   position={op.name: i for j in (0, 1) for i, op in enumerate(block[j])})


def _layer_reads(t: _Traced, attr: str) -> dict[str, tuple[tuple[str, object], ...]] | None:
    """Per layer-1 op, where each input comes from: ("outside", value), ("own",
    position: this layer's op there) or ("previous", position: the layer before's);
    None if layers 0 and 1 differ in any op or read."""
    reads = {}
    for a, b in zip(t.block[0], t.block[1]):
        if not _alike(a, b, attr):
            return None
        links = []
        for x, y in zip(a.inputs, b.inputs):
            if (x.shape, x.strides, x.offset) != (y.shape, y.strides, y.offset):
                return None
            lx, ly = t.layer_of[x.value], t.layer_of[y.value]
            if lx is None and ly is None and x.value == y.value:
                links.append(("outside", y.value))
            elif lx == 0 and ly == 1 and t.position[x.value] == t.position[y.value]:
                links.append(("own", t.position[y.value]))
            elif lx is None and ly == 0:   # the value layer 0 was handed: layer k-1's
                links.append(("previous", t.position[y.value]))
            else:
                return None
        reads[b.name] = tuple(links)
    return reads


def _outside_reads_ok(graph: Graph, t: _Traced) -> bool:
    """Ops outside the layers read layer 1 only after its last op, layer 0 never; no
    output is a layer-0 value."""
    for i, op in enumerate(t.ops):
        if t.which[i] is None:
            seen = {t.layer_of[x.value] for x in op.inputs}
            if 0 in seen or (1 in seen and i < t.last_layer_op):
                return False
    return not any(t.layer_of[o.value] == 0 for _, o in graph.outputs)


def _build_layers(lowered: Lowered, layers: RepeatedLayers, t: _Traced, reads):
    """Layers first+2..N-1 as copies of layer first+1 (`t.block[1]`) under fresh names,
    reading their own layer's values, the layer before's, or the same outside values;
    each copy's weights and state taken from the module by the layer's own target
    names."""
    taken = {op.name for op in t.ops}
    source = layers.first + 1
    names = {source: [op.name for op in t.block[1]]}   # layer k's value at each position
    built: dict[int, list[Op]] = {}
    constants = dict(lowered.constants)
    state_names = dict(lowered.state_names)
    for k in range(source + 1, layers.count):
        names[k] = [_fresh(op.name, layers.attr, source, k, taken) for op in t.block[1]]
        built[k] = []
        for i, op in enumerate(t.block[1]):
            inputs = []
            for operand, (how, what) in zip(op.inputs, reads[op.name]):
                value = (what if how == "outside" else
                         names[k][what] if how == "own" else names[k - 1][what])
                inputs.append(replace(operand, value=value))
            attrs = op.attrs
            target = op.attr("target")
            if target is not None:
                target = _in_layer(target, layers.attr, k)
                attrs = tuple((key, target if key == "target" else v) for key, v in attrs)
                constants[names[k][i]] = _module_tensor(layers.module, target)
                if op.name in state_names:
                    state_names[names[k][i]] = target
            built[k].append(replace(op, name=names[k][i], inputs=tuple(inputs), attrs=attrs,
                                    scope=tuple(_in_layer(s, layers.attr, k)
                                                for s in op.scope)))
    return built, names, constants, state_names


def _splice(t: _Traced, built, copies: range, last: dict[str, str]) -> list[Op] | None:
    """The traced ops with each run of layer-1 ops followed by the same run in the built
    layers (`copies`), and the ops after the layers reading the last layer; None if
    that order would read a value before it is written."""
    out: list[Op] = []
    for i, op in enumerate(t.ops):
        if t.which[i] is None and i > t.last_layer_op:
            op = replace(op, inputs=tuple(_renamed(x, last) for x in op.inputs))
        out.append(op)
        if t.which[i] == 1 and (i + 1 == len(t.ops) or t.which[i + 1] != 1):
            start = i
            while start > 0 and t.which[start - 1] == 1:
                start -= 1
            run = range(t.position[t.ops[start].name], t.position[op.name] + 1)
            for k in copies:
                out.extend(built[k][p] for p in run)
    defined: set[str] = set()
    for op in out:   # an op between two runs of layer 1 could leave a read before its write
        if any(x.value not in defined for x in op.inputs):
            return None
        defined.add(op.name)
    return out


def _renamed(operand: Operand, last: dict[str, str]) -> Operand:
    """A read of a layer-1 value, moved to the last layer's."""
    return replace(operand, value=last.get(operand.value, operand.value))


def _layer_of(op: Op, attr: str, first: int) -> int | None:
    """0 or 1 for an op of layer `first` or `first + 1` (a compute op traced inside it,
    or one of its weights or caches), None for anything else (inputs, shared weights,
    earlier layers, the rest)."""
    if op.kind in ("input", "weight", "state"):
        target = op.attr("target")
        m = re.match(rf"{re.escape(attr)}\.(\d+)\.", target) if target else None
    else:
        m = next((re.fullmatch(rf"{re.escape(attr)}\.(\d+)(\..*)?", s) for s in op.scope
                  if re.fullmatch(rf"{re.escape(attr)}\.(\d+)(\..*)?", s)), None)
    return int(m.group(1)) - first if m and int(m.group(1)) - first in (0, 1) else None


def _alike(a: Op, b: Op, attr: str) -> bool:
    """Op `b` of layer 1 does what op `a` of layer 0 does."""
    def in_1(op: Op) -> tuple:
        attrs = tuple((k, _in_layer(v, attr, 1) if k == "target" else v) for k, v in op.attrs)
        return (op.kind, op.type, attrs, op.source, tuple(_in_layer(s, attr, 1) for s in op.scope))
    return in_1(a) == in_1(b)


def _in_layer(path: str, attr: str, k: int) -> str:
    """`path` ("layers.1.mlp", "layers.0.k_cache") moved to layer k."""
    return re.sub(rf"^{re.escape(attr)}\.\d+(?=\.|$)", f"{attr}.{k}", path)


def _fresh(name: str, attr: str, source: int, k: int, taken: set[str]) -> str:
    """A name for layer k's copy of layer `source`'s `name`: its layer number replaced
    where it has one (p_layers_1_mlp_up_proj_weight -> p_layers_7_...), else suffixed."""
    base = re.sub(rf"(?<={re.escape(attr.replace('.', '_'))}_){source}(?=_)", str(k), name)
    base = base if base != name else f"{name}_layer{k}"
    fresh, i = base, 1
    while fresh in taken:
        fresh, i = f"{base}_{i}", i + 1
    taken.add(fresh)
    return fresh


def _module_tensor(module: torch.nn.Module, target: str) -> torch.Tensor:
    """The parameter or buffer `target` ("layers.7.self_attn.q_proj.weight") of `module`."""
    path, _, leaf = target.rpartition(".")
    return getattr(module.get_submodule(path), leaf).detach()
