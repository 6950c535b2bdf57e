"""cost: predicted task times and DAG path lengths, used by the scheduler.

All workers run at once, so each gets 1/workers of the memory bandwidth and of the
flop rate. A task costs the longer of its memory traffic and its arithmetic on that
share, plus what it waits for:

* GPU targets (`Target.mem_latency_us` > 0) price latency: a task pays its dependent
  round trips to L2 (the protocol's record, args, waits and signal, and one per pass of
  a prologue reduction), then streams. A stream keeps `in_flight` bytes requested at
  once (a matvec or GEMM tile's weight ring, ir/stream.py; else a loop of plain
  loads), so by Little's law it moves at most in_flight / latency: its rate is the
  lower of that and the worker's share of the measured bandwidth, after the first
  bytes' latency. Only weights and state count against the bandwidth: activations
  stay in L2.
* Other targets (the interpreter) charge a flat overhead per task instead.

Where the target carries a measured per-worker streaming rate, no stream is faster.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tilec.ir.graph import FusedGraph, Group
from tilec.ir.record import prefetch_bytes
from tilec.ir.stream import (PLAIN_IN_FLIGHT, PROLOGUE_CHUNK, PROTOCOL_ROUND_TRIPS,
                             REDUCTION_KINDS, is_matvec, matmul_ring)
from tilec.ir.target import Target
from tilec.ir.tasks import TRANSFER, Buffer, Dep, GroupTiling, Task, TaskGraph

LOW_PRECISION = ("bfloat16", "float16")


@dataclass(frozen=True)
class Stream:
    """How a task moves its bytes, for the latency-aware model: `in_flight` bytes
    requested at once, after `round_trips` dependent round trips to L2; `hbm_bytes` of
    them come from HBM (weights and state: read once per step), the rest are
    activations, a few KB that many tasks read, which stay in L2 (-1: all from HBM)."""

    in_flight: int = PLAIN_IN_FLIGHT
    round_trips: int = PROTOCOL_ROUND_TRIPS
    hbm_bytes: int = -1
    prefetch: int = 0      # weight bytes asked into L2 before the waits (ir/record.py)


def task_time_us(task: Task, target: Target, dtype: str = "float32",
                 stream: Stream = Stream()) -> float:
    if task.group == TRANSFER:   # a message between devices: the link's latency and rate
        rate = target.link_gbps * 1e3 if target.link_gbps > 0 else float("inf")
        return target.link_latency_us + task.bytes / rate
    workers = max(1, target.workers)
    bytes_per_us = target.bandwidth_gbps * 1e3 / workers      # GB/s = 1e3 bytes/us
    if target.worker_stream_gbps:  # calibrated: what a task body was measured to stream
        bytes_per_us = min(bytes_per_us, target.worker_stream_gbps * 1e3)
    tflops = target.bf16_tflops if dtype in LOW_PRECISION else target.fp32_tflops
    flops_per_us = tflops * 1e6 / workers                      # TFLOP/s = 1e6 flop/us
    compute = task.flops / flops_per_us if flops_per_us > 0 else 0.0
    if target.mem_latency_us <= 0:
        memory = task.bytes / bytes_per_us if bytes_per_us > 0 else 0.0
        return target.task_overhead_us + max(memory, compute)
    rate = min(bytes_per_us, stream.in_flight / target.mem_latency_us)
    hbm = task.bytes if stream.hbm_bytes < 0 else stream.hbm_bytes
    memory = target.mem_latency_us + hbm / rate
    return stream.round_trips * target.l2_latency_us + max(memory, compute)


@dataclass(frozen=True)
class Prefetch:
    """What a task's weight prefetch can take off its time (`prefetch_saving_us`).
    The kernel asks L2 for a task's first weights PREFETCH_DEPTH tasks ahead, so its
    round trips and first bytes' latency overlap the task before it on the worker
    (`latency`; a queue's first task: only its wait), and its prefetched bytes stream
    whenever the worker's share of HBM has slack, in waits and in tasks that move fewer
    bytes than their time allows; after the wait they come from L2, faster (`stream`:
    their time from HBM less from L2, by Little's law on L2's latency). `busy`: how
    long the task itself keeps its HBM share busy (its bytes over the share)."""

    latency: float = 0.0
    stream: float = 0.0
    busy: float = 0.0


def prefetch_saving_us(task: Task, target: Target, stream: Stream) -> Prefetch:
    """The task's Prefetch; no saving without a prefetch or latencies."""
    if target.mem_latency_us <= 0 or task.group == TRANSFER:
        return Prefetch()
    share = target.bandwidth_gbps * 1e3 / max(1, target.workers)
    if target.worker_stream_gbps:
        share = min(share, target.worker_stream_gbps * 1e3)
    busy = (task.bytes if stream.hbm_bytes < 0 else stream.hbm_bytes) / share
    if stream.prefetch <= 0:
        return Prefetch(busy=busy)
    rate = min(share, stream.in_flight / target.mem_latency_us)
    from_l2 = stream.prefetch * target.l2_latency_us / stream.in_flight
    latency = stream.round_trips * target.l2_latency_us + target.mem_latency_us
    return Prefetch(latency, max(0.0, stream.prefetch / rate - from_l2), busy)


class Streams:
    """The Stream of each task of a task graph (`of(task)`), from its group's tiling: a
    matmul tile's ring (ir/stream.matmul_ring: a matvec tile's, or a GEMM tile's, whose
    depth its A chunks bound too) holds (stages - 1) chunks of its weights, or all of
    them when the task reads fewer (then at least what plain loads keep in flight); a
    prologue reduction reads its row in passes of PROLOGUE_CHUNK, each a round trip; a
    row group pays one per chunk of each pass."""

    def __init__(self, fused: FusedGraph, tilings: Sequence[GroupTiling],
                 buffers: Sequence[Buffer]):
        self.ops = fused.graph.by_name()
        self.buffers = {b.name: b for b in buffers}
        self.weights = {b.name for b in buffers if b.kind == "weight"}
        self.hbm = {b.name for b in buffers if b.kind in ("weight", "state")}
        self.groups = {g.name: (g, tl) for g, tl in zip(fused.groups, tilings)}
        self._known: dict[tuple[str, GroupTiling], tuple[int, int]] = {}

    def of(self, task: Task, tiling: GroupTiling | None = None) -> Stream:
        """`tiling`: price the task as cut by this tiling of its group instead."""
        if task.group not in self.groups:   # a transfer
            return Stream()
        g, tl = self.groups[task.group]
        tl = tiling or tl
        if (g.name, tl) not in self._known:
            self._known[(g.name, tl)] = _group_stream(g, tl, self.ops)
        ring, round_trips = self._known[(g.name, tl)]
        hbm = sum(n for name, n in task.moved if name in self.hbm) if task.moved else -1
        prefetch = prefetch_bytes(task, self.buffers)
        if not ring:
            return Stream(PLAIN_IN_FLIGHT, round_trips, hbm, prefetch)
        weight_bytes = sum(n for name, n in task.moved if name in self.weights)
        in_flight = ring if weight_bytes > ring else max(PLAIN_IN_FLIGHT, weight_bytes)
        return Stream(in_flight, round_trips, hbm, prefetch)


def _group_stream(g: Group, tl: GroupTiling, ops) -> tuple[int, int]:
    """(ring bytes or 0, round trips) of the tasks of group `g` cut by `tl`."""
    if g.kind == "matmul":
        k = ops[g.anchor].inputs[0].shape[-1]
        chunk = min(1 << max(0, (k - 1).bit_length()), PROLOGUE_CHUNK) if is_matvec(tl) else tl.block_k
        passes = sum(ops[m].kind in REDUCTION_KINDS for m in g.prologue) * math.ceil(k / chunk)
        return matmul_ring(g, ops, tl).b_in_flight, PROTOCOL_ROUND_TRIPS + passes
    if g.kind == "row":   # each reduction, then the final loop, walks its chunks
        reductions = sum(ops[m].kind in REDUCTION_KINDS for m in g.members)
        chunks = math.ceil(tl.block_n / max(1, tl.block_k))
        return 0, PROTOCOL_ROUND_TRIPS + (reductions + 1) * chunks
    return 0, PROTOCOL_ROUND_TRIPS + 2   # attention: the scores, then the values


def list_makespan(jobs: list[tuple[float, int]], workers: int) -> float:
    """When the last of `count` independent tasks of each `time` ((time, count) pairs)
    finishes, dealt longest first, each to the worker free first (LPT list scheduling,
    within 4/3 of the best possible, Graham 1969): what a stage takes on `workers`."""
    free = [0.0] * max(1, workers)
    for time, count in sorted(jobs, reverse=True):
        for _ in range(count):
            heapq.heapreplace(free, free[0] + time)
    return max(free)


def task_dtype(task: Task, dtypes: dict[str, str]) -> str:
    """The dtype a task computes in: that of the first buffer it writes (an anchor's
    output carries its operands' dtype), else of the first it reads.
    `dtypes` maps buffer name -> dtype."""
    for region in task.writes + task.reads:
        if region.buffer in dtypes:
            return dtypes[region.buffer]
    return "float32"


def task_times(taskgraph: TaskGraph, target: Target) -> list[float]:
    """Predicted time of every task, indexed by task id."""
    return task_costs(taskgraph, target)[0]


def task_costs(taskgraph: TaskGraph, target: Target) -> tuple[list[float], list[Prefetch]]:
    """(time, prefetch saving) of every task, indexed by task id: `task_time_us` and
    `prefetch_saving_us`."""
    dtypes = {b.name: b.type.dtype for b in taskgraph.buffers}
    streams = Streams(taskgraph.fused, taskgraph.tilings, taskgraph.buffers)
    times, savings = [], []
    for t in taskgraph.tasks:
        stream = streams.of(t)
        times.append(task_time_us(t, target, task_dtype(t, dtypes), stream))
        savings.append(prefetch_saving_us(t, target, stream))
    return times, savings


def hbm_bytes_per_step(taskgraph: TaskGraph, target: Target) -> int:
    """The bytes of one step `task_time_us` prices at HBM speed: each task's
    `Stream.hbm_bytes` (weights and state), or all its bytes on a target without
    latencies (which prices every byte alike); the activations it takes from L2 and
    the transfers between devices are not counted. Over the target's bandwidth, the
    floor under the cost model's own step (no task streams faster than its HBM share)."""
    tasks = [t for t in taskgraph.tasks if t.group != TRANSFER]
    if target.mem_latency_us <= 0:
        return sum(t.bytes for t in tasks)
    streams = Streams(taskgraph.fused, taskgraph.tilings, taskgraph.buffers)
    total = 0
    for t in tasks:
        hbm = streams.of(t).hbm_bytes
        total += t.bytes if hbm < 0 else hbm
    return total


def edges(taskgraph: TaskGraph) -> tuple[np.ndarray, np.ndarray]:
    """(before, after) task ids of every dep, as int64 arrays in deps order. A decode
    step has millions of deps: the passes work on these arrays, not loop over objects.
    Read-only arrays when the deps pass made them (DepArrays)."""
    deps = taskgraph.deps
    if isinstance(deps, DepArrays):
        return deps.arrays
    return (np.fromiter((d.before for d in deps), dtype=np.int64, count=len(deps)),
            np.fromiter((d.after for d in deps), dtype=np.int64, count=len(deps)))


class DepArrays(Sequence):
    """A task graph's deps as the deps pass makes them: a read-only sequence of Dep
    kept as arrays, each Dep made when it is read. The passes read only the `edges`
    arrays; making Llama-1B's 1.5 M Dep objects up front took 1.5 s of the 1.8 s deps
    pass, and only the stage dump and error messages ever look at them.
    Dep i is (before[i], after[i], kinds[tag[i]], buffers[tag[i]])."""

    def __init__(self, before: np.ndarray, after: np.ndarray, tag: np.ndarray,
                 kinds: list[str], buffers: list[str]):
        before.flags.writeable = after.flags.writeable = tag.flags.writeable = False
        self.arrays = (before, after)
        self._tag, self._kinds, self._buffers = tag, kinds, buffers

    def __len__(self) -> int:
        return len(self._tag)

    def tags(self) -> np.ndarray:
        """Each dep's index into `sources()`."""
        return self._tag

    def sources(self) -> tuple[list[str], list[str]]:
        """(kinds, buffers): dep i is of kind kinds[tags()[i]] on buffers[tags()[i]]."""
        return list(self._kinds), list(self._buffers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        tag = int(self._tag[i])
        return Dep(int(self.arrays[0][i]), int(self.arrays[1][i]), self._kinds[tag],
                   self._buffers[tag])

    def __iter__(self):
        kinds, buffers = self._kinds, self._buffers
        for b, a, tag in zip(self.arrays[0].tolist(), self.arrays[1].tolist(),
                             self._tag.tolist()):
            yield Dep(b, a, kinds[tag], buffers[tag])

    def __eq__(self, other) -> bool:   # as the tuple of Dep it stands for
        if not isinstance(other, (tuple, DepArrays)):
            return NotImplemented
        return len(self) == len(other) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))

    def __reduce__(self):
        return DepArrays, (*self.arrays, self._tag, self._kinds, self._buffers)


def adjacency(n: int, key: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """`value` grouped by `key` (task ids 0..n-1), in the given order within a group, as
    one flat array and bounds: group k is flat[bounds[k]:bounds[k + 1]]."""
    if len(key) and (key.min() < 0 or key.max() >= n):
        raise IndexError(f"a dep names task {key.min() if key.min() < 0 else key.max()}, "
                         f"not one of the {n} tasks")
    order = np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[order], np.arange(n + 1)).tolist()
    return value[order], bounds


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique, by sort: numpy 2's np.unique hashes first and took ~1 s on the 2 M
    edges of a decode step, a sort takes milliseconds."""
    values = np.sort(values)
    keep = np.ones(len(values), dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def _lists(n: int, key: np.ndarray, value: np.ndarray) -> list[list[int]]:
    flat, bounds = adjacency(n, key, value)
    flat = flat.tolist()
    return [flat[a:b] for a, b in zip(bounds, bounds[1:])]


def successors(taskgraph: TaskGraph) -> list[list[int]]:
    before, after = edges(taskgraph)
    return _lists(len(taskgraph.tasks), before, after)


def bottom_levels(taskgraph: TaskGraph, target: Target,
                  dep_edges: tuple[np.ndarray, np.ndarray] | None = None,
                  times: list[float] | None = None) -> list[float]:
    """Longest path (in predicted time) from each task to a sink, the task included.
    `dep_edges`, `times`: `edges(taskgraph)` and `task_times(taskgraph, target)`, when
    the caller has them already.

    Deps always point from a lower to a higher id, so one sweep in reverse id order
    sees every successor before its predecessors."""
    if times is None:
        times = task_times(taskgraph, target)
    before, after = dep_edges if dep_edges is not None else edges(taskgraph)
    succ, bounds = adjacency(len(times), before, after)
    level = np.zeros(len(times))
    for t in range(len(times) - 1, -1, -1):
        lo, hi = bounds[t], bounds[t + 1]
        level[t] = times[t] + (level[succ[lo:hi]].max() if hi > lo else 0.0)
    return level.tolist()


def critical_path(taskgraph: TaskGraph, target: Target) -> tuple[float, list[int]]:
    """(length in us, task ids along it) of the longest path through the deps DAG, each
    task at its shortest (its weight prefetch hidden behind its wait: a lower bound on
    any schedule). Ties go to the lowest id, so the answer is deterministic."""
    if not taskgraph.tasks:
        return 0.0, []
    times = [t - p.latency - p.stream for t, p in zip(*task_costs(taskgraph, target))]
    level = bottom_levels(taskgraph, target, times=times)
    succ = successors(taskgraph)
    # A sink path starts at a task with the largest bottom level (a source, necessarily).
    t = min(range(len(level)), key=lambda i: (-level[i], i))
    length, path = level[t], [t]
    while succ[t]:
        # Follow the successor that carries the rest of the longest path.
        rest = level[t] - times[t]
        t = min((s for s in succ[t] if abs(level[s] - rest) <= 1e-9 * max(1.0, rest)),
                default=None)
        if t is None:
            break
        path.append(t)
    return length, path
