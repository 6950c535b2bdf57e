"""How ATen's reductions lower, over any dims: sums, means, maxima and minima, `any`,
the normalisations built of them (layer norm, group norm) and cumsum.

The IR reduces over the last dim only (`reduce`), so a reduction over other dims is a
strided view that makes them the last: the kept dims first, then the reduced ones
merged into one (a copy only where no strides express the merge). The handlers
register in aten_ops.HANDLERS (compiler/frontend.py imports this module).
"""
from __future__ import annotations

import math

import torch

from tilec.compiler.aten_ops import aten, handles
from tilec.compiler.lowered import View
from tilec.ir.graph import FLOAT_DTYPES


def reduce_dims(L, fn: str, v: View, dims, keepdim: bool, dtype: str,
                mean: bool = False) -> View:
    """`fn` ("sum" or "max") of `v` over `dims` (None or empty: all of them), the mean
    with `mean`, as torch shapes it."""
    nd = len(v.shape)
    if nd == 0:
        v, nd = L.view_as(v, (1,)), 1
        dims, keepdim, scalar = [0], False, True
    else:
        scalar = False
    dims = sorted({d % nd for d in (dims if dims else range(nd))}) if not scalar else [0]
    kept = [d for d in range(nd) if d not in dims]
    count = math.prod(v.shape[d] for d in dims)
    rows = tuple(v.shape[d] for d in kept)
    flat = L.view_as(L.permute(v, kept + dims), rows + (count,))
    # the mean of no values is NaN, as in torch (0 * NaN)
    scale = (1.0 / count if count else float("nan")) if mean else 1.0
    out = L.emit("reduce", rows + (1,), dtype, (flat.operand(),), fn=fn, scale=scale)
    if scalar:
        return L.view_as(out, ())
    shape = tuple(1 if d in dims else s for d, s in enumerate(v.shape)) if keepdim else rows
    return L.view_as(out, shape)


def _float_only(L, v: View, what: str) -> None:
    if v.dtype not in FLOAT_DTYPES:
        raise L.unsupported(f"{what} of {v.dtype} values (floating point only)")


def _sum_dtype(L, v: View, dtype) -> str:
    """The result's dtype; a sum of integers (or bools, counted) is exact only within
    float32's 24 bits, so it is refused rather than rounded."""
    out = L.out_dtype()
    if v.dtype not in FLOAT_DTYPES or out not in FLOAT_DTYPES:
        raise L.unsupported(f"{L.node.target} of {v.dtype} values as {out} "
                            "(floating point only)")
    return out


@handles(aten.sum.dim_IntList)
def _sum(L, x, dims=None, keepdim=False, dtype=None):
    v = L.tensor(x)
    return reduce_dims(L, "sum", v, dims, keepdim, _sum_dtype(L, v, dtype))


@handles(aten.sum.default)
def _sum_all(L, x, dtype=None):
    v = L.tensor(x)
    return reduce_dims(L, "sum", v, None, False, _sum_dtype(L, v, dtype))


@handles(aten.mean.dim)
def _mean(L, x, dims=None, keepdim=False, dtype=None):
    v = L.tensor(x)
    return reduce_dims(L, "sum", v, dims, keepdim, _sum_dtype(L, v, dtype), mean=True)


@handles(aten.mean.default)
def _mean_all(L, x, dtype=None):
    v = L.tensor(x)
    return reduce_dims(L, "sum", v, None, False, _sum_dtype(L, v, dtype), mean=True)


@handles(aten.amax.default)
def _amax(L, x, dims=(), keepdim=False):
    v = L.tensor(x)
    _float_only(L, v, "aten.amax")
    return reduce_dims(L, "max", v, dims, keepdim, L.out_dtype())


@handles(aten.amin.default)
def _amin(L, x, dims=(), keepdim=False):
    """min(x) = -max(-x): the IR's reductions are sum and max."""
    v = L.tensor(x)
    _float_only(L, v, "aten.amin")
    dtype = L.out_dtype()
    negated = L.elementwise("neg", x, shape=v.shape, dtype=v.dtype)
    top = reduce_dims(L, "max", negated, dims, keepdim, dtype)
    return L.elementwise("neg", top, shape=top.shape, dtype=dtype)


@handles(aten.any.dim, aten.any.dims, aten.any.default)
def _any(L, x, dims=None, keepdim=False):
    """Whether any value is nonzero: the max of a 0/1 mask (a float32 mask, as the IR's
    predicates are)."""
    v = L.tensor(x)
    if isinstance(dims, int):
        dims = [dims]
    nonzero = L.elementwise("ne", x, 0.0, shape=v.shape, dtype="float32")
    return reduce_dims(L, "max", nonzero, dims, keepdim, "float32")


# normalisations -----------------------------------------------------------------------
def _normalize(L, rows_view: View, eps: float) -> tuple[View, View, View]:
    """(x - mean) * rstd of each row of a [rows.., n] view, with its mean and rstd
    ([rows.., 1]), all float32: torch computes them in float32 for any input."""
    shape = rows_view.shape
    mean = reduce_dims(L, "sum", rows_view, [-1], True, "float32", mean=True)
    centred = L.elementwise("sub", rows_view, mean, shape=shape, dtype="float32")
    square = L.elementwise("mul", centred, centred, shape=shape, dtype="float32")
    var = reduce_dims(L, "sum", square, [-1], True, "float32", mean=True)
    shifted = L.elementwise("add", var, float(eps), shape=var.shape, dtype="float32")
    rstd = L.elementwise("rsqrt", shifted, shape=var.shape, dtype="float32")
    return L.elementwise("mul", centred, rstd, shape=shape, dtype="float32"), mean, rstd


def _affine(L, y: View, weight, bias, param_shape, dtype: str) -> View:
    """y * weight + bias, each (if given) viewed as `param_shape` to broadcast."""
    if weight is not None:
        w = L.view_as(L.tensor(weight), param_shape)
        y = L.elementwise("mul", y, w, shape=y.shape, dtype=dtype if bias is None else "float32")
    if bias is not None:
        b = L.view_as(L.tensor(bias), param_shape)
        y = L.elementwise("add", y, b, shape=y.shape, dtype=dtype)
    if weight is None and bias is None and dtype != "float32":
        y = L.elementwise("cast", y, shape=y.shape, dtype=dtype)
    return y


def _dtype(meta) -> str:
    """The IR name of a float tensor's dtype ("float32" for torch.float32)."""
    return str(meta.dtype).removeprefix("torch.")


def _as(L, v: View, dtype: str) -> View:
    return v if v.dtype == dtype else L.elementwise("cast", v, shape=v.shape, dtype=dtype)


@handles(aten.native_layer_norm.default)
def _layer_norm(L, x, normalized_shape, weight, bias, eps):
    """(out, mean, rstd) over the last len(normalized_shape) dims; mean and rstd keep
    those dims as ones."""
    v = L.tensor(x)
    _float_only(L, v, "aten.native_layer_norm")
    outs = [_dtype(m) for m in L.meta()]
    lead = v.shape[:len(v.shape) - len(normalized_shape)]
    n = math.prod(normalized_shape)
    y, mean, rstd = _normalize(L, L.view_as(v, lead + (n,)), eps)
    y = _affine(L, y, weight, bias, (n,), outs[0])
    stats = lead + (1,) * len(normalized_shape)
    return [L.view_as(y, v.shape), L.view_as(_as(L, mean, outs[1]), stats),
            L.view_as(_as(L, rstd, outs[2]), stats)]


@handles(aten.native_group_norm.default)
def _group_norm(L, x, weight, bias, n, c, hw, groups, eps):
    """(out, mean, rstd): each of `groups` groups of channels normalised over its
    channels and positions; mean and rstd are [n, groups]."""
    v = L.tensor(x)
    _float_only(L, v, "aten.native_group_norm")
    outs = [_dtype(m) for m in L.meta()]
    n, c, hw, groups = int(n), int(c), int(hw), int(groups)
    y, mean, rstd = _normalize(L, L.view_as(v, (n, groups, c // groups * hw)), eps)
    y = _affine(L, L.view_as(y, (n, c, hw)), weight, bias, (c, 1), outs[0])
    return [L.view_as(y, v.shape), L.view_as(_as(L, mean, outs[1]), (n, groups)),
            L.view_as(_as(L, rstd, outs[2]), (n, groups))]


# cumsum -------------------------------------------------------------------------------
@handles(aten.cumsum.default)
def _cumsum(L, x, dim, dtype=None):
    """A cumulative sum over a static length n is a product with the [n, n] upper
    triangle of ones: out[.., j] = sum over i <= j of x[.., i]."""
    v = L.tensor(x)
    out_dtype = L.out_dtype()
    if v.dtype not in FLOAT_DTYPES or out_dtype != v.dtype:
        raise L.unsupported(f"aten.cumsum of {v.dtype} values as {out_dtype} "
                            "(floating point, same dtype only)")
    if not v.shape:
        return v
    nd = len(v.shape)
    dim %= nd
    order = [d for d in range(nd) if d != dim] + [dim]
    moved = L.permute(v, order)
    size = v.shape[dim]
    rows = math.prod(moved.shape[:-1])
    flat = L.view_as(moved, (rows, size))
    triangle = L.emit("weight", (size, size), v.dtype, name=f"cumsum_triangle_{size}")
    L.constants[triangle.value] = torch.ones(size, size).triu().to(getattr(torch, v.dtype))
    out = L.emit("matmul", (rows, size), out_dtype, (flat.operand(), triangle.operand()))
    back = [order.index(d) for d in range(nd)]
    return L.permute(L.view_as(out, moved.shape), back)
