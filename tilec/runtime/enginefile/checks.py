"""The checks an engine file passes before anything of it is used (read.load runs them):
every index the kernel will follow, every view of a buffer, the stored GPU binary, and
the kernel source against what this tilec renders from the manifest. Each returns None
or the problem, in one line."""
from __future__ import annotations

import hashlib
import json

import torch

from tilec.ir.abi import (FIXED_FIELDS, KERNEL_NAME, NO_PREFETCH, PREFETCH_UNIT, SIGNAL,
                          TRANSFER_OPCODE, record_prefetch, record_waits)
from tilec.ir.graph import DTYPE_BYTES
from tilec.ir.record import weight_pools
from tilec.ir.tasks import TRANSFER
from tilec.runtime.enginefile.format import (AOT_CUBIN, POOL_KINDS, TORCH_DTYPES, EngineFile,
                                             Manifest, clip, first_line)
from tilec.version import __version__

ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190                # ELF e_machine of NVIDIA cubins


def check_aot(engine: EngineFile) -> str | None:
    """The stored binary belongs to this engine: a GPU target's, compiled for that
    architecture from this kernel source, and a CUDA ELF file defining the kernel."""
    aot, target = engine.aot, engine.manifest.schedule.target
    if aot is None:
        return None
    if engine.manifest.plan:
        return "a plan (no weights, never run) carries a GPU binary"
    if target.backend != "cuda":
        return f"an engine for the {target.name} target carries a GPU binary"
    if aot.arch != target.arch:
        return f"the GPU binary is for sm_{aot.arch}, the target {target.name} is sm_{target.arch}"
    if aot.kernel_sha256 != hashlib.sha256(engine.kernel_source.encode()).hexdigest():
        return "the GPU binary was compiled from another kernel source"
    md = json.loads(aot.triton_metadata)
    want = {"target": {"backend": "cuda", "arch": aot.arch, "warp_size": 32},
            "name": KERNEL_NAME, "num_warps": aot.num_warps, "shared": aot.shared,
            "triton_version": aot.triton_version}
    differ = [k for k, v in want.items() if md.get(k) != v]
    if differ:
        return f"the GPU binary's Triton metadata disagrees on {', '.join(differ)}"
    head = aot.cubin[:20]
    if head[:4] != ELF_MAGIC or len(head) < 20 or int.from_bytes(head[18:20], "little") != EM_CUDA:
        return "the GPU binary is not a CUDA ELF file"
    if KERNEL_NAME.encode() + b"\0" not in aot.cubin:
        return f"the GPU binary does not define the kernel {KERNEL_NAME}"
    return None


def render_manifest(m: Manifest):
    """The kernel (codegen.render.Rendered) this tilec renders from a manifest."""
    from tilec.codegen.render import render

    sched = m.schedule
    return render(sched.taskgraph.fused, sched.taskgraph.tilings, sched.buffers, sched.pools,
                  m.max_waits, sched.target.workers, m.model, __version__)


def check_kernel(engine: EngineFile, accept: str = "checked") -> str | None:
    """Render the kernel from the manifest and compare it, the opcodes and the args table
    with what the file stores; sets `engine.kernel_checked` and `code_trusted`. `accept`:
    "checked" refuses a differing kernel, "read" accepts it unchecked (it will not run),
    "trust" accepts it to run as it is (--trust-engine-code)."""
    m = engine.manifest
    try:
        rendered = render_manifest(m)
    except Exception as e:  # a manifest that parses but describes nothing renderable
        return f"manifest does not describe a renderable kernel ({first_line(e)})"
    if rendered.opcodes != m.opcodes or rendered.kinds != m.kinds:
        return "opcode table differs from what this tilec renders from the manifest"
    if rendered.args != tuple(tuple(r) for r in engine.tensors["args"].tolist()):
        return "args table differs from what this tilec renders from the manifest"
    engine.kernel_checked = rendered.source == engine.kernel_source
    engine.code_trusted = accept == "trust"
    if not engine.kernel_checked and accept == "checked":
        return ("stored kernel source differs from what this tilec renders from the manifest "
                "(written by another tilec version, or edited); refusing to run it "
                "(--trust-engine-code runs it anyway)")
    return None


def check_tables(engine: EngineFile) -> str | None:
    """Every index the kernel will follow, checked against the manifest."""
    m, t = engine.manifest, engine.tensors
    sched = m.schedule
    groups = sched.taskgraph.fused.groups
    tasks = sched.taskgraph.tasks
    width = engine.record_width
    need = {"tasks": (torch.int32, 2), "task_ids": (torch.int32, 1),
            "queue_start": (torch.int32, 1), "args": (torch.int64, 2)}
    for name, (dtype, ndim) in need.items():
        if name not in t or t[name].dtype != dtype or t[name].dim() != ndim:
            return f"tensor {name!r} missing or of the wrong type"
    table, ids, starts, args = t["tasks"], t["task_ids"], t["queue_start"], t["args"]
    if table.shape != (len(tasks), width) or ids.shape != (len(tasks),):
        return f"task table has shape {tuple(table.shape)}, expected {(len(tasks), width)}"
    if args.shape != (len(groups), m.max_args):
        return f"args table has shape {tuple(args.shape)}, expected {(len(groups), m.max_args)}"
    if len(m.opcodes) != len(groups) or any(not 0 <= o < len(m.kinds) for o in m.opcodes):
        return "opcode list does not match the groups"
    s = starts.tolist()
    if len(s) != sched.target.workers + 1 or s[0] != 0 or s[-1] != len(tasks) or \
            any(b < a for a, b in zip(s, s[1:])):
        return "queue_start is not a monotone split of the task table"
    if sorted(ids.tolist()) != list(range(len(tasks))):
        return "task_ids is not a permutation of the tasks"
    return _records_problem(m, table.tolist(), ids.tolist(), s) or \
        _pools_problem(sched, t, m.plan) or _args_problem(sched, args)


def _records_problem(m: Manifest, table: list[list[int]], ids: list[int],
                     starts: list[int]) -> str | None:
    """Each task record (ir/abi.py) against its task: group, opcode, tile, waits,
    signal, prefetch; transfers on the comm worker only, kernel tasks off it."""
    sched = m.schedule
    groups = sched.taskgraph.fused.groups
    tasks = sched.taskgraph.tasks
    n_events = len(sched.events)
    tilings = {tl.group: tl for tl in sched.taskgraph.tilings}
    comm = sched.target.comm_worker()
    host_rows = range(starts[comm], starts[comm + 1]) if comm is not None and \
        comm < len(starts) - 1 else range(0)
    transfers = len(sched.taskgraph.transfers)
    # a prefetch may name any whole unit inside a weight pool, no more
    prefetch_units = [p.numel * DTYPE_BYTES.get(p.dtype, 0) // PREFETCH_UNIT
                      for p in weight_pools(sched.pools)]
    for row, (rec, tid) in enumerate(zip(table, ids)):
        op, g, t0, t1, t2, nw = rec[:FIXED_FIELDS]
        task = tasks[tid]
        if (row in host_rows) != (task.group == TRANSFER):
            return f"task record {row}: a transfer off the comm worker or a kernel task on it"
        if task.group == TRANSFER:   # the host runs it: its sequence number must exist
            if (op, g) != (TRANSFER_OPCODE,) * 2 or (t0, t1, t2) != task.tile or \
                    not 0 <= t0 < transfers or (t1, t2) != (0, 0):
                return f"task record {row}: transfer record does not match task {tid}"
        elif not 0 <= g < len(groups) or op != m.opcodes[g]:
            return f"task record {row}: group/opcode out of range"
        elif task.group != groups[g].name or (t0, t1, t2) != task.tile or not all(
                0 <= c < n for c, n in zip((t0, t1, t2), tilings[groups[g].name].grid
                                           if groups[g].name in tilings else (0, 0, 0))):
            return f"task record {row}: tile {(t0, t1, t2)} does not match task {tid}"
        if not 0 <= nw <= m.max_waits:
            return f"task record {row}: {nw} waits (at most {m.max_waits})"
        for ev, cnt in record_waits(rec):
            if not 0 <= ev < n_events or cnt < 1 or cnt > sched.events[ev].signals:
                return f"task record {row}: wait on event {ev} x{cnt} out of range"
        if not 0 <= rec[SIGNAL] < n_events:
            return f"task record {row}: signals event {rec[SIGNAL]} out of range"
        slot, first, units = record_prefetch(rec, m.max_waits)
        if (slot, first, units) != NO_PREFETCH and not (
                0 <= slot < len(prefetch_units) and first >= 0 and
                0 < units and first + units <= prefetch_units[slot]):
            return f"task record {row}: weight prefetch {(slot, first, units)} out of range"
    return None


def _pools_problem(sched, t: dict[str, torch.Tensor], plan: bool) -> str | None:
    """Pools and buffers: unique names, known kinds and dtypes, every buffer inside its
    pool, every weight and state pool stored with its size; in a plan, none stored."""
    pools = {p.name: p for p in sched.pools}
    if len(pools) != len(sched.pools) or len({b.name for b in sched.buffers}) != len(sched.buffers):
        return "pool or buffer names are not unique"
    for p in sched.pools:
        if p.kind not in POOL_KINDS or p.dtype not in TORCH_DTYPES or p.numel < 1:
            return f"pool {p.name} has kind {clip(p.kind)}, dtype {clip(p.dtype)}, size {p.numel}"
    for b in sched.buffers:
        p = pools.get(b.pool)
        if any(n < 0 for n in b.type.shape):
            return f"buffer {b.name} has shape {clip(list(b.type.shape))}"
        problem = _shard_problem(b)
        if problem:
            return problem
        held = not b.stored or b.stored[0] != b.stored[1]   # (see _unheld_problem)
        if p is None or b.offset < 0 or (held and b.offset + b.extent() > p.numel):
            return f"buffer {b.name} lies outside its pool"
        if b.type.dtype != p.dtype:
            return f"buffer {b.name} ({clip(b.type.dtype)}) is in pool {p.name} of {p.dtype}"
        if b.stored and (len(b.stored) != 2 or b.kind not in ("weight", "state") or
                         not 0 <= b.stored[0] <= b.stored[1] <= b.extent()):
            return f"buffer {b.name} stores a malformed part {clip(list(b.stored))}"
    problem = _unheld_problem(sched)
    if problem:
        return problem
    if plan:   # sizes without data: no pool may be stored (nor anything to run)
        stored = sorted(k for k in t if k.startswith("pool.") or k == AOT_CUBIN)
        if stored:
            return f"a plan (no weights) stores {clip(stored[0])}"
        return None
    for p in sched.pools:
        if p.kind in ("weight", "state"):
            tensor = t.get(f"pool.{p.name}")
            if tensor is None or tensor.dtype != TORCH_DTYPES.get(p.dtype) or \
                    tuple(tensor.shape) != (p.numel,):
                return f"pool {p.name} missing or of the wrong size"
    return None


def _shard_problem(b) -> str | None:
    """A weight's shard (Buffer.shard, passes/shard.py) is a non-empty box inside the
    buffer, and the part stored is exactly that box under the shard's strides: so the
    strides every address of the buffer is formed with, and the buffer's extent in its
    pool (checked next), follow from checked numbers."""
    if not b.shard:
        return None
    box = b.shard
    if b.kind != "weight" or len(box) != len(b.type.shape) or \
            any(len(iv) != 2 or not 0 <= iv[0] < iv[1] <= n for iv, n in zip(box, b.type.shape)):
        return f"buffer {b.name} has a malformed shard {clip([list(iv) for iv in box])}"
    first = sum(a * s for (a, _), s in zip(box, b.layout_strides()))
    numel = 1
    for a, z in box:
        numel *= z - a
    if tuple(b.stored) != (first, first + numel):
        return (f"buffer {b.name} stores {clip(list(b.stored))}, not its shard "
                f"{clip([list(iv) for iv in box])}")
    return None


def _unheld_problem(sched) -> str | None:
    """A device of a multi-device engine holds none of a buffer no task of its touches
    (Buffer.stored (0, 0)), and that buffer need not lie inside its pool (memplan). So
    no task here may run a group whose ops read or write such a buffer: the kernel's
    code for a group addresses every buffer its ops name, whatever the task's regions."""
    unheld = {b.name for b in sched.buffers
              if b.stored and len(b.stored) == 2 and b.stored[0] == b.stored[1]}
    if not unheld:
        return None
    ops = sched.taskgraph.fused.graph.by_name()
    named: dict[str, set[str]] = {}   # group -> the buffers its ops name
    for g in sched.taskgraph.fused.groups:
        members = [ops[m] for m in g.members if m in ops]
        named[g.name] = {m.name for m in members} | \
            {x.value for m in members for x in m.inputs}
    for task in sched.taskgraph.tasks:
        touched = sorted(named.get(task.group, set()) & unheld)
        if touched:
            return (f"task {task.id} ({clip(task.group)}) addresses buffer "
                    f"{clip(touched[0])}, of which this device holds nothing")
    return None


def _args_problem(sched, args: torch.Tensor) -> str | None:
    """Each args entry is an element offset into the pool of the buffer it addresses;
    which pool is only known by rendering, so check_kernel compares the whole table with
    the rendered one (before anything runs). Here: inside some pool at least."""
    largest = max((p.numel for p in sched.pools), default=0)
    for g, row in enumerate(args.tolist()):
        for a in row:
            if not 0 <= a < largest:
                return f"args row {g}: offset {a} outside every pool"
    return None


def check_views(engine: EngineFile) -> str | None:
    """Every strided view the runtime or the kernel takes of a buffer (model inputs and
    outputs, operands of graph ops) lies inside that buffer, and the generation spec
    names real inputs and outputs: so a manifest edited and signed again cannot make a
    load or store leave its buffer."""
    m = engine.manifest
    sched = m.schedule
    buffers = {b.name: b for b in sched.buffers}
    for io in m.inputs + m.outputs:
        b = buffers.get(io.buffer)
        if b is None:
            return f"input/output {io.name} names unknown buffer {clip(io.buffer)}"
        if io.dtype != b.type.dtype:
            return f"input/output {io.name} is {clip(io.dtype)} in a {b.type.dtype} buffer"
        problem = _view_problem(io.shape, io.strides, io.offset, b)
        if problem:
            return f"input/output {io.name}: {problem}"
        if io.high is not None and io.high <= io.low:
            return f"input {io.name}: empty value range [{io.low}, {io.high})"
    names = [io.name for io in m.inputs + m.outputs]
    if len(set(names)) != len(names):
        return "input/output names are not unique"
    ops = sched.taskgraph.fused.graph.ops
    if len({op.name for op in ops}) != len(ops):
        return "op names are not unique"
    declared = {b.name: b for b in sched.taskgraph.buffers}
    if declared.keys() != buffers.keys():
        return "planned buffers differ from the task graph's buffers"
    for op in ops:
        b = buffers.get(op.name)
        if b is not None and (b.type != op.type or declared[op.name].type != op.type):
            return f"buffer {op.name} does not have the type of the op that computes it"
    problem = _taskgraph_problem(sched, buffers)
    if problem:
        return problem
    for op in ops:
        for operand in op.inputs:
            b = buffers.get(operand.value)
            if b is None:
                continue
            problem = _view_problem(operand.shape, operand.strides, operand.offset, b)
            if problem:
                return f"op {op.name} reads {operand.value}: {problem}"
    gen = m.generation
    if gen is not None:
        ins, outs = {io.name for io in m.inputs}, {io.name for io in m.outputs}
        if gen.vocab_size < 1 or gen.max_seq_len < 1 or gen.token_input not in ins or \
                gen.pos_input not in ins or gen.logits_output not in outs or \
                gen.next_token_output not in outs:
            return "generation spec does not match the engine's inputs and outputs"
    return None


def _taskgraph_problem(sched, buffers) -> str | None:
    """The task graph's own references (what inspect and verify walk): task ids in
    order, known groups, regions of known buffers with one interval per dimension,
    dependencies between existing tasks. Whether regions lie inside their buffers is
    left to verify (regions_in_buffers)."""
    tasks = sched.taskgraph.tasks
    groups = {g.name for g in sched.taskgraph.fused.groups}
    for i, t in enumerate(tasks):
        if t.id != i or (t.group not in groups and t.group != TRANSFER):
            return f"task record {i} has id {t.id} and group {clip(t.group)}"
        for r in t.reads + t.writes:
            b = buffers.get(r.buffer)
            if b is None or len(r.box) != len(b.type.shape) or \
                    any(len(iv) != 2 for iv in r.box):
                return f"task {i} touches {clip(r.buffer)} with a malformed region"
    tg = sched.taskgraph
    if not 0 <= tg.device < tg.devices:
        return f"device {tg.device} of {tg.devices}"
    for k, tr in enumerate(tg.transfers):
        if tr.seq != k or not tr.parts:
            return f"transfer {k} is malformed"
        # the host copies these boxes itself (no kernel bounds check): inside the buffer
        for part in tr.parts:
            b = buffers.get(part.region.buffer)
            box = part.region.box
            if b is None or len(box) != len(b.type.shape) or any(
                    not 0 <= lo <= hi <= n for (lo, hi), n in zip(box, b.type.shape)) \
                    or any(not 0 <= d < tg.devices for d in (part.src,) + part.dsts):
                return f"transfer {k} is malformed or leaves its buffer"
    for t in tasks:
        if t.group == TRANSFER and (
                not 0 <= t.tile[0] < len(tg.transfers) or
                (t.reads, t.writes) != (tg.transfers[t.tile[0]].sends(tg.device),
                                        tg.transfers[t.tile[0]].receives(tg.device))):
            return f"task {t.id} does not carry its transfer's regions"
    n = len(tasks)
    for d in sched.taskgraph.deps:
        if not (0 <= d.before < n and 0 <= d.after < n):
            return f"dependency {d.before} -> {d.after} names unknown tasks"
    if len(sched.start_us) != n or len(sched.finish_us) != n:
        return "predicted times do not cover the tasks"
    for e, ev in enumerate(sched.events):
        if ev.id != e or ev.signals < 1:
            return f"event {e} is malformed"
    return None


def _view_problem(shape, strides, offset, buffer) -> str | None:
    if len(shape) != len(strides) or offset < 0 or any(n < 0 for n in shape) or \
            any(s < 0 for s in strides):
        return f"malformed view (shape {list(shape)}, strides {list(strides)}, offset {offset})"
    if 0 in shape:
        return None
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    if last >= buffer.extent():   # its numel; a shard's reach (Buffer.extent)
        return (f"view (shape {list(shape)}, strides {list(strides)}, offset {offset}) "
                f"reaches element {last} of buffer {buffer.name} ({buffer.extent()} elements)")
    return None


def entry_problem(engine: EngineFile, entry: EngineFile, name: str) -> str | None:
    """A further entry against the decode step: it says it is `name` and lists no
    entries, is a plan exactly when the decode step is, and places every weight and
    state buffer the two share by name exactly where the decode step does, in pools of
    the same size (so one KV cache and one copy of the weights serve both)."""
    m = entry.manifest
    if m.entry != name or m.entries != ("decode",):
        return f"its manifest says entry {clip(m.entry)} with entries {clip(list(m.entries))}"
    if m.plan != engine.manifest.plan:
        return "a plan beside an engine with weights, or the other way round"
    mine = _shared_layout(engine.manifest.schedule)
    theirs = _shared_layout(m.schedule)
    for key in sorted(set(mine) & set(theirs)):
        if mine[key] != theirs[key]:
            return f"{key} lies elsewhere than in the decode step: the entries cannot share it"
    return None


def _shared_layout(sched) -> dict[str, tuple]:
    """Each weight and state buffer's (kind, pool, offset, shape, dtype) and each weight
    and state pool's size, by name."""
    layout = {b.name: (b.kind, b.pool, b.offset, tuple(b.type.shape), b.type.dtype)
              for b in sched.buffers if b.kind in ("weight", "state")}
    layout.update({f"pool {p.name}": (p.numel, p.dtype) for p in sched.pools
                   if p.kind in ("weight", "state")})
    return layout
