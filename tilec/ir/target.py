"""Targets: the machine a schedule is made for, with the numbers the cost model uses.

Every number carries its source. GPU figures are datasheet values unless marked as
measured; the cost model only needs them to be right in proportion.
"""
from __future__ import annotations

from dataclasses import dataclass

from tilec.ir.tasks import TRANSFER

# Without `roles`, every worker belongs to one role of this name and runs any task.
DEFAULT_ROLE = "compute"
# Target.max_workers: the CTAs of 128 threads (the kernel's 4 warps) an SM holds at most
# (2048 threads per SM on sm_80 and sm_90); registers and shared memory may allow fewer.
CTAS_PER_SM = 16
CPU_MAX_WORKERS = 64
# A multi-device target's most devices: a region's devices are bits of an int64 mask
# (passes/partition.py).
MAX_DEVICES = 62


@dataclass(frozen=True)
class Role:
    """A set of workers that run only the tasks given to the role (model.yaml's
    `target.roles`). A task belongs to the role whose `kinds` name its task kind (the
    fusion group's label, e.g. `matmul_epilogue`), whose `ops` name an op kind or op
    name its group contains, or whose `modules` name a module one of its ops belongs
    to; tasks no role claims go to the one role that names none of these."""

    name: str
    workers: tuple[int, ...]
    kinds: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    # A device role (model.yaml `devices:` on a multi-device target) owns devices, not
    # workers: its groups are partitioned over these devices (passes/partition.py).
    devices: tuple[int, ...] = ()
    # Modules of the model, by path or by the end of one ("indexer" is every
    # "layers.N.indexer"): the role owns every group with an op one of them computes.
    modules: tuple[str, ...] = ()
    # A device role's worker roles (model.yaml `roles:` inside it): how each of its
    # devices splits its workers among the device role's groups; () : one role with
    # every worker.
    roles: tuple[Role, ...] = ()

    @property
    def takes_the_rest(self) -> bool:
        return not self.kinds and not self.ops and not self.modules

    def owns_module(self, scope: tuple[str, ...]) -> bool:
        """Whether an op computed inside the modules `scope` (Op.scope) is this role's."""
        return any(path == m or path.endswith("." + m) for m in self.modules for path in scope)


@dataclass(frozen=True)
class Target:
    name: str
    backend: str               # "cpu" (interpreter) or "cuda"
    workers: int               # persistent CTAs (GPU) or cooperative workers (CPU)
    sms: int                   # multiprocessors (GPU) or cores (CPU)
    mem_gbps: float            # memory bandwidth, GB/s
    fp32_tflops: float
    bf16_tflops: float
    task_overhead_us: float    # per task: dispatch, wait and signal
    smem_kb: int               # shared memory per multiprocessor
    arch: int                  # CUDA compute capability x10 (90 for sm_90); 0 for CPU
    dtype: str                 # default engine dtype on this target
    sources: str
    # What one worker's task body actually streams, GB/s, when measured (0: unknown,
    # assume the worker's share of the bandwidth). Lower bounds never use it.
    worker_stream_gbps: float = 0.0
    # Measured device-to-device copy bandwidth, GB/s (read + write; 0: not measured, use
    # mem_gbps): what HBM really delivers, the floor a decode step is held against.
    copy_gbps: float = 0.0
    # Latencies (us) of the latency-aware cost model (passes/cost.py; 0: the target uses
    # the flat per-task overhead instead): a load from HBM under load, and one round trip
    # to L2 (a record or args load, an acquire poll, a release add).
    mem_latency_us: float = 0.0
    l2_latency_us: float = 0.0
    # Heterogeneous workers; () means one role, DEFAULT_ROLE, with every worker.
    roles: tuple[Role, ...] = ()
    # Multi-device engines (passes/partition.py): the number of devices, each running its
    # own kernel on `workers` workers, and roles that own devices (() : one role with
    # every device). `link_gbps` and `link_latency_us` price a transfer between devices.
    devices: int = 1
    device_roles: tuple[Role, ...] = ()
    link_gbps: float = 0.0
    link_latency_us: float = 0.0
    # Memory one device holds, bytes (0: not a fixed amount: the cpu target runs in this
    # machine's memory). A plan's weights, caches and arenas per device are held to it
    # (tilec inspect, tilec compile --plan).
    memory_bytes: int = 0

    @property
    def max_workers(self) -> int:
        """The most workers a schedule for this target may have (model.yaml, the API, the
        CLI and a loaded engine are held to it). GPU: every worker must be resident at
        once (a persistent kernel), so at most CTAS_PER_SM per SM. cpu: the interpreter
        runs workers one after another in one process, so more never run faster, and
        CPU_MAX_WORKERS keeps the per-worker tables (inspect, the cost model) small."""
        return self.sms * CTAS_PER_SM if self.backend == "cuda" else CPU_MAX_WORKERS

    @property
    def bandwidth_gbps(self) -> float:
        """The memory bandwidth a stream can reach: measured if known, else the datasheet's."""
        return self.copy_gbps or self.mem_gbps

    def all_roles(self) -> tuple[Role, ...]:
        """The roles, or the one implicit role over every worker."""
        return self.roles or (Role(DEFAULT_ROLE, tuple(range(self.workers))),)

    def all_device_roles(self) -> tuple[Role, ...]:
        """The device roles, or the one implicit role over every device."""
        return self.device_roles or (Role(DEFAULT_ROLE, (), devices=tuple(range(self.devices))),)

    def device_role(self, device: int) -> Role:
        """The device role that owns `device` (the implicit one without device roles)."""
        return next((r for r in self.all_device_roles() if device in r.devices),
                    Role(DEFAULT_ROLE, (), devices=(device,)))

    def comm_worker(self) -> int | None:
        """The worker that runs transfers (multi-device: the host drives it, the kernel
        never sees it), or None on a single-device target."""
        for r in self.roles:
            if r.kinds == (TRANSFER,) and len(r.workers) == 1:
                return r.workers[0]
        return None

    def worker_roles(self) -> tuple[str, ...]:
        """The role name of each worker ("" for a worker no role lists)."""
        names = [""] * self.workers
        for role in self.all_roles():
            for w in role.workers:
                if 0 <= w < self.workers:
                    names[w] = role.name
        return tuple(names)


TARGETS: dict[str, Target] = {
    "h200": Target(
        name="h200", backend="cuda", workers=132, sms=132, mem_gbps=4800.0,
        fp32_tflops=67.0, bf16_tflops=989.0, task_overhead_us=1.0, smem_kb=228, arch=90,
        dtype="bfloat16",
        sources="NVIDIA H200 SXM datasheet (4.8 TB/s HBM3e, 989 TFLOP/s dense bf16, "
                "67 TFLOP/s fp32); 132 SMs and 228 KB shared memory per SM from the "
                "Hopper tuning guide; copy_gbps measured 2026-11-30 on one H200 "
                "(docs/BENCHMARKS.md, runs 2-3: 4223-4245 GB/s device-to-device, read + "
                "write); latencies are estimates, to be calibrated from a measured "
                "profile: an L2 hit about 260 cycles near, more far, and HBM about 480 "
                "cycles unloaded in microbenchmarks of Hopper (Luo et al., 'Benchmarking "
                "and Dissecting the Nvidia Hopper GPU Architecture', 2024), i.e. 0.15-0.3 "
                "and 0.25 us at 1.98 GHz, HBM rising to 0.6-0.8 us at full bandwidth "
                "(issue 20's Little's-law figures): 0.3 and 0.7 us here; task_overhead_us "
                "(1 us, an estimate) only prices what the latency model does not; the "
                "7.6 GB/s per worker measured on the kernel before its weight ring "
                "(run 3) no longer applies and is not used; links: NVLink 4, 900 GB/s "
                "per GPU both ways (datasheet), so 450 GB/s one way; 3 us per transfer is "
                "an estimate (a signal and a flag poll across the fabric); memory: 141 GB "
                "HBM3e (datasheet), 143771 MiB as nvidia-smi reports an H200's total",
        copy_gbps=4200.0, mem_latency_us=0.7, l2_latency_us=0.3,
        link_gbps=450.0, link_latency_us=3.0, memory_bytes=143771 << 20,
    ),
    "h100": Target(
        name="h100", backend="cuda", workers=132, sms=132, mem_gbps=3350.0,
        fp32_tflops=67.0, bf16_tflops=989.0, task_overhead_us=1.0, smem_kb=228, arch=90,
        dtype="bfloat16",
        sources="NVIDIA H100 SXM5 datasheet (3.35 TB/s HBM3, 989 TFLOP/s dense bf16, "
                "67 TFLOP/s fp32); 132 SMs; copy bandwidth not measured (the datasheet "
                "figure stands in); latencies estimated as for h200; links as for h200; "
                "memory: 80 GB HBM3 (datasheet), 81559 MiB as nvidia-smi reports an "
                "H100 SXM's total",
        mem_latency_us=0.7, l2_latency_us=0.3,
        link_gbps=450.0, link_latency_us=3.0, memory_bytes=81559 << 20,
    ),
    "cpu": Target(
        name="cpu", backend="cpu", workers=2, sms=2, mem_gbps=10.0,
        fp32_tflops=0.05, bf16_tflops=0.05, task_overhead_us=2000.0, smem_kb=0, arch=0,
        dtype="float32",
        sources="Triton interpreter on a 2-core x86-64 machine, measured 2026-11-29: "
                "about 20 ms per 64x1024 matvec tile task (DESIGN.md), i.e. task "
                "overhead dominates; bandwidth and rates are rough; links: gloo send/recv "
                "between two processes on this machine, measured 2026-11-30: about 50-100 "
                "us one way for small messages, 3.1 GB/s for 4 MB",
        link_gbps=3.0, link_latency_us=75.0,
    ),
}
