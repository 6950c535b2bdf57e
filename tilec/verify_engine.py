"""`tilec verify`: the static invariants on the engine as stored (the queues, signals and
waits decoded from the task table, not the compiler's intentions; with worker roles,
that every task sits in a queue of its role's workers), plus optional random
interleavings in the cooperative interpreter compared bitwise with round-robin."""
from __future__ import annotations

from typing import Any

import torch

from tilec.errors import RunError, TilecError
from tilec.passes.entries import verify_entries
from tilec.passes.verify_devices import verify_parts
from tilec.runtime import enginefile as engine_file
from tilec.runtime.inprocess import parts_executor, random_inputs


def verify_engine(engine, interleavings: int = 0, backend: str = "interpret") -> dict[str, Any]:
    """`engine`: a `tilec.Engine`, or the engine file it holds (runtime.enginefile.EngineFile or
    DeviceEngines). Returns {"ok", "checks": name -> bool, "violations": one line each,
    first first}."""
    if not isinstance(interleavings, int) or isinstance(interleavings, bool) or \
            interleavings < 0:
        raise RunError(f"interleavings: expected an integer >= 0, found {interleavings!r}")
    parts = _parts(engine)
    # a multi-device engine: each device, then all together
    report = verify_parts(tuple(p.schedule() for p in parts))
    if len(parts) == 1 and parts[0].entries:   # each entry, then all of them together
        report = verify_entries(parts[0].entry_schedules(), first=report)
    checks = dict(report.checks)
    violations = list(report.violations)
    if interleavings:
        parts[0].require_weights()   # interleavings run the engine: a plan cannot
        problem = _interleavings(parts, interleavings, backend)
        checks["interleavings"] = problem is None
        if problem:
            violations.append(problem)
    return {"ok": not violations, "checks": checks, "violations": violations}


def _parts(engine) -> tuple[engine_file.EngineFile, ...]:
    """Every device's part of the engine (one for a one-device engine)."""
    if isinstance(engine, engine_file.DeviceEngines):
        return engine.ranks
    if isinstance(engine, engine_file.EngineFile):
        return (engine,)
    return engine.parts   # a tilec.Engine


def _interleavings(parts, n: int, backend: str) -> str | None:
    """None when N seeded random interleavings give outputs bitwise identical to
    round-robin, else the first difference or hang. Every run gets a fresh executor
    (fresh state pools, step 0) and the same valid inputs (ints inside their declared
    [low, high), so a decoder's token and position are in range)."""
    inputs = random_inputs(parts[0].manifest, seed=1)
    try:   # a multi-device engine: all its devices in this process, taking turns
        base = parts_executor(parts, backend, policy="round_robin").run(dict(inputs))
    except TilecError as e:
        return f"interleavings: round-robin: {str(e).splitlines()[0]}"
    for seed in range(n):
        try:
            out = parts_executor(parts, backend, policy="random", seed=seed).run(dict(inputs))
        except TilecError as e:
            return f"interleavings: seed {seed}: {str(e).splitlines()[0]}"
        diff = [k for k in base if not _bitwise_equal(base[k], out[k])]
        if diff:
            return (f"interleavings: seed {seed} changes outputs {diff} (a race: the "
                    "result depends on the interleaving)")
    return None


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN == NaN when the bits agree)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8),
                       b.contiguous().view(-1).view(torch.uint8))
