"""The IR as readable text: the stage dumps `tilec compile --dump-dir` writes beside the
JSON ones (`02_ir.txt`, `03_fused.txt`, `04_tasks.txt`, `05_schedule.txt`).

One line per op, group, task or scheduled task, with names, shapes, dtypes and
dependencies, in the spirit of inductor's `ir_pre_fusion.txt`: for reading and diffing,
not for parsing (the JSON dumps round-trip through `ir/serial.py`).

    %g3_norm_matmul: matmul anchor=%mm_1 rows=1 cols=128 out=[%mm_1]
      prologue %pow_1 = elementwise(%x) fn=pow  f32[1, 64]
"""
from __future__ import annotations

from collections import defaultdict

from tilec.ir.graph import FusedGraph, Graph, Op, Operand, TensorType, contiguous_strides
from tilec.ir.schedule import Schedule
from tilec.ir.tasks import Region, TaskGraph

DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int64": "i64",
          "int32": "i32", "bool": "b8"}


def type_text(t: TensorType) -> str:
    """`f32[4, 64]`."""
    return f"{DTYPES.get(t.dtype, t.dtype)}[{', '.join(map(str, t.shape))}]"


def operand_text(o: Operand) -> str:
    """`%x`, or `%x{shape=[4, 8] strides=[1, 4] offset=2}` for a strided view."""
    if o.strides == contiguous_strides(o.shape) and o.offset == 0:
        return f"%{o.value}"
    off = f" offset={o.offset}" if o.offset else ""
    return f"%{o.value}{{shape={list(o.shape)} strides={list(o.strides)}{off}}}"


def op_text(op: Op, source: bool = True) -> str:
    """`%name = kind(%a, %b) key=value ...  f32[4, 64]  # source line`."""
    attrs = "".join(f" {k}={_short(v)}" for k, v in op.attrs)
    source = f"  # {op.source}" if op.source and source else ""
    args = ", ".join(operand_text(o) for o in op.inputs)
    return f"%{op.name} = {op.kind}({args}){attrs}  {type_text(op.type)}{source}"


def graph_text(graph: Graph) -> str:
    """02_ir.txt: the op-level IR, one op a line, then the inputs and outputs."""
    lines = [f"inputs: {', '.join('%' + i for i in graph.inputs)}"]
    lines += [op_text(op) for op in graph.ops]
    lines += [f"output {name} = {operand_text(o)}" for name, o in graph.outputs]
    return "\n".join(lines) + "\n"


def fused_text(fused: FusedGraph) -> str:
    """03_fused.txt: each group (kind, anchor, space, the values it writes to buffers),
    then its members by part, one op a line (their source lines are in 02_ir.txt)."""
    ops = fused.graph.by_name()
    lines = [f"{len(fused.groups)} groups over {len(fused.graph.ops)} ops"]
    for g in fused.groups:
        anchor = f" anchor=%{g.anchor}" if g.anchor else ""
        outs = ", ".join("%" + v for v in g.outputs)
        lines.append(f"%{g.name}: {g.kind}{anchor} rows={g.rows} cols={g.cols} out=[{outs}]")
        parts = [("prologue", g.prologue), ("anchor", (g.anchor,) if g.anchor else ()),
                 ("epilogue", g.epilogue)]
        lines += [f"  {part:<8} {op_text(ops[m], source=False)}" for part, members in parts for m in members]
    return "\n".join(lines) + "\n"


def region_text(r: Region) -> str:
    """`%buf[0:4, 0:64]`."""
    return f"%{r.buffer}[{', '.join(f'{a}:{b}' for a, b in r.box)}]"


def tasks_text(tg: TaskGraph) -> str:
    """04_tasks.txt: buffers, tilings, then one task a line (group, tile, role, reads,
    writes, flops, bytes, the tasks it depends on), then the transfers."""
    device = f" (device {tg.device} of {tg.devices})" if tg.devices > 1 else ""
    lines = [f"{len(tg.tasks)} tasks, {len(tg.deps)} dependencies, "
             f"{len(tg.buffers)} buffers{device}", "", "buffers:"]
    lines += [f"  %{b.name}: {b.kind} {type_text(b.type)}" for b in tg.buffers]
    lines += ["", "tilings:"]
    lines += [f"  %{t.group}: block {t.block_m}x{t.block_n}x{t.block_k} grid {list(t.grid)}"
              for t in tg.tilings]
    after = defaultdict(list)
    for d in tg.deps:
        after[d.after].append(f"{d.kind}:t{d.before}")
    lines += ["", "tasks:"]
    for t in tg.tasks:
        role = f" role={tg.roles[t.id]}" if tg.roles else ""
        deps = f" after [{', '.join(after[t.id])}]" if after[t.id] else ""
        lines.append(f"  t{t.id} %{t.group} tile {list(t.tile)}{role} "
                     f"reads [{', '.join(map(region_text, t.reads))}] "
                     f"writes [{', '.join(map(region_text, t.writes))}] "
                     f"flops={t.flops} bytes={t.bytes}{deps}")
    if tg.transfers:
        lines += ["", "transfers:"]
        for x in tg.transfers:
            parts = "; ".join(f"device {p.src} -> {list(p.dsts)} {region_text(p.region)}"
                              for p in x.parts)
            lines.append(f"  #{x.seq} {parts}")
    return "\n".join(lines) + "\n"


def schedule_text(s: Schedule) -> str:
    """05_schedule.txt: pools and placed buffers, then each worker's queue, one task a
    line (predicted start and finish, the event it signals, the waits it needs)."""
    tg = s.taskgraph
    lines = [f"target {s.target.name}: {s.target.workers} workers, {len(tg.tasks)} tasks, "
             f"{len(s.events)} events", "", "pools:"]
    lines += [f"  {p.name}: {p.kind} {p.dtype} x {p.numel}" for p in s.pools]
    lines += ["", "buffers:"]
    lines += [f"  %{b.name}: {b.kind} {type_text(b.type)} at {b.pool}+{b.offset}"
              for b in s.buffers]
    for w, queue in enumerate(s.queues):
        lines += ["", f"worker {w}:"]
        for i in queue:
            t = tg.tasks[i] if i < len(tg.tasks) else None
            what = f"%{t.group} tile {list(t.tile)}" if t is not None else "transfer"
            signal = f" signal e{s.signal[i]}" if s.signal else ""
            waits = f" wait [{', '.join(f'e{x.event}>={x.count}' for x in s.waits[i])}]" \
                if s.waits and s.waits[i] else ""
            lines.append(f"  t{i} {what} {s.start_us[i]:.2f}-{s.finish_us[i]:.2f} us"
                         f"{signal}{waits}")
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
