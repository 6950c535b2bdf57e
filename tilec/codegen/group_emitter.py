"""The lines of one fused group's ops, shared by every task kind's emitter
(codegen/emit.py): loads of strided views, op expressions, last-dim reductions as
chunked phases, and stores.

Every group works on a block of BM rows of its [rows, cols] space: `rows` are flat row
indices, `cols` the current column chunk. Values are [BM, chunk] ("wide") or [BM, 1]
("narrow": reductions and per-row values). Loads read strided views through a
per-operand row offset, so layout ops cost nothing at run time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tilec.codegen.exprs import EXPRS, cast, downcast, literal, upcast
from tilec.codegen.safety import identifier
from tilec.codegen.topk import topk_phase
from tilec.ir.graph import FLOAT_DTYPES, Group, Op, Operand, index_checks
from tilec.ir.tasks import Buffer, GroupTiling


REDUCTIONS = ("reduce", "argmax", "topk")


@dataclass
class GroupCode:
    """What every task kind's template needs; each group kind has its own subclass
    (codegen/emit.py `KINDS`: kind -> code type, emitter; the code type names its
    template)."""

    kind: str
    comment: str
    consts: dict[str, int]
    preamble: list[str] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)    # reduction loops
    narrow: list[str] = field(default_factory=list)     # per-row values after phases
    main: list[str] = field(default_factory=list)       # body of the final (or K) loop
    bases: list[int] = field(default_factory=list)      # pool element offsets (args row)


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def row_offset(shape: tuple[int, ...], strides: tuple[int, ...], rows: str,
               shift: tuple[int, int] | None = None) -> str | None:
    """Offset of flat row `rows` of a view with leading `shape`/`strides`.
    `shift` = (dim, start) subtracts start from that dim's coordinate (concat)."""
    terms = []
    inner = 1
    for d in range(len(shape) - 1, -1, -1):
        size, stride = shape[d], strides[d]
        if size > 1 and stride != 0:
            coord = rows if inner == 1 else f"({rows} // {inner})"
            if d > 0 and math.prod(shape[:d]) > 1:
                coord = f"({coord} % {size})"
            if shift and shift[0] == d and shift[1]:
                coord = f"({coord} - {shift[1]})"
            terms.append(coord if stride == 1 else f"{coord} * {stride}")
        inner *= size
    return f"({' + '.join(reversed(terms))})" if terms else None


class GroupEmitter:
    """The lines of one group's ops, written into `code` (the group kind's code type,
    which the kind's emitter in codegen/emit.py then completes)."""

    def __init__(self, group: Group, ops: dict[str, Op], tiling: GroupTiling,
                 buffers: dict[str, Buffer], code: GroupCode):
        self.g = group
        self.ops = ops
        self.tiling = tiling
        self.buffers = buffers
        self.members = list(group.members)
        self.var = {name: f"v{i}" for i, name in enumerate(self.members)}
        self.code = code
        self.base_of: dict[tuple, str] = {}
        self.leaf_vars: dict[tuple, str] = {}
        self.nleaf = 0

    # ---- buffers and leaves ------------------------------------------------------------
    def storage(self, value: str) -> Buffer:
        op = self.ops[value]
        if op.kind == "state_update":
            return self.storage(op.inputs[0].value)
        return self.buffers[value]

    def pointer(self, value: str, offset: int = 0) -> str:
        """`pool + baseJ`: the element address of `value` plus a view offset."""
        return self.buffer_pointer(self.storage(value), offset)

    def buffer_pointer(self, buf: Buffer, offset: int = 0) -> str:
        key = (buf.name, offset)
        if key not in self.base_of:
            self.base_of[key] = f"base{len(self.code.bases)}"
            self.code.bases.append(buf.offset + offset)
        return f"{identifier(buf.pool, 'pool')} + {self.base_of[key]}"

    def fresh(self, prefix: str) -> str:
        self.nleaf += 1
        return f"{prefix}{self.nleaf}"

    def dtype(self, value: str) -> str:
        return self.ops[value].type.dtype

    def upcast(self, expr: str, dtype: str) -> str:
        return upcast(expr, dtype)

    def row_offset_var(self, operand: Operand, shift=None) -> str | None:
        key = ("ro", operand.value, operand.shape[:-1], operand.strides[:-1], shift)
        if key not in self.leaf_vars:
            expr = row_offset(operand.shape[:-1], operand.strides[:-1], "rows", shift)
            if expr is None:
                self.leaf_vars[key] = None
            else:
                name = self.fresh("ro")
                self.code.preamble.append(f"{name} = {expr}")
                self.leaf_vars[key] = name
        return self.leaf_vars[key]

    def narrow_load(self, operand: Operand) -> str:
        """A [BM, 1] (or scalar) load of a per-row value, hoisted to the preamble."""
        key = ("nl", operand)
        if key not in self.leaf_vars:
            ptr = self.pointer(operand.value, operand.offset)
            ro = self.row_offset_var(operand) if operand.shape else None
            name = self.fresh("ld")
            dt = self.dtype(operand.value)
            if ro is None:
                self.code.preamble.append(f"{name} = {self.upcast(f'tl.load({ptr})', dt)}")
            else:
                self.code.preamble.append(
                    f"{name} = {self.upcast(f'tl.load({ptr} + {ro}[:, None], mask=rmask[:, None], other=0)', dt)}")
            self.leaf_vars[key] = name
        return self.leaf_vars[key]

    def load(self, operand: Operand, narrow: bool) -> str:
        """Expression for a non-member operand at (rows, cols)."""
        if not operand.shape or narrow or operand.shape[-1] == 1 or operand.strides[-1] == 0:
            return self.narrow_load(operand)
        ptr = self.pointer(operand.value, operand.offset)
        ro = self.row_offset_var(operand)
        s = operand.strides[-1]
        col = "cols[None, :]" if s == 1 else f"cols[None, :] * {s}"
        dt = self.dtype(operand.value)
        if ro is None:
            return self.upcast(f"tl.load({ptr} + {col}, mask=cmask[None, :], other=0)", dt)
        return self.upcast(f"tl.load({ptr} + {ro}[:, None] + {col}, mask=mask, other=0)", dt)

    # ---- ops -----------------------------------------------------------------------
    def is_narrow(self, name: str) -> bool:
        op = self.ops[name]
        return op.kind in REDUCTIONS or op.type.cols == 1

    def arg(self, op: Op, i: int) -> str:
        operand = op.inputs[i]
        if operand.value in self.var:  # a member: aligned, already in registers
            return self.var[operand.value]
        return self.load(operand, narrow=self.is_narrow(op.name))

    def op_expr(self, name: str) -> str:
        op = self.ops[name]
        if op.kind == "elementwise":
            fn, enc = op.attr("fn"), op.attr("args")
            integer = op.type.dtype not in FLOAT_DTYPES
            args = [self.arg(op, a[1]) if isinstance(a, tuple) else literal(a, integer)
                    for a in enc]
            if not op.inputs:   # a fill: its numbers as blocks of the values' shape
                where = "rmask[:, None]" if self.is_narrow(name) else "mask"
                args = [f"tl.where({where}, {a}, {a})" for a in args]
            if fn == "cast":
                return cast(args[0], self.dtype(op.inputs[0].value), op.type.dtype)
            if fn == "pow":
                return EXPRS["pow"](args[0], enc[1])
            return EXPRS[fn](*args)  # math stays in float32; the store rounds
        if op.kind == "state_update":  # the value it stores; `stores` writes it
            return self.arg(op, 1)
        if op.kind == "gather":
            return self.gather(op)
        if op.kind == "concat":
            return self.concat(op)
        raise NotImplementedError(op.kind)

    def gather(self, op: Op) -> str:
        table, index = op.inputs
        key = ("gi", index)
        if key not in self.leaf_vars:
            name = self.fresh("gi")
            ptr = self.pointer(index.value, index.offset)
            ro = row_offset(index.shape, index.strides, "rows") or "rows * 0"
            rows = table.shape[0]
            self.code.preamble.append(
                f"{name} = tl.load({ptr} + {ro}, mask=rmask, other=0).to(tl.int64)")
            self.check_index(op, name, "rmask", rows)
            self.leaf_vars[key] = name
        gi = self.leaf_vars[key]
        ptr = self.pointer(table.value, table.offset)
        s0, s1 = table.strides
        if self.is_narrow(op.name):   # one value per row (a table of width 1): no columns
            return self.upcast(f"tl.load({ptr} + {gi}[:, None] * {s0}, mask=rmask[:, None], "
                               f"other=0)", self.dtype(table.value))
        col = "cols[None, :]" if s1 == 1 else f"cols[None, :] * {s1}"
        return self.upcast(f"tl.load({ptr} + {gi}[:, None] * {s0} + {col}, mask=mask, other=0)",
                           self.dtype(table.value))

    def check_index(self, op: Op, index: str, valid: str, bound: int,
                    replace: bool = True) -> None:
        """Preamble lines that check the run-time indices `index` (lanes where `valid`)
        against [0, bound): the first out of range is recorded in the error buffer for
        the host (`index_error` in kernel.py.j2). With `replace`, an index out of range
        then becomes 0, so a read never leaves its table (a write masks them instead)."""
        check = index_checks(self.g, self.ops).index(op.name)
        bad = f"{index}_bad"
        self.code.preamble += [
            f"{bad} = {valid} & (({index} < 0) | ({index} >= {bound}))",
            f"index_error(error, arow, t0, t1, t2, {check}, {index}, {bad}, {bound})",
        ]
        if replace:
            self.code.preamble.append(f"{index} = tl.where({bad}, 0, {index})")

    def concat(self, op: Op) -> str:
        dim = op.attr("dim")
        nd = len(op.type.shape)
        expr = "0.0"
        start = 0
        for piece in op.inputs:
            stop = start + piece.shape[dim]
            # pieces read in the concat's index space: strides of the piece, shape of the out
            if dim == nd - 1:
                view = Operand(piece.value, op.type.shape, piece.strides,
                               piece.offset - start * piece.strides[dim])
                value = self.load(view, narrow=False)
                cond = f"(cols[None, :] >= {start}) & (cols[None, :] < {stop})"
            else:
                ro = row_offset(op.type.shape[:-1], piece.strides[:-1], "rows", (dim, start))
                name = self.fresh("ro")
                self.code.preamble.append(f"{name} = {ro or 'rows * 0'}")
                coord = row_offset(op.type.shape[:-1],
                                   tuple(1 if d == dim else 0 for d in range(nd - 1)), "rows")
                valid = self.fresh("rv")
                self.code.preamble.append(f"{valid} = ({coord} >= {start}) & ({coord} < {stop})")
                ptr = self.pointer(piece.value, piece.offset)
                s = piece.strides[-1]
                col = "cols[None, :]" if s == 1 else f"cols[None, :] * {s}"
                value = self.upcast(
                    f"tl.load({ptr} + {name}[:, None] + {col}, mask=mask & {valid}[:, None], other=0)",
                    self.dtype(piece.value))
                cond = f"{valid}[:, None]"
            expr = f"tl.where({cond}, {value}, {expr})"
            start = stop
        return expr

    # ---- sections ------------------------------------------------------------------
    def needed(self, targets, avail: set[str], scope: list[str]) -> list[str]:
        """Members in `scope` (order kept) needed to compute `targets` given `avail`."""
        need: set[str] = set()
        stack = [t for t in targets if t in self.var and t not in avail]
        while stack:
            n = stack.pop()
            if n in need or n in avail or n == self.g.anchor:
                continue
            need.add(n)
            for operand in self.ops[n].inputs:
                if operand.value in self.var and operand.value not in avail:
                    stack.append(operand.value)
        return [n for n in scope if n in need]

    def assign(self, name: str) -> str:
        return f"{self.var[name]} = {self.op_expr(name)}"

    def reduce_lines(self, name: str, col0: str) -> tuple[list[str], list[str], str]:
        """(init, update, finish) lines of a last-dim reduction; `col0` is the column
        of the chunk's first element."""
        op = self.ops[name]
        src = op.inputs[0]
        x = self.var[src.value] if src.value in self.var else self.load(src, narrow=False)
        acc = f"acc_{self.var[name]}"
        bm = self.tiling.block_m
        if op.kind == "argmax":
            # first index of the maximum, as torch.argmax: strict > keeps earlier chunks
            idx = f"idx_{self.var[name]}"
            xm = f"tl.where(mask, {x}, -float(\"inf\"))"
            init = [f"{acc} = tl.full([{bm}], -float(\"inf\"), tl.float32)",
                    f"{idx} = tl.zeros([{bm}], dtype=tl.int64)"]
            upd = [f"chunk_max = tl.max({xm}, axis=1)",
                   f"chunk_idx = tl.argmax({xm}, axis=1).to(tl.int64) + {col0}",
                   f"{idx} = tl.where(chunk_max > {acc}, chunk_idx, {idx})",
                   f"{acc} = tl.maximum({acc}, chunk_max)"]
            return init, upd, f"{self.var[name]} = {idx}[:, None]"
        scale = op.attr("scale", 1.0)
        tail = f" * {literal(scale)}" if scale != 1.0 else ""
        if op.attr("fn") == "max":
            init = f"{acc} = tl.full([{self.tiling.block_m}], -float(\"inf\"), tl.float32)"
            upd = f"{acc} = tl.maximum({acc}, tl.max(tl.where(mask, {x}, -float(\"inf\")), axis=1))"
        else:
            init = f"{acc} = tl.zeros([{self.tiling.block_m}], dtype=tl.float32)"
            upd = f"{acc} = {acc} + tl.sum(tl.where(mask, {x}, 0.0), axis=1)"
        finish = f"{self.var[name]} = ({acc}{tail})[:, None]"
        return [init], [upd], finish

    def row_phases(self, scope: list[str], avail: set[str]) -> None:
        """Reductions over the whole row, each one chunked loop, in dependency order;
        per-row values in between are computed once, outside the loops."""
        def ready_narrow():
            changed = True
            while changed:
                changed = False
                for n in scope:
                    if n in avail or not self.is_narrow(n) or self.ops[n].kind in REDUCTIONS:
                        continue
                    deps = [o.value for o in self.ops[n].inputs if o.value in self.var]
                    if all(d in avail for d in deps):
                        self.code.narrow.append(self.assign(n))
                        avail.add(n)
                        changed = True
        for n in scope:
            if self.ops[n].kind not in REDUCTIONS or n in avail:
                continue
            ready_narrow()
            src = self.ops[n].inputs[0].value
            body = [self.assign(m) for m in self.needed([src], avail, scope)]
            if self.ops[n].kind == "topk":
                phase, done = topk_phase(self, n, body)
            else:
                init, upd, finish = self.reduce_lines(n, col0="c0")
                phase = {"init": init, "body": body + upd, "finish": finish, "rounds": 0}
                done = [n]
            self.code.phases.append({**phase, "pre": list(self.code.narrow)})
            self.code.narrow = []
            avail.update(done)
        ready_narrow()

    def batch_pointer(self, operand: Operand, name: str) -> str:
        """Address of batch `t0` of a matmul operand [B.., rows, cols]; the batch offset
        is computed once, in the preamble, as `name`."""
        ptr = self.pointer(operand.value, operand.offset)
        off = row_offset(operand.shape[:-2], operand.strides[:-2], "t0")
        if off:
            self.code.preamble.append(f"{name} = {off}")
            ptr += f" + {name}"
        return ptr

    def pool_pointer(self, op: Op, name: str) -> str:
        """Address of the matrix of an indexed matmul's pool that batch `t0` reads: its
        id is loaded (one per lane of the block's rows, all the same), checked against
        the pool's size (an id out of range reads expert 0 and is reported), and
        becomes the batch offset `name`."""
        _, pool, ids = op.inputs
        ptr = self.pointer(ids.value, ids.offset)
        off = row_offset(ids.shape, ids.strides, "t0") or "0"
        eid = self.fresh("eid")
        self.code.preamble.append(
            f"{eid} = tl.load({ptr} + {off} + rows * 0, mask=rmask, other=0).to(tl.int64)")
        self.check_index(op, eid, "rmask", pool.shape[0])
        self.code.preamble.append(f"{name} = tl.max({eid}, axis=0) * {pool.strides[0]}")
        return f"{self.pointer(pool.value, pool.offset)} + {name}"

    def split_outputs(self, outputs) -> tuple[list[str], list[str]]:
        """(wide, narrow) outputs of the group, the matmul anchor and the top-k results
        (stored a round at a time) excluded."""
        outs = [n for n in outputs if n != self.g.anchor and self.ops[n].kind != "topk"]
        return ([n for n in outs if not self.is_narrow(n)], [n for n in outs if self.is_narrow(n)])

    def final_stores(self, outputs) -> list[str]:
        """Stores of a matmul-like group's outputs, over the current (rows, cols)."""
        wide, narrow = self.split_outputs(outputs)
        if self.g.anchor in outputs:
            wide.append(self.g.anchor)
        return self.stores(wide, narrow=False) + self.stores(narrow, narrow=True)

    def state_store(self, op: Op) -> list[str]:
        return _state_store_lines(self, op)

    def stores(self, names, narrow: bool) -> list[str]:
        lines = []
        for n in names:
            op = self.ops[n]
            if op.kind == "state_update":
                lines += self.state_store(op)
                continue
            ptr = self.pointer(n)
            width = op.type.cols
            val = downcast(self.var[n], op.type.dtype)
            if narrow:
                off = "rows[:, None]" if width == 1 else f"rows[:, None] * {width}"
                lines.append(f"tl.store({ptr} + {off}, {val}, mask=rmask[:, None])")
            else:
                lines.append(f"tl.store({ptr} + rows[:, None] * {width} + cols[None, :], "
                             f"{val}, mask=mask)")
        return lines



def _state_store_lines(e: "GroupEmitter", op: Op) -> list[str]:
    state, value, index = op.inputs
    dim = op.attr("dim")
    size = op.type.shape[dim]
    pos = e.fresh("pos")
    index_ptr = e.pointer(index.value, index.offset)
    if op.attr("slot_dim") is None:
        # the position as a per-row vector: the interpreter rejects scalar & block masks
        e.code.preamble.append(f"{pos} = rows.to(tl.int64) * 0 + tl.load({index_ptr}).to(tl.int64)")
    else:   # each row's own slot's position
        slot = f"(rows // {_rows_per_slot(e, value)})"
        step = index.strides[0]
        e.code.preamble.append(
            f"{pos} = tl.load({index_ptr} + {slot if step == 1 else f'{slot} * {step}'}, "
            f"mask=rmask, other=0).to(tl.int64)")
    e.check_index(op, pos, "rmask", size, replace=False)
    ptr = e.pointer(state.value, state.offset)
    valid = f"mask & (({pos} >= 0) & ({pos} < {size}))[:, None]"
    stored = downcast(e.var[op.name], op.type.dtype)
    if e.g.kind == "matmul":
        # The tile is in the product's [rows, N] space; the value views those elements
        # in order in its own shape (heads split out): unravel each element's flat index.
        flat = f"(rows[:, None] * {e.g.cols} + cols[None, :])"
        terms, inner = [f"{pos}[:, None] * {state.strides[dim]}"], 1
        for d in range(len(value.shape) - 1, -1, -1):
            size_d = value.shape[d]
            if d != dim and size_d > 1:
                coord = f"({flat} // {inner})" if inner > 1 else flat
                if inner * size_d < e.g.rows * e.g.cols:
                    coord = f"({coord} % {size_d})"
                terms.append(f"{coord} * {state.strides[d]}")
            inner *= size_d
        return [f"tl.store({ptr} + {' + '.join(terms)}, {stored}, mask={valid})"]
    ro = row_offset(value.shape[:-1], state.strides[:-1], "rows")
    s_last = state.strides[-1]
    col = "cols[None, :]" if s_last == 1 else f"cols[None, :] * {s_last}"
    rows = f"{ro}[:, None] + " if ro else ""
    # a position outside the state writes nothing (and is reported: check_index)
    return [f"tl.store({ptr} + {rows}{pos}[:, None] * {state.strides[dim]} + {col}, "
            f"{stored}, mask={valid})"]


def _rows_per_slot(e: "GroupEmitter", value: Operand) -> int:
    """How many rows of the group's [rows, cols] space one slot of a per-slot state
    update's value (slot dim 0) spans: in a matmul epilogue the product's rows (fuse
    lets one join only where a slot is whole rows), else the value's rows."""
    per_slot = math.prod(value.shape[1:])
    if e.g.kind == "matmul":
        return per_slot // e.g.cols
    return per_slot // value.shape[-1]
