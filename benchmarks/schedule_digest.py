"""A digest of what the compiler decides for a few configurations: each device's stored
schedule (queues, order, predicted times, events, waits, buffers, pools: the manifest's
JSON), its task tables, the kernel source, and the verifier's report. A change meant to
make the passes faster, not different, must leave every line the same:

    .venv/bin/python benchmarks/schedule_digest.py > before.txt
    (change the passes)
    .venv/bin/python benchmarks/schedule_digest.py > after.txt && diff before.txt after.txt

`--quick` leaves out the 4-layer GLM-5 plan (a minute on 2 cores).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

EXAMPLES = ROOT / "examples"
# (name, yaml, compile options): the CPU examples as they are, and on a GPU target, where
# the cost model prices latencies and prefetches (GPU engines compiled without AOT)
CASES = [
    ("mlp", "mlp.yaml", {}),
    ("block", "block.yaml", {}),
    ("llama_tiny", "llama_tiny.yaml", {}),
    ("llama_tiny_roles", "llama_tiny_roles.yaml", {}),
    ("glm_dsa_tiny", "glm_dsa_tiny.yaml", {}),
    ("glm_dsa_tiny_4dev", "glm_dsa_tiny_4dev.yaml", {}),
    ("llama_tiny_h200", "llama_tiny.yaml", {"target": "h200", "workers": 16}),
    ("llama_tiny_h200_3dev", "llama_tiny.yaml", {"target": "h200", "workers": 8,
                                                 "devices": 3}),
    ("glm_dsa_tiny_4dev_h200", "glm_dsa_tiny_4dev.yaml", {"target": "h200", "workers": 8}),
]


def _placeless(text: str) -> str:
    """`text` without where the model's code is: ops name their source lines by path
    and line, which move when the tree is elsewhere or a model file gains a line."""
    return re.sub(r"\.py:\d+", ".py:N", text.replace(str(ROOT), "<root>"))


def digest(engine) -> list[str]:
    from tilec.ir.serial import to_json

    lines = []
    for d, part in enumerate(engine.parts):
        h = hashlib.sha256(_placeless(to_json(part.manifest.schedule)).encode())
        for key in ("tasks", "task_ids", "queue_start", "args"):
            h.update(part.tensors[key].numpy().tobytes())
        h.update(_placeless(part.kernel_source).encode())
        lines.append(f"  device {d}: {len(part.manifest.schedule.taskgraph.tasks)} tasks, "
                     f"{h.hexdigest()[:16]}")
    report = engine.verify()
    lines.append(f"  verify: ok={report.ok} "
                 + hashlib.sha256(json.dumps([sorted(report.checks.items()),
                                              list(report.violations)]).encode()
                                  ).hexdigest()[:16])
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="leave out the GLM-5 plan")
    args = p.parse_args(argv)
    import tilec

    for name, yaml, options in CASES:
        engine = tilec.compile(str(EXAMPLES / yaml), aot=False, **options)
        print(name)
        print("\n".join(digest(engine)), flush=True)
    if not args.quick:
        from plan_full import GLM5_ROLES, glm5_config, plan_engine

        config = glm5_config()
        if config is not None:
            engine = plan_engine("glm5", config, layers=4, devices=8, target="h200",
                                 max_seq_len=8192, roles=GLM5_ROLES)
            print("glm5 plan, 4 layers, 8 x h200")
            print("\n".join(digest(engine)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
