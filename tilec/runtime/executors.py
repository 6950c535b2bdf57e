"""Executors: run one step of an engine.

* `interpret`: the generated kernel under Triton's interpreter in cooperative mode.
  Each launch runs one worker until a task is not ready (or a budget is spent); the
  host picks the next worker by a policy, so tests can explore interleavings. A full
  pass without progress is a deadlock, reported with who waits on what.
* `reference`: the same queues, events and waits, but each task computed with torch
  ops (`reference.TaskRunner`): an oracle for the kernel.
* `gpu`: one launch of the persistent kernel per step, grid = workers, spin-waits
  bounded by a watchdog. It launches the binary stored in the engine (compiled ahead
  of time by `tilec compile`) when it fits this GPU and this Triton; otherwise it
  compiles the kernel source (Triton's JIT) and logs one warning line saying why.

Profiling (`tilec run --profile`, `Executor.start_profile()`): the cooperative
executors then give every launch a budget of one task and stamp the host clock around
it, so `self.trace` collects one (step, worker, task id, start s, end s) record per
task run; the interleaving policy still picks the order of workers. On the `gpu`
backend the kernel itself stamps each task's start and end from the global timer
(PROFILE constexpr) into a buffer, read back into the same records after the launch.
"""
from __future__ import annotations

import hashlib
import logging
import random
import time
import warnings
from typing import Callable

import numpy as np
import torch

from tilec.codegen import aot
from tilec.codegen.loader import own_binary
from tilec.errors import RunError, ScheduleHangError
from tilec.ir.abi import (ARGS_ROW, ERROR_WORDS, NUM_WARPS, SIGNAL, SPIN_LIMIT, TILE, AOTKernel,
                          launch_arguments, record_waits)
from tilec.limits import gigabytes, memory_problem
from tilec.runtime.enginefile import TORCH_DTYPES, EngineFile
from tilec.runtime.error_buffer import recorded_error
from tilec.runtime.kernel import engine_kernel, require_mode
from tilec.runtime.reference import TaskRunner
from tilec.runtime.sizes import allocated_bytes

POLICIES = ("round_robin", "random", "reverse")
log = logging.getLogger(__name__)


class NaNValuesError(RunError):
    """A step stopped at values that are all NaN (the interpreter's argmax cannot pick
    one). Generation reports it as NaN logits, the same on every backend."""


class Executor:
    """Pools, events and the step counter shared by all executors."""

    backend = "?"

    def __init__(self, engine: EngineFile, device: str = "cpu", comm=None,
                 share_with: "Executor | None" = None):
        """`share_with`: an executor whose pools this one runs on where the two share
        them (`shared_pools`: the state, and the weights of one engine's entries); those
        are taken as they are, never allocated or copied, and only the rest (the arenas)
        is made here."""
        self.engine = engine
        self.device = device
        m = engine.manifest
        sched = m.schedule
        self.schedule = sched
        taken = {} if share_with is None else shared_pools(sched, engine, share_with)
        _check_memory([p for p in sched.pools if p.name not in taken], device)
        self.pools: dict[str, torch.Tensor] = {
            p.name: taken[p.name] if p.name in taken else fresh_pool(engine, p, device)
            for p in sched.pools}
        self.buffers = {b.name: b for b in sched.buffers}
        self.tables = {k: engine.tensors[k].to(device) for k in ("tasks", "queue_start", "args")}
        self.events = torch.zeros(max(len(sched.events), 1), dtype=torch.int32, device=device)
        self.error = torch.zeros(ERROR_WORDS, dtype=torch.int32, device=device)
        self.step_index = 0
        # Multi-device: this device's comm worker and the messages it sends and receives
        tg = sched.taskgraph
        self.comm_worker = sched.target.comm_worker()
        # `comm.transfer(transfer, view_of, step)` sends and receives this device's parts
        # (view_of: region -> view of this device's buffer) and says whether it completed: a rank's Communicator (blocking, torch.distributed), or
        # the in-process exchange of LocalDevices (all devices in this process)
        self.comm = comm
        if tg.devices > 1:
            if device != "cpu":
                raise RunError("multi-device engines run on the interpret and reference "
                               "backends (gloo between CPU processes) in this version")
            if comm is None:
                from tilec.runtime.distributed import communicator
                self.comm = communicator(tg.device, tg.devices)

    def use_state_of(self, other: "Executor") -> None:
        """Run on `other`'s state pools (the KV cache) from now on, and on the weight
        pools the two share (`shared_pools`); a RunError if their state is laid out
        differently. An executor made with `share_with=other` already does."""
        self.pools.update(shared_pools(self.schedule, self.engine, other))
        if hasattr(self, "pool_args"):
            self.pool_args = [self.pools[p.name] for p in self.schedule.pools]

    # ---- inputs and outputs ------------------------------------------------------------
    def write_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        specs = self.engine.manifest.inputs
        missing = [s.name for s in specs if s.name not in inputs]
        extra = sorted(set(inputs) - {s.name for s in specs})
        if missing or extra:
            raise RunError(f"inputs do not match the engine: missing {missing}, unexpected {extra}")
        for s in specs:
            x = inputs[s.name]
            if tuple(x.shape) != s.shape:
                raise RunError(f"input {s.name!r} has shape {tuple(x.shape)}, expected {s.shape}")
            if x.dtype != TORCH_DTYPES[s.dtype]:
                raise RunError(f"input {s.name!r} has dtype {x.dtype}, expected {s.dtype}")
            if s.high is not None and x.numel() and (int(x.min()) < s.low or int(x.max()) >= s.high):
                raise RunError(f"input {s.name!r} has values outside [{s.low}, {s.high})")
            buf = self.buffers[s.buffer]
            dest = torch.as_strided(self.pools[buf.pool], s.shape, s.strides, buf.offset + s.offset)
            dest.copy_(x.to(self.device))

    def read_outputs(self) -> dict[str, torch.Tensor]:
        out = {}
        for s in self.engine.manifest.outputs:
            buf = self.buffers[s.buffer]
            out[s.name] = torch.as_strided(self.pools[buf.pool], s.shape, s.strides,
                                           buf.offset + s.offset).clone().cpu()
        return out

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.write_inputs(inputs)
        try:
            self.launch()
        except Exception:
            # an index out of range is the cause of what failed after it (NaN everywhere
            # past an attention at position -1, say): report it, if the step recorded one
            self.raise_recorded_error(self.step_index)
            raise
        self.step_index += 1
        self.raise_recorded_error(self.step_index - 1)
        return self.read_outputs()

    def raise_recorded_error(self, step: int) -> None:
        error = self.take_recorded_error(step)
        if error is not None:
            raise error

    def take_recorded_error(self, step: int) -> Exception | None:
        """What the step recorded in the error buffer, as one exception, or None; the
        buffer is cleared, so a later step starts clean (an index error ends the step's
        work, every task ran and signalled, only its outputs are void)."""
        words = self.error.tolist()
        if not words[0]:
            return None
        self.error.zero_()
        return recorded_error(words, step, self.describe_task, self.schedule.taskgraph.fused)

    def launch(self) -> None:
        raise NotImplementedError

    def start_profile(self) -> None:
        """Record a host-clock span per task from now on (into `self.trace`)."""
        raise RunError(f"--profile: the {self.backend} backend cannot time tasks "
                       "(use --backend interpret or reference)")

    # ---- diagnosis -----------------------------------------------------------------
    def describe_task(self, row: int) -> str:
        tid = int(self.engine.tensors["task_ids"][row])
        task = self.schedule.taskgraph.tasks[tid]
        return f"task {tid} ({task.group} tile {task.tile})"


def fresh_pool(engine: EngineFile, pool, device: str) -> torch.Tensor:
    """The pool an executor of `engine` allocates for itself on `device`: the file's
    weights (on the CPU the file's tensor itself, nothing copied), a copy of the state's
    initial contents (one copy, on either device: the KV cache is written), or a zeroed
    arena."""
    if pool.kind == "weight":
        return engine.tensors[f"pool.{pool.name}"].to(device)
    if pool.kind == "state":
        return engine.tensors[f"pool.{pool.name}"].to(device, copy=True)
    return torch.zeros(pool.numel, dtype=TORCH_DTYPES[pool.dtype], device=device)


def shared_pools(schedule, engine: EngineFile, other: Executor) -> dict[str, torch.Tensor]:
    """The pools an executor of `schedule` (of `engine`) runs on that are `other`'s: its
    state pools (the KV cache: another schedule over the same state, a decoder's prefill
    entry beside its decode step; their state buffers must lie where `other`'s do, same
    names, pools, offsets and shapes, else a RunError), and its weight pools where it is
    an entry of `other`'s engine (the entries of one engine store their weights once,
    placed alike, checked at load: weights a caller put in place of the file's are then
    the ones every entry runs on) or both come from the same file tensors. Launches of
    the two run one after the other, each to its end, so one's writes are complete
    before the other reads them (passes/entries.py)."""
    mine, theirs = state_layout(schedule), state_layout(other.schedule)
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))
        raise RunError(f"the two schedules lay out their state differently "
                       f"(first difference: {diff[0][0]}): they cannot share it")
    entry_of_other = other.engine.entries.get(engine.manifest.entry) is engine
    out = {}
    for p in schedule.pools:
        key = f"pool.{p.name}"
        same_weights = p.kind == "weight" and p.name in other.pools and (
            entry_of_other or engine.tensors.get(key) is other.engine.tensors.get(key))
        if p.kind == "state" or same_weights:
            out[p.name] = other.pools[p.name]
    return out


def state_layout(schedule) -> dict[str, tuple]:
    """Each state buffer's (pool, offset, shape, dtype) and each state pool's size, by
    name: what two schedules sharing state must agree on."""
    layout = {b.name: (b.pool, b.offset, tuple(b.type.shape), b.type.dtype)
              for b in schedule.buffers if b.kind == "state"}
    layout.update({f"pool {p.name}": (p.numel, p.dtype) for p in schedule.pools
                   if p.kind == "state"})
    return layout


def _check_memory(pools, device: str) -> None:
    """A RunError, before anything is allocated, unless the pools an executor allocates
    on `device` fit in the memory free there now."""
    need = allocated_bytes(pools, device)
    if device == "cpu":
        problem = memory_problem("running this engine", need)
    else:
        free = torch.cuda.mem_get_info()[0]
        problem = None if need <= free else (
            f"running this engine takes {gigabytes(need)} of GPU memory, more than the "
            f"{gigabytes(free)} free")
    if problem:
        raise RunError(problem)


class CooperativeExecutor(Executor):
    """Host-driven interleaving of workers; subclasses say how one worker advances."""

    def __init__(self, engine: EngineFile, policy: str = "round_robin", seed: int = 0,
                 device: str = "cpu", comm=None, share_with: Executor | None = None):
        super().__init__(engine, device, comm, share_with)
        if policy not in POLICIES:
            raise RunError(f"unknown interleaving policy {policy!r} (choose from {', '.join(POLICIES)})")
        self.policy = policy
        self.rng = random.Random(seed)
        # (step, worker, task id, start s, end s) per task run while profiling
        self.trace: list[tuple[int, int, int, float, float]] | None = None

    def advance(self, worker: int, budget: int) -> None:
        raise NotImplementedError

    def start_profile(self) -> None:
        self.trace = []

    def ready(self, rec: list[int]) -> bool:
        """Whether every wait of task record `rec` is met at this step."""
        step = self.step_index + 1
        return all(int(self.events[ev]) >= count * step for ev, count in record_waits(rec))

    def _advance(self, worker: int, budget: int) -> None:
        if worker == self.comm_worker:
            self.advance_transfers(budget)
        else:
            self.advance(worker, budget)

    def advance_transfers(self, budget: int) -> None:
        """The comm worker: run ready transfers in queue order (each a blocking message
        to or from the other ranks), as a kernel worker runs ready tasks."""
        w = self.comm_worker
        end = int(self.tables["queue_start"][w + 1])
        row = int(self.cursor[w])
        transfers = self.schedule.taskgraph.transfers
        ran = 0
        while row < end and ran < budget:
            rec = self.tables["tasks"][row].tolist()
            if not self.ready(rec):
                break
            if not self.comm.transfer(transfers[rec[TILE]], self.region_view, self.step_index):
                break   # in-process: a party is not there yet
            self.events[rec[SIGNAL]] += 1
            row += 1
            ran += 1
        self.cursor[w] = row

    def region_view(self, region) -> torch.Tensor:
        """A region of a buffer as a view of its pool."""
        buf = self.buffers[region.buffer]
        whole = torch.as_strided(self.pools[buf.pool], buf.type.shape, buf.layout_strides(),
                                 buf.offset)
        return whole[tuple(slice(a, b) for a, b in region.box)]

    def _advance_timed(self, worker: int) -> None:
        """One launch with a budget of one task, its host time recorded if it ran one."""
        row = int(self.cursor[worker])
        t0 = time.perf_counter()
        self._advance(worker, 1)
        t1 = time.perf_counter()
        if int(self.cursor[worker]) != row:
            tid = int(self.engine.tensors["task_ids"][row])
            self.trace.append((self.step_index, worker, tid, t0, t1))

    def launch(self) -> None:
        self.begin_launch()
        while not self.finished():
            if not self.pass_over_workers():
                raise ScheduleHangError(self.deadlock_report(self.live()))

    def begin_launch(self) -> None:
        starts = self.tables["queue_start"].tolist()
        self.cursor = torch.tensor(starts[:-1], dtype=torch.int32, device=self.device)
        self.ends = starts[1:]

    def live(self) -> list[int]:
        return [w for w in range(len(self.ends)) if int(self.cursor[w]) < self.ends[w]]

    def finished(self) -> bool:
        return not self.live()

    def pass_over_workers(self) -> bool:
        """Give every unfinished worker a turn, in the policy's order; whether any ran
        a task."""
        live = self.live()
        if self.policy == "round_robin":
            picks = [(w, 1 << 30) for w in live]
        elif self.policy == "reverse":
            picks = [(w, 1 << 30) for w in reversed(live)]
        else:  # random worker order, random small budgets: fine-grained interleavings
            picks = [(w, self.rng.randint(1, 3)) for w in self.rng.sample(live, len(live))]
        progressed = False
        for w, budget in picks:
            before = int(self.cursor[w])
            if self.trace is None:
                self._advance(w, budget)
            else:
                self._advance_timed(w)
            progressed |= int(self.cursor[w]) != before
        return progressed

    def deadlock_report(self, live: list[int]) -> str:
        table = self.tables["tasks"]
        parts = []
        for w in live:
            row = int(self.cursor[w])
            rec = table[row].tolist()
            unmet = []
            for ev, cnt in record_waits(rec):
                need = cnt * (self.step_index + 1)
                seen = int(self.events[ev])
                if seen < need:
                    unmet.append(f"event {ev} (seen {seen}, wanted {need})")
            parts.append(f"worker {w} in {self.describe_task(row)} waits on {', '.join(unmet)}")
        return f"deadlock at step {self.step_index}: " + "; ".join(parts)


class InterpretExecutor(CooperativeExecutor):
    backend = "interpret"

    def __init__(self, engine: EngineFile, policy: str = "round_robin", seed: int = 0, comm=None,
                 share_with: Executor | None = None):
        super().__init__(engine, policy, seed, comm=comm, share_with=share_with)
        require_mode(interpret=True)
        self.kernel = engine_kernel(engine)
        self.pool_args = [self.pools[p.name] for p in self.schedule.pools]

    def advance(self, worker: int, budget: int) -> None:
        t = self.tables
        # Lanes past a tile's edge compute too, as on a GPU, where 0/0 is a quiet NaN
        # that is never stored; numpy would warn about each one.
        row = int(self.cursor[worker])
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
            try:
                args = launch_arguments(
                    {**t, "events": self.events, "cursor": self.cursor, "error": self.error,
                     "stamps": self.error, "step": self.step_index, "worker_base": worker,
                     "budget": budget}, self.pool_args)
                self.kernel[(1,)](*args, BLOCKING=False, SPIN_LIMIT=1, PROFILE=False)
            except Exception as e:
                # The interpreter's argmax (numpy's nanargmax) refuses a row of NaN only;
                # the GPU and the reference backend return an index. Whichever task it
                # was, its values are NaN: say so, in one line.
                if "All-NaN slice" not in str(e):
                    raise
                raise NaNValuesError(f"step {self.step_index}: every value an argmax of "
                                     f"worker {worker} (at or after {self.describe_task(row)}) "
                                     "reads is NaN") from None


class ReferenceExecutor(CooperativeExecutor):
    backend = "reference"

    def __init__(self, engine: EngineFile, policy: str = "round_robin", seed: int = 0, comm=None,
                 share_with: Executor | None = None):
        super().__init__(engine, policy, seed, comm=comm, share_with=share_with)
        sched = self.schedule
        fused = sched.taskgraph.fused
        self.runner = TaskRunner(fused.groups, fused.graph.by_name(),
                                 {t.group: t for t in sched.taskgraph.tilings},
                                 self.buffers, self.pools, self.error)
        self.records = self.tables["tasks"].tolist()

    def advance(self, worker: int, budget: int) -> None:
        end = int(self.tables["queue_start"][worker + 1])
        row = int(self.cursor[worker])
        ran = 0
        while row < end and ran < budget:
            rec = self.records[row]
            if not self.ready(rec):
                break
            self.runner.run(rec[ARGS_ROW], tuple(rec[TILE:TILE + 3]))
            self.events[rec[SIGNAL]] += 1
            row += 1
            ran += 1
        self.cursor[worker] = row


class GPUExecutor(Executor):
    """One launch per step, grid = workers. `timing` records each launch's device time
    (CUDA events); `start_profile()` makes the kernel stamp every task instead.

    `binary` is the engine's stored binary, loaded (no compile), or None: then each
    launch goes through Triton's JIT (`kernel`), which compiles on the first one. The
    time-stamping variant (`start_profile`) is not stored: profiling always JITs it."""

    backend = "gpu"

    def __init__(self, engine: EngineFile, share_with: Executor | None = None):
        if not torch.cuda.is_available():
            raise RunError("the gpu backend needs a CUDA GPU and none is visible")
        require_mode(interpret=False)
        super().__init__(engine, "cuda", share_with=share_with)
        self.kernel = engine_kernel(engine)
        self.binary = self._stored_binary(engine)
        self.pool_args = [self.pools[p.name] for p in self.schedule.pools]
        self.workers = self.schedule.target.workers
        self.cursor = torch.zeros(self.workers, dtype=torch.int32, device="cuda")
        self.timing = False              # record each launch's device time (CUDA events)
        # the watchdog's bound on one wait, in spins: the stored binary has SPIN_LIMIT
        # compiled in, so another bound launches the kernel through the JIT
        self.spin_limit = SPIN_LIMIT
        self.kernel_ms: list[float] = []
        n = int(self.tables["tasks"].shape[0])
        self.stamps = torch.zeros(max(1, 2 * n), dtype=torch.int64, device="cuda")
        self.trace: list[tuple[int, int, int, float, float]] | None = None

    def _stored_binary(self, engine: EngineFile):
        """The stored binary, ready to launch, or None with a warning saying why not
        (none when the engine stores no binary: nothing was expected then)."""
        import triton

        major, minor = torch.cuda.get_device_capability()
        problem = stored_binary_problem(engine.aot, engine.kernel_source, major * 10 + minor,
                                        triton.__version__, SPIN_LIMIT,
                                        trusted=engine.code_trusted)
        if problem is None:
            try:
                return aot.load_binary(engine.aot, self.kernel, self.schedule.pools)
            except Exception as e:  # e.g. a driver too old for the binary: the JIT may do
                first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                problem = f"the driver could not load the stored GPU binary ({first})"
        if engine.aot is not None:
            log.warning("warning: %s; compiling the kernel from its source instead", problem)
        return None

    def start_profile(self) -> None:
        """Launch with PROFILE=True from now on: every task stamps its start and end
        from the GPU's global timer (written, compiled for sm_90 in the tests, not yet
        run on a GPU)."""
        self.trace = []

    def launch(self) -> None:
        t = self.tables
        if self.timing:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        self._launch(t)
        if self.timing:
            end.record()
            end.synchronize()
            self.kernel_ms.append(start.elapsed_time(end))

    def _launch(self, t) -> None:
        profile = self.trace is not None
        args = launch_arguments(
            {**t, "events": self.events, "cursor": self.cursor, "error": self.error,
             "stamps": self.stamps, "step": self.step_index, "worker_base": 0,
             "budget": 1 << 30}, self.pool_args)
        if self.binary is not None and not profile and \
                self.spin_limit == self.engine.aot.spin_limit:
            # a compiled kernel takes the constexprs too, positionally, in signature order
            self.binary[(self.workers, 1, 1)](*args, True, self.engine.aot.spin_limit, False)
        else:
            self.kernel[(self.workers,)](*args, BLOCKING=True, SPIN_LIMIT=self.spin_limit,
                                         PROFILE=profile, num_warps=NUM_WARPS)
        if profile:
            self._collect_stamps()

    def _collect_stamps(self) -> None:
        """Per task row the kernel stamped (start, end) in global-timer nanoseconds;
        kept as (step, worker, task id, start s, end s) like the CPU executors' trace."""
        stamps = self.stamps.view(-1, 2).cpu().tolist()
        starts = self.tables["queue_start"].tolist()
        ids = self.engine.tensors["task_ids"].tolist()
        for w in range(len(starts) - 1):
            for row in range(starts[w], starts[w + 1]):
                began, ended = stamps[row]
                self.trace.append((self.step_index, w, ids[row], began * 1e-9, ended * 1e-9))

    def check(self) -> None:
        torch.cuda.synchronize()
        self.raise_recorded_error(self.step_index)

    def run(self, inputs):
        self.write_inputs(inputs)
        self.launch()
        try:
            self.check()
        finally:
            self.step_index += 1
        return self.read_outputs()


def stored_binary_problem(binary: AOTKernel | None, source: str, capability: int,
                          triton_version: str, spin_limit: int,
                          trusted: bool = False) -> str | None:
    """Why an engine entry's stored GPU binary cannot be launched here for its kernel
    `source`, or None if it can.

    A binary is launched only for the source it was compiled from: each entry of an
    engine (decode, prefill) has its own kernel and its own binary, and `load` refuses a
    file whose binary is another source's; this holds an engine made in memory to it
    too. A cubin is machine code: it is launched only if this user's tilec compiled it
    (codegen.loader.own_binary) or the user trusts the file's code (`trusted`). A cubin
    for sm_90a runs only on compute capability 9.0 (`capability` is major x 10 +
    minor); Triton's launcher and metadata change between versions, so only the Triton
    that compiled it launches it; and the watchdog bound is compiled in."""
    if binary is None:
        return "the engine stores no GPU binary"
    if binary.kernel_sha256 != hashlib.sha256(source.encode()).hexdigest():
        return "the stored GPU binary was compiled from another kernel source than this one"
    if binary.arch != capability:
        return f"the stored GPU binary is for sm_{binary.arch}, this GPU is sm_{capability}"
    if binary.triton_version != triton_version:
        return (f"the stored GPU binary was compiled by Triton {binary.triton_version}, "
                f"this is Triton {triton_version}")
    if binary.spin_limit != spin_limit:
        return (f"the stored GPU binary waits at most {binary.spin_limit} spins, this run "
                f"asks for {spin_limit}")
    if not trusted and not own_binary(binary.cubin_sha256):
        return ("the stored GPU binary was not compiled by this user's tilec, and machine "
                "code cannot be checked against its source (--trust-engine-code launches it)")
    return None


BACKENDS: dict[str, Callable[..., Executor]] = {
    "interpret": InterpretExecutor,
    "reference": ReferenceExecutor,
    "gpu": GPUExecutor,
}


def entry_executor(decode: Executor, name: str, **kwargs) -> Executor:
    """An executor of the engine's entry `name` (`prefill`) on the same backend as
    `decode`, an executor of its decode step, made on `decode`'s KV cache and weights
    (`share_with`: on a GPU, no second copy of them is ever made, not even for a
    moment). `kwargs`: the CPU backends' policy and seed."""
    return make_executor(decode.engine.entry(name), decode.backend, share_with=decode,
                         **kwargs)


def make_executor(engine: EngineFile, backend: str = "auto",
                  share_with: Executor | None = None, **kwargs) -> Executor:
    engine.require_weights()   # a plan has no pools to run on
    if backend == "auto":
        sched = engine.manifest.schedule
        backend = "gpu" if (torch.cuda.is_available() and sched.target.backend == "cuda"
                            and sched.taskgraph.devices == 1) else "interpret"
    if backend not in BACKENDS:
        raise RunError(f"unknown backend {backend!r} (choose from auto, {', '.join(BACKENDS)})")
    if backend == "gpu":
        kwargs = {}
    return BACKENDS[backend](engine, share_with=share_with, **kwargs)
