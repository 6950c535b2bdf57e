"""Triton expressions for elementwise functions. All float math runs in float32.

Each entry takes the argument expressions (strings) and returns one expression.
"""
from __future__ import annotations

import math

from tilec.ir.graph import FLOAT_DTYPES

SQRT1_2 = 0.7071067811865476
SQRT_2_OVER_PI = 0.7978845608028654


def literal(x: float, integer: bool = False) -> str:
    if integer and float(x).is_integer():
        return str(int(x))
    if math.isinf(x):
        return 'float("inf")' if x > 0 else '-float("inf")'
    if math.isnan(x):
        return 'float("nan")'
    return repr(float(x))


def _tanh(a: str) -> str:
    # tanh(a) = 1 - 2 / (exp(2a) + 1): exact limits at +-inf, no tl.tanh needed.
    return f"(1.0 - 2.0 / (tl.exp(2.0 * {a}) + 1.0))"


def _pow(a: str, p: float) -> str:
    e = float(p)
    if e == 0:
        return f"({a} * 0.0 + 1.0)"
    if e.is_integer() and abs(e) <= 8:
        prod = " * ".join([f"({a})"] * int(abs(e)))
        return f"({prod})" if e > 0 else f"(1.0 / ({prod}))"
    if e == 0.5:
        return f"tl.sqrt({a})"
    if e == -0.5:
        return f"tl.rsqrt({a})"
    return f"tl.exp({literal(e)} * tl.log({a}))"


def _float(a: str) -> str:
    # a float32 value, also of an int64 load or a number literal (`.to` would not take one)
    return f"({a} + 0.0)"


def _pow_tensor(a: str, b: str) -> str:
    """a ** b, both tensors, as torch: |a| ** b through exp and log, negative for a
    negative base and an odd whole exponent, NaN for a negative base and a fractional
    one, and 1 for b == 0 or a == 1 (even if the other is NaN). Conditions nest in
    `tl.where` rather than meet in `&`: the interpreter's numpy refuses a block & a
    scalar."""
    a, b = _float(a), _float(b)
    size = f"tl.exp({b} * tl.log(tl.abs({a})))"
    odd = f"(tl.floor({b} * 0.5) * 2.0 != {b})"
    negative = f"tl.where({b} == tl.floor({b}), tl.where({odd}, -{size}, {size}), float(\"nan\"))"
    signed = f"tl.where({a} < 0, {negative}, {size})"
    return f"tl.where({b} == 0.0, 1.0, tl.where({a} == 1.0, 1.0, {signed}))"


def _truth(a: str) -> str:
    return f"tl.where({a} != 0, 1.0, 0.0)"


def _trunc(a: str) -> str:
    return f"tl.where({a} < 0, -tl.floor(-{a}), tl.floor({a}))"


def _div_floor(a: str, b: str) -> str:
    """torch's floor division of floats: through the remainder (C fmod, `%` in Triton),
    not floor(a / b), which rounds up where a / b rounds to a whole number (1 // 0.1
    is 9); a division by zero is a / b."""
    a, b = _float(a), _float(b)
    mod = f"({a} % {b})"
    div = f"(({a} - {mod}) / {b})"
    signs_differ = f"tl.where({b} < 0, {mod} > 0, {mod} < 0)"   # (mod != 0 is tested first)
    div = f"tl.where({mod} != 0, tl.where({signs_differ}, {div} - 1.0, {div}), {div})"
    low = f"tl.floor({div})"
    rounded = f"tl.where({div} - {low} > 0.5, {low} + 1.0, {low})"
    return f"tl.where({b} == 0, {a} / {b}, {rounded})"


EXPRS = {
    "identity": lambda a: a,
    "add": lambda a, b: f"({a} + {b})",
    "sub": lambda a, b: f"({a} - {b})",
    "rsub": lambda a, b: f"({b} - {a})",
    "mul": lambda a, b: f"({a} * {b})",
    "div": lambda a, b: f"({a} / {b})",
    "neg": lambda a: f"(-{a})",
    "exp": lambda a: f"tl.exp({a})",
    "log": lambda a: f"tl.log({a})",
    "sqrt": lambda a: f"tl.sqrt({a})",
    "rsqrt": lambda a: f"tl.rsqrt({a})",
    "reciprocal": lambda a: f"(1.0 / {a})",
    "abs": lambda a: f"tl.abs({a})",
    "cos": lambda a: f"tl.cos({a})",
    "sin": lambda a: f"tl.sin({a})",
    "relu": lambda a: f"tl.maximum({a}, 0.0)",
    "sigmoid": lambda a: f"(1.0 / (1.0 + tl.exp(-{a})))",
    "silu": lambda a: f"({a} / (1.0 + tl.exp(-{a})))",
    "tanh": _tanh,
    "erf": lambda a: f"tl.erf({a})",
    "gelu_erf": lambda a: f"(0.5 * {a} * (1.0 + tl.erf({a} * {SQRT1_2})))",
    "gelu_tanh": lambda a: (
        f"(0.5 * {a} * (1.0 + {_tanh(f'({SQRT_2_OVER_PI} * ({a} + 0.044715 * {a} * {a} * {a}))')}))"),
    "pow": _pow,
    "pow_tensor": _pow_tensor,
    "floor": lambda a: f"tl.floor({a})",
    "ceil": lambda a: f"(-tl.floor(-{a}))",
    "trunc": _trunc,
    "div_trunc": lambda a, b: _trunc(f"({a} / {b})"),
    "div_floor": _div_floor,
    # on 0/1 floats: no bitwise ops on Triton's int1 (the interpreter's numpy refuses a
    # block & a scalar), and a number argument is a Python literal
    "logical_and": lambda a, b: f"({_truth(a)} * {_truth(b)})",
    "logical_or": lambda a, b: f"tl.maximum({_truth(a)}, {_truth(b)})",
    "logical_xor": lambda a, b: f"tl.abs({_truth(a)} - {_truth(b)})",
    "maximum": lambda a, b: f"tl.maximum({a}, {b})",
    "minimum": lambda a, b: f"tl.minimum({a}, {b})",
    "where": lambda c, a, b: f"tl.where({c} != 0, {a}, {b})",
    "lt": lambda a, b: f"({a} < {b}).to(tl.float32)",
    "gt": lambda a, b: f"({a} > {b}).to(tl.float32)",
    "le": lambda a, b: f"({a} <= {b}).to(tl.float32)",
    "ge": lambda a, b: f"({a} >= {b}).to(tl.float32)",
    "eq": lambda a, b: f"({a} == {b}).to(tl.float32)",
    "ne": lambda a, b: f"({a} != {b}).to(tl.float32)",
}

TL_DTYPES = {
    "float32": "tl.float32", "bfloat16": "tl.bfloat16", "float16": "tl.float16",
    "int64": "tl.int64", "int32": "tl.int32", "bool": "tl.int1",
}


def downcast(expr: str, dst: str) -> str:
    """A float32 `expr` as `dst`, rounded to nearest even as torch rounds. A bfloat16
    goes through the kernel template's `round_bf16`: Triton's interpreter truncates a
    bf16 downcast, the GPU's cvt.rn does not (templates/kernel.py.j2)."""
    if dst == "bfloat16":
        return f"round_bf16({expr})"
    return f"{expr}.to({TL_DTYPES[dst]})"


def upcast(expr: str, src: str) -> str:
    """A loaded `src` value as float32 (floats, exactly) or int64. A bfloat16 goes
    through the kernel template's `widen_bf16`: Triton's interpreter flushes bf16
    subnormals to zero on this conversion."""
    if src == "bfloat16":
        return f"widen_bf16({expr})"
    return f"{expr}.to(tl.float32)" if src in FLOAT_DTYPES else f"{expr}.to(tl.int64)"


def cast(expr: str, src: str, dst: str) -> str:
    """A dtype conversion, rounding through the narrow type as eager PyTorch does."""
    if dst in ("bfloat16", "float16"):
        return upcast(downcast(expr, dst), dst)
    if dst == "bool":   # a 0/1 mask in registers, as the predicates; stored as bool
        return f"({expr} != 0).to(tl.float32)"
    if dst in ("int64", "int32"):
        return f"{expr}.to(tl.int64)"
    return f"{expr}.to(tl.float32)"
