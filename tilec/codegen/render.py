"""Render the persistent kernel: one task kind per distinct group body.

Groups whose bodies render to the same text and agree on which buffer bases are
aligned (the same layer repeated) share one opcode; what differs between them, the
addresses of their buffers, lives in one row of the args table per group.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import jinja2

from tilec.codegen.emit import emit_group, pow2
from tilec.ir.graph import FusedGraph
from tilec.ir.record import (PREFETCH_DEPTH, PREFETCH_MAX_BYTES, prefetch_offset, record_width,
                             weight_pools)
from tilec.ir.schedule import POOL_ALIGN as ALIGN, Pool
from tilec.ir.tasks import Buffer, GroupTiling

KERNEL_NAME = "tilec_engine"
# Pieces a task's weight prefetch is asked for in (each up to PREFETCH_MAX_BYTES / this,
# 16 KB): the prefetch instruction takes its operands from uniform registers, so ptxas
# issues one per distinct piece in a loop over the worker's threads
PREFETCH_PIECES = 8
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
    ops = fused.graph.by_name()
    placed = {b.name: b for b in buffers}
    tiling = {t.group: t for t in tilings}
    bodies: dict[str, int] = {}
    blocks = []
    opcodes, rows, kinds = [], [], []
    for g in fused.groups:
        code = emit_group(g, ops, tiling[g.name], placed)
        body = _env.get_template(f"{g.kind}.py.j2").render(c=code).rstrip("\n")
        # Bases that are multiples of ALIGN elements are promised to the compiler as
        # such (memplan aligns every buffer), so loads from them can be 16-byte vectors;
        # groups share an opcode only if they agree on which bases are aligned.
        aligned = tuple(b % ALIGN == 0 for b in code.bases)
        key = f"{aligned}\n{body}"
        if key not in bodies:
            bodies[key] = len(blocks)
            label = g.label
            blocks.append({"opcode": len(blocks), "comment": f"{label} (first: {g.name})",
                           "aligned": aligned, "align": ALIGN, "body": body})
            kinds.append(label)
        opcodes.append(bodies[key])
        rows.append(tuple(code.bases))
    max_args = max([len(r) for r in rows] + [1])
    args = tuple(r + (0,) * (max_args - len(r)) for r in rows)
    source = _env.get_template("kernel.py.j2").render(
        version=version, model=model, blocks=blocks, workers=workers,
        rec=record_width(max_waits), max_waits=max_waits, max_args=max_args,
        wait_slots=pow2(max(1, max_waits)), prefetch_at=prefetch_offset(max_waits),
        prefetch_depth=PREFETCH_DEPTH,
        prefetch_pieces=PREFETCH_PIECES, prefetch_piece=PREFETCH_MAX_BYTES // PREFETCH_PIECES,
        kernel_name=KERNEL_NAME, pools=[p.name for p in pools],
        weight_pools=[p.name for p in weight_pools(pools)],
    )
    return Rendered(source, tuple(opcodes), args, max_args, tuple(kinds))
