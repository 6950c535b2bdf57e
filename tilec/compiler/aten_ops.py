"""How each core ATen op lowers: one handler per op (or family of overloads).

A handler gets the lowering state `L` (see `frontend._Lowering`) and the FX node's
arguments, and returns a `View` (layout ops only compute new strides), a number, or
a list of views. Compute ops are emitted with `L.emit` / `L.elementwise`.
Adding an operator means adding a handler here (see docs/architecture.md).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.fx

from tilec.compiler.lowered import View
from tilec.ir.graph import FLOAT_DTYPES, Operand

aten = torch.ops.aten

HANDLERS: dict[Any, Callable] = {}


def handles(*targets):
    def deco(fn):
        for t in targets:
            HANDLERS[t] = fn
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
    v = L.value(x)
    if isinstance(v, (int, float)):
        return v   # a number (aten.scalar_tensor) broadcasts to any shape as it is
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
    views = [v for v in views if v.shape[dim] > 0]   # empty pieces add nothing
    if len(views) == 1:
        return views[0]   # the one piece left is the result: a view of it, no copy
    return L.emit("concat", shape, L.out_dtype(), tuple(v.operand() for v in views), dim=dim)


# matmul -----------------------------------------------------------------------------
@handles(aten.mm.default, aten.bmm.default)
def _mm(L, a, b):
    indexed = _indexed_pool(L, L.tensor(b))
    if indexed is not None:
        pool, ids = indexed
        return L.emit("matmul", L.out_shape(), L.out_dtype(),
                      (L.tensor(a).operand(), pool, ids))
    return L.matmul(L.tensor(a), L.tensor(b))


# experts chosen at run time ---------------------------------------------------------
# `pool[ids]` (aten.index.Tensor) is a gather of whole matrices; a batched matmul that
# reads such a gather of a weight pool becomes a matmul whose B operand is the pool
# itself, each batch entry's matrix found at run time by its id (is_indexed_matmul):
# the tasks stream only the chosen experts' weights, and the gather (dropped unread)
# never copies them.
@handles(aten.index.Tensor)
def _index(L, x, indices):
    v = L.tensor(x)
    if len(indices) != 1 or indices[0] is None:
        raise L.unsupported("aten.index other than one index tensor on the first dim")
    idx = L.tensor(indices[0])
    if idx.dtype not in ("int64", "int32") or len(idx.shape) != 1 or not v.shape:
        raise L.unsupported(f"aten.index with a {idx.dtype} index of shape {list(idx.shape)} "
                            f"(one 1-d integer index only)")
    rest = math.prod(v.shape[1:])
    table = L.view_as(v, (v.shape[0], rest))
    if rest > 1 and table.strides[1] != 1:
        table = L.view_as(L.copy(v), (v.shape[0], rest))
    rows = L.emit("gather", (idx.shape[0], rest), v.dtype, (table.operand(), idx.operand()))
    return L.view_as(rows, L.out_shape())


def _indexed_pool(L, b: View):
    """(pool operand [E, K, N], ids operand [J]) if `b` [J, K, N] views the matrices a
    gather took whole from a weight by run-time ids; else None."""
    source = L.ops_by_name(b.value)
    if source.kind != "gather" or len(b.shape) != 3:
        return None
    table, ids = source.inputs
    row = table.shape[1]
    if L.ops_by_name(table.value).kind != "weight" or table.strides[1] != 1 or \
            b.strides[0] != row or b.offset >= row or ids.shape != (b.shape[0],):
        return None
    pool = Operand(table.value, (table.shape[0],) + b.shape[1:],
                   (table.strides[0],) + b.strides[1:], table.offset + b.offset)
    return pool, ids


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
    (aten.floor.default, "floor"), (aten.ceil.default, "ceil"), (aten.trunc.default, "trunc"),
]:
    HANDLERS[_op] = _unary(_fn)


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
    HANDLERS[_op] = _binary(_fn)


@handles(aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div(L, a, b, rounding_mode=None):
    if rounding_mode is None:
        return L.elementwise("div", a, b)
    if L.out_dtype() not in FLOAT_DTYPES:   # float math is exact only within 24 bits
        raise L.unsupported(f"aten.div with rounding_mode={rounding_mode!r} of integers "
                            "(floating point only)")
    return L.elementwise(f"div_{rounding_mode}", a, b)


@handles(aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default,
         aten.clamp_min.Tensor, aten.clamp_max.default, aten.clamp_max.Tensor)
def _clamp(L, x, min=None, max=None):
    if L.node.target in (aten.clamp_max.default, aten.clamp_max.Tensor):
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


@handles(aten.pow.Tensor_Tensor, aten.pow.Scalar)
def _pow_tensor(L, base, exponent):
    if L.out_dtype() not in FLOAT_DTYPES:
        raise L.unsupported("aten.pow of integers (floating point only)")
    return L.elementwise("pow_tensor", base, exponent)


@handles(aten.gelu.default)
def _gelu(L, x, approximate="none"):
    return L.elementwise("gelu_tanh" if approximate == "tanh" else "gelu_erf", x)


@handles(aten.full.default, aten.full_like.default)
def _full(L, size_or_like, value, **kwargs):
    # the number as the value's dtype holds it (full(0.1, dtype=bfloat16) is rounded)
    number = float(torch.tensor(value, dtype=L.meta().dtype).float())
    out = L.elementwise("identity", number)
    L.fills[out.value] = number
    return out


@handles(aten.where.self)
def _where(L, cond, a, b):
    return L.elementwise("where", cond, a, b)


for _op, _fn in [
    (aten.lt.Tensor, "lt"), (aten.lt.Scalar, "lt"), (aten.gt.Tensor, "gt"), (aten.gt.Scalar, "gt"),
    (aten.le.Tensor, "le"), (aten.le.Scalar, "le"), (aten.ge.Tensor, "ge"), (aten.ge.Scalar, "ge"),
    (aten.eq.Tensor, "eq"), (aten.eq.Scalar, "eq"), (aten.ne.Tensor, "ne"), (aten.ne.Scalar, "ne"),
]:
    # Predicates are float32 0/1 masks in the IR: one less storage type, and `where`
    # tests them against zero (a graph output that torch says is bool is stored as
    # bool: frontend.py).
    HANDLERS[_op] = (lambda fn: (lambda L, a, b: L.elementwise(fn, a, b, dtype="float32")))(_fn)


# logical ops (issue 15): masks in, a float32 0/1 mask out ---------------------------
for _op, _fn in [(aten.logical_and.default, "logical_and"),
                 (aten.logical_or.default, "logical_or"),
                 (aten.logical_xor.default, "logical_xor")]:
    HANDLERS[_op] = (lambda fn: (lambda L, a, b: L.elementwise(fn, a, b, dtype="float32")))(_fn)


@handles(aten.logical_not.default)
def _logical_not(L, x):
    return L.elementwise("eq", x, 0.0, dtype="float32")


def _bools_only(L, *args):
    for a in args:
        if isinstance(a, torch.fx.Node) and L.meta(a).dtype != torch.bool:
            raise L.unsupported(f"{L.node.target} of {L.meta(a).dtype} (bool only)")


@handles(aten.bitwise_not.default)
def _bitwise_not(L, x):
    _bools_only(L, x)
    return L.elementwise("eq", x, 0.0, dtype="float32")


for _op, _fn in [(aten.bitwise_and.Tensor, "logical_and"), (aten.bitwise_or.Tensor, "logical_or"),
                 (aten.bitwise_xor.Tensor, "logical_xor")]:
    def _bitwise(L, a, b, fn=_fn):   # of bools (x & y, x | y, x ^ y of masks)
        _bools_only(L, a, b)
        return L.elementwise(fn, a, b, dtype="float32")
    HANDLERS[_op] = _bitwise


@handles(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(L, *args, **kwargs):
    """A constant: its shape is static, so its values are known when the model is
    exported (a weight, as torch.arange computes it)."""
    meta = L.meta()
    v = L.emit("weight", tuple(meta.shape), L.out_dtype(), name=L.node.name)
    L.constants[v.value] = torch.arange(*args, dtype=meta.dtype)
    return v


# reductions: compiler/aten_reductions.py ------------------------------------------
@handles(aten._softmax.default, aten._log_softmax.default)
def _softmax(L, x, dim, half_to_float=False):
    v = L.tensor(x)
    nd = len(v.shape)
    if nd and dim % nd != nd - 1:   # over another dim: a view that makes it the last
        order = [d for d in range(nd) if d != dim % nd] + [dim % nd]
        out = _softmax_last(L, L.permute(v, order))
        return L.permute(out, [order.index(d) for d in range(nd)])
    return _softmax_last(L, v)


def _softmax_last(L, v: View) -> View:
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
    in_place = L.ops_by_name(L.tensor(state).value).kind in ("state", "state_update")
    if in_place and not accumulate and len(positions) == 2 and \
            _is_slots(L, L.tensor(state), *positions[0]):
        return _slot_update(L, state, positions[1][0], positions[1][1], values)
    if accumulate or len(positions) != 1:
        raise L.unsupported("aten.index_put other than one index tensor along one dim "
                            "(or `state[slots, ..., pos] = values`)")
    dim, index = positions[0]
    if in_place:
        return _state_update(L, state, dim, index, values)
    return _scatter(L, L.tensor(state), dim, L.tensor(index), L.value(values))


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


def _is_slots(L, state: View, dim: int, index) -> bool:
    """Whether `index` names every slot of `state`'s first dim in order: a constant
    0..n-1 (a batched decoder's `slots` buffer), so `state[slots, ..., pos]` writes
    row b of the values into slot b."""
    idx = L.tensor(index)
    n = state.shape[0] if state.shape else 0
    data = L.constants.get(idx.value)
    return (dim == 0 and idx.shape == (n,) and idx.strides == (1,) and idx.offset == 0
            and data is not None and data.numel() == n
            and torch.equal(data.reshape(-1).long(), torch.arange(n)))


def _slot_update(L, state, dim, index, values):
    """`state[slots, ..., pos] = values` (slots 0..n-1 along dim 0, `pos` [n] along
    `dim`): slot b's values go to position pos[b] of slot b. One state update at per-slot
    positions (attr `slot_dim` 0): its value is [n, ..., 1 at dim, ...]."""
    s, idx = L.tensor(state), L.tensor(index)
    if not s.contiguous:
        raise L.unsupported("an in-place update of something other than a module buffer")
    dim %= len(s.shape)
    n = s.shape[0]
    if dim == 0 or idx.shape != (n,):
        raise L.unsupported(f"an in-place update of {n} slots at {idx.shape} positions "
                            f"(one position per slot)")
    rest = tuple(size for d, size in enumerate(s.shape) if d not in (0, dim))
    vals = L.expand(L.tensor(values), (n,) + rest)
    slot = s.shape[:dim] + (1,) + s.shape[dim + 1:]
    vals = L.view_as(vals, slot)
    return L.emit("state_update", s.shape, s.dtype, (s.operand(), vals.operand(), idx.operand()),
                  dim=dim, slot_dim=0)


def _scatter(L, base: View, dim: int, index: View, values) -> View:
    """index_put into a computed value (not a module buffer) at positions known only at
    run time, such as a mask built from top-k indices: out[.., s, ..] is values[j] where
    index[j] names s (negative indices wrap, as in torch), else base[.., s, ..]. The
    positions are compared, never used as addresses: hit[s, j] over [size, k], whose
    row maximum says whether any index names s. Values are a number, or vary along
    `dim` only (one per index); torch leaves duplicate indices unordered, and here the
    largest of their values wins."""
    if index.dtype not in ("int64", "int32") or len(index.shape) != 1:
        raise L.unsupported(f"aten.index_put with a {index.dtype} index of shape "
                            f"{list(index.shape)} (one 1-d integer index only)")
    nd = len(base.shape)
    dim %= nd
    size, k = base.shape[dim], index.shape[0]
    grid = (size, k)
    positions = _positions(L, size)
    wrapped = L.elementwise("sub", positions, float(size), shape=(size, 1), dtype="int64")
    idx = L.expand(View(index.value, (1, k), (0, index.strides[0]), index.offset, index.dtype),
                   grid)
    hit = L.elementwise("maximum", L.elementwise("eq", positions, idx, shape=grid,
                                                 dtype="float32"),
                        L.elementwise("eq", wrapped, idx, shape=grid, dtype="float32"),
                        shape=grid, dtype="float32")

    def along_dim(column: View) -> View:
        """A [size, 1] column as base's shape, varying along `dim`."""
        lined_up = L.view_as(column, tuple(size if d == dim else 1 for d in range(nd)))
        return L.expand(lined_up, base.shape)

    named = along_dim(L.emit("reduce", (size, 1), "float32", (hit.operand(),), fn="max",
                             scale=1.0))
    if not isinstance(values, (int, float)):
        values = along_dim(_scattered_values(L, base, dim, L.tensor(values), hit))
    return L.elementwise("where", named, values, base, shape=base.shape, dtype=base.dtype)


def _scattered_values(L, base: View, dim: int, values: View, hit: View) -> View:
    """[size, 1]: for each position s, the value of the index that names it."""
    if base.dtype not in FLOAT_DTYPES:
        raise L.unsupported(f"aten.index_put of tensor values into a {base.dtype} value")
    size, k = hit.shape
    slot = base.shape[:dim] + (k,) + base.shape[dim + 1:]
    v = L.expand(values, slot)
    if any(n != 1 and stride != 0 for d, (n, stride) in enumerate(zip(v.shape, v.strides))
           if d != dim):
        raise L.unsupported("aten.index_put of values that vary along a dim other than "
                            "the indexed one")
    per_index = View(v.value, (size, k), (0, v.strides[dim]), v.offset, v.dtype)
    chosen = L.elementwise("where", hit, per_index, float("-inf"), shape=(size, k),
                           dtype=base.dtype)
    return L.emit("reduce", (size, 1), base.dtype, (chosen.operand(),), fn="max", scale=1.0)


def _positions(L, n: int) -> View:
    """0..n-1 as an int64 [n, 1] weight, one per length."""
    if n not in L.positions:
        v = L.emit("weight", (n, 1), "int64", name=f"positions_{n}")
        L.constants[v.value] = torch.arange(n, dtype=torch.int64).reshape(n, 1)
        L.positions[n] = v
    return L.positions[n]


@handles(aten.topk.default)
def _topk(L, x, k, dim=-1, largest=True, sorted=True):
    """Values and indices as two ops over the same row (the one the model never reads
    is dropped; a row task computes both in one pass). Always sorted: with sorted=False
    torch leaves the order open, and sorted is one of the orders it allows."""
    v = L.tensor(x)
    nd = len(v.shape)
    if nd == 0:
        raise L.unsupported("aten.topk of a 0-d tensor")
    if dim % nd != nd - 1:   # over another dim: a view that makes it the last
        order = [d for d in range(nd) if d != dim % nd] + [dim % nd]
        back = [order.index(d) for d in range(nd)]
        return [L.permute(r, back) for r in _topk(L, L.permute(v, order), k, -1, largest)]
    if v.dtype not in FLOAT_DTYPES:
        raise L.unsupported(f"aten.topk of {v.dtype} values (floating point only)")
    if not 0 < k <= v.shape[-1]:
        raise L.unsupported(f"aten.topk with k={k} of a row of {v.shape[-1]}")
    shape, base = v.shape[:-1] + (k,), L.node.name
    attrs = {"k": int(k), "largest": bool(largest)}
    return [L.emit("topk", shape, v.dtype, (v.operand(),), name=f"{base}_values",
                   result="values", **attrs),
            L.emit("topk", shape, "int64", (v.operand(),), name=f"{base}_indices",
                   result="indices", **attrs)]


@handles(aten.argmax.default)
def _argmax(L, x, dim=None, keepdim=False):
    v = L.tensor(x)
    nd = len(v.shape)
    if dim is None or nd == 0:   # over all values, as torch: the index into the flattened
        out = _argmax_last(L, L.view_as(v, (math.prod(v.shape),)))
        return L.view_as(out, (1,) * nd if keepdim else ())
    if dim % nd != nd - 1:
        raise L.unsupported("argmax over a dim other than the last")
    out = _argmax_last(L, v)
    return out if keepdim else L.view_as(out, v.shape[:-1])


def _argmax_last(L, v: View) -> View:
    """The argmax of each row of v's last dim, [.., 1]."""
    chunk = _argmax_chunk(v.shape[-1])
    if chunk:
        return _argmax_in_stages(L, v, chunk)
    return L.emit("argmax", v.shape[:-1] + (1,), "int64", (v.operand(),))


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
