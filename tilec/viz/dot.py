"""Graphviz DOT of an engine: the fused op graph or the scheduled task graph.

    ops level:   one node per op; compute ops inside `subgraph cluster_<group>` (one
                 cluster per fusion group, the anchor drawn bold); runtime inputs and
                 state (KV cache) as plain nodes outside; weights are left out.
    tasks level: one node per task, filled with its worker's colour; an edge per
                 dependency, solid when it crosses workers (a wait on an event),
                 dashed within a worker (queue order enforces it).

Render with `dot -Tsvg file.dot -o file.svg`.
"""
from __future__ import annotations

import json

from tilec.ir.graph import FusedGraph
from tilec.ir.schedule import Schedule

# Colour-blind friendly (Okabe-Ito), then a few more; workers cycle through them.
PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
           "#999999", "#8DD3C7", "#FFFFB3", "#BEBADA", "#FB8072")


def quote(text: str) -> str:
    """A DOT double-quoted string (JSON escaping is a valid subset)."""
    return json.dumps(str(text))


def worker_colour(w: int) -> str:
    return PALETTE[w % len(PALETTE)]


def ops_dot(fused: FusedGraph, name: str = "model") -> str:
    graph = fused.graph
    ops = graph.by_name()
    lines = [f"digraph {quote(name)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontsize=10];']
    shown: set[str] = set()
    for op in graph.ops:
        if op.kind in ("input", "state"):
            shape = "invhouse" if op.kind == "input" else "cylinder"
            lines.append(f"  {quote(op.name)} [label={quote(op.name + chr(10) + op.kind)}, "
                         f"shape={shape}, fillcolor=\"#eeeeee\"];")
            shown.add(op.name)
    for i, g in enumerate(fused.groups):
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f"    label={quote(f'{g.name} ({g.kind})')};")
        lines.append('    style="rounded"; color="#888888";')
        for member in g.members:
            op = ops[member]
            bold = ', penwidth=2, fillcolor="#ffe8b0"' if member == g.anchor else ""
            lines.append(f"    {quote(member)} [label={quote(member + chr(10) + op.kind)}{bold}];")
            shown.add(member)
        lines.append("  }")
    seen: set[tuple[str, str]] = set()
    for op in graph.ops:
        if op.name not in shown:
            continue
        for operand in op.inputs:
            edge = (operand.value, op.name)
            if operand.value in shown and edge not in seen:
                seen.add(edge)
                lines.append(f"  {quote(edge[0])} -> {quote(edge[1])};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def tasks_dot(schedule: Schedule, kinds: list[str], name: str = "model") -> str:
    """The tasks, and an edge per dependency in `schedule.taskgraph.deps`: a schedule
    loaded from an engine has none stored (see inspect.schedule_with_deps)."""
    tg = schedule.taskgraph
    where = schedule.worker_of()
    lines = [f"digraph {quote(name + ' tasks')} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontsize=10];']
    for w in range(schedule.workers):
        label = quote(f"worker {w} (compute)")
        lines.append(f"  {quote(f'worker {w}')} [shape=plaintext, style=filled, "
                     f"fillcolor={quote(worker_colour(w))}, label={label}];")
    for t in tg.tasks:
        w = where[t.id][0]
        label = f"{t.id}: {kinds[t.id]}\n{t.group} {tuple(t.tile)}"
        lines.append(f"  t{t.id} [label={quote(label)}, fillcolor={quote(worker_colour(w))}];")
    seen: set[tuple[int, int]] = set()
    for dep in tg.deps:
        edge = (dep.before, dep.after)
        if edge in seen:
            continue
        seen.add(edge)
        same = where[dep.before][0] == where[dep.after][0]
        style = ' [style=dashed, color="#999999"]' if same else ""
        lines.append(f"  t{dep.before} -> t{dep.after}{style};")
    lines.append("}")
    return "\n".join(lines) + "\n"
