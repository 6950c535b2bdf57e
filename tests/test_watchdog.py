"""Hangs: a broken schedule planted in memory (load() would refuse most of them) must
stop with a ScheduleHangError that says which worker, task and event, and how many
signals it saw and wanted: in the cooperative interpreter and the reference executor
by deadlock detection, on the GPU by the spin-wait watchdog (checked here by reading
the rendered kernel, and by feeding the error formatter a hand-made error buffer)."""
from __future__ import annotations

import ast
import re

import pytest
import torch

from engines import compiled
from tilec.errors import EngineError, ScheduleHangError
from tilec.ir import abi
from tilec.ir.abi import KERNEL_NAME
from tilec.runtime import enginefile as engine_file
from tilec.runtime import executors
from tilec.runtime.error_buffer import watchdog_message
from tilec.runtime.executors import GPUExecutor, make_executor
from tilec.verify_engine import verify_engine

import tilec.api


def fresh(example: str = "block") -> engine_file.EngineFile:
    return engine_file.load(compiled(example))


def rows_of(engine, worker: int) -> range:
    s = engine.tensors["queue_start"].tolist()
    return range(s[worker], s[worker + 1])


def plant_excess_count(engine) -> tuple[int, int, int, int]:
    """The first task with a wait now wants one signal more than its event ever gets.
    Returns (worker, task id, event, wanted at step 0)."""
    table = engine.tensors["tasks"]
    for w in range(engine.manifest.schedule.target.workers):
        for row in rows_of(engine, w):
            if int(table[row, 5]):
                ev = int(table[row, 6])
                want = engine.manifest.schedule.events[ev].signals + 1
                table[row, 7] = want
                return w, int(engine.tensors["task_ids"][row]), ev, want
    raise AssertionError("no task waits")


def plant_wait_on_later_task(engine) -> tuple[int, int, int, int]:
    """A task waits on the event of a task after it in its own queue: it can never run."""
    table = engine.tensors["tasks"]
    events = engine.manifest.schedule.events
    for w in range(engine.manifest.schedule.target.workers):
        rows = rows_of(engine, w)
        if len(rows) < 2:
            continue
        row, later = rows[0], rows[-1]
        ev = int(table[later, -1])
        table[row, 5] = 1
        table[row, 6] = ev
        table[row, 7] = events[ev].signals
        return w, int(engine.tensors["task_ids"][row]), ev, events[ev].signals
    raise AssertionError("no worker with two tasks")


PLANTS = [plant_excess_count, plant_wait_on_later_task]


def assert_names_the_hang(message: str, worker: int, task: int, event: int, wanted: int) -> None:
    part = next((p for p in message.split("; ") if f"worker {worker} in task {task} " in p), None)
    assert part is not None, message
    m = re.search(rf"event {event} \(seen (\d+), wanted {wanted}\)", part)
    assert m and int(m.group(1)) < wanted, message


@pytest.mark.parametrize("plant", PLANTS, ids=lambda f: f.__name__)
def test_reference_executor_reports_the_deadlock(plant):
    engine = fresh()
    worker, task, event, wanted = plant(engine)
    inputs = tilec.api.Engine(engine).random_inputs(0)
    for policy in ("round_robin", "random", "reverse"):
        with pytest.raises(ScheduleHangError) as e:
            make_executor(engine, "reference", policy=policy, seed=3).run(inputs)
        assert str(e.value).startswith("deadlock at step 0: ")
        assert_names_the_hang(str(e.value), worker, task, event, wanted)


def test_interpreter_reports_the_deadlock():
    """The generated kernel itself, cooperative mode: the cursor stops at the task."""
    engine = fresh()
    worker, task, event, wanted = plant_wait_on_later_task(engine)
    inputs = tilec.api.Engine(engine).random_inputs(0)
    with pytest.raises(ScheduleHangError) as e:
        make_executor(engine, "interpret", policy="round_robin").run(inputs)
    assert_names_the_hang(str(e.value), worker, task, event, wanted)


def test_verify_sees_the_planted_deadlock():
    engine = fresh()
    _, task, _, _ = plant_wait_on_later_task(engine)
    report = verify_engine(engine)
    assert not report["checks"]["global_order"]
    first = report["violations"][0]
    assert first.startswith("global_order: ") and "deadlock" in first and f"task {task} " in first


def test_load_refuses_a_count_above_the_signals(tmp_path):
    """On disk the same plant is refused before anything runs."""
    engine = fresh()
    plant_excess_count(engine)
    engine_file.save(engine, tmp_path / "hang.engine")
    with pytest.raises(EngineError, match="out of range"):
        engine_file.load(tmp_path / "hang.engine")


# ---- the GPU watchdog, without a GPU -------------------------------------------------------

def kernel_tree(source: str) -> ast.FunctionDef:
    """The engine kernel's function (the task kinds' functions are the others)."""
    return next(n for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.FunctionDef) and n.name == KERNEL_NAME)


@pytest.mark.parametrize("example", ["block", "llama_tiny"])
def test_every_spin_wait_is_bounded_and_reports(example):
    """In BLOCKING mode the only loops are the queue walk (bounded by the queue's end)
    and the spin-wait, which gives up after SPIN_LIMIT spins and records worker, task
    row, event, seen and wanted into the error buffer."""
    source = fresh(example).kernel_source
    fn = kernel_tree(source)
    loops = [n for n in ast.walk(fn) if isinstance(n, ast.While)]
    module = ast.parse(source)   # the task functions: counted loops only
    assert len([n for n in ast.walk(module) if isinstance(n, ast.While)]) == len(loops)
    assert not any(isinstance(n, (ast.For, ast.AsyncFor)) and
                   not ast.unparse(n.iter).startswith(("tl.static_range", "range", "tl.range"))
                   for n in ast.walk(module))
    queue_walk = [n for n in loops if "idx < end" in ast.unparse(n.test)]
    spins = [n for n in loops if "SPIN_LIMIT" in ast.unparse(n.test)]
    assert len(queue_walk) == 1 and "ran < budget" in ast.unparse(queue_walk[0].test)
    assert spins and len(queue_walk) + len(spins) == len(loops), [ast.unparse(n.test) for n in loops]
    for loop in spins:
        assert "spins < SPIN_LIMIT" in ast.unparse(loop.test)
        assert "spins += 1" in ast.unparse(loop)
        # the loop sits under `if BLOCKING:`; the cooperative branch never spins
        parent = next(n for n in ast.walk(fn) if isinstance(n, ast.If) and loop in n.body)
        assert ast.unparse(parent.test) == "BLOCKING"
        after = parent.body[parent.body.index(loop) + 1:]
        text = "\n".join(ast.unparse(n) for n in after)
        assert "tl.atomic_cas(error, 0, 1) == 0" in text
        for slot, name in enumerate(["worker", "idx", "ev", "seen", "need"], start=1):
            assert f"tl.store(error + {slot}, {name})" in text
        assert "stop = 1" in text


def test_gpu_executor_bounds_its_spins():
    assert 0 < executors.SPIN_LIMIT < 2 ** 31
    assert abi.ERROR_WORDS >= 6


def test_watchdog_message_formats_the_error_buffer():
    engine = fresh()
    ex = make_executor(engine, "reference")
    row = 4
    task = int(engine.tensors["task_ids"][row])
    assert watchdog_message([0] * abi.ERROR_WORDS, 0, ex.describe_task) is None
    msg = watchdog_message([1, 2, row, 7, 3, 8, 0, 0], 5, ex.describe_task)
    assert msg.startswith("watchdog at step 5: worker 2 in task ")
    assert f"task {task} (" in msg and "event 7 (seen 3, wanted 8)" in msg
    # a row the kernel should never report still formats
    assert "task row 99999" in watchdog_message([1, 0, 99999, 1, 0, 1, 0, 0], 0, ex.describe_task)


def test_gpu_executor_check_raises_on_a_fired_watchdog(monkeypatch):
    """GPUExecutor.check on a hand-made error buffer, on CPU (no kernel launched)."""
    engine = fresh()
    gpu = GPUExecutor.__new__(GPUExecutor)
    ref = make_executor(engine, "reference")
    gpu.__dict__.update(engine=engine, tables=ref.tables, schedule=ref.schedule,
                        step_index=2, error=torch.zeros(abi.ERROR_WORDS, dtype=torch.int32))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    gpu.check()   # nothing fired
    gpu.error[:6] = torch.tensor([1, 1, 3, 5, 0, 3], dtype=torch.int32)
    with pytest.raises(ScheduleHangError, match=r"watchdog at step 2: worker 1 in task \d+ .*"
                                                 r"event 5 \(seen 0, wanted 3\)"):
        gpu.check()


@pytest.mark.gpu
def test_gpu_watchdog_fires(monkeypatch):
    """On a GPU (TRITON_INTERPRET=0 pytest -m gpu): a planted hang ends the launch with the
    watchdog's report instead of spinning forever."""
    engine = fresh()
    worker, task, event, wanted = plant_wait_on_later_task(engine)
    monkeypatch.setattr(executors, "SPIN_LIMIT", 1 << 12)
    ex = make_executor(engine, "gpu")
    with pytest.raises(ScheduleHangError, match=r"watchdog at step 0: worker \d+ in task"):
        ex.run(tilec.api.Engine(engine).random_inputs(0))
