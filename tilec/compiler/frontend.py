"""Frontend: torch.export (non-strict) + core ATen decompositions -> `ir.Graph`.

Layout ops never become IR ops: every FX value is tracked as a strided view over the
contiguous storage of an IR value, and compute ops read those views as `Operand`s.
Only a reshape that no strides can express materialises a copy.
"""
from __future__ import annotations

import math
import operator
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from tilec.errors import UnsupportedOpError
from tilec.ir.graph import Graph, Op, Operand, TensorType, contiguous_strides

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
class View:
    """An FX tensor value: a strided view of IR value `value`."""

    value: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    dtype: str

    def operand(self) -> Operand:
        return Operand(self.value, self.shape, self.strides, self.offset)

    @property
    def contiguous(self) -> bool:
        return self.offset == 0 and self.strides == contiguous_strides(self.shape)


@dataclass(frozen=True)
class Lowered:
    graph: Graph
    constants: dict[str, torch.Tensor]        # weight and state placeholders' data
    input_names: tuple[str, ...]              # user-facing input names, in call order
    output_names: tuple[str, ...]
    state_names: dict[str, str]               # state op name -> module buffer name


def export(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]):
    """torch.export in non-strict mode, then the core ATen decompositions."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch-internal pytree deprecations
        ep = torch.export.export(module, tuple(example_inputs), strict=False)
        return ep.run_decompositions()


def source_line(node: torch.fx.Node) -> str:
    """The user's source line that produced `node` ('file:line: code')."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
    if not frames:
        return "unknown source line"
    file, line, code = frames[-1]
    return f"{file}:{line}: {code.strip()}"


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


class _Lowering:
    def __init__(self, ep):
        self.ep = ep
        self.ops: list[Op] = []
        self.env: dict[torch.fx.Node, Any] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.names: set[str] = set()
        self.node: torch.fx.Node | None = None

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
        op = Op(name, kind, TensorType(shape, dtype), tuple(inputs),
                tuple(sorted(attrs.items())), src)
        self.ops.append(op)
        return View(name, shape, contiguous_strides(shape), 0, dtype)

    def ops_by_name(self, name: str) -> Op:
        return next(o for o in reversed(self.ops) if o.name == name)

    def unsupported(self, what: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{what} at {source_line(self.node)}")

    def meta(self, node=None):
        val = (node or self.node).meta.get("val")
        return val

    def out_dtype(self) -> str:
        return dtype_name(self.meta().dtype, f" at {source_line(self.node)}")

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
                shape, dtype = tuple(val.shape), dtype_name(val.dtype, f" for input {node.name}")
                if node.name in params or node.name in consts or node.name in buffers:
                    target = params.get(node.name) or consts.get(node.name) or buffers.get(node.name)
                    data = state_dict[target] if target in state_dict else constants[target]
                    kind = "state" if target in mutated else "weight"
                    key = (data.data_ptr(), tuple(data.shape), tuple(data.stride()), data.dtype)
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
                    self.outputs.append((spec.arg.name, v.operand()))
            else:
                raise UnsupportedOpError(f"unsupported FX node {node.op} {node.target}")
        names = user_output_names(ep, len(self.outputs))
        self.outputs = [(n, operand) for n, (_, operand) in zip(names, self.outputs)]
        graph = Graph(tuple(self.ops), tuple(graph_inputs), tuple(self.outputs))
        return Lowered(graph, self.constants, tuple(user_inputs),
                       tuple(n for n, _ in self.outputs), state_names)

    def lower_call(self, node: torch.fx.Node):
        target = node.target
        if target is operator.getitem:
            seq, idx = self.value(node.args[0]), node.args[1]
            return seq[idx]
        handler = _HANDLERS.get(target)
        if handler is None:
            name = getattr(target, "__name__", str(target))
            raise UnsupportedOpError(f"unsupported operator aten.{name} at {source_line(node)}"
                                     if "aten" in str(target) or hasattr(target, "_schema")
                                     else f"unsupported operator {name} at {source_line(node)}")
        return handler(self, *node.args, **node.kwargs)


_HANDLERS: dict[Any, Callable] = {}


def handles(*targets):
    def deco(fn):
        for t in targets:
            _HANDLERS[t] = fn
        return fn
    return deco


# layout -----------------------------------------------------------------------------
@handles(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(L, x, shape):
    return L.view_as(L.tensor(x), shape)


@handles(aten.permute.default)
def _permute(L, x, dims):
    return L.permute(L.tensor(x), dims)


@handles(aten.transpose.int)
def _transpose(L, x, d0, d1):
    v = L.tensor(x)
    dims = list(range(len(v.shape)))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return L.permute(v, dims)


@handles(aten.t.default)
def _t(L, x):
    v = L.tensor(x)
    return L.permute(v, [1, 0]) if len(v.shape) == 2 else v


@handles(aten.unsqueeze.default)
def _unsqueeze(L, x, dim):
    v = L.tensor(x)
    dim %= len(v.shape) + 1
    inner = v.strides[dim] * v.shape[dim] if dim < len(v.shape) else 1
    return View(v.value, v.shape[:dim] + (1,) + v.shape[dim:],
                v.strides[:dim] + (inner,) + v.strides[dim:], v.offset, v.dtype)


@handles(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(L, x, dims=None):
    v = L.tensor(x)
    if dims is None:
        dims = [i for i, s in enumerate(v.shape) if s == 1]
    dims = {d % len(v.shape) for d in ([dims] if isinstance(dims, int) else dims)} if v.shape else set()
    keep = [i for i in range(len(v.shape)) if not (i in dims and v.shape[i] == 1)]
    return View(v.value, tuple(v.shape[i] for i in keep), tuple(v.strides[i] for i in keep),
                v.offset, v.dtype)


@handles(aten.expand.default)
def _expand(L, x, shape, implicit=False):
    return L.expand(L.tensor(x), shape)


@handles(aten.slice.Tensor)
def _slice(L, x, dim=0, start=None, end=None, step=1):
    if step < 1:
        raise L.unsupported("slice with step < 1")
    return L.slice(L.tensor(x), dim, start, end, step)


@handles(aten.select.int)
def _select(L, x, dim, index):
    v = L.tensor(x)
    dim %= len(v.shape)
    index = index + v.shape[dim] if index < 0 else index
    s = L.slice(v, dim, index, index + 1)
    return View(s.value, s.shape[:dim] + s.shape[dim + 1:], s.strides[:dim] + s.strides[dim + 1:],
                s.offset, s.dtype)


@handles(aten.split_with_sizes.default, aten.split.Tensor)
def _split(L, x, sizes, dim=0):
    v = L.tensor(x)
    dim %= len(v.shape)
    if isinstance(sizes, int):
        sizes = [sizes] * ((v.shape[dim] + sizes - 1) // sizes)
    out, start = [], 0
    for s in sizes:
        out.append(L.slice(v, dim, start, start + s))
        start += s
    return out


@handles(aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default)
def _alias(L, x):
    return L.tensor(x)


@handles(aten.clone.default)
def _clone(L, x, memory_format=None):
    # Values are immutable between state updates, so a clone is just the same view.
    return L.tensor(x)


@handles(aten._to_copy.default)
def _to_copy(L, x, dtype=None, **kwargs):
    v = L.tensor(x)
    out = L.out_dtype()
    if out == v.dtype:
        return v
    return L.elementwise("cast", x, dtype=out)


@handles(aten.cat.default)
def _cat(L, tensors, dim=0):
    views = [L.tensor(t) for t in tensors]
    shape = L.out_shape()
    dim %= len(shape)
    views = [v for v in views if v.shape[dim] > 0]
    return L.emit("concat", shape, L.out_dtype(), tuple(v.operand() for v in views), dim=dim)


# matmul -----------------------------------------------------------------------------
@handles(aten.mm.default, aten.bmm.default)
def _mm(L, a, b):
    return L.matmul(L.tensor(a), L.tensor(b))


@handles(aten.addmm.default)
def _addmm(L, bias, a, b, beta=1, alpha=1):
    shape, dtype = L.out_shape(), L.out_dtype()
    mm = L.matmul(L.tensor(a), L.tensor(b))
    if alpha != 1:
        mm = L.elementwise("mul", mm, float(alpha), shape=shape, dtype=dtype)
    if beta == 0:
        return mm
    if beta != 1:
        bias = L.elementwise("mul", bias, float(beta), shape=L.tensor(bias).shape, dtype=dtype)
    return L.elementwise("add", mm, bias, shape=shape, dtype=dtype)


# elementwise ------------------------------------------------------------------------
def _unary(fn):
    return lambda L, x: L.elementwise(fn, x)


for _op, _fn in [
    (aten.neg.default, "neg"), (aten.exp.default, "exp"), (aten.log.default, "log"),
    (aten.sqrt.default, "sqrt"), (aten.rsqrt.default, "rsqrt"), (aten.relu.default, "relu"),
    (aten.sigmoid.default, "sigmoid"), (aten.tanh.default, "tanh"), (aten.erf.default, "erf"),
    (aten.silu.default, "silu"), (aten.reciprocal.default, "reciprocal"),
    (aten.abs.default, "abs"), (aten.cos.default, "cos"), (aten.sin.default, "sin"),
]:
    _HANDLERS[_op] = _unary(_fn)


def _binary(fn):
    def lower(L, a, b, alpha=1):
        if alpha != 1:
            shape = L.tensor(b).shape if isinstance(b, torch.fx.Node) else ()
            b = L.elementwise("mul", b, float(alpha), shape=shape, dtype=L.out_dtype()) \
                if isinstance(b, torch.fx.Node) else b * alpha
        return L.elementwise(fn, a, b)
    return lower


for _op, _fn in [
    (aten.add.Tensor, "add"), (aten.add.Scalar, "add"), (aten.sub.Tensor, "sub"),
    (aten.sub.Scalar, "sub"), (aten.mul.Tensor, "mul"), (aten.mul.Scalar, "mul"),
    (aten.maximum.default, "maximum"), (aten.minimum.default, "minimum"),
    (aten.rsub.Scalar, "rsub"),
]:
    _HANDLERS[_op] = _binary(_fn)


@handles(aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode)
def _div(L, a, b, rounding_mode=None):
    if rounding_mode is not None:
        raise L.unsupported(f"aten.div with rounding_mode={rounding_mode!r}")
    return L.elementwise("div", a, b)


@handles(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
def _clamp(L, x, min=None, max=None):
    if L.node.target is aten.clamp_max.default:
        min, max = None, min
    shape, dtype = L.out_shape(), L.out_dtype()
    out = x
    if min is not None:
        out = L.elementwise("maximum", out, min, shape=shape, dtype=dtype)
    if max is not None:
        out = L.elementwise("minimum", out, max, shape=shape, dtype=dtype)
    return L.tensor(out) if min is None and max is None else out


@handles(aten.pow.Tensor_Scalar)
def _pow(L, x, exponent):
    return L.elementwise("pow", x, float(exponent))


@handles(aten.gelu.default)
def _gelu(L, x, approximate="none"):
    return L.elementwise("gelu_tanh" if approximate == "tanh" else "gelu_erf", x)


@handles(aten.where.self)
def _where(L, cond, a, b):
    return L.elementwise("where", cond, a, b)


for _op, _fn in [
    (aten.lt.Tensor, "lt"), (aten.lt.Scalar, "lt"), (aten.gt.Tensor, "gt"), (aten.gt.Scalar, "gt"),
    (aten.le.Tensor, "le"), (aten.le.Scalar, "le"), (aten.ge.Tensor, "ge"), (aten.ge.Scalar, "ge"),
    (aten.eq.Tensor, "eq"), (aten.eq.Scalar, "eq"), (aten.ne.Tensor, "ne"), (aten.ne.Scalar, "ne"),
]:
    # Predicates are float32 0/1 masks in the IR: one less storage type, and `where`
    # tests them against zero.
    _HANDLERS[_op] = (lambda fn: (lambda L, a, b: L.elementwise(fn, a, b, dtype="float32")))(_fn)


# reductions -------------------------------------------------------------------------
@handles(aten.sum.dim_IntList)
def _sum(L, x, dims=None, keepdim=False, dtype=None):
    return L.reduce_last("sum", L.tensor(x), dims, keepdim)


@handles(aten.sum.default)
def _sum_all(L, x, dtype=None):
    v = L.tensor(x)
    return L.reduce_last("sum", v, list(range(len(v.shape))), False)


@handles(aten.mean.dim)
def _mean(L, x, dims=None, keepdim=False, dtype=None):
    v = L.tensor(x)
    return L.reduce_last("sum", v, dims, keepdim, scale=1.0 / v.shape[-1])


@handles(aten.amax.default)
def _amax(L, x, dims=(), keepdim=False):
    return L.reduce_last("max", L.tensor(x), dims, keepdim)


@handles(aten._softmax.default, aten._log_softmax.default)
def _softmax(L, x, dim, half_to_float=False):
    v = L.tensor(x)
    if dim % len(v.shape) != len(v.shape) - 1:
        raise L.unsupported(f"softmax over dim {dim} (only the last dim is supported)")
    shape, dtype = v.shape, L.out_dtype()
    m = L.reduce_last("max", v, [-1], True)
    shifted = L.elementwise("sub", v, m, shape=shape, dtype=dtype)
    e = L.elementwise("exp", shifted, shape=shape, dtype=dtype)
    s = L.reduce_last("sum", e, [-1], True)
    if L.node.target is aten._log_softmax.default:
        logs = L.elementwise("log", s, shape=s.shape, dtype=dtype)
        return L.elementwise("sub", shifted, logs, shape=shape, dtype=dtype)
    return L.elementwise("div", e, s, shape=shape, dtype=dtype)


# state and selection ----------------------------------------------------------------
@handles(aten.index_put.default, aten.index_put_.default)
def _index_put(L, state, indices, values, accumulate=False):
    positions = [(d, i) for d, i in enumerate(indices) if i is not None]
    if accumulate or len(positions) != 1:
        raise L.unsupported("aten.index_put other than one position along one dim")
    dim, index = positions[0]
    return _state_update(L, state, dim, index, values)


@handles(aten.index_copy.default, aten.index_copy_.default)
def _index_copy(L, state, dim, index, values):
    return _state_update(L, state, dim, index, values)


def _state_update(L, state, dim, index, values):
    s, idx = L.tensor(state), L.tensor(index)
    if L.ops_by_name(s.value).kind not in ("state", "state_update") or not s.contiguous:
        raise L.unsupported("an in-place update of something other than a module buffer")
    if idx.shape not in ((), (1,)):
        raise L.unsupported(f"an in-place update at {idx.shape} positions (one position only)")
    dim %= len(s.shape)
    slot = s.shape[:dim] + (1,) + s.shape[dim + 1:]
    vals = L.expand(L.tensor(values), slot)
    return L.emit("state_update", s.shape, s.dtype, (s.operand(), vals.operand(), idx.operand()),
                  dim=dim)


@handles(aten.argmax.default)
def _argmax(L, x, dim=None, keepdim=False):
    v = L.tensor(x)
    nd = len(v.shape)
    if dim is None and nd != 1 or dim is not None and dim % nd != nd - 1:
        raise L.unsupported("argmax over a dim other than the last")
    chunk = _argmax_chunk(v.shape[-1])
    if chunk:
        out = _argmax_in_stages(L, v, chunk)
    else:
        out = L.emit("argmax", v.shape[:-1] + (1,), "int64", (v.operand(),))
    return out if keepdim else L.view_as(out, v.shape[:-1])


WIDE_ARGMAX = 4096   # from this width, one task per row would walk the row alone


def _argmax_chunk(width: int) -> int:
    """Chunk length for a staged argmax: the largest power of two dividing the width,
    at most 1024 and at least 64; 0 when the row is narrow or no such chunk exists."""
    if width < WIDE_ARGMAX:
        return 0
    chunk = 1024
    while chunk >= 64 and width % chunk:
        chunk //= 2
    return chunk if chunk >= 64 else 0


def _argmax_in_stages(L, v: View, chunk: int) -> View:
    """argmax over a wide row as parallel chunk maxima, the argmax of those, then the
    argmax inside the winning chunk (read back by a gather). The first chunk holding
    the maximum holds its first occurrence, so ties resolve as in torch.argmax."""
    rows, width = math.prod(v.shape[:-1]), v.shape[-1]
    n = width // chunk
    chunks = L.view_as(v, (rows * n, chunk))
    maxima = L.emit("reduce", (rows * n, 1), v.dtype, (chunks.operand(),), fn="max", scale=1.0)
    best = L.emit("argmax", (rows, 1), "int64", (L.view_as(maxima, (rows, n)).operand(),))
    if rows > 1:  # row r's chunks start at row r * n of the chunk view
        base = L.emit("weight", (rows, 1), "int64", name="argmax_chunk_rows")
        L.constants[base.value] = (torch.arange(rows, dtype=torch.int64) * n).reshape(rows, 1)
        best_row = L.elementwise("add", best, base, shape=(rows, 1), dtype="int64")
    else:
        best_row = best
    picked = L.emit("gather", (rows, chunk), v.dtype,
                    (chunks.operand(), L.view_as(best_row, (rows,)).operand()))
    inner = L.emit("argmax", (rows, 1), "int64", (picked.operand(),))
    offset = L.elementwise("mul", best, float(chunk), shape=(rows, 1), dtype="int64")
    out = L.elementwise("add", inner, offset, shape=(rows, 1), dtype="int64")
    return L.view_as(out, v.shape[:-1] + (1,))


@handles(aten.scalar_tensor.default)
def _scalar_tensor(L, value, **kwargs):
    return float(value)


@handles(aten._assert_tensor_metadata.default)
def _assert_metadata(L, *args, **kwargs):
    return None


# gather -----------------------------------------------------------------------------
@handles(aten.embedding.default)
def _embedding(L, weight, indices, padding_idx=-1, scale_grad=False, sparse=False):
    w, idx = L.tensor(weight), L.tensor(indices)
    return L.emit("gather", L.out_shape(), L.out_dtype(), (w.operand(), idx.operand()))


def user_output_names(ep, count: int) -> list[str]:
    """The forward's output names: a returned dict's keys, else output0, output1, ..."""
    spec = ep.call_spec.out_spec
    if spec is not None and spec.type is dict and spec.num_leaves == count:
        return [str(k) for k in spec.context]
    return [f"output{i}" for i in range(count)]


def lower(ep) -> Lowered:
    """Lower an ExportedProgram (core ATen) to an `ir.Graph` plus its constant data."""
    return _Lowering(ep).run()


def supported_ops() -> list[str]:
    return sorted({str(t) for t in _HANDLERS})
