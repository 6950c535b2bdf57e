"""What `tilec inspect` shows: a summary of an engine as plain data."""
from __future__ import annotations

from collections import Counter
from typing import Any

from tilec.runtime.engine import Engine


def summary(engine: Engine) -> dict[str, Any]:
    m = engine.manifest
    sched = engine.schedule()
    tg = sched.taskgraph
    groups = {g.name: g for g in tg.fused.groups}
    index = {g.name: i for i, g in enumerate(tg.fused.groups)}
    kinds = Counter(m.kinds[m.opcodes[index[t.group]]] for t in tg.tasks)
    busy = [sum(sched.finish_us[t] - sched.start_us[t] for t in q) for q in sched.queues]
    span = max(sched.finish_us, default=0.0)
    return {
        "model": m.model,
        "target": sched.target.name,
        "backend": sched.target.backend,
        "workers": sched.workers,
        "tasks": len(tg.tasks),
        "events": len(sched.events),
        "waits": sum(len(w) for w in sched.waits),
        "groups": len(groups),
        "task_kinds": dict(sorted(kinds.items())),
        "kernel": {"opcodes": len(m.kinds), "source_lines": engine.kernel_source.count("\n"),
                   "max_waits": m.max_waits},
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in m.inputs],
        "outputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in m.outputs],
        "predicted_step_us": span,
        "per_worker": [{"worker": w, "tasks": len(q), "busy_us": busy[w],
                        "utilisation": (busy[w] / span) if span else 0.0}
                       for w, q in enumerate(sched.queues)],
    }
