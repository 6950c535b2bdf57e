"""schedule -> sync -> memplan -> verify on hand-built and random task graphs.

Positive properties: every compiled schedule verifies. Negative ones: each kind of
damage (a missing wait, a task moved past its producer, a shrunk buffer, two live
buffers on the same bytes) is caught by verify and raised by check.
"""
from __future__ import annotations

import re
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tilec.errors import ScheduleError
from tilec.ir.graph import FusedGraph, Graph, TensorType
from tilec.ir.schedule import Schedule
from tilec.ir.target import TARGETS, Role
from tilec.ir.tasks import Buffer, Region, Task, TaskGraph
from tilec.passes.cost import bottom_levels, critical_path, task_time_us, task_times
from tilec.passes.deps import deps
from tilec.passes.memplan import ALIGN, memplan
from tilec.passes.schedule import schedule
from tilec.passes.sync import happens_before_clocks, sync
from tilec.passes.verify import check, verify

EMPTY = FusedGraph(Graph((), (), ()), ())


def target(workers: int):
    return replace(TARGETS["cpu"], workers=workers)


def graph(buffers: dict, tasks: list) -> TaskGraph:
    """buffers: name -> (shape, kind[, dtype]); tasks: (group, reads, writes) with
    regions as (buffer, box)."""
    bufs = tuple(Buffer(name, TensorType(tuple(spec[0]), spec[2] if len(spec) > 2
                                         else "float32"), spec[1])
                 for name, spec in buffers.items())
    ts = tuple(Task(i, group, (0, i, 0), tuple(Region(b, tuple(box)) for b, box in reads),
                    tuple(Region(b, tuple(box)) for b, box in writes), 100, 400)
               for i, (group, reads, writes) in enumerate(tasks))
    return deps(TaskGraph(EMPTY, bufs, (), ts))


def compile_schedule(tg: TaskGraph, workers: int, policy: str = "critical_path",
                     max_waits: int = 8) -> Schedule:
    return memplan(sync(schedule(tg, target(workers), policy), max_waits=max_waits))


def assert_broken(s: Schedule, check_name: str | None = None) -> None:
    report = verify(s)
    assert not report.ok
    if check_name:
        assert not report.checks[check_name], report.violations
    with pytest.raises(ScheduleError):
        check(verify(s))


# ---------------------------------------------------------------- hand-built graphs

def chain(n: int) -> TaskGraph:
    """t0 writes x0, t1 reads x0 writes x1, ...: every task needs the previous one."""
    buffers = {f"x{i}": ((4, 8), "activation") for i in range(n)}
    tasks = [("g0", [], [("x0", ((0, 4), (0, 8)))])]
    tasks += [(f"g{i}", [(f"x{i - 1}", ((0, 4), (0, 8)))], [(f"x{i}", ((0, 4), (0, 8)))])
              for i in range(1, n)]
    return graph(buffers, tasks)


def fan() -> TaskGraph:
    """Two producer groups of 4 row tiles, consumers reading pairs of rows of both."""
    buffers = {"inp": ((8, 8), "input"), "a": ((8, 8), "activation"),
               "b": ((8, 8), "activation"), "out": ((8, 8), "output")}
    tasks = []
    for r in range(4):
        tasks.append(("pa", [("inp", ((2 * r, 2 * r + 2), (0, 8)))], [("a", ((2 * r, 2 * r + 2), (0, 8)))]))
    for r in range(4):
        tasks.append(("pb", [("a", ((2 * r, 2 * r + 2), (0, 8)))], [("b", ((2 * r, 2 * r + 2), (0, 8)))]))
    for r in range(2):
        tasks.append(("c", [("a", ((4 * r, 4 * r + 4), (0, 8))), ("b", ((4 * r, 4 * r + 4), (0, 8)))],
                      [("out", ((4 * r, 4 * r + 4), (0, 8)))]))
    return graph(buffers, tasks)


def test_cost_model_and_critical_path():
    tg = chain(4)
    t = target(2)
    one = task_time_us(tg.tasks[0], t)
    assert one >= t.task_overhead_us
    levels = bottom_levels(tg, t)
    assert levels[0] == pytest.approx(4 * one) and levels[3] == pytest.approx(one)
    length, path = critical_path(tg, t)
    assert path == [0, 1, 2, 3] and length == pytest.approx(4 * one)
    big = replace(tg.tasks[0], flops=10**12)
    assert task_time_us(big, t, "bfloat16") <= task_time_us(big, replace(t, bf16_tflops=0.01), "bfloat16")


@pytest.mark.parametrize("workers", [1, 4])
def test_chain_needs_no_waits(workers):
    s = compile_schedule(chain(6), workers)
    assert sum(1 for q in s.queues if q) == 1       # no latency is worth paying
    assert all(ws == () for ws in s.waits)
    assert len(s.queues) == workers
    assert verify(s).ok


def test_round_robin_chain_waits_on_each_predecessor():
    s = compile_schedule(chain(6), 3, policy="round_robin")
    assert [len(ws) for ws in s.waits] == [0, 1, 1, 1, 1, 1]
    assert verify(s).ok


def test_same_worker_and_transitive_waits_are_pruned():
    # t0 on w0 writes x; t1 on w1 reads x; t2 on w1 reads x too: t1's wait covers t2.
    tg = graph({"x": ((4,), "activation"), "y": ((4,), "activation"), "z": ((4,), "activation")},
               [("p", [], [("x", ((0, 4),))]),
                ("c", [("x", ((0, 4),))], [("y", ((0, 4),))]),
                ("d", [("x", ((0, 4),))], [("z", ((0, 4),))])])
    base = Schedule(tg, target(2), queues=((0,), (1, 2)), order=(0, 1, 2),
                    start_us=(0.0,) * 3, finish_us=(1.0,) * 3)
    s = sync(base)
    assert len(s.waits[1]) == 1 and s.waits[2] == ()
    assert verify(memplan(s)).ok


def test_fan_blocks_and_thresholds():
    s = compile_schedule(fan(), 3, policy="round_robin")
    assert verify(s).ok, verify(s).violations
    assert sorted(len([t for t in s.signal if t == e.id]) for e in s.events) == \
        sorted(e.signals for e in s.events)
    for ws in s.waits:
        assert list(ws) == sorted(ws, key=lambda w: w.event)
        for w in ws:
            assert w.count == s.events[w.event].signals


# h200 priced the flat way (a fixed overhead per task, a fixed rate per worker), so that
# task times are exactly what a test asks for
FLAT_H200 = replace(TARGETS["h200"], worker_stream_gbps=7.6, mem_latency_us=0.0,
                    l2_latency_us=0.0, copy_gbps=0.0)


def two_waves(tiles: int, q_us: float) -> TaskGraph:
    """A decode layer's projections in miniature: `tiles` q tiles (`q_us` each) feed the
    attention `a` directly; as many k tiles (2 us each) feed it through `r` (1 us), as k
    feeds it through RoPE and the cache append. `a` takes 1 us. Times on FLAT_H200: 1 us
    of overhead plus the bytes at 7.6 GB/s per worker; ids in program order q, k, r, a."""
    rate = FLAT_H200.worker_stream_gbps * 1e3        # bytes per us
    buffers = (Buffer("q", TensorType((tiles, 4), "bfloat16"), "activation"),
               Buffer("k", TensorType((tiles, 4), "bfloat16"), "activation"),
               Buffer("r", TensorType((1, 4), "bfloat16"), "activation"),
               Buffer("a", TensorType((1, 4), "bfloat16"), "output"))

    def row(buffer: str, i: int) -> Region:
        return Region(buffer, ((i, i + 1), (0, 4)))
    tasks = [("q", (), (row("q", i),), q_us) for i in range(tiles)]
    tasks += [("k", (), (row("k", i),), 2.0) for i in range(tiles)]
    tasks += [("r", tuple(row("k", i) for i in range(tiles)), (row("r", 0),), 1.0),
              ("a", tuple(row("q", i) for i in range(tiles)) + (row("r", 0),),
               (row("a", 0),), 1.0)]
    return deps(TaskGraph(EMPTY, buffers, (), tuple(
        Task(i, group, (0, i, 0), reads, writes, 0, round((us - 1.0) * rate))
        for i, (group, reads, writes, us) in enumerate(tasks))))


@pytest.mark.parametrize("tiles,workers,q_us,makespan", [
    # q's bottom level (4.2 + 1) beats k's (2 + 1 + 1): by it both qs go first and the
    # ks share the third worker, then r and a follow there at 4 and 5 (end 6). Ranking
    # by what follows a task instead puts the ks first and ends at 7.2: the first wins.
    (2, 3, 4.2, 6.0),
    # 4 q and 4 k tiles on 5 workers: the bottom level puts every q first and two ks in
    # a second wave, so r runs at 6.5 and a ends at 8.5; ranking by what follows puts
    # the ks first, r runs at 2.5 beside the qs and a ends at 7.5: the second wins.
    (4, 5, 4.0, 7.5),
])
def test_the_shorter_of_two_priority_rules_is_kept(tiles, workers, q_us, makespan):
    s = schedule(two_waves(tiles, q_us), replace(FLAT_H200, workers=workers))
    assert max(s.finish_us) == pytest.approx(makespan)
    assert verify(memplan(sync(s))).ok


def test_schedule_is_deterministic():
    tg = fan()
    for policy in ("critical_path", "round_robin"):
        runs = [compile_schedule(tg, 3, policy) for _ in range(3)]
        assert all(r == runs[0] for r in runs)


def test_empty_queues_when_fewer_tasks_than_workers():
    s = compile_schedule(chain(2), 8)
    assert len(s.queues) == 8 and sum(len(q) for q in s.queues) == 2
    assert verify(s).ok


def test_wait_cap_merges_events():
    # One consumer of ten producer groups, each on its own worker.
    buffers = {f"x{i}": ((4,), "activation") for i in range(10)}
    buffers["out"] = ((4,), "output")
    tasks = [(f"p{i}", [], [(f"x{i}", ((0, 4),))]) for i in range(10)]
    tasks.append(("c", [(f"x{i}", ((0, 4),)) for i in range(10)], [("out", ((0, 4),))]))
    tg = graph(buffers, tasks)
    base = Schedule(tg, target(10), queues=tuple((i,) for i in range(9)) + ((9, 10),),
                    order=tuple(range(11)), start_us=(0.0,) * 11, finish_us=(1.0,) * 11)
    uncapped = sync(base, max_waits=100)
    assert len(uncapped.waits[10]) == 9
    s = memplan(sync(base, max_waits=4))
    assert len(s.waits[10]) <= 4
    assert verify(s).ok, verify(s).violations


def test_arena_reuse_and_overlap_mutation():
    # x0 -> x1 -> x2 -> x3 on one worker: x2 can reuse x0's bytes.
    s = compile_schedule(chain(4), 1)
    planned = {b.name: b for b in s.buffers}
    assert planned["x2"].offset == planned["x0"].offset
    assert all(b.offset % ALIGN == 0 for b in s.buffers)
    assert verify(s).ok
    # x1 and x2 are live at once (task 2 reads x1 and writes x2).
    moved = tuple(replace(b, offset=planned["x1"].offset) if b.name == "x2" else b
                  for b in s.buffers)
    assert_broken(replace(s, buffers=moved), "arena_disjoint")


def test_inputs_and_outputs_never_share():
    s = compile_schedule(fan(), 2)
    planned = {b.name: b for b in s.buffers}
    spans = sorted((b.offset, b.offset + b.type.numel, b.name) for b in s.buffers
                   if b.kind in ("input", "output"))
    for (a0, a1, _), (b0, b1, _) in zip(spans, spans[1:]):
        assert a1 <= b0
    moved = tuple(replace(b, offset=planned["inp"].offset) if b.name == "out" else b
                  for b in s.buffers)
    assert_broken(replace(s, buffers=moved), "arena_disjoint")


def test_shrunk_buffer_and_pool_are_caught():
    s = compile_schedule(fan(), 2)
    shrunk = tuple(replace(b, type=TensorType((4, 8), "float32")) if b.name == "a" else b
                   for b in s.buffers)
    assert_broken(replace(s, buffers=shrunk), "regions_in_buffers")
    pools = tuple(replace(p, numel=p.numel - 1) for p in s.pools)
    assert_broken(replace(s, pools=pools), "arena_disjoint")


def test_violation_messages_name_tasks_and_buffers():
    s = compile_schedule(chain(3), 2, policy="round_robin")
    broken = replace(s, waits=tuple(() for _ in s.waits))
    with pytest.raises(ScheduleError, match=r"RAW on buffer 'x0'.*task 0 .*group g0.*task 1"):
        check(verify(broken))
    cyclic = replace(s, queues=((1, 0), (2,)))   # task 1 waits on task 0, now after it
    report = verify(cyclic)
    assert not report.checks["global_order"]
    assert "deadlock" in report.violations[0]


def test_queue_mutations_are_caught():
    s = compile_schedule(fan(), 2)
    dropped = replace(s, queues=(s.queues[0][1:],) + s.queues[1:])
    assert_broken(dropped, "each_task_once")
    doubled = replace(s, queues=(s.queues[0] + s.queues[0][:1],) + s.queues[1:])
    assert_broken(doubled, "each_task_once")
    counts = list(s.waits)
    t = next(t for t, ws in enumerate(counts) if ws)
    counts[t] = (replace(counts[t][0], count=counts[t][0].count + 1),) + counts[t][1:]
    assert_broken(replace(s, waits=tuple(counts)), "thresholds")


# ---------------------------------------------------------------- random graphs

@st.composite
def task_graphs(draw):
    n_buffers = draw(st.integers(1, 4))
    buffers = {}
    for i in range(n_buffers):
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
        kind = draw(st.sampled_from(["activation", "activation", "input", "output", "state"]))
        buffers[f"b{i}"] = (shape, kind)
    names = list(buffers)

    def region():
        name = draw(st.sampled_from(names))
        box = []
        for size in buffers[name][0]:
            lo = draw(st.integers(0, size - 1))
            box.append((lo, draw(st.integers(lo + 1, size))))
        return name, tuple(box)

    tasks = []
    for _ in range(draw(st.integers(1, 24))):
        group = draw(st.sampled_from(["g0", "g1", "g2", "g3"]))
        reads = [region() for _ in range(draw(st.integers(0, 3)))]
        writes = [region() for _ in range(draw(st.integers(0, 2)))]
        tasks.append((group, reads, writes))
    return graph(buffers, tasks)


random_settings = settings(max_examples=150, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow])


@random_settings
@given(tg=task_graphs(), workers=st.integers(1, 8),
       policy=st.sampled_from(["critical_path", "round_robin"]),
       max_waits=st.sampled_from([1, 2, 8]))
def test_random_schedules_verify(tg, workers, policy, max_waits):
    s = compile_schedule(tg, workers, policy, max_waits)
    report = verify(s)
    assert report.ok, report.violations
    # The global order is topological for the deps and consistent with every queue.
    rank = {t: i for i, t in enumerate(s.order)}
    assert all(rank[d.before] < rank[d.after] for d in tg.deps)
    for q in s.queues:
        assert [rank[t] for t in q] == sorted(rank[t] for t in q)
    # Every dep is ordered by the clocks sync exports.
    clocks = happens_before_clocks(s)
    where = s.worker_of()
    for d in tg.deps:
        w, i = where[d.before]
        assert clocks[d.after][w] > i


@random_settings
@given(tg=task_graphs(), workers=st.integers(1, 8))
def test_critical_path_places_each_task_at_its_earliest_start(tg, workers):
    """Replays list scheduling naively: every task starts on the first worker (lowest
    index on ties) where its inputs can have arrived."""
    t = target(workers)
    s = schedule(tg, t)
    times = task_times(tg, t)
    latency = 0.5 * t.task_overhead_us
    preds = {i: [d.before for d in tg.deps if d.after == i] for i in range(len(tg.tasks))}
    where = s.worker_of()
    free = [0.0] * workers
    placed = {}
    for task in s.order:
        starts = [max([free[w]] + [s.finish_us[p] + (0.0 if placed[p] == w else latency)
                                   for p in preds[task]]) for w in range(workers)]
        best = min(range(workers), key=lambda w: (starts[w], w))
        assert where[task][0] == best
        assert s.start_us[task] == pytest.approx(starts[best])
        assert s.finish_us[task] == pytest.approx(starts[best] + times[task])
        placed[task] = best
        free[best] = s.finish_us[task]


@random_settings
@given(tg=task_graphs(), workers=st.integers(2, 8),
       policy=st.sampled_from(["critical_path", "round_robin"]), data=st.data())
def test_random_missing_wait_is_caught(tg, workers, policy, data):
    s = compile_schedule(tg, workers, policy)
    waited = [(t, k) for t, ws in enumerate(s.waits) for k in range(len(ws))]
    if not waited:
        return
    t, k = data.draw(st.sampled_from(waited))
    waits = list(s.waits)
    waits[t] = waits[t][:k] + waits[t][k + 1:]
    assert_broken(replace(s, waits=tuple(waits)))


@random_settings
@given(tg=task_graphs(), workers=st.integers(1, 8),
       policy=st.sampled_from(["critical_path", "round_robin"]), data=st.data())
def test_random_task_moved_before_its_producer_is_caught(tg, workers, policy, data):
    s = compile_schedule(tg, workers, policy)
    if not tg.deps:
        return
    dep = data.draw(st.sampled_from(tg.deps))
    where = s.worker_of()
    w, i = where[dep.before]
    queues = [[t for t in q if t != dep.after] for q in s.queues]
    queues[w].insert(queues[w].index(dep.before), dep.after)
    assert_broken(replace(s, queues=tuple(tuple(q) for q in queues)))


def test_large_graph_schedules_quickly():
    import time
    # 64 row tiles per layer, each reading 3 tiles of the previous layer.
    layers, width = 60, 64
    buffers = {f"x{l}": ((width, 8), "activation") for l in range(layers)}
    tasks = []
    for l in range(layers):
        for r in range(width):
            reads = [] if l == 0 else [(f"x{l - 1}", ((max(0, r - 1), min(width, r + 2)), (0, 8)))]
            tasks.append((f"g{l}", reads, [(f"x{l}", ((r, r + 1), (0, 8)))]))
    tg = graph(buffers, tasks)
    start = time.perf_counter()
    s = compile_schedule(tg, 16)
    elapsed = time.perf_counter() - start
    assert verify(s).ok
    assert elapsed < 10


# ---------------------------------------------------------------- roles

def role_split(tg: TaskGraph, workers: int, data) -> tuple[TaskGraph, object]:
    """The workers dealt at random into 1-3 roles (the last takes the rest), and each of
    the task graph's groups given to a random role."""
    n_roles = data.draw(st.integers(1, min(3, workers)))
    perm = data.draw(st.permutations(range(workers)))
    cuts = sorted(data.draw(st.lists(st.integers(1, workers - 1), min_size=n_roles - 1,
                                     max_size=n_roles - 1, unique=True))) if n_roles > 1 else []
    bounds = [0] + cuts + [workers]
    roles = tuple(Role(f"r{i}", tuple(sorted(perm[bounds[i]:bounds[i + 1]])),
                       kinds=(f"k{i}",) if i < n_roles - 1 else ())
                  for i in range(n_roles))
    owner = {g: data.draw(st.sampled_from([r.name for r in roles]))
             for g in sorted({t.group for t in tg.tasks})}
    tg = replace(tg, roles=tuple(owner[t.group] for t in tg.tasks))
    return tg, replace(target(workers), roles=roles)


@random_settings
@given(tg=task_graphs(), workers=st.integers(1, 8),
       policy=st.sampled_from(["critical_path", "round_robin"]),
       max_waits=st.sampled_from([1, 8]), data=st.data())
def test_random_role_splits_verify_and_keep_tasks_in_their_roles(tg, workers, policy,
                                                                 max_waits, data):
    tg, t = role_split(tg, workers, data)
    s = memplan(sync(schedule(tg, t, policy), max_waits=max_waits))
    report = verify(s)
    assert report.ok, report.violations
    workers_of = {r.name: r.workers for r in t.roles}
    for task, (w, _) in s.worker_of().items():
        assert w in workers_of[tg.roles[task]]


@random_settings
@given(tg=task_graphs(), workers=st.integers(1, 8), data=st.data())
def test_critical_path_with_roles_places_each_task_at_its_earliest_start(tg, workers, data):
    """As the replay above, with each task's candidates cut down to its role's workers."""
    tg, t = role_split(tg, workers, data)
    s = schedule(tg, t)
    latency = 0.5 * t.task_overhead_us
    preds = {i: [d.before for d in tg.deps if d.after == i] for i in range(len(tg.tasks))}
    allowed = {r.name: r.workers for r in t.roles}
    where = s.worker_of()
    free = [0.0] * workers
    placed = {}
    for task in s.order:
        starts = {w: max([free[w]] + [s.finish_us[p] + (0.0 if placed[p] == w else latency)
                                      for p in preds[task]]) for w in allowed[tg.roles[task]]}
        best = min(starts, key=lambda w: (starts[w], w))
        assert where[task][0] == best
        assert s.start_us[task] == pytest.approx(starts[best])
        placed[task] = best
        free[best] = s.finish_us[task]


@random_settings
@given(tg=task_graphs(), workers=st.integers(1, 8),
       policy=st.sampled_from(["critical_path", "round_robin"]))
def test_one_role_over_every_worker_schedules_as_no_roles(tg, workers, policy):
    plain = schedule(tg, target(workers), policy)
    every = replace(target(workers), roles=(Role("all", tuple(range(workers))),))
    one = schedule(replace(tg, roles=("all",) * len(tg.tasks)), every, policy)
    assert (one.queues, one.order, one.start_us, one.finish_us) == \
        (plain.queues, plain.order, plain.start_us, plain.finish_us)


def test_task_on_another_roles_worker_is_caught():
    tg = fan()
    roles = (Role("produce", (0,), kinds=("pa", "pb")), Role("consume", (1, 2)))
    tg = replace(tg, roles=tuple("produce" if t.group in ("pa", "pb") else "consume"
                                 for t in tg.tasks))
    s = memplan(sync(schedule(tg, replace(target(3), roles=roles))))
    assert verify(s).ok, verify(s).violations
    assert {t for w in (1, 2) for t in s.queues[w]} == {8, 9}   # the two consumers
    moved = next(t for t in s.queues[1] + s.queues[2])
    queues = [tuple(t for t in q if t != moved) for q in s.queues]
    queues[0] += (moved,)   # last in worker 0's queue: after everything it waits on
    report = verify(replace(s, queues=tuple(queues)))
    assert not report.checks["roles_respected"]
    assert any(re.search(rf"roles_respected: task {moved} .*role 'consume' but runs on "
                         r"worker 0, which belongs to role 'produce'", v)
               for v in report.violations), report.violations
    relabelled = replace(s, taskgraph=replace(s.taskgraph, roles=("consume",) + tg.roles[1:]))
    report = verify(relabelled)
    assert not report.checks["roles_respected"]
    assert "task 0 " in next(v for v in report.violations if "roles_respected" in v)


def test_schedule_needs_the_roles_pass_when_the_target_has_roles():
    t = replace(target(2), roles=(Role("a", (0,), kinds=("x",)), Role("b", (1,))))
    with pytest.raises(ScheduleError, match="run the roles pass"):
        schedule(chain(3), t)
    with pytest.raises(ScheduleError, match="role 'c'"):
        schedule(replace(chain(3), roles=("a", "c", "b")), t)
