"""The reference executor's task body: one task computed with torch ops.

It reads the same pools through the same strided views as the kernel, but computes
each fused group op by op on whole rows with PyTorch, independently of the
generated code: a debugging oracle for the kernel (compare the two on a schedule).
Split attention is the exception in method, not in code: its partials and merge follow
the same algorithm as the kernel's, so tests also compare both with eager PyTorch.
"""
from __future__ import annotations

import math

import torch

from tilec.ir.abi import ERROR_WORDS, INDEX_ERROR
from tilec.ir.attention import attention_chunks, attention_parts, partial_names
from tilec.ir.graph import FLOAT_DTYPES, Group, Op, Operand, index_checks, is_indexed_matmul
from tilec.ir.tasks import Buffer, GroupTiling

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32}


def _gelu_tanh(x):
    return torch.nn.functional.gelu(x, approximate="tanh")


FNS = {
    "identity": lambda a: a, "add": torch.add, "sub": torch.sub, "rsub": lambda a, b: b - a,
    "mul": torch.mul, "div": torch.div, "neg": torch.neg, "exp": torch.exp, "log": torch.log,
    "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal, "abs": torch.abs,
    "cos": torch.cos, "sin": torch.sin, "relu": torch.relu, "sigmoid": torch.sigmoid,
    "silu": torch.nn.functional.silu, "tanh": torch.tanh, "erf": torch.erf,
    "gelu_erf": torch.nn.functional.gelu, "gelu_tanh": _gelu_tanh, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum,
    "where": lambda c, a, b: torch.where(c != 0, a, b),
    "lt": lambda a, b: (a < b).float(), "gt": lambda a, b: (a > b).float(),
    "le": lambda a, b: (a <= b).float(), "ge": lambda a, b: (a >= b).float(),
    "eq": lambda a, b: (a == b).float(), "ne": lambda a, b: (a != b).float(),
    "pow_tensor": torch.pow, "floor": torch.floor, "ceil": torch.ceil, "trunc": torch.trunc,
    "div_trunc": lambda a, b: torch.div(a, b, rounding_mode="trunc"),
    "div_floor": lambda a, b: torch.div(a, b, rounding_mode="floor"),
    "logical_and": lambda a, b: torch.logical_and(a, b).float(),
    "logical_or": lambda a, b: torch.logical_or(a, b).float(),
    "logical_xor": lambda a, b: torch.logical_xor(a, b).float(),
}


# ops that read whole rows of their input to make each row's results
WALK_ROWS = ("reduce", "argmax", "topk")


class TaskRunner:
    def __init__(self, groups: tuple[Group, ...], ops: dict[str, Op],
                 tilings: dict[str, GroupTiling], buffers: dict[str, Buffer],
                 pools: dict[str, torch.Tensor], error: torch.Tensor):
        self.groups, self.ops, self.tilings = groups, ops, tilings
        self.buffers, self.pools = buffers, pools
        self.error = error      # the executor's error buffer, laid out as the kernel's
        self.task = (0, (0, 0, 0))   # the group and tile being run

    def storage(self, value: str) -> Buffer:
        op = self.ops[value]
        return self.storage(op.inputs[0].value) if op.kind == "state_update" else self.buffers[value]

    def view(self, operand: Operand) -> torch.Tensor:
        buf = self.storage(operand.value)
        pool = self.pools[buf.pool]
        t = torch.as_strided(pool, operand.shape, operand.strides, buf.offset + operand.offset)
        return t.float() if buf.type.dtype in FLOAT_DTYPES else t.long()

    def rows_of(self, operand: Operand, r0, r1, c0, c1) -> torch.Tensor:
        t = self.view(operand)
        width = operand.shape[-1] if operand.shape else 1
        t = t.reshape(math.prod(operand.shape[:-1]), width)   # (not -1: width may be 0)
        return t[r0:r1, c0:c1] if width > 1 else t[r0:r1]

    def compute(self, op: Op, env, r0, r1, c0, c1) -> torch.Tensor:
        def arg(i):
            operand = op.inputs[i]
            if operand.value in env:  # a member: aligned rows, broadcasts as needed
                return env[operand.value]
            return self.rows_of(operand, r0, r1, c0, c1)
        if op.kind == "elementwise":
            fn, enc = op.attr("fn"), op.attr("args")
            # numbers broadcast against the inputs; with no inputs (a fill) they are the tile
            tile = () if op.inputs else (r1 - r0, c1 - c0)
            args = [arg(a[1]) if isinstance(a, tuple) else torch.full(tile, float(a)) for a in enc]
            if fn == "cast":
                x = args[0]
                if op.type.dtype in ("bfloat16", "float16"):
                    return x.float().to(_TORCH[op.type.dtype]).float()
                if op.type.dtype == "bool":
                    return (x != 0).float()
                return x.long() if op.type.dtype in ("int64", "int32") else x.float()
            out = FNS[fn](*args)
            return out.long() if op.type.dtype in ("int64", "int32") else out.float()
        if op.kind == "reduce":
            x = arg(0)
            if op.attr("fn") == "sum":
                out = x.sum(-1, keepdim=True)
            else:   # the max of no values is -inf, as the kernel's (torch.amax refuses)
                out = x.amax(-1, keepdim=True) if x.shape[-1] else \
                    torch.full((x.shape[0], 1), float("-inf"))
            return out * op.attr("scale", 1.0)
        if op.kind == "argmax":
            return arg(0).argmax(-1, keepdim=True)
        if op.kind == "topk":
            # torch.topk leaves the order of ties open; a stable sort puts the lowest
            # index first, as the kernel does (and NaN first when largest, like topk)
            ranked = torch.sort(arg(0), dim=-1, descending=op.attr("largest"), stable=True)
            picked = ranked.values if op.attr("result") == "values" else ranked.indices
            return picked[:, :op.attr("k")]
        if op.kind == "state_update":
            return arg(1)
        if op.kind == "gather":
            table, index = op.inputs
            idx = self.checked_index(op, self.view(index).reshape(-1)[r0:r1], table.shape[0])
            return self.view(table)[idx][:, c0:c1]
        if op.kind == "concat":
            dim = op.attr("dim")
            whole = torch.cat([self.view(p) for p in op.inputs], dim=dim)
            return whole.reshape(-1, op.type.cols)[r0:r1, c0:c1]
        raise NotImplementedError(op.kind)

    def checked_index(self, op: Op, index: torch.Tensor, bound: int) -> torch.Tensor:
        """`index` with the values outside [0, bound) replaced by 0; the first task to
        meet one records it as the kernel's `index_error` does."""
        bad = (index < 0) | (index >= bound)
        if bool(bad.any()) and int(self.error[0]) == 0:
            group, tile = self.task
            check = index_checks(self.groups[group], self.ops).index(op.name)
            value = max(-2 ** 31, min(int(index[bad].max()), 2 ** 31 - 1))
            words = [INDEX_ERROR, group, *tile, check, value, bound]
            self.error[:ERROR_WORDS] = torch.tensor(words)
        return torch.where(bad, 0, index)

    def store(self, name: str, value: torch.Tensor, r0, r1, c0, c1,
              space: int | None = None) -> None:
        op = self.ops[name]
        if op.kind == "state_update":
            return self.store_state(op, value, r0, r1, c0, c1, space)
        buf = self.buffers[name]
        pool = self.pools[buf.pool]
        width = op.type.cols
        dest = pool[buf.offset:buf.offset + op.type.numel].view(-1, width)
        if width == 1:
            dest[r0:r1] = value.reshape(r1 - r0, 1).to(pool.dtype)
        else:
            dest[r0:r1, c0:c1] = value.to(pool.dtype)

    def store_state(self, op: Op, value: torch.Tensor, r0, r1, c0, c1,
                    space: int | None = None) -> None:
        """Write a tile of the value at the run-time position. The tile is rows x cols
        of the value seen as [rows, last dim], or, with `space`, of a [rows, space] view
        of its elements in order (a matmul epilogue): each element goes where its flat
        index puts it in the value's shape. With `slot_dim`, each element at the position
        its own slot's index names."""
        state, val, index = op.inputs
        dim, slot_dim = op.attr("dim"), op.attr("slot_dim")
        size = op.type.shape[dim]
        buf = self.storage(op.name)
        pool = self.pools[buf.pool]
        cache = torch.as_strided(pool, state.shape, state.strides, buf.offset + state.offset)
        width = space or val.shape[-1]
        rows = torch.arange(r0, r1).reshape(-1, 1)
        flat = (rows * width + torch.arange(c0, c1).reshape(1, -1)).reshape(-1)
        coords = list(torch.unravel_index(flat, val.shape))
        positions = self.view(index).reshape(-1)
        pos = positions[coords[slot_dim]] if slot_dim is not None else positions[:1].expand_as(flat)
        kept = self.checked_index(op, pos, size) == pos   # outside the state: no write
        coords[dim] = pos
        cache[tuple(c[kept] for c in coords)] = value.reshape(-1)[kept].to(pool.dtype)

    def run(self, group_index: int, tile: tuple[int, int, int]) -> None:
        g = self.groups[group_index]
        tl = self.tilings[g.name]
        b, mi, ni = tile
        self.task = (group_index, tile)
        env: dict[str, torch.Tensor] = {}
        if g.kind == "row":
            r0, r1 = mi * tl.block_m, min(g.rows, (mi + 1) * tl.block_m)
            c0, c1 = ni * tl.block_n, min(g.cols, (ni + 1) * tl.block_n)
            for name in g.epilogue:
                op = self.ops[name]
                width = op.inputs[0].shape[-1] if op.kind in WALK_ROWS else op.type.cols
                env[name] = self.compute(op, env, r0, r1, 0, width)
            for name in g.outputs:
                v, cols = env[name], self.ops[name].type.cols
                if cols == 1 or self.ops[name].kind == "topk":   # all of each row's results
                    self.store(name, v, r0, r1, 0, cols)
                else:
                    self.store(name, v[:, c0:c1], r0, r1, c0, c1)
            return
        if g.kind == "attention":
            return self.run_attention(g, tl, tile)
        anchor = self.ops[g.anchor]
        m, n = anchor.type.shape[-2], anchor.type.shape[-1]
        r0, r1 = b * m + mi * tl.block_m, b * m + min(m, (mi + 1) * tl.block_m)
        c0, c1 = ni * tl.block_n, min(n, (ni + 1) * tl.block_n)
        env = self.matmul(g, b, r0, r1, c0, c1)
        for name in g.epilogue:
            env[name] = self.compute(self.ops[name], env, r0, r1, c0, c1)
        for name in g.outputs:
            self.store(name, env[name], r0, r1, c0, c1, space=n)

    def matmul(self, g: Group, b: int, r0, r1, c0, c1) -> dict[str, torch.Tensor]:
        """The anchor's product for rows [r0, r1) x cols [c0, c1) of batch b, its
        prologue recomputed as the kernel does."""
        anchor = self.ops[g.anchor]
        n, k = anchor.type.shape[-1], anchor.inputs[0].shape[-1]
        env: dict[str, torch.Tensor] = {}
        for name in g.prologue:
            op = self.ops[name]
            width = op.inputs[0].shape[-1] if op.kind in WALK_ROWS else op.type.cols
            env[name] = self.compute(op, env, r0, r1, 0, width)
        a_op, b_op = anchor.inputs[:2]
        a = env[a_op.value] if a_op.value in env else self.rows_of(a_op, r0, r1, 0, k)
        if self.ops[a_op.value].type.dtype in ("bfloat16", "float16"):
            a = a.to(_TORCH[self.ops[a_op.value].type.dtype]).float()
        if is_indexed_matmul(anchor):   # batch b's matrix: the pool's at its run-time id
            ids = self.view(anchor.inputs[2]).reshape(-1)
            expert = int(self.checked_index(anchor, ids[b:b + 1], b_op.shape[0])[0])
            bmat = self.view(b_op)[expert, :, c0:c1]
        else:
            bmat = self.view(b_op).reshape(math.prod(b_op.shape[:-2]), k, n)[b, :, c0:c1]
        return {g.anchor: a.double().matmul(bmat.double()).float()}

    def run_attention(self, g: Group, tl: GroupTiling, tile: tuple[int, int, int]) -> None:
        """Split-KV attention as templates/attention.py.j2 lays it out: a partial
        per chunk of keys (softmax within the chunk), a merge that rescales them."""
        b, mi, ni = tile
        parts = attention_parts(g, self.ops)
        m, n = self.ops[g.anchor].type.shape[-2:]
        pv = self.ops[parts.pv]
        dv = pv.type.cols
        chunks = attention_chunks(tl)
        r0, r1 = b * m + mi * tl.block_m, b * m + min(m, (mi + 1) * tl.block_m)
        scratch = [self.scratch(name) for name in partial_names(g.name)] if chunks > 1 else []
        if ni < chunks:
            c0, c1 = ni * tl.block_n, min(n, (ni + 1) * tl.block_n)
            if chunks > 1 and not self.any_key_visible(parts, r0, r1, c0, c1):
                out, mx, sm = scratch
                out[r0:r1, ni], mx[r0:r1, ni], sm[r0:r1, ni] = 0.0, float("-inf"), 0.0
                return
            env = self.matmul(g, b, r0, r1, c0, c1)
            for name in parts.score_ops + parts.softmax_ops:
                env[name] = self.compute(self.ops[name], env, r0, r1, c0, c1)
            values = self.view(pv.inputs[1]).reshape(-1, n, dv)[b, c0:c1]
            out = env[parts.p].double().matmul(values.double()).float()
            if chunks > 1:
                for dest, value in zip(scratch, (out, env[parts.row_max], env[parts.row_sum])):
                    dest[r0:r1, ni] = value.reshape(dest[r0:r1, ni].shape)
                return
        else:
            out_part, mx, sm = (t[r0:r1] for t in scratch)
            top = mx.amax(dim=1, keepdim=True)
            w = torch.where(sm > 0, torch.exp(mx - top) * sm, torch.zeros_like(sm))
            total = torch.where(w[..., None] > 0, w[..., None] * out_part, 0.0).sum(1)
            out = total / w.sum(1, keepdim=True)
        env = {parts.pv: out}
        for name in parts.out_ops:
            env[name] = self.compute(self.ops[name], env, r0, r1, 0, dv)
        for name in g.outputs:
            self.store(name, env[name], r0, r1, 0, dv)

    def any_key_visible(self, parts, r0, r1, c0, c1) -> bool:
        if not parts.masks:
            return True
        hidden = torch.zeros(r1 - r0, c1 - c0, dtype=torch.bool)
        for name, cond, hides_when_true in parts.masks:
            c = self.rows_of(self.ops[name].inputs[cond], r0, r1, c0, c1) != 0
            hidden |= c if hides_when_true else ~c
        return not bool(hidden.all())

    def scratch(self, name: str) -> torch.Tensor:
        """A float32 scratch buffer (attention partials), as a tensor of its shape."""
        buf = self.buffers[name]
        return self.pools[buf.pool][buf.offset:buf.offset + buf.type.numel].view(buf.type.shape)
