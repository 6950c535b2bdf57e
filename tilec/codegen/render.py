"""Render the persistent kernel: one task kind per distinct group body.

Groups whose bodies render to the same text and agree on which buffer bases are
aligned (the same layer repeated) share one opcode; what differs between them, the
addresses of their buffers, lives in one row of the args table per group.

The same function renders a kernel at compile time and again from a loaded engine's
manifest, so what it pastes into the source follows `codegen/safety.py`: pool names
as checked identifiers, free text (the model name, group labels) as string literals,
numbers as numbers; and the result is checked as a whole before it is returned.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import jinja2

from tilec.codegen.emit import emit_group
from tilec.codegen.group_emitter import pow2
from tilec.codegen.safety import (UnsafeKernelError, check_kernel_source, identifier, integer,
                                  text_literal)
from tilec.ir import abi
from tilec.ir.graph import FusedGraph
from tilec.ir.record import weight_pools
from tilec.ir.schedule import POOL_ALIGN as ALIGN, Pool
from tilec.ir.tasks import Buffer, GroupTiling

TEMPLATES = Path(__file__).parent / "templates"
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


@dataclass(frozen=True)
class Rendered:
    source: str
    opcodes: tuple[int, ...]             # per group (FusedGraph order)
    args: tuple[tuple[int, ...], ...]    # per group: pool element offsets, padded
    max_args: int
    kinds: tuple[str, ...]               # per opcode: a readable name

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()


def render(fused: FusedGraph, tilings: tuple[GroupTiling, ...], buffers: tuple[Buffer, ...],
           pools: tuple[Pool, ...], max_waits: int, workers: int, model: str,
           version: str) -> Rendered:
    """The kernel source for a planned schedule; UnsafeKernelError (a TilecError) when
    the inputs would put anything but kernel code into it."""
    for p in pools:
        if not p.well_named:
            raise UnsafeKernelError(f"pool {text_literal(p.name, 60)} of kind "
                                    f"{text_literal(p.kind, 20)} and dtype "
                                    f"{text_literal(p.dtype, 20)} is not a tilec pool")
    pool_args = [identifier(p.name, "pool") for p in pools]
    ops = fused.graph.by_name()
    placed = {b.name: b for b in buffers}
    tiling = {t.group: t for t in tilings}
    bodies: dict[str, int] = {}
    blocks = []
    opcodes, rows, kinds = [], [], []
    for g in fused.groups:
        code = emit_group(g, ops, tiling[g.name], placed)
        for key, value in code.consts.items():
            integer(value, f"group {text_literal(g.name, 60)}: {key}")
        body = _env.get_template(code.template).render(c=code).rstrip("\n")
        # Bases that are multiples of ALIGN elements are promised to the compiler as
        # such (memplan aligns every buffer), so loads from them can be 16-byte vectors;
        # groups share an opcode only if they agree on which bases are aligned.
        aligned = tuple(b % ALIGN == 0 for b in code.bases)
        key = f"{aligned}\n{body}"
        if key not in bodies:
            bodies[key] = len(blocks)
            label = g.label
            blocks.append({"opcode": len(blocks),
                           "comment": text_literal(f"{label} (first: {g.name})"),
                           "aligned": aligned, "align": ALIGN, "body": body})
            kinds.append(label)
        opcodes.append(bodies[key])
        rows.append(tuple(code.bases))
    max_args = max([len(r) for r in rows] + [1])
    args = tuple(r + (0,) * (max_args - len(r)) for r in rows)
    source = _env.get_template("kernel.py.j2").render(
        version=text_literal(version), model=text_literal(model), blocks=blocks,
        workers=integer(workers, "workers"), pools=pool_args,
        weight_pools=[identifier(p.name, "pool") for p in weight_pools(pools)],
        max_args=max_args, **_interface(integer(max_waits, "max_waits")))
    check_kernel_source(source, abi.KERNEL_NAME)
    return Rendered(source, tuple(opcodes), args, max_args, tuple(kinds))


def _interface(max_waits: int) -> dict:
    """What the kernel template takes from the kernel interface (ir/abi.py): its name,
    launch arguments, the record's width and fields, the error codes, the prefetch."""
    return dict(
        kernel_name=abi.KERNEL_NAME, launch_args=[name for name, _ in abi.LAUNCH_ARGS],
        constexprs=abi.LAUNCH_CONSTEXPRS, rec=abi.record_width(max_waits),
        max_waits=max_waits, wait_slots=pow2(max(1, max_waits)),
        at={"opcode": abi.OPCODE, "args_row": abi.ARGS_ROW, "tile": abi.TILE,
               "num_waits": abi.NUM_WAITS, "waits": abi.WAITS},
        hang=abi.HANG, index_error=abi.INDEX_ERROR,
        prefetch_at=abi.prefetch_offset(max_waits), prefetch_depth=abi.PREFETCH_DEPTH,
        prefetch_pieces=abi.PREFETCH_PIECES, prefetch_unit=abi.PREFETCH_UNIT,
        prefetch_piece=abi.PREFETCH_MAX_BYTES // abi.PREFETCH_PIECES)
