"""The latency-aware cost model (GPU targets): a task pays its round trips to L2 and
the first bytes' latency, then streams at the lower of its worker's bandwidth share and
what it keeps in flight over the latency (Little's law); activations stay in L2."""
from __future__ import annotations

from dataclasses import replace

import pytest

from tilec.ir.stream import (GEMM_IN_FLIGHT, GEMM_RING_SMEM, PLAIN_IN_FLIGHT, PROTOCOL_ROUND_TRIPS,
                             RING_STAGES, gemm_stages, matmul_ring, ring_stages)
from tilec.ir.target import TARGETS
from tilec.ir.tasks import GroupTiling, Task
from tilec.passes.cost import Stream, task_time_us

H200 = TARGETS["h200"]
MB = 1 << 20


def weight_task(nbytes: int, activations: int = 0) -> Task:
    return Task(0, "g", (0, 0, 0), (), (), 0, nbytes + activations,
                (("w", nbytes), ("x", activations)))


def test_a_deep_ring_streams_at_the_bandwidth_share():
    share = H200.copy_gbps * 1e3 / H200.workers          # bytes per us per worker
    ring = Stream(in_flight=48 * 1024, round_trips=4, hbm_bytes=MB)
    expect = 4 * H200.l2_latency_us + H200.mem_latency_us + MB / share
    assert task_time_us(weight_task(MB), H200, "bfloat16", ring) == pytest.approx(expect)


def test_a_shallow_stream_is_bound_by_littles_law():
    """16 KB in flight over 0.7 us is 23 GB/s, below the 31.8 GB/s share of 4.2 TB/s."""
    shallow = Stream(in_flight=16 * 1024, round_trips=4, hbm_bytes=MB)
    rate = 16 * 1024 / H200.mem_latency_us
    expect = 4 * H200.l2_latency_us + H200.mem_latency_us + MB / rate
    assert rate < H200.copy_gbps * 1e3 / H200.workers
    assert task_time_us(weight_task(MB), H200, "bfloat16", shallow) == pytest.approx(expect)


def test_round_trips_and_latency_are_priced():
    t = weight_task(64 * 1024)
    base = task_time_us(t, H200, "bfloat16", Stream(48 * 1024, 4, 64 * 1024))
    more = task_time_us(t, H200, "bfloat16", Stream(48 * 1024, 6, 64 * 1024))
    assert more - base == pytest.approx(2 * H200.l2_latency_us)
    slower = replace(H200, mem_latency_us=2 * H200.mem_latency_us)
    assert task_time_us(t, slower, "bfloat16", Stream(48 * 1024, 4, 64 * 1024)) > base


def test_activations_cost_round_trips_not_bandwidth():
    stream = Stream(48 * 1024, 4, MB)
    assert task_time_us(weight_task(MB, 64 * 1024), H200, "bfloat16", stream) == \
        pytest.approx(task_time_us(weight_task(MB), H200, "bfloat16", stream))


def test_the_ring_the_cost_model_assumes_is_the_kernels():
    tiling = GroupTiling("g", 1, 16, 512, (1, 1, 128))
    assert ring_stages(tiling, 2048) == RING_STAGES
    assert ring_stages(tiling, 512) == 1            # one trip: no ring
    assert ring_stages(GroupTiling("g", 16, 16, 512, (1, 1, 1)), 2048) == 1   # not a matvec


def test_a_gemm_ring_is_as_deep_as_its_weights_and_shared_memory_allow():
    """GEMM tiles (16 rows or more): enough stages for GEMM_IN_FLIGHT bytes of B, no more
    than GEMM_RING_SMEM of A and B chunks, no more than the loop's trips, at least 3."""
    KB = 1024
    assert GEMM_IN_FLIGHT == 32 * KB and GEMM_RING_SMEM == 160 * KB
    assert gemm_stages(16, 16 * KB, 8 * KB) == 3      # 2 x 16 KB of B
    assert gemm_stages(32, 8 * KB, 32 * KB) == 5      # 4 x 8 KB of B, 160 KB in all
    assert gemm_stages(32, 2 * KB, 32 * KB) == 5      # shared memory: 4 x 34 KB
    assert gemm_stages(32, 2 * KB, 8 * KB) == 17      # 16 x 2 KB of B in 160 KB
    assert gemm_stages(2, 2 * KB, 0) == 3             # two trips
    assert gemm_stages(1, 2 * KB, 0) == 1             # one trip: nothing to overlap


def _h200_gemm_engine(rows: int, tile_n: int | None):
    """Llama's MLP block on h200 tiles of `rows` rows: an RMSNorm in float32 (the
    residual stream's dtype) in the up projection's prologue, then bfloat16 products."""
    import torch
    from torch import nn

    import tilec.api

    class NormMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.Parameter(torch.ones(512, dtype=torch.bfloat16))
            self.up = nn.Linear(512, 1024, bias=False, dtype=torch.bfloat16)
            self.down = nn.Linear(1024, 512, bias=False, dtype=torch.bfloat16)

        def forward(self, x):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.down(self.up(h.to(torch.bfloat16) * self.norm))

    return tilec.api.compile(NormMLP(), (torch.randn(rows, 512),), target="h200",
                             dtype="bfloat16", workers=16, tile_n=tile_n, aot=False)


@pytest.mark.parametrize("rows,tile_n", [(16, None), (128, 16)])
def test_gemm_tiles_are_priced_by_their_ring(rows, tile_n):
    """Each GEMM task is priced with the weight bytes its ring keeps in flight
    (ir/stream.matmul_ring, what codegen emits; tests/codegen/test_streaming.py holds it
    against the compiled code): 16-row tiles (a batched decode step's) keep
    GEMM_IN_FLIGHT, more than plain loads; 128 rows of float32 A against 16 columns of
    B fill shared memory first, and their shallow ring is priced as shallow."""
    from tilec.passes.cost import Streams

    tg = _h200_gemm_engine(rows, tile_n).data.manifest.schedule.taskgraph
    ops = tg.fused.graph.by_name()
    streams = Streams(tg.fused, tg.tilings, tg.buffers)
    groups = {g.name: (g, tl) for g, tl in zip(tg.fused.groups, tg.tilings)}
    weight_names = {b.name for b in tg.buffers if b.kind == "weight"}
    rings = set()
    for task in tg.tasks:
        g, tl = groups[task.group]
        if g.kind != "matmul":
            continue
        ring = matmul_ring(g, ops, tl)
        assert tl.block_m == rows and ring.stages >= 3, (tl, ring)
        assert ring.shared_bytes <= GEMM_RING_SMEM, ring
        weights = sum(n for name, n in task.moved if name in weight_names)
        assert weights > ring.b_in_flight, (weights, ring)
        assert streams.of(task).in_flight == ring.b_in_flight, (tl, ring)
        rings.add((g.name, ring))
    in_flight = {ring.b_in_flight for _, ring in rings}
    if rows == 16:
        assert len(rings) == 2 and min(in_flight) >= GEMM_IN_FLIGHT > PLAIN_IN_FLIGHT
    else:   # the up projection: 4 x (32 KB of A, 2 KB of B)
        assert len(rings) == 2 and min(in_flight) == 4 * 2 * 1024 < PLAIN_IN_FLIGHT, rings


def test_flat_targets_keep_the_flat_overhead():
    cpu = TARGETS["cpu"]
    t = weight_task(MB)
    assert task_time_us(t, cpu) == pytest.approx(cpu.task_overhead_us + MB / (cpu.mem_gbps * 1e3 / cpu.workers))
    assert PROTOCOL_ROUND_TRIPS >= 1


def test_inspect_holds_the_step_against_the_measured_hbm_floor():
    from pathlib import Path

    import tilec.api

    path = Path(__file__).resolve().parents[2] / "examples/llama_tiny.yaml"
    s = tilec.api.compile(str(path), target="h200", workers=16, aot=False).summary()
    b = s["bytes"]
    assert s["hbm_floor_measured"] and s["hbm_floor_gbps"] == H200.copy_gbps
    assert s["hbm_floor_us"] == pytest.approx((b["weights"] + b["kv"]) / (H200.copy_gbps * 1e3))
    assert s["predicted_over_hbm_floor"] == pytest.approx(s["predicted_step_us"] / s["hbm_floor_us"])
    assert s["predicted_over_hbm_floor"] > 1      # no schedule beats the floor


def test_a_prefetch_hides_latency_and_streams_in_slack():
    """The weights asked into L2 ahead take the round trips and the first bytes'
    latency off a task; when its worker's HBM share has slack (a wait, or tasks that
    move fewer bytes than their time allows) they also stream, so after the wait they
    come from L2. The scheduler applies it: behind another task on the worker the
    latency always, the stream as far as the slack covers it."""
    from tilec.passes.cost import prefetch_saving_us
    from tilec.passes.schedule import _prefetched

    share = H200.copy_gbps * 1e3 / H200.workers
    task = weight_task(256 * 1024)
    stream = Stream(48 * 1024, 4, 256 * 1024, prefetch=128 * 1024)
    p = prefetch_saving_us(task, H200, stream)
    assert p.latency == pytest.approx(4 * H200.l2_latency_us + H200.mem_latency_us)
    assert p.stream == pytest.approx(128 * 1024 / share - 128 * 1024 * H200.l2_latency_us / (48 * 1024))
    assert p.busy == pytest.approx(256 * 1024 / share)
    assert _prefetched(p, 0.0, follows=True, credit=0.0) == (p.latency, 0.0, 0.0)
    assert _prefetched(p, 0.0, follows=False, credit=0.0) == (0.0, 0.0, 0.0)
    assert _prefetched(p, 1.0, follows=True, credit=0.0) == (pytest.approx(p.latency + 1.0), 0.0, 0.0)
    assert _prefetched(p, 0.0, follows=True, credit=1.0) == (pytest.approx(p.latency + 1.0), 1.0, 0.0)
    # a long wait streams all of it, and leaves the rest for the prefetches after it
    saved, used, left = _prefetched(p, 100.0, follows=False, credit=0.5)
    assert saved == pytest.approx(p.latency + p.stream) and used == 0.5
    assert left == pytest.approx(100.0 - p.latency - (p.stream - 0.5))
    assert prefetch_saving_us(task, H200, replace(stream, prefetch=0)).stream == 0
    assert prefetch_saving_us(task, TARGETS["cpu"], stream) == (type(p)())


def test_slack_streams_only_prefetches_already_asked_for():
    """Slack during a worker's k-th task serves tasks k..k + PREFETCH_DEPTH, oldest
    first; later tasks' prefetches had not been asked for yet."""
    from tilec.ir.abi import PREFETCH_DEPTH
    from tilec.passes.schedule import _Slack

    slack = _Slack()
    slack.add(3.0, 0)
    assert slack.usable(PREFETCH_DEPTH) == 3.0
    slack.use(1.0)
    assert slack.usable(1) == pytest.approx(2.0)
    assert slack.usable(PREFETCH_DEPTH + 1) == 0.0
