"""What generated kernel source may contain, and the check that it contains nothing else.

An engine file is data, and a kernel is rendered again from its manifest before it is
imported, so whatever reaches the rendered source from a manifest is attacker-chosen
text when the file is hostile. Two rules keep it from becoming code:

1. What the renderer pastes is an identifier checked against `IDENTIFIER`
   (`identifier`), an int or a float rendered by Python (`integer`, `exprs.literal`),
   or free text as a one-line Python string literal (`text_literal`), never raw text.
2. Whatever the renderer produced, `check_kernel_source` parses it and refuses it
   unless it has the kernel's fixed shape (three imports, integer constants, jitted
   functions named `task_N`, the template's helpers `HELPERS` and the kernel) and its
   function bodies use only the kernel's vocabulary: names that are not Python
   builtins (but `range` and `float`), no private attributes, calls only to `tl`
   functions in `TL_CALLS`, to the task functions and helpers, to `.to`, and to
   `tl.inline_asm_elementwise` with one of the template's own instructions
   (`TEMPLATE_ASM`, GPU-only prefetch hints). In Triton's interpreter the bodies run
   as Python, so this is what stands between a hostile manifest and the machine;
   `codegen.loader` applies it to every source it imports unless the user trusts the
   engine's code. It bounds what a kernel can call, not where it reads and writes:
   addresses are pool pointers plus offsets, and those offsets are checked against
   the manifest when an engine loads (runtime/enginefile/checks.py check_tables,
   check_views).
"""
from __future__ import annotations

import ast
import builtins
import functools
import re

from tilec.errors import TilecError

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
TASK_FUNCTION = re.compile(r"task_(0|[1-9][0-9]{0,5})\Z")
KERNEL_IMPORTS = ("import triton", "import triton.language as tl",
                  "import triton.language.extra.cuda")
# Every `tl` function a kernel calls. A new task body that needs another one adds it
# here, on purpose: `tl.inline_asm_elementwise` (machine code) stays out but for the
# template's own instructions (TEMPLATE_ASM, checked call by call), and the modules
# reachable through `tl` stay out.
TL_CALLS = frozenset({
    "abs", "arange", "argmax", "argmin", "atomic_add", "atomic_cas", "atomic_max",
    "atomic_xchg", "broadcast_to", "cast", "constexpr", "cos", "cumsum", "debug_barrier",
    "dot", "erf", "exp", "exp2", "expand_dims", "fdiv", "floor", "full", "load", "log",
    "log2", "make_tensor_descriptor", "max", "max_contiguous", "maximum", "min", "minimum",
    "multiple_of", "num_programs", "permute", "pointer_type", "program_id", "range",
    "reshape", "rsqrt",
    "sigmoid", "sin", "sqrt", "sqrt_rn", "static_range", "store", "sum", "trans", "where",
    "zeros", "zeros_like",
})
# The kernel template's own helper functions (templates/kernel.py.j2): the weight,
# record and args prefetches a GPU worker issues before it waits, the record of a
# run-time index out of range (index_error), and bfloat16 conversions that the
# interpreter gets wrong (round_bf16, widen_bf16)
HELPERS = frozenset({"prefetch_l2", "prefetch_l1", "prefetch_weights", "index_error",
                     "round_bf16", "widen_bf16"})
# The only machine code a kernel holds: the template's prefetch hints, each passed to
# `tl.inline_asm_elementwise` as exactly this literal (a GPU-only branch: never run by
# the interpreter)
TEMPLATE_ASM = frozenset({
    "{ .reg .pred p; setp.gt.s32 p, $2, 0; "
    "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
    "prefetch.global.L1 [$1]; mov.u32 $0, 0;",
})
INLINE_ASM = "inline_asm_elementwise"
TL_VALUES = frozenset({"float32", "float16", "bfloat16", "float64", "int1", "int8",
                       "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})
TL_PATHS = frozenset({("extra", "cuda", "globaltimer")})   # deeper than tl.NAME
METHOD_CALLS = frozenset({"to"})          # value.to(dtype)
RESERVED = frozenset({"tl", "triton"})    # never rebound, so `tl.load` is Triton's
BUILTIN_CALLS = frozenset({"range", "float", "min", "max"})
FORBIDDEN_NAMES = frozenset(dir(builtins)) - BUILTIN_CALLS - {"True", "False", "None"}
STATEMENTS = (ast.Assign, ast.AugAssign, ast.Expr, ast.If, ast.For, ast.While, ast.Pass,
              ast.Break, ast.Continue, ast.Return)
EXPRESSIONS = (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call, ast.Attribute,
               ast.Name, ast.Constant, ast.Subscript, ast.Slice, ast.Tuple, ast.List,
               ast.IfExp, ast.keyword, ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
               ast.expr_context)


class UnsafeKernelError(TilecError):
    """Generated kernel source would contain something other than kernel code."""


def identifier(text: object, what: str) -> str:
    """`text` if it is a plain identifier (pasted into code as a name), else an error."""
    if not isinstance(text, str) or not IDENTIFIER.match(text) or text in FORBIDDEN_NAMES:
        raise UnsafeKernelError(f"{what} {_clip(text)} is not a plain identifier "
                                "([A-Za-z_][A-Za-z0-9_]*, at most 128 characters)")
    return text


def integer(value: object, what: str) -> int:
    """`value` if it is an int (not a bool, not a string of digits), else an error."""
    if type(value) is not int:
        raise UnsafeKernelError(f"{what} {_clip(value)} is not an integer")
    return value


def text_literal(text: object, limit: int = 200) -> str:
    """Free text (a model name, a group label) as a one-line Python string literal:
    `repr` escapes newlines, quotes, backslashes and every other non-printable
    character, Unicode line separators included, so the text cannot end a comment or
    a string."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    out = repr(text)
    if any(ch in out for ch in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):  # repr escapes these
        raise UnsafeKernelError(f"text {_clip(text)} does not render on one line")
    return out


@functools.lru_cache(maxsize=4)
def check_kernel_source(source: str, kernel_name: str) -> None:
    """Refuse `source` unless it is made only of what a tilec kernel is made of (see the
    module docstring); raises UnsafeKernelError naming the first thing that is not.
    A source that passed is remembered (the same text, compared whole, passes again):
    the devices of an engine render the same kernel, a second each on GLM-5's 8
    devices. A refusal is never remembered: it raises again, after the full check."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as e:
        raise UnsafeKernelError(f"kernel source does not parse ({_clip(str(e))})") from None
    body = list(tree.body)
    imports = [ast.unparse(s) for s in body[:len(KERNEL_IMPORTS)]]
    if tuple(imports) != KERNEL_IMPORTS:
        raise UnsafeKernelError("kernel source does not start with the kernel's imports")
    functions = []
    for stmt in body[len(KERNEL_IMPORTS):]:
        if isinstance(stmt, ast.Assign):
            _check_constant(stmt)
        elif isinstance(stmt, ast.FunctionDef):
            functions.append(stmt.name)
            _check_function(stmt, kernel_name)
        else:
            raise UnsafeKernelError(f"line {stmt.lineno}: a top-level "
                                    f"{type(stmt).__name__} in kernel source")
    if not functions or functions[-1] != kernel_name:
        raise UnsafeKernelError(f"kernel source does not end with the function {kernel_name}")
    if len(set(functions)) != len(functions):
        raise UnsafeKernelError("kernel source defines a function twice")


def _check_constant(stmt: ast.Assign) -> None:
    """`NAME = tl.constexpr(<int>)`."""
    ok = (len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
          and IDENTIFIER.match(stmt.targets[0].id) and stmt.targets[0].id.isupper()
          and isinstance(stmt.value, ast.Call) and ast.unparse(stmt.value.func) == "tl.constexpr"
          and len(stmt.value.args) == 1 and not stmt.value.keywords
          and isinstance(stmt.value.args[0], ast.Constant)
          and type(stmt.value.args[0].value) is int)
    if not ok:
        raise UnsafeKernelError(f"line {stmt.lineno}: a top-level assignment that is not "
                                "an integer constant")


def _check_function(fn: ast.FunctionDef, kernel_name: str) -> None:
    if fn.name != kernel_name and not TASK_FUNCTION.match(fn.name) and fn.name not in HELPERS:
        raise UnsafeKernelError(f"line {fn.lineno}: function {_clip(fn.name)} is neither the "
                                "kernel nor a task function")
    decorators = [ast.unparse(d) for d in fn.decorator_list]
    if decorators not in (["triton.jit"], ["triton.jit(noinline=True)"]):
        raise UnsafeKernelError(f"line {fn.lineno}: function {fn.name} is not plainly "
                                "@triton.jit")
    a = fn.args
    if a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults or fn.returns:
        raise UnsafeKernelError(f"line {fn.lineno}: function {fn.name} has a signature a "
                                "kernel does not have")
    for arg in a.args:
        _name(arg.arg, arg.lineno)
        if arg.arg in RESERVED:
            raise UnsafeKernelError(f"line {arg.lineno}: an argument named {arg.arg}")
        if arg.annotation is not None and ast.unparse(arg.annotation) != "tl.constexpr":
            raise UnsafeKernelError(f"line {arg.lineno}: argument {arg.arg} has an annotation "
                                    "other than tl.constexpr")
    for stmt in fn.body:
        _check_statement(stmt)


def _check_statement(stmt: ast.stmt) -> None:
    if not isinstance(stmt, STATEMENTS):
        raise UnsafeKernelError(f"line {stmt.lineno}: a {type(stmt).__name__} statement in "
                                "a kernel function")
    if isinstance(stmt, ast.For) and stmt.orelse or isinstance(stmt, ast.While) and stmt.orelse:
        raise UnsafeKernelError(f"line {stmt.lineno}: a loop with an else branch")
    for node in ast.iter_child_nodes(stmt):
        if isinstance(node, ast.stmt):
            _check_statement(node)
        else:
            _check_expression(node, stmt.lineno)


def _check_expression(node: ast.AST, line: int) -> None:
    for sub in ast.walk(node):
        if not isinstance(sub, EXPRESSIONS):
            raise UnsafeKernelError(f"line {line}: a {type(sub).__name__} expression in a "
                                    "kernel function")
        if isinstance(sub, ast.Name):
            _name(sub.id, line)
            if isinstance(sub.ctx, ast.Store) and sub.id in RESERVED:
                raise UnsafeKernelError(f"line {line}: {sub.id} assigned in a kernel function")
        elif isinstance(sub, ast.Attribute):
            _check_attribute(sub, line)
        elif isinstance(sub, ast.Call):
            if _dotted(sub.func) == ["tl", INLINE_ASM]:
                _check_asm(sub, line)
            else:
                _check_callee(sub.func, line)
        elif isinstance(sub, ast.Constant) and not isinstance(
                sub.value, (int, float, str, type(None))):
            raise UnsafeKernelError(f"line {line}: a {type(sub.value).__name__} constant")


def _check_attribute(node: ast.Attribute, line: int) -> None:
    """`tl.NAME` of the vocabulary (or a prefix of a longer `tl` path in it), or a
    method of a value (`x.to`); nothing else of `tl` is reachable (its modules, its
    assembler), and no attribute of anything else."""
    path = _dotted(node)
    if path and path[0] in RESERVED:
        rest = tuple(path[1:])
        named = len(rest) == 1 and rest[0] in TL_CALLS | TL_VALUES | {INLINE_ASM}
        if path[0] == "tl" and (named or any(p[:len(rest)] == rest for p in TL_PATHS)):
            return
    elif node.attr in METHOD_CALLS:
        return
    raise UnsafeKernelError(f"line {line}: the attribute {_clip(ast.unparse(node))}, which "
                            "is not in the kernel's vocabulary")


def _check_asm(call: ast.Call, line: int) -> None:
    """`tl.inline_asm_elementwise` with keyword arguments only, its `asm` one of the
    template's own instructions and its `constraints` a string literal."""
    given = {k.arg: k.value for k in call.keywords}
    asm, constraints = given.get("asm"), given.get("constraints")
    if call.args or not (isinstance(asm, ast.Constant) and asm.value in TEMPLATE_ASM
                         and isinstance(constraints, ast.Constant)
                         and isinstance(constraints.value, str)):
        raise UnsafeKernelError(f"line {line}: inline assembly that is not one of the kernel "
                                "template's own instructions")


def _check_callee(func: ast.expr, line: int) -> None:
    if isinstance(func, ast.Name):
        if func.id in BUILTIN_CALLS or TASK_FUNCTION.match(func.id) or func.id in HELPERS:
            return
    elif isinstance(func, ast.Attribute):
        path = _dotted(func)
        if path and path[0] == "tl" and (len(path) == 2 and path[1] in TL_CALLS
                                         or tuple(path[1:]) in TL_PATHS):
            return
        if not (path and path[0] in RESERVED) and func.attr in METHOD_CALLS:
            return
    raise UnsafeKernelError(f"line {line}: a call to {_clip(ast.unparse(func))}, which is "
                            "not in the kernel's vocabulary")


def _dotted(node: ast.expr) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _name(name: str, line: int) -> None:
    if name.startswith("_") or name in FORBIDDEN_NAMES:
        raise UnsafeKernelError(f"line {line}: the name {_clip(name)} in a kernel function")


def _clip(x: object) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."
