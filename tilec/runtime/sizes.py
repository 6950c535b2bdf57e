"""Sizes an engine file sets, checked before anything of that size is allocated.

An engine's manifest says how many workers it has and how large each pool is; the
arenas (pools of intermediate values) are not stored, only declared, so a manifest
edited and signed again could ask for any amount of memory (a 3e9-element arena had
`run` allocate 12 GB). `load` refuses a worker count beyond what the target holds and a
pool larger than the buffers placed in it need (the compiler makes each pool exactly
that large: passes/memplan.py), and, for a CPU engine, pools that could never fit in
this machine's memory; an executor checks what it is about to allocate against the
memory available at that moment (`memory_problem`).
"""
from __future__ import annotations

from tilec.ir.graph import DTYPE_BYTES
from tilec.ir.target import TARGETS
from tilec.limits import gigabytes, total_memory


def size_problem(engine, shared_with=()) -> str | None:
    """Why the sizes an engine (runtime.enginefile.EngineFile) declares cannot be right, or
    None. `shared_with`: the schedules of the engine's other entries, whose weight and
    state buffers lie in the same pools (so they count towards those pools' sizes)."""
    sched = engine.manifest.schedule
    target = sched.target
    known = TARGETS.get(target.name)
    if known is None:
        return f"target {target.name[:40]!r} is not one this tilec knows ({', '.join(TARGETS)})"
    most = known.max_workers + (sched.taskgraph.devices > 1)   # + the host's comm worker
    if target.workers > most:
        return f"{target.workers} workers, more than target {target.name} holds ({most})"
    if engine.aot is not None:
        problem = resident_problem(known, target.workers, engine.aot)
        if problem:
            return problem
    need: dict[str, int] = {}
    stored = {p.name for p in sched.pools if p.kind in ("weight", "state")}
    shared = [b for other in shared_with for b in other.buffers
              if b.kind in ("weight", "state") and b.pool in stored]   # never an arena
    for b in list(sched.buffers) + shared:
        need[b.pool] = max(need.get(b.pool, 1), b.offset + b.extent())
    for p in sched.pools:
        if p.numel > need.get(p.name, 1):
            return (f"pool {p.name} declares {p.numel} elements, more than the "
                    f"{need.get(p.name, 1)} its buffers need")
    if target.backend == "cpu" and not engine.manifest.plan:   # a plan never runs
        fresh = allocated_bytes(sched.pools, "cpu")
        if fresh > total_memory():
            return (f"running it takes {gigabytes(fresh)} of memory, more than this "
                    f"machine's {gigabytes(total_memory())}")
    return None


def allocated_bytes(pools, device: str) -> int:
    """Bytes an executor allocates for these pools on `device`: every arena, a copy of
    each state pool, and on a GPU the weights too (on CPU they stay in the file)."""
    kinds = ("arena", "state") if device == "cpu" else ("arena", "state", "weight")
    return sum(p.numel * DTYPE_BYTES.get(p.dtype, 8) for p in pools if p.kind in kinds)


# What an sm_90 SM holds (CUDA occupancy rules, compute capability 9.0): CTAs, warps,
# registers (allocated per warp in units of 256), shared memory (1 kB of it reserved
# per CTA).
SM90_CTAS, SM90_WARPS, SM90_REGISTERS, SM90_REGISTER_UNIT = 32, 64, 65536, 256
SM90_SHARED, SM90_SHARED_RESERVED = 228 << 10, 1 << 10


def resident_ctas(num_warps: int, n_regs: int | None, shared: int) -> int:
    """CTAs of a kernel (warps, registers per thread, shared bytes per CTA) that one
    sm_90 SM holds at once; registers unknown (None): not counted."""
    fits = [SM90_CTAS, SM90_WARPS // num_warps,
            SM90_SHARED // (shared + SM90_SHARED_RESERVED)]
    if n_regs:
        per_warp = -(-n_regs * 32 // SM90_REGISTER_UNIT) * SM90_REGISTER_UNIT
        fits.append(SM90_REGISTERS // per_warp // num_warps)
    return min(fits)


def resident_problem(target, workers: int, aot) -> str | None:
    """Why `workers` CTAs of the compiled kernel `aot` (ir.abi.AOTKernel) cannot
    all be resident on `target`'s SMs at once, as a persistent kernel needs (the
    workers that do not fit would never start, and the others wait on them), or None."""
    per_sm = resident_ctas(aot.num_warps, aot.n_regs, aot.shared)
    if workers <= per_sm * target.sms:
        return None
    regs = f"{aot.n_regs} registers per thread, " if aot.n_regs else ""
    return (f"{workers} workers cannot all be resident on {target.name}: the kernel takes "
            f"{regs}{aot.num_warps} warps and {aot.shared} bytes of shared memory per CTA, "
            f"so an SM holds {per_sm} and the target {per_sm * target.sms}")


def device_memory(engine) -> dict:
    """What one device of an engine (runtime.enginefile.EngineFile) holds while it runs,
    in bytes, from its pools: `weights` (the weight pools: its part of each weight,
    whole where its tasks read all of it), `kv` (the state pools: the KV caches),
    `scratch` (the arenas), their `total`; `capacity` (the target's memory per
    device; 0: not fixed, the cpu target) and `fits` (total <= capacity; None without
    a capacity). A plan's pools are sized as the real engine's, so this is what the
    real engine would need."""
    sched = engine.manifest.schedule
    by_kind = {kind: sum(p.numel * DTYPE_BYTES.get(p.dtype, 8) for p in sched.pools
                         if p.kind == kind) for kind in ("weight", "state", "arena")}
    total = sum(by_kind.values())
    capacity = sched.target.memory_bytes
    return {"device": sched.taskgraph.device, "weights": by_kind["weight"],
            "kv": by_kind["state"], "scratch": by_kind["arena"], "total": total,
            "capacity": capacity, "fits": total <= capacity if capacity else None}


def memory_line(m: dict, target: str) -> str:
    """One device's `device_memory` as a line a person reads: what it needs, and plainly
    whether that fits."""
    need = (f"weights {gigabytes(m['weights'])} + KV cache {gigabytes(m['kv'])} + scratch "
            f"{gigabytes(m['scratch'])} = {gigabytes(m['total'])}")
    if m["fits"] is None:
        return f"device {m['device']}: {need} (target {target} sets no memory size)"
    if m["fits"]:
        return f"device {m['device']}: {need} of {gigabytes(m['capacity'])}: fits"
    return (f"device {m['device']}: {need}: DOES NOT FIT in the {gigabytes(m['capacity'])} "
            f"of an {target} (short by {gigabytes(m['total'] - m['capacity'])})")
