"""What `tilec inspect` shows: a summary of an engine as plain data.

`summary(engine)` is the object `tilec inspect --json` prints. Its keys are stable:

  model, target, backend        the model name, target name, "cpu" | "cuda"
  workers, tasks, events        counts (ints)
  waits, cross_worker_waits     waits in the task table; those signalled by a task
                                on another worker
  groups                        number of fusion groups
  task_kinds                    {kind: number of tasks}
  roles                         [{name, workers: [ids], kinds, ops, modules, tasks,
                                busy_us}]: model.yaml's target.roles (as written;
                                tasks and busy_us: the role's tasks and the sum of
                                their predicted times), or one implicit role "compute"
                                with every worker, no kinds and no ops
  per_worker                    [{worker, role, tasks, busy_us, utilisation}]
  predicted_step_us             the cost model's makespan (latest predicted finish)
  critical_path_us              longest path through the dependency DAG (task times
                                of the cost model)
  critical_path                 [{task, kind, group, tile, worker, start_us, finish_us}]
  memory_bound_us               bytes.cost_model_hbm / the target's bandwidth (the
                                bytes the cost model reads from HBM, activations it takes
                                from L2 left out: no schedule of them beats it there)
  work_bound_us                 the most loaded role's predicted task time per worker
                                (sum of its tasks' times / its workers): under the cost
                                model no schedule of these tasks beats it either
  lower_bound_us                max(critical_path_us, work_bound_us, memory_bound_us):
                                predicted_step_us / lower_bound_us is what the schedule
                                loses to dependencies and idle workers
  hbm_floor_us                  weight + KV bytes per step over the target's measured
                                copy bandwidth (hbm_floor_gbps; hbm_floor_measured false:
                                no measurement, the datasheet's): no step that reads
                                them from HBM is shorter, however it is scheduled
  predicted_over_hbm_floor      predicted_step_us / hbm_floor_us (null without a floor):
                                the headline, what the kernel and schedule lose to the
                                memory system's floor
  bytes                         per step: weights, kv, intermediate (bytes of the
                                regions tasks read and write in buffers of kind weight,
                                state, and input/output/activation; a gather's read
                                region is its whole table, so weights is an upper
                                bound there), intermediate_unfused (an op-by-op
                                execution: each computed op's output written once and
                                read once per consuming op), cost_model (sum of the
                                tasks' byte counts, what the cost model charges),
                                cost_model_hbm (the part of it the cost model reads
                                from HBM: passes/cost.hbm_bytes_per_step)
  fusion_groups                 [{name, kind, anchor, prologue, epilogue, ops, tasks}]
  event_table                   [{id, signals, signalled_by, waited_by}] (task ids)
  kernel                        {opcodes, source_lines, max_waits, task_kinds (the
                                distinct kinds its dispatch handles), aot};
                                aot describes the kernel compiled for the target's GPU:
                                {arch, ptx_target, n_regs, n_spills, shared (bytes per
                                CTA), cubin_size, num_warps, triton_version (that
                                compiled it), stored (true: the engine's stored binary,
                                read without compiling; false: compiled now, for
                                `--aot` on a GPU engine without one)}; null for an
                                engine without a stored binary unless `--aot` asks;
                                streaming: [{opcode, kind, group (its first), tasks,
                                weight_bytes_per_task (the most one task reads),
                                streams_weights (at least 32 KB a task),
                                bytes_in_flight_per_worker (weights and activations),
                                weight_bytes_in_flight_per_worker (the ring's copies
                                with an L2 evict-first policy: the weights; 0 without a
                                ring), async_copy ("tma", "cp.async" or "none"), copy_op
                                (its hot loop's copy instruction), stages}] per opcode
                                whose tasks read a weight buffer, read from the compiled
                                code's SASS (codegen/sass.py: a ring's bytes outstanding
                                when a chunk is awaited); null when aot is
  inputs, outputs               [{name, shape, dtype}]
  plan                          true for a plan (compiled with --plan: no weights,
                                never runs)
  memory                        what this device holds while it runs, bytes:
                                {device, weights, kv, scratch, total, capacity (the
                                target's memory per device; 0: not fixed), fits (null
                                without a capacity)} (runtime/sizes.device_memory);
                                a multi-device engine's `devices` rows carry each
                                device's as `memory`
  entry                         the entry summarised: "decode", or "prefill"
                                (`tilec inspect --entry prefill`)
  entries                       [{entry, tasks, predicted_step_us, bytes, aot}] for every
                                entry of the file, decode first: `bytes` as above, `aot`
                                as kernel.aot for that entry's own stored GPU binary
                                (null without one), so both kernels' registers, spills
                                and shared memory show side by side
  devices                       multi-device engines (tilec inspect, cli.py adds it):
                                [{device, role (its device role), roles (its worker
                                roles, comm worker included, as in `roles`), tasks,
                                transfers, bytes_sent, bytes_received,
                                predicted_step_us, memory}]
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

from tilec.errors import TilecError
from tilec.ir.graph import DTYPE_BYTES, PLACEHOLDER_KINDS
from tilec.ir.schedule import Schedule
from tilec.ir.tasks import TRANSFER
from tilec.passes.cost import critical_path, hbm_bytes_per_step
from tilec.passes.deps import deps
from tilec.passes.roles import format_workers
from tilec.runtime.enginefile import EngineFile
from tilec.runtime.sizes import device_memory, memory_line
from tilec.viz.text import roles_line
from tilec.viz.timeline import cross_worker_edges, predicted, task_kinds

WEIGHT_KINDS = ("weight",)
KV_KINDS = ("state",)
INTERMEDIATE_KINDS = ("input", "output", "activation")


def entries_table(engine: EngineFile) -> list[dict[str, Any]]:
    """Each entry of the engine (decode, then prefill if it has one): its tasks, the
    cost model's predicted time of one launch, the bytes a launch moves, and its
    stored GPU binary's figures (`aot`, as `kernel.aot`; null without one)."""
    return [{"entry": name, "tasks": len(sched.taskgraph.tasks),
             "predicted_step_us": max(sched.finish_us, default=0.0),
             "bytes": bytes_moved(sched),
             "aot": aot_info_of(compiled_kernel(engine.entry(name)))}
            for name, sched in engine.entry_schedules()]


def schedule_with_deps(engine: EngineFile):
    """The stored schedule with its dependency edges: engines do not store them, so
    they are found again from the tasks' regions (the deps pass)."""
    sched = engine.schedule()
    if not sched.taskgraph.deps:
        sched = replace(sched, taskgraph=deps(sched.taskgraph))
    return sched


def summary(engine: EngineFile, aot: bool = False) -> dict[str, Any]:
    m = engine.manifest
    sched = schedule_with_deps(engine)
    compiled = compiled_kernel(engine, compile=aot)
    tg = sched.taskgraph
    target = sched.target
    kinds_of = task_kinds(m, sched)
    kinds = Counter(kinds_of)
    busy = [sum(sched.finish_us[t] - sched.start_us[t] for t in q) for q in sched.queues]
    worker_role = sched.target.worker_roles()
    span = max(sched.finish_us, default=0.0)
    where = sched.worker_of()
    cp_us, cp_tasks = critical_path(tg, target)
    moved = bytes_moved(sched)
    moved["cost_model_hbm"] = hbm_bytes_per_step(tg, target)
    memory_us = (moved["cost_model_hbm"] / (target.bandwidth_gbps * 1e3)
                 if target.bandwidth_gbps > 0 else 0.0)
    floor_bytes = moved["weights"] + moved["kv"]
    floor_us = floor_bytes / (target.bandwidth_gbps * 1e3) if target.bandwidth_gbps > 0 else 0.0
    tasks_per_group = Counter(t.group for t in tg.tasks)
    roles = role_table(sched)
    work_us = max((r["busy_us"] / len(r["workers"]) for r in roles if r["workers"]), default=0.0)
    return {
        "model": m.model,
        "target": target.name,
        "backend": target.backend,
        "workers": sched.workers,
        "tasks": len(tg.tasks),
        "events": len(sched.events),
        "waits": sum(len(w) for w in sched.waits),
        "cross_worker_waits": len({(b, ev) for _, b, ev in cross_worker_edges(sched)}),
        "groups": len(tg.fused.groups),
        "task_kinds": dict(sorted(kinds.items())),
        "roles": roles,
        "per_worker": [{"worker": w, "role": worker_role[w] if w < len(worker_role) else "",
                        "tasks": len(q), "busy_us": busy[w],
                        "utilisation": (busy[w] / span) if span else 0.0}
                       for w, q in enumerate(sched.queues)],
        "predicted_step_us": span,
        "critical_path_us": cp_us,
        "critical_path": [{"task": t, "kind": kinds_of[t], "group": tg.tasks[t].group,
                           "tile": list(tg.tasks[t].tile), "worker": where[t][0],
                           "start_us": sched.start_us[t], "finish_us": sched.finish_us[t]}
                          for t in cp_tasks],
        "memory_bound_us": memory_us,
        "work_bound_us": work_us,
        "lower_bound_us": max(cp_us, work_us, memory_us),
        "hbm_floor_us": floor_us,
        "hbm_floor_gbps": target.bandwidth_gbps,
        "hbm_floor_measured": bool(target.copy_gbps),
        "predicted_over_hbm_floor": span / floor_us if floor_us else None,
        "bytes": moved,
        "fusion_groups": [{"name": g.name, "kind": g.kind, "anchor": g.anchor,
                           "prologue": list(g.prologue), "epilogue": list(g.epilogue),
                           "ops": list(g.members), "tasks": tasks_per_group[g.name]}
                          for g in tg.fused.groups],
        "event_table": event_table(sched),
        "kernel": {"opcodes": len(m.kinds), "source_lines": engine.kernel_source.count("\n"),
                   "max_waits": m.max_waits, "task_kinds": sorted(set(m.kinds)),
                   "aot": aot_info_of(compiled), "streaming": streaming(engine, compiled)},
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in m.inputs],
        "outputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in m.outputs],
        "plan": m.plan,
        "memory": device_memory(engine),
        "entry": m.entry,
        "entries": entries_table(engine),
    }


def role_table(sched: Schedule) -> list[dict[str, Any]]:
    """Each role with its workers, what it owns, its tasks and their predicted time."""
    tasks = Counter(sched.task_roles())
    busy: Counter = Counter()
    for t, role in enumerate(sched.task_roles()):
        busy[role] += sched.finish_us[t] - sched.start_us[t]
    return [{"name": r.name, "workers": list(r.workers), "kinds": list(r.kinds),
             "ops": list(r.ops), "modules": list(r.modules), "tasks": tasks[r.name],
             "busy_us": busy[r.name]}
            for r in sched.target.all_roles()]


def task_moved(task, buffers) -> tuple[tuple[str, int], ...]:
    """(buffer, bytes) a task moves; engines from before `Task.moved` existed: what its
    regions cover."""
    if task.moved:
        return task.moved
    return tuple((r.buffer, r.numel * DTYPE_BYTES[buffers[r.buffer].type.dtype])
                 for r in task.reads + task.writes)


def bytes_moved(sched: Schedule) -> dict[str, int]:
    """Bytes per step by where they live (see the module docstring)."""
    tg = sched.taskgraph
    buffers = {b.name: b for b in tg.buffers}
    out = {"weights": 0, "kv": 0, "intermediate": 0}
    for task in tg.tasks:
        for name, n in task_moved(task, buffers):
            b = buffers[name]
            if b.kind in WEIGHT_KINDS:
                out["weights"] += n
            elif b.kind in KV_KINDS:
                out["kv"] += n
            elif b.kind in INTERMEDIATE_KINDS:
                out["intermediate"] += n
    graph = tg.fused.graph
    users = graph.users()
    out["intermediate_unfused"] = sum(op.type.nbytes * (1 + len(users[op.name]))
                                      for op in graph.ops if op.kind not in PLACEHOLDER_KINDS)
    out["cost_model"] = sum(t.bytes for t in tg.tasks)
    return out


def event_table(sched: Schedule) -> list[dict[str, Any]]:
    rows = [{"id": e.id, "signals": e.signals, "signalled_by": [], "waited_by": []}
            for e in sched.events]
    for tid, ev in enumerate(sched.signal):
        rows[ev]["signalled_by"].append(tid)
    for tid, waits in enumerate(sched.waits):
        for w in waits:
            rows[w.event]["waited_by"].append(tid)
    return rows


AOT_KEYS = ("arch", "ptx_target", "n_regs", "n_spills", "shared", "cubin_size", "num_warps",
            "triton_version")


def aot_info_of(compiled: dict[str, Any] | None) -> dict[str, Any] | None:
    """Registers, spills and shared memory of the kernel compiled for the target's GPU
    (`compiled_kernel` less the cubin), or None."""
    return None if compiled is None else {k: v for k, v in compiled.items() if k != "cubin"}


def compiled_kernel(engine: EngineFile, compile: bool = False) -> dict[str, Any] | None:
    """What the kernel compiled for the target's GPU is: the stored binary's figures, or
    if `compile` (`--aot`) those of a compile now (seconds), or None; with the cubin.
    Keys: AOT_KEYS, `stored`, `cubin` (bytes)."""
    binary = engine.aot
    if binary is not None:
        return {**{k: getattr(binary, k) for k in AOT_KEYS if k != "cubin_size"},
                "cubin_size": len(binary.cubin), "stored": True, "cubin": binary.cubin}
    if not compile:
        return None
    target = engine.manifest.schedule.target
    if target.backend != "cuda":
        raise TilecError(f"--aot: target {target.name} is not a GPU target (nothing to "
                         "compile ahead of time)")
    from tilec.codegen.aot import compile_for_gpu
    from tilec.runtime.kernel import engine_source

    info = compile_for_gpu(engine_source(engine), engine.manifest.schedule.pools,
                           arch=target.arch, trusted=engine.code_trusted)
    return {**{k: info.get(k) for k in AOT_KEYS}, "stored": False, "cubin": info["cubin"]}


# A task kind streams weights when each of its tasks reads at least this many bytes of
# them (an embedding row gather reads a few KB: not a stream)
STREAMING_BYTES = 32 * 1024


def streaming(engine: EngineFile,
              compiled: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """Per opcode whose tasks read a weight buffer: how it streams them, read from the
    compiled code (codegen/sass.py), not from the template. None without compiled code,
    or where nvdisasm cannot read it."""
    if compiled is None:
        return None
    from tilec.codegen.sass import kernel_stream_facts

    facts = kernel_stream_facts(compiled["cubin"], 32 * compiled["num_warps"])
    if facts is None:
        return None
    m = engine.manifest
    tg = m.schedule.taskgraph
    buffers = {b.name: b for b in tg.buffers}
    opcode_of = {g.name: op for g, op in zip(tg.fused.groups, m.opcodes)}
    weight_bytes: dict[int, list[int]] = {}
    first_group: dict[int, str] = {}
    for task in tg.tasks:
        op = opcode_of.get(task.group)
        if op is None:
            continue   # a transfer: no opcode
        moved = sum(n for name, n in task_moved(task, buffers)
                    if buffers[name].kind in WEIGHT_KINDS)
        if moved:
            weight_bytes.setdefault(op, []).append(moved)
            first_group.setdefault(op, task.group)
    out = []
    for op in sorted(weight_bytes):
        f = facts.get(op, {})
        per_task = max(weight_bytes[op])
        out.append({"opcode": op, "kind": m.kinds[op], "group": first_group[op],
                    "tasks": len(weight_bytes[op]), "weight_bytes_per_task": per_task,
                    "streams_weights": per_task >= STREAMING_BYTES,
                    "bytes_in_flight_per_worker": f.get("bytes_in_flight") or 0,
                    "weight_bytes_in_flight_per_worker": f.get("weight_bytes_in_flight") or 0,
                    "async_copy": f.get("async_copy", "none"), "copy_op": f.get("copy_op"),
                    "stages": f.get("stages")})
    return out


def predicted_timeline(engine: EngineFile):
    """The predicted timeline with the critical path marked (for traces and reports)."""
    sched = schedule_with_deps(engine)
    _, path = critical_path(sched.taskgraph, sched.target)
    return predicted(engine.manifest, sched, path)


def dot_graph(engine: EngineFile, level: str) -> str:
    """`tilec inspect --dot`: Graphviz DOT of the fused op graph ("ops") or of the tasks
    with an edge per dependency ("tasks"; found again, see schedule_with_deps)."""
    from tilec.viz.dot import ops_dot, tasks_dot

    name = engine.manifest.model
    if level == "ops":
        return ops_dot(engine.schedule().taskgraph.fused, name)
    sched = schedule_with_deps(engine)
    return tasks_dot(sched, task_kinds(engine.manifest, sched), name)


def device_table(parts: tuple[EngineFile, ...]) -> list[dict[str, Any]]:
    """Per device of a multi-device engine: its device role, its worker roles (as in
    `role_table`: workers, tasks, predicted busy time), its tasks, its transfers and the
    bytes they send (each region once, whatever its number of receivers) and receive,
    and its predicted step."""
    out = []
    for d, part in enumerate(parts):
        sched = part.manifest.schedule
        tg = sched.taskgraph
        size = {b.name: DTYPE_BYTES[b.type.dtype] for b in tg.buffers}
        comm = [t for t in tg.tasks if t.group == TRANSFER]
        sent = sum(r.numel * size[r.buffer] for t in comm for r in t.reads)
        received = sum(r.numel * size[r.buffer] for t in comm for r in t.writes)
        out.append({"device": d, "role": sched.target.device_role(d).name,
                    "roles": role_table(sched),
                    "tasks": sum(t.group != TRANSFER for t in tg.tasks),
                    "transfers": sum(t.group == TRANSFER for t in tg.tasks),
                    "bytes_sent": sent, "bytes_received": received,
                    "predicted_step_us": max(sched.finish_us, default=0.0),
                    "memory": device_memory(part)})
    return out


def fit_report(parts: tuple[EngineFile, ...]) -> dict[str, Any]:
    """What `tilec compile --plan` tells, read from the manifests alone (cheap at any
    size): the predicted step (the latest predicted finish over the devices), tokens/s
    at one token per step, and each device's memory (`device_memory`)."""
    step_us = max(max(p.manifest.schedule.finish_us, default=0.0) for p in parts)
    memory = [device_memory(p) for p in parts]
    return {"predicted_step_us": step_us,
            "tokens_per_s": 1e6 / step_us if step_us > 0 else None,
            "memory": memory, "fits": all(m["fits"] is not False for m in memory)}


def fit_lines(report: dict[str, Any], target: str) -> list[str]:
    """`fit_report` as lines: one per device, then the verdict and the step."""
    lines = [memory_line(m, target) for m in report["memory"]]
    short = [m["device"] for m in report["memory"] if m["fits"] is False]
    if short:
        lines.append(f"does NOT fit: device{'s' if len(short) > 1 else ''} "
                     f"{', '.join(map(str, short))} need more memory than an {target} has")
    rate = report["tokens_per_s"]
    lines.append(f"predicted step {report['predicted_step_us']:.1f} us"
                 + (f", {rate:.1f} tokens/s at one token per step" if rate else ""))
    return lines


def terminal_safe(x: Any) -> Any:
    """`x` with every string (dict keys too) fit to print through rich: markup escaped,
    and characters that are not printable (terminal escape sequences, line breaks)
    shown as Python escapes. An engine's names are the file's text, not markup."""
    from rich.markup import escape

    if isinstance(x, str):
        return escape("".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in x))
    if isinstance(x, dict):
        return {terminal_safe(k): terminal_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(terminal_safe(v) for v in x)
    return x


def print_summary(s: dict[str, Any], console) -> None:
    """The summary as rich tables (its text escaped: `terminal_safe`), one section after
    another."""
    s = terminal_safe(s)
    for section in SUMMARY_SECTIONS:
        section(s, console)
    if len(s["entries"]) > 1:
        binaries = any(e["aot"] for e in s["entries"])
        table = _table(f"entries (shown above: {s['entry']})",
                       ("entry", "tasks", "predicted us", "weights MB", "kv MB") +
                       (("registers", "spill bytes", "shared bytes") if binaries else ()),
                       ("entry",))
        for e in s["entries"]:
            a = e["aot"] or {}
            table.add_row(e["entry"], str(e["tasks"]), f"{e['predicted_step_us']:.1f}",
                          f"{e['bytes']['weights'] / 1e6:.2f}", f"{e['bytes']['kv'] / 1e6:.2f}",
                          *([str(a.get(k, "-")) for k in ("n_regs", "n_spills", "shared")]
                            if binaries else []))
        console.print(table)


def _table(title: str, columns: tuple[str, ...], left: tuple[str, ...] = ()):
    """A table whose columns are right-aligned (numbers) except those in `left`."""
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


def _print_devices(s, console) -> None:
    if not s.get("devices"):
        return
    table = _table(f"devices ({len(s['devices'])}; below: device {s['device']}, "
                   "`inspect --device D` for another)",
                   ("device", "tasks", "transfers", "bytes sent", "bytes received",
                    "predicted us"))
    for d in s["devices"]:
        table.add_row(str(d["device"]), str(d["tasks"]), str(d["transfers"]),
                      f"{d['bytes_sent']:,}", f"{d['bytes_received']:,}",
                      f"{d['predicted_step_us']:.1f}")
    console.print(table)
    roles = _table("roles per device", ("device", "device role", "worker role", "workers",
                                        "owns", "tasks", "busy us"),
                   left=("device role", "worker role", "workers", "owns"))
    for d in s["devices"]:
        for r in d["roles"]:
            roles.add_row(str(d["device"]), d["role"], r["name"], format_workers(r["workers"]),
                          _owns(r), str(r["tasks"]), f"{r['busy_us']:.1f}")
    console.print(roles)


def _owns(role: dict[str, Any]) -> str:
    return ", ".join(role["kinds"] + role["ops"] + role.get("modules", [])) or "the rest"


def _print_headline_and_roles(s, console) -> None:
    console.print(f"[bold]{s['model']}[/bold]: target {s['target']} ({s['backend']}), "
                  f"{s['workers']} workers, {s['tasks']} tasks, {s['events']} events, "
                  f"{s['waits']} waits, predicted step {s['predicted_step_us']:.1f} us")
    console.print(f"roles: {roles_line(s['roles'])}")
    if s["plan"]:
        console.print("a plan (compiled with --plan): no weights, it cannot run")
    for m in [d["memory"] for d in s.get("devices") or []] or [s["memory"]]:
        console.print(f"memory: {memory_line(m, s['target'])}")
    if len(s["roles"]) > 1:
        table = _table("roles", ("role", "workers", "owns", "tasks", "busy us"),
                       left=("role", "workers", "owns"))
        for r in s["roles"]:
            table.add_row(r["name"], format_workers(r["workers"]), _owns(r), str(r["tasks"]),
                          f"{r['busy_us']:.1f}")
        console.print(table)


def _print_kinds_and_workers(s, console) -> None:
    kinds = _table("task kinds", ("kind", "tasks"), left=("kind",))
    for k, n in s["task_kinds"].items():
        kinds.add_row(k, str(n))
    console.print(kinds)
    workers = _table("workers", ("worker", "role", "tasks", "busy us", "utilisation"),
                     left=("role",))
    for w in s["per_worker"]:
        workers.add_row(str(w["worker"]), w["role"], str(w["tasks"]), f"{w['busy_us']:.1f}",
                        f"{w['utilisation']:.0%}")
    console.print(workers)


def _print_timing(s, console) -> None:
    timing = _table("step time (predicted, cost model)", ("", "us"), left=("",))
    timing.add_row("predicted step", f"{s['predicted_step_us']:.1f}")
    if s["hbm_floor_us"]:
        source = "measured" if s["hbm_floor_measured"] else "datasheet"
        timing.add_row(f"HBM floor (weights + KV at {s['hbm_floor_gbps']:.0f} GB/s, {source})",
                       f"{s['hbm_floor_us']:.1f}")
        timing.add_row("  predicted / HBM floor", f"{s['predicted_over_hbm_floor']:.2f}")
    timing.add_row("lower bound", f"{s['lower_bound_us']:.1f}")
    timing.add_row("  critical path", f"{s['critical_path_us']:.1f}")
    timing.add_row("  work / workers", f"{s['work_bound_us']:.1f}")
    timing.add_row("  bytes / HBM bandwidth", f"{s['memory_bound_us']:.1f}")
    console.print(timing)


def _print_critical_path(s, console) -> None:
    path = _table(f"critical path: {len(s['critical_path'])} tasks, "
                  f"{s['critical_path_us']:.1f} us",
                  ("task", "kind", "tile", "worker", "start us", "finish us"), left=("kind",))
    for c in s["critical_path"]:
        path.add_row(str(c["task"]), c["kind"], str(tuple(c["tile"])), str(c["worker"]),
                     f"{c['start_us']:.1f}", f"{c['finish_us']:.1f}")
    console.print(path)


def _print_bytes_and_groups(s, console) -> None:
    b = s["bytes"]
    moved = _table("bytes per step", ("", "bytes"), left=("",))
    for label, key in (("weights", "weights"), ("KV cache", "kv"),
                       ("intermediates", "intermediate"),
                       ("intermediates, unfused op by op", "intermediate_unfused"),
                       ("cost model total", "cost_model"),
                       ("cost model, from HBM", "cost_model_hbm")):
        moved.add_row(label, f"{b[key]:,}")
    console.print(moved)
    groups = _table(f"fusion groups ({s['groups']})", ("group", "kind", "tasks", "ops"),
                    left=("group", "kind", "ops"))
    for g in s["fusion_groups"]:
        ops = [f"[bold]{o}[/bold]" if o == g["anchor"] else o for o in g["ops"]]
        groups.add_row(g["name"], g["kind"], str(g["tasks"]), " ".join(ops))
    console.print(groups)


def _print_kernel(s, console) -> None:
    multi = sum(1 for e in s["event_table"] if e["signals"] > 1)
    console.print(f"events: {s['events']} ({multi} with more than one signal), waits: "
                  f"{s['waits']}, cross-worker waits: {s['cross_worker_waits']}")
    k = s["kernel"]
    console.print(f"kernel: {k['source_lines']} lines, {k['opcodes']} opcodes over "
                  f"{len(k['task_kinds'])} task kinds ({', '.join(k['task_kinds'])}), at most "
                  f"{k['max_waits']} waits per task")
    if k["aot"]:
        a = k["aot"]
        where = "stored in the engine" if a["stored"] else "compiled now"
        console.print(f"  sm_{a['arch']} ({a['ptx_target']}): {a['n_regs']} registers, "
                      f"{a['n_spills']} spill bytes, {a['shared']} bytes shared memory, "
                      f"cubin {a['cubin_size']} bytes ({where}, Triton {a['triton_version']})")
    if k.get("streaming"):
        table = _table("weight streams (read from the compiled code)",
                       ("opcode", "kind", "tasks", "weights per task", "in flight per worker",
                        "of it weights", "copy", "stages"), left=("kind", "copy"))
        for r in k["streaming"]:
            table.add_row(str(r["opcode"]), r["kind"], str(r["tasks"]),
                          f"{r['weight_bytes_per_task']:,}",
                          f"{r['bytes_in_flight_per_worker']:,}",
                          f"{r['weight_bytes_in_flight_per_worker']:,}", r["async_copy"],
                          str(r["stages"]))
        console.print(table)


SUMMARY_SECTIONS = (_print_devices, _print_headline_and_roles, _print_kinds_and_workers,
                    _print_timing, _print_critical_path, _print_bytes_and_groups,
                    _print_kernel)
