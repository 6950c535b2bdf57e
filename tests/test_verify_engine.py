"""`tilec verify` on real compiled engines, and mutation tests: edits of the stored task
table and memory plan (a dropped wait, two dependent tasks swapped across queues, a
shrunk or misplaced buffer) must each be caught by the named check."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import tilec.api
from engines import compiled, run_cli
from tilec.passes.entries import ENTRY_CHECKS
from tilec.runtime import enginefile as engine_file
from tilec.runtime.executors import make_executor
from tilec.verify_engine import verify_engine

EXAMPLES = ["block", "llama_tiny"]
ORDERING_CHECKS = {"conflicts_ordered", "kv_appends_ordered", "arena_disjoint"}


def fresh(example: str) -> engine_file.EngineFile:
    return engine_file.load(compiled(example))


def failing(report) -> set[str]:
    return {k for k, ok in report["checks"].items() if not ok}


def drop_wait(table: torch.Tensor, row: int, i: int) -> None:
    """Remove wait i of a record: the last wait moves into its slot, nwaits - 1."""
    nw = int(table[row, 5])
    last = nw - 1
    table[row, 6 + 2 * i], table[row, 7 + 2 * i] = table[row, 6 + 2 * last], table[row, 7 + 2 * last]
    table[row, 6 + 2 * last] = 0
    table[row, 7 + 2 * last] = 0
    table[row, 5] = last


def worker_of_row(engine: engine_file.EngineFile, row: int) -> int:
    starts = engine.tensors["queue_start"].tolist()
    return next(w for w in range(len(starts) - 1) if starts[w] <= row < starts[w + 1])


@pytest.mark.parametrize("example", EXAMPLES)
def test_compiled_engine_verifies(example):
    engine = fresh(example)
    report = verify_engine(engine)
    assert report["ok"], report["violations"]
    checks = {"each_task_once", "global_order", "thresholds", "conflicts_ordered",
              "kv_appends_ordered", "indexed_reads_whole", "regions_in_buffers",
              "arena_disjoint", "roles_respected"}
    if engine.entries:   # a decoder's prefill entry: its own checks, then both together
        checks |= {f"prefill: {c}" for c in checks} | set(ENTRY_CHECKS)
    assert set(report["checks"]) == checks


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_wait_is_needed(example):
    """Drop each wait of the engine in turn: verify must fail every time. A wait whose
    removal verifies would be redundant: the sync pass should have pruned it."""
    engine = fresh(example)
    table = engine.tensors["tasks"]
    original = table.clone()
    ids = engine.tensors["task_ids"].tolist()
    tried, redundant, kv = 0, [], 0
    for row in range(table.shape[0]):
        for i in range(int(original[row, 5])):
            table.copy_(original)
            drop_wait(table, row, i)
            report = verify_engine(engine)
            tried += 1
            if report["ok"]:
                redundant.append(f"task {ids[row]} wait on event {int(original[row, 6 + 2 * i])}")
                continue
            assert failing(report) & ORDERING_CHECKS, report
            assert "missing edge" in report["violations"][0] or "overlap" in report["violations"][0]
            kv += not report["checks"]["kv_appends_ordered"]
    table.copy_(original)
    assert tried > 10
    assert not redundant, f"redundant waits the sync pass kept: {redundant}"
    if example == "llama_tiny":   # the waits that order KV appends before attention
        assert kv > 0


def test_dropped_kv_wait_is_named():
    engine = fresh("llama_tiny")
    table = engine.tensors["tasks"]
    original = table.clone()
    for row in range(table.shape[0]):
        for i in range(int(original[row, 5])):
            table.copy_(original)
            drop_wait(table, row, i)
            report = verify_engine(engine)
            kv = [v for v in report["violations"] if v.startswith("kv_appends_ordered")]
            if kv:
                assert "cache" in kv[0] and "appends" in kv[0] and "missing edge" in kv[0]
                return
    pytest.fail("no dropped wait broke the order of a KV append and its reader")


def swap_rows(engine, a: int, b: int) -> None:
    for name in ("tasks", "task_ids"):
        t = engine.tensors[name]
        t[a], t[b] = t[b].clone(), t[a].clone()


@pytest.mark.parametrize("example", EXAMPLES)
def test_swapped_dependent_tasks_across_queues(example):
    """Swap a consumer with a producer it waits on (on another worker). Some swaps are
    still valid schedules (the consumer's wait keeps the order); verify must catch the
    rest, and the ones it accepts must run to the same bits in any interleaving."""
    engine = fresh(example)
    table, ids = engine.tensors["tasks"], engine.tensors["task_ids"]
    t0, i0 = table.clone(), ids.clone()
    inputs = tilec.api.Engine(engine).random_inputs(1)
    base = make_executor(engine, "reference").run(dict(inputs))
    caught, accepted = {}, []
    for r in range(t0.shape[0]):
        for i in range(int(t0[r, 5])):
            event = int(t0[r, 6 + 2 * i])
            for s in range(t0.shape[0]):
                if int(t0[s, -1]) != event or worker_of_row(engine, s) == worker_of_row(engine, r):
                    continue
                table.copy_(t0)
                ids.copy_(i0)
                swap_rows(engine, r, s)
                report = verify_engine(engine)
                if report["ok"]:
                    accepted.append((r, s))
                else:
                    names = failing(report)
                    assert names & {"global_order", "conflicts_ordered"}, report
                    assert "task" in report["violations"][0] and "worker" in report["violations"][0]
                    caught[(r, s)] = names
    assert caught, "verify caught none of the swaps"
    for r, s in accepted[:6]:
        table.copy_(t0)
        ids.copy_(i0)
        swap_rows(engine, r, s)
        for seed in range(2):
            out = make_executor(engine, "reference", policy="random", seed=seed).run(dict(inputs))
            assert all(torch.equal(out[k], base[k]) for k in base), (r, s, seed)
    table.copy_(t0)
    ids.copy_(i0)
    if example == "block":   # some swaps even close a cycle: a deadlock
        assert any("global_order" in names for names in caught.values())


def _with_buffers(engine, change) -> engine_file.EngineFile:
    """A copy of the engine whose planned and declared buffers are edited by change."""
    sched = engine.manifest.schedule
    tg = replace(sched.taskgraph, buffers=tuple(change(b) for b in sched.taskgraph.buffers))
    sched = replace(sched, taskgraph=tg, buffers=tuple(change(b) for b in sched.buffers))
    return replace(engine, manifest=replace(engine.manifest, schedule=sched))


@pytest.mark.parametrize("example", EXAMPLES)
def test_shrunk_buffer(example):
    engine = fresh(example)
    victim = next(b for b in engine.manifest.schedule.buffers
                  if b.kind == "activation" and b.type.shape and b.type.shape[0] > 1)

    def shrink(b):
        if b.name != victim.name:
            return b
        shape = (b.type.shape[0] - 1,) + b.type.shape[1:]
        return replace(b, type=replace(b.type, shape=shape))

    report = verify_engine(_with_buffers(engine, shrink))
    assert not report["ok"] and not report["checks"]["regions_in_buffers"]
    assert victim.name in report["violations"][0]


@pytest.mark.parametrize("example", EXAMPLES)
def test_live_buffers_moved_onto_each_other(example):
    """Two arena buffers one task reads and writes are live at once: put them on the
    same bytes."""
    engine = fresh(example)
    buffers = {b.name: b for b in engine.manifest.schedule.buffers}
    for task in engine.manifest.schedule.taskgraph.tasks:
        pairs = [(buffers[r.buffer], buffers[w.buffer]) for r in task.reads for w in task.writes]
        pair = next(((x, y) for x, y in pairs if x.pool == y.pool and x.name != y.name
                     and x.kind == y.kind == "activation"), None)
        if pair:
            break
    x, y = pair
    moved = _with_buffers(engine, lambda b: replace(b, offset=x.offset) if b.name == y.name else b)
    report = verify_engine(moved)
    assert not report["ok"] and not report["checks"]["arena_disjoint"]
    assert x.name in report["violations"][0] and y.name in report["violations"][0]


@pytest.mark.parametrize("example", EXAMPLES)
def test_round_trip_is_byte_identical(example, tmp_path):
    first = compiled(example)
    engine_file.save(engine_file.load(first), tmp_path / "again.engine")
    engine_file.save(engine_file.load(tmp_path / "again.engine"), tmp_path / "third.engine")
    assert (tmp_path / "again.engine").read_bytes() == first.read_bytes()
    assert (tmp_path / "third.engine").read_bytes() == first.read_bytes()


# ---- the command line --------------------------------------------------------------------

def test_cli_verify_names_the_first_violation(capsys, tmp_path):
    """A stored schedule with a dropped wait loads (every index is in range) but does not
    verify: exit 1, the failing check and the first violation named."""
    engine = fresh("block")
    drop_wait(engine.tensors["tasks"], next(r for r in range(engine.tensors["tasks"].shape[0])
                                            if int(engine.tensors["tasks"][r, 5])), 0)
    path = tmp_path / "dropped.engine"
    engine_file.save(engine, path)
    code, out, err = run_cli(capsys, "verify", path)
    assert code == 1, out + err
    assert "FAIL conflicts_ordered" in out
    assert "first violation: conflicts_ordered:" in out and "missing edge" in out
    code, out, _ = run_cli(capsys, "verify", path, "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["checks"]["conflicts_ordered"] is False
    assert report["violations"][0].startswith("conflicts_ordered:")
    assert set(report) == {"ok", "checks", "violations"}


def test_cli_verify_decoder_with_interleavings(capsys):
    """A decoder engine gets valid random inputs (token and position in range) and its
    random interleavings reproduce round-robin bit for bit."""
    code, out, err = run_cli(capsys, "verify", compiled("llama_tiny"), "--json",
                             "--interleavings", "2")
    report = json.loads(out)
    assert code == 0 and report["ok"], report
    assert report["checks"]["interleavings"] and report["checks"]["kv_appends_ordered"]
