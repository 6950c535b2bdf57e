"""The error buffer (ir/abi.py: ERROR_WORDS int32 words) after a step: what the kernel, or
the reference executor, recorded in it, as one line a user can act on."""
from __future__ import annotations

from typing import Callable

from tilec.errors import RunError, ScheduleHangError
from tilec.ir.abi import HANG, INDEX_ERROR
from tilec.ir.graph import FusedGraph, index_checks

INDEXED_WHAT = {"gather": "the rows of its table", "state_update": "the positions of its state",
                "matmul": "the matrices of its pool"}


def recorded_error(words: list[int], step: int, describe: Callable[[int], str],
                   fused: FusedGraph) -> Exception:
    """The error a step recorded (`words[0]` is not 0) as one exception: a hang as a
    ScheduleHangError, anything else as a RunError. `describe`: task row -> what the task is."""
    if words[0] == HANG:
        return ScheduleHangError(watchdog_message(words, step, describe))
    if words[0] == INDEX_ERROR:
        return RunError(index_error_message(words, step, fused))
    return RunError(f"step {step}: the kernel recorded error code {words[0]}, which "
                    f"this tilec does not know")


def watchdog_message(error: list[int], step: int, describe: Callable[[int], str]) -> str | None:
    """The error buffer a blocking launch leaves behind, as one line, or None when the
    watchdog did not fire: [fired, worker, task row, event, seen, wanted, ...]."""
    if not error or not error[0]:
        return None
    worker, row, ev, seen, need = error[1:6]
    try:
        task = describe(row)
    except (IndexError, KeyError, RuntimeError):
        task = f"task row {row}"
    return (f"watchdog at step {step}: worker {worker} in {task} waited on event {ev} "
            f"(seen {seen}, wanted {need})")


def index_error_message(error: list[int], step: int, fused: FusedGraph) -> str:
    """An index-out-of-range record of the error buffer as one line naming the op, its
    module and source line, the index and the bound."""
    group, t0, t1, t2, check, value, bound = error[1:8]
    try:
        ops = fused.graph.by_name()
        op = ops[index_checks(fused.groups[group], ops)[check]]
    except IndexError:   # a record the kernel should never write still formats
        return (f"step {step}: index {value} out of range [0, {bound}) in the task of "
                f"group {group} at tile ({t0}, {t1}, {t2})")
    module = next((m for m in reversed(op.scope) if m), "")
    what = f"{op.kind} {op.name!r}" + (f" ({module})" if module else "")
    shown = f"{value}" if -2 ** 31 < value < 2 ** 31 - 1 else \
        ("at least" if value > 0 else "at most") + f" {value}"
    where = f" at {op.source}" if op.source else ""
    return (f"step {step}: index {shown} is out of range [0, {bound}) "
            f"({INDEXED_WHAT.get(op.kind, 'its bound')}) in {what}{where}")
