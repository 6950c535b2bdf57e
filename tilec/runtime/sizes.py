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


def size_problem(manifest) -> str | None:
    """Why the sizes the manifest declares cannot be right, or None."""
    sched = manifest.schedule
    target = sched.target
    known = TARGETS.get(target.name)
    if known is None:
        return f"target {target.name[:40]!r} is not one this tilec knows ({', '.join(TARGETS)})"
    most = known.max_workers + (sched.taskgraph.devices > 1)   # + the host's comm worker
    if target.workers > most:
        return f"{target.workers} workers, more than target {target.name} holds ({most})"
    need: dict[str, int] = {}
    for b in sched.buffers:
        need[b.pool] = max(need.get(b.pool, 1), b.offset + max(b.type.numel, 1))
    for p in sched.pools:
        if p.numel > need.get(p.name, 1):
            return (f"pool {p.name} declares {p.numel} elements, more than the "
                    f"{need.get(p.name, 1)} its buffers need")
    if target.backend == "cpu":
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
