"""Frontend: torch.export (non-strict) + core ATen decompositions -> `ir.Graph`.

Layout ops never become IR ops: every FX value is tracked as a strided view over the
contiguous storage of an IR value, and compute ops read those views as `Operand`s.
Only a reshape that no strides can express materialises a copy.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import operator
import re
import sys
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from tilec.compiler.fold import evaluate
from tilec.compiler.lowered import Lowered, View
from tilec.compiler.sites import module_scope, source_line, user_frame, user_site
from tilec.errors import ConfigError, TilecError, UnsupportedOpError
from tilec.ir.graph import (PLACEHOLDER_KINDS, Graph, Op, Operand, TensorType,
                            contiguous_strides, reads_run_time_index, run_time_index)

aten = torch.ops.aten

_DTYPES = {
    torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
    torch.int64: "int64", torch.int32: "int32", torch.bool: "bool",
}


def dtype_name(dt: torch.dtype, where: str = "") -> str:
    if dt not in _DTYPES:
        raise UnsupportedOpError(f"unsupported dtype {dt}{where}")
    return _DTYPES[dt]


@dataclass(frozen=True)
class Exported:
    """What `export` traced: the module's program or, for a module whose layers repeat,
    the program of a copy of it holding only its layers up to the second repeated one
    (`layers`, then, says how `lower` builds the others: compiler/layers.py)."""

    program: Any                  # torch.export.ExportedProgram
    layers: Any = None            # layers.RepeatedLayers | None
    example_inputs: tuple = ()


def export(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Exported:
    """torch.export in non-strict mode, then the core ATen decompositions; for a module
    that declares repeated layers, of its layers up to the second repeated one only."""
    from tilec.compiler.layers import declared_layers, first_traced

    example_inputs = _unaliased(example_inputs)
    layers = declared_layers(module)
    if layers is not None:
        return Exported(_export(first_traced(layers), example_inputs), layers,
                        tuple(example_inputs))
    return Exported(_export(module, example_inputs))


def _unaliased(example_inputs) -> tuple:
    """The example inputs, each sharing memory with an earlier one cloned: torch.export
    traces one tensor passed twice as one input, and the engine would then read its
    first input wherever the model reads the second (`f(x, x)` compiled `f(x, y)` as
    `f(x, x)`, silently wrong for any other y)."""
    seen, out = [], []
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            if any(_shares_memory(x, y) for y in seen):
                x = x.clone()
            seen.append(x)
        out.append(x)
    return tuple(out)


def _shares_memory(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x is y:
        return True
    if x.is_meta or y.is_meta:   # meta tensors have no memory to share (data_ptr 0)
        return False
    return x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


def _export(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch-internal pytree deprecations
        hook = module.register_forward_hook(_check_outputs)
        try:
            with _torch_quiet_on_failure():
                try:
                    ep = torch.export.export(module, tuple(example_inputs), strict=False)
                except TilecError:
                    raise
                except Exception as exc:
                    raise _export_error(exc, example_inputs) from exc
        finally:
            hook.remove()
        return ep.run_decompositions()


def _check_outputs(module: torch.nn.Module, args, output) -> None:
    """What forward() returns, seen while it is traced: an engine's outputs are tensors
    (in any nesting of tuples, lists, dicts, ModelOutputs), so anything else (a KV cache
    object) is refused here by its path, before torch.export fails on it in its own
    words."""
    from torch.utils._pytree import keystr, tree_flatten_with_path

    for path, leaf in tree_flatten_with_path(output)[0]:
        if leaf is not None and not isinstance(leaf, (torch.Tensor, bool, int, float)):
            raise ConfigError(f"forward() returns a {type(leaf).__name__} at output{keystr(path)}, "
                              f"which is not a tensor: an engine returns tensors only (a "
                              f"transformers model returns its cache unless "
                              f"config.use_cache is False)")


def check_input_ranges(lowered: Lowered, ranges) -> None:
    """Integer inputs declared to draw from [low, high) (model.yaml `inputs`) that an op
    uses as a run-time index directly must stay in its bound, or the random inputs of
    `tilec run` would be out of range: a ConfigError naming the input and the bound."""
    declared = {r.name: r for r in ranges if r.high is not None}
    by_value = dict(zip(lowered.graph.inputs, lowered.input_names))
    for op in lowered.graph.ops:
        if not reads_run_time_index(op):
            continue
        operand, bound = run_time_index(op)
        r = declared.get(by_value.get(operand.value))
        if r is None or (0 <= r.low and r.high <= bound):
            continue
        where = f" at {op.source}" if op.source else ""
        raise ConfigError(f"inputs: {r.name}: values from [{r.low}, {r.high}) index "
                          f"{op.kind} {op.name!r}, whose bound is {bound}{where}: "
                          f"low must be >= 0 and high <= {bound}")


@contextlib.contextmanager
def _torch_quiet_on_failure():
    """torch.export prints the partial graph of a failed trace to stderr and logs the
    error with its traceback (20 lines and more) before raising it: keep what it
    writes meanwhile, and let it through only if the export succeeds, so a failure is
    the one line _export_error makes of it."""
    kept, disabled = io.StringIO(), logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(kept):
            yield
    finally:
        logging.disable(disabled)
    sys.stderr.write(kept.getvalue())


def _export_error(exc: Exception, example_inputs) -> Exception:
    """What tracing the model's forward() raised, as one line naming the user's source
    line: data-dependent control flow is an UnsupportedOpError, anything else (a shape
    the model does not take, a bug in forward) a ConfigError about the inputs. An
    error raised in tilec's own models is a tilec bug: kept as it is."""
    frame = user_frame(exc)
    if frame is None:
        return exc
    where = f"{frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`"
    if isinstance(exc, GuardOnDataDependentSymNode):
        return UnsupportedOpError(
            f"data-dependent control flow at {where}: an engine is one static graph, so no "
            "branch, loop or size may depend on a tensor's values; compute both branches "
            "and choose with torch.where")
    shapes = ", ".join(f"{list(t.shape)} {dtype_name(t.dtype) if t.dtype in _DTYPES else t.dtype}"
                       for t in example_inputs if isinstance(t, torch.Tensor))
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ConfigError(f"inputs: forward() fails on example inputs {shapes} at {where}: "
                       f"{type(exc).__name__}: {message} (check the inputs' shapes and "
                       "dtypes)")


def reshape_strides(shape, strides, new_shape) -> tuple[int, ...] | None:
    """Strides for viewing (shape, strides) as new_shape without a copy, or None.
    The algorithm of ATen's computeStride."""
    if math.prod(shape) == 0 or not shape:
        return contiguous_strides(tuple(new_shape))
    new_strides = [0] * len(new_shape)
    view_d = len(new_shape) - 1
    chunk_base = strides[-1]
    tensor_numel = view_numel = 1
    for d in range(len(shape) - 1, -1, -1):
        tensor_numel *= shape[d]
        if d == 0 or (shape[d - 1] != 1 and strides[d - 1] != tensor_numel * chunk_base):
            while view_d >= 0 and (view_numel < tensor_numel or new_shape[view_d] == 1):
                new_strides[view_d] = view_numel * chunk_base
                view_numel *= new_shape[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if d > 0:
                chunk_base = strides[d - 1]
                tensor_numel = view_numel = 1
    if view_d != -1:
        return None
    return tuple(new_strides)


class _Env(dict):
    """FX node -> its lowered value; a node folded at compile time becomes a constant
    the first time an op reads it (`_Lowering.constant`). It refers to its lowering
    weakly: a cycle would keep the exported program and its tensors alive until a
    garbage collection (paused while compiling), and pack decides which weights it may
    take or free by who else still holds them."""

    def __init__(self, lowering: "_Lowering"):
        super().__init__()
        self.lowering = weakref.proxy(lowering)

    def __missing__(self, node: torch.fx.Node):
        if node not in self.lowering.known:
            raise KeyError(node)
        value = self.lowering.constant(node, self.lowering.known[node])
        self[node] = value
        return value


class _Lowering:
    def __init__(self, ep):
        self.ep = ep
        self.ops: list[Op] = []
        self.env: dict[torch.fx.Node, Any] = _Env(self)
        # values known at compile time: the buffers the model does not write, its lifted
        # constants, and what ops compute from only those (folded: see `fold`)
        self.known: dict[torch.fx.Node, Any] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.names: set[str] = set()
        self.node: torch.fx.Node | None = None
        # values that are one number everywhere (aten.full): elementwise ops read the
        # number, so the fill itself is usually left unread and dropped
        self.fills: dict[str, float] = {}
        self.positions: dict[int, View] = {}   # 0..n-1 as int64 [n, 1] weights, by n

    # ---- helpers -------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        base = re.sub(r"\W", "_", base) or "v"
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def emit(self, kind: str, shape, dtype: str, inputs=(), name: str | None = None, **attrs) -> View:
        name = self.fresh(name or (self.node.name if self.node is not None else kind))
        shape = tuple(int(s) for s in shape)
        src = source_line(self.node) if self.node is not None else ""
        scope = module_scope(self.node) if self.node is not None else ()
        op = Op(name, kind, TensorType(shape, dtype), tuple(inputs),
                tuple(sorted(attrs.items())), src, scope)
        self.ops.append(op)
        return View(name, shape, contiguous_strides(shape), 0, dtype)

    def ops_by_name(self, name: str) -> Op:
        return next(o for o in reversed(self.ops) if o.name == name)

    def unsupported(self, what: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{what} at {user_site(self.node)}")

    def meta(self, node=None):
        val = (node or self.node).meta.get("val")
        return val

    def out_dtype(self) -> str:
        return dtype_name(self.meta().dtype, f" at {user_site(self.node)}")

    def out_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.meta().shape)

    def tensor(self, arg) -> View:
        v = self.env[arg] if isinstance(arg, torch.fx.Node) else arg
        if not isinstance(v, View):
            raise self.unsupported(f"expected a tensor, got {type(v).__name__}")
        return v

    def value(self, arg):
        if isinstance(arg, torch.fx.Node):
            return self.env[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        return arg

    # ---- views ---------------------------------------------------------------------
    def view_as(self, v: View, shape) -> View:
        shape = tuple(int(s) for s in shape)
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(math.prod(v.shape) // known if s == -1 else s for s in shape)
        strides = reshape_strides(v.shape, v.strides, shape)
        if strides is None:  # no strides express it: materialise, then view
            v = self.copy(v)
            strides = contiguous_strides(shape)
        return View(v.value, shape, strides, v.offset, v.dtype)

    def copy(self, v: View) -> View:
        return self.emit("elementwise", v.shape, v.dtype, (v.operand(),),
                         name=f"{v.value}_copy", fn="identity", args=(("in", 0),))

    def expand(self, v: View, shape) -> View:
        shape = tuple(int(s) for s in shape)
        lead = len(shape) - len(v.shape)
        strides = [0] * lead
        for i, (size, stride) in enumerate(zip(v.shape, v.strides)):
            target = shape[lead + i]
            if target == -1:
                target = size
            if size == target:
                strides.append(stride)
            elif size == 1:
                strides.append(0)
            else:
                raise self.unsupported(f"cannot expand {v.shape} to {shape}")
        shape = tuple(v.shape[i - lead] if s == -1 else s for i, s in enumerate(shape))
        return View(v.value, shape, tuple(strides), v.offset, v.dtype)

    def permute(self, v: View, dims) -> View:
        dims = [d % len(v.shape) for d in dims]
        return View(v.value, tuple(v.shape[d] for d in dims),
                    tuple(v.strides[d] for d in dims), v.offset, v.dtype)

    def slice(self, v: View, dim: int, start, end, step=1) -> View:
        dim %= len(v.shape)
        size = v.shape[dim]
        start = 0 if start is None else start
        end = size if end is None else end
        start = max(start + size, 0) if start < 0 else min(start, size)
        end = max(end + size, 0) if end < 0 else min(end, size)
        end = max(end, start)
        length = (end - start + step - 1) // step
        shape = list(v.shape)
        strides = list(v.strides)
        shape[dim] = length
        strides[dim] = v.strides[dim] * step
        return View(v.value, tuple(shape), tuple(strides),
                    v.offset + start * v.strides[dim], v.dtype)

    # ---- compute -------------------------------------------------------------------
    def scalar_or_operand(self, x, shape, inputs: list[Operand]):
        """An elementwise arg: a number, or a tensor broadcast to `shape`."""
        if isinstance(x, torch.fx.Node):
            x = self.env[x]
        if isinstance(x, (bool, int, float)):
            return float(x)
        if isinstance(x, View) and x.value in self.fills:
            return self.fills[x.value]
        if isinstance(x, View):
            if x.shape == () and x.value in self.constants and self.constants[x.value].numel() == 1:
                pass  # a lifted scalar constant is still a tensor: keep it as an input
            inputs.append(self.expand(x, shape).operand())
            return ("in", len(inputs) - 1)
        raise self.unsupported(f"unsupported argument {x!r}")

    def elementwise(self, fn: str, *args, shape=None, dtype=None) -> View:
        shape = self.out_shape() if shape is None else shape
        dtype = self.out_dtype() if dtype is None else dtype
        inputs: list[Operand] = []
        enc = tuple(self.scalar_or_operand(a, shape, inputs) for a in args)
        return self.emit("elementwise", shape, dtype, inputs, fn=fn, args=enc)

    def reduce_last(self, fn: str, x: View, dims, keepdim: bool, scale: float = 1.0) -> View:
        nd = len(x.shape)
        dims = [d % nd for d in (dims if dims else range(nd))] if nd else []
        if nd == 0:
            return x
        if sorted(dims) != [nd - 1]:
            if not (nd == 1 and dims == [0]):
                raise self.unsupported(
                    f"reduction over dims {list(dims)} of a {nd}-d tensor "
                    "(only the last dim is supported)")
        dtype = self.out_dtype()
        shape = x.shape[:-1] + (1,)
        out = self.emit("reduce", shape, dtype, (x.operand(),), fn=fn, scale=float(scale))
        if not keepdim:
            out = self.view_as(out, x.shape[:-1])
        return out

    def matmul(self, a: View, b: View) -> View:
        shape = self.out_shape()
        dtype = self.out_dtype()
        batch = shape[:-2]
        a = self.expand(a, batch + a.shape[-2:])
        b = self.expand(b, batch + b.shape[-2:])
        return self.emit("matmul", shape, dtype, (a.operand(), b.operand()))

    # ---- driver --------------------------------------------------------------------
    def run(self) -> Lowered:
        ep = self.ep
        sig = ep.graph_signature
        params = dict(sig.inputs_to_parameters)
        buffers = dict(sig.inputs_to_buffers)
        consts = dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
        mutated = {v: k for k, v in sig.buffers_to_mutate.items()} if sig.buffers_to_mutate else {}
        state_dict = ep.state_dict
        constants = ep.constants
        user_inputs: list[str] = []
        state_names: dict[str, str] = {}
        graph_inputs: list[str] = []
        shared: dict[tuple, View] = {}
        for node in ep.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                val = node.meta["val"]
                target = params.get(node.name) or consts.get(node.name) or buffers.get(node.name)
                # named as the user names it: the parameter's or buffer's path ("0.weight",
                # not the exported placeholder "p_0_weight"), the forward's argument
                what = f"parameter {target}" if node.name in params else \
                    f"buffer {target}" if target else f"input {node.name}"
                shape, dtype = tuple(val.shape), dtype_name(val.dtype, f" for {what}")
                if target:
                    data = state_dict[target] if target in state_dict else constants[target]
                    kind = "state" if target in mutated else "weight"
                    if kind == "weight" and node.name not in params:
                        self.known[node] = data
                    key = (_identity(data), tuple(data.shape), tuple(data.stride()), data.dtype)
                    if kind == "weight" and key in shared:  # tied weights: one buffer
                        self.env[node] = shared[key]
                        continue
                    self.node = None
                    v = self.emit(kind, shape, dtype, name=node.name, target=target)
                    self.constants[v.value] = data.detach()
                    if kind == "state":
                        state_names[v.value] = target
                    else:
                        shared[key] = v
                else:
                    self.node = None
                    v = self.emit("input", shape, dtype, name=node.name)
                    user_inputs.append(node.name)
                    graph_inputs.append(v.value)
                self.env[node] = v
            elif node.op == "call_function":
                if not self.fold(node):
                    self.env[node] = self.lower_call(node)
            elif node.op == "output":
                outs = node.args[0]
                self.outputs = []
                for i, spec in enumerate(sig.output_specs):
                    v = self.env[outs[i]] if isinstance(outs[i], torch.fx.Node) else outs[i]
                    kind = spec.kind.name
                    if kind == "BUFFER_MUTATION":
                        continue  # the state op already wrote the cache in place
                    if not isinstance(v, View):
                        raise UnsupportedOpError(f"output {i} is not a tensor")
                    if self.meta(outs[i]).dtype == torch.bool and v.dtype != "bool":
                        # a predicate (a float32 0/1 mask in the IR) returned as torch's bool
                        v = self.elementwise("cast", v, shape=v.shape, dtype="bool")
                    self.outputs.append((spec.arg.name, v.operand()))
            else:
                raise UnsupportedOpError(f"unsupported FX node {node.op} {node.target}")
        names = user_output_names(ep, len(self.outputs))
        self.outputs = [(n, operand) for n, (_, operand) in zip(names, self.outputs)]
        ops = used_ops(self.ops, [operand.value for _, operand in self.outputs])
        graph = Graph(tuple(ops), tuple(graph_inputs), tuple(self.outputs))
        return Lowered(graph, self.constants, tuple(user_inputs),
                       tuple(n for n, _ in self.outputs), state_names)

    def fold(self, node: torch.fx.Node) -> bool:
        """Compute `node` now if it can be (`fold.evaluate`); True if it then needs no op
        (a view of a known value stays known but is lowered as the view it is)."""
        folded = evaluate(node, self.known)
        if folded is None:
            return False
        self.known[node] = folded.value
        return not folded.is_view

    def constant(self, node: torch.fx.Node, value):
        """A folded value as the op graph reads it: a tensor becomes a weight (a
        predicate one of float32 0/1, as the IR's predicates are), or, where it is one
        number all over, a fill (as aten.full lowers: elementwise ops read the number)."""
        if isinstance(value, (list, tuple)):
            return type(value)(self.constant(node, v) for v in value)
        if not isinstance(value, torch.Tensor):
            return value
        data = value.detach().contiguous()
        if data.dtype == torch.bool:
            data = data.to(torch.float32)
        dtype = dtype_name(data.dtype, f" at {user_site(node)}")
        flat = data.reshape(-1)
        where, self.node = self.node, node
        if flat.numel() and bool((flat == flat[0]).all()):
            v = self.elementwise("identity", float(flat[0]), shape=data.shape, dtype=dtype)
            self.fills[v.value] = float(flat[0])
        else:
            v = self.emit("weight", data.shape, dtype, name=node.name)
            self.constants[v.value] = data
        self.node = where
        return v

    def lower_call(self, node: torch.fx.Node):
        target = node.target
        if target is operator.getitem:
            seq, idx = self.value(node.args[0]), node.args[1]
            return seq[idx]
        handler = aten_ops.HANDLERS.get(target)
        if handler is None:
            name = getattr(target, "__name__", str(target))
            kind = "aten." if "aten" in str(target) or hasattr(target, "_schema") else ""
            raise UnsupportedOpError(f"unsupported operator {kind}{name} at {user_site(node)}")
        return handler(self, *node.args, **node.kwargs)


def _identity(data: torch.Tensor) -> int:
    """What tied weights share: their memory, or on the meta device (a plan, which has
    no memory: every meta tensor's data_ptr is 0) the tensor object itself."""
    return id(data) if data.is_meta else data.data_ptr()


def used_ops(ops: list[Op], outputs: list[str]) -> list[Op]:
    """`ops` less the compute ops whose values nothing reads: a fill every reader took
    as a number, the half of a topk the model ignores. Kept, each would be a task that
    stores nothing. Placeholders stay (they are the engine's interface) and so do
    state updates (their effect is the write)."""
    needed = set(outputs)
    kept = []
    for op in reversed(ops):
        if op.kind in PLACEHOLDER_KINDS or op.kind == "state_update" or op.name in needed:
            kept.append(op)
            needed.update(operand.value for operand in op.inputs)
    return kept[::-1]


def user_output_names(ep, count: int) -> list[str]:
    """The forward's output names: a returned dict's keys (a dict subclass's too, as
    transformers' ModelOutput), else output0, output1, ..."""
    spec = ep.call_spec.out_spec
    if spec is not None and isinstance(spec.type, type) and issubclass(spec.type, dict) \
            and spec.num_leaves == count and len(spec.context) == count:
        return [str(k) for k in spec.context]
    return [f"output{i}" for i in range(count)]


def lower(exported: Exported, input_names: tuple[str, ...] = ()) -> Lowered:
    """Lower an exported program (core ATen) to an `ir.Graph` plus its constant data;
    for two traced layers of many, with the other layers built from the second.
    `input_names`: what model.yaml's `inputs` call the forward's inputs, in call order:
    the engine's input names (without them, the forward's parameter names)."""
    lowered = _Lowering(exported.program).run()
    if exported.layers is not None:
        from tilec.compiler.layers import repeat_layers

        whole = repeat_layers(lowered, exported.layers)
        if whole is None:   # the two layers differ after all: trace every layer
            whole = _Lowering(_export(exported.layers.module, exported.example_inputs)).run()
        lowered = whole
    if not input_names:
        return lowered
    if len(input_names) != len(lowered.input_names):
        raise ConfigError(f"inputs: {len(input_names)} declared ({', '.join(input_names)}), "
                          f"but the traced forward takes {len(lowered.input_names)} tensors "
                          f"({', '.join(lowered.input_names)})")
    return replace(lowered, input_names=tuple(input_names))


def supported_ops() -> list[str]:
    return sorted({str(t) for t in aten_ops.HANDLERS})


from tilec.compiler import aten_ops, aten_reductions  # noqa: E402,F401  (register the handlers)
