"""`tilec verify`: the static invariants on the engine as stored, plus optional random
interleavings in the cooperative interpreter compared bitwise with round-robin."""
from __future__ import annotations

from typing import Any

import torch

from tilec.errors import TilecError


def verify_engine(engine, interleavings: int = 0) -> dict[str, Any]:
    from tilec.passes.verify import verify

    report = verify(engine.data.schedule())
    checks = dict(report.checks)
    violations = list(report.violations)
    if interleavings:
        inputs = engine.random_inputs(seed=1)
        base = engine.executor("interpret", "round_robin", 0).run(dict(inputs))
        same = True
        for seed in range(interleavings):
            try:
                out = engine.executor("interpret", "random", seed).run(dict(inputs))
            except TilecError as e:
                violations.append(f"interleavings: seed {seed}: {e}")
                same = False
                break
            diff = [k for k in base if not torch.equal(base[k], out[k])]
            if diff:
                violations.append(f"interleavings: seed {seed} changes outputs {diff} "
                                  "(a race: the result depends on the interleaving)")
                same = False
                break
        checks["interleavings"] = same
    return {"ok": not violations, "checks": checks, "violations": violations}
