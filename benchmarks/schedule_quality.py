"""Schedule quality: predicted step time over the HBM floor and over its lower bound,
per model and workers.

    .venv/bin/python benchmarks/schedule_quality.py [--full] [--json]

`floor` is `tilec inspect`'s hbm_floor_us: the weight and KV bytes of a step over the
target's measured copy bandwidth (h200: 4.2 TB/s, measured 2026-11-30; h100 has no
measurement, so its datasheet 3.35 TB/s stands in). `vs floor`, predicted / floor, is
the headline: what the kernel's protocol and the schedule lose to the memory system
(issue 20's goal: <= 1.25 for Llama-3.2-1B on h200). Everything here is the cost
model's prediction (passes/cost.py: round trips to L2, latency, bytes in flight), not a
measurement: only a GPU run says how close the kernel comes.

`ratio` is predicted / lower bound, the lower bound being the largest of `cp` (the
critical path), `work` (the predicted task times summed over the workers that run
them, per role, the largest: the step if no worker ever idled) and `memory` (the bytes
the tasks move over the datasheet HBM bandwidth): under the cost model no schedule of
these tasks beats any of the three, so `ratio` is what the list schedule loses to
dependencies and idle workers. `--full` adds Llama-3.2-1B shapes with all 16 layers
(about a minute each to compile).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tilec  # noqa: E402,F401


def cases(full: bool):
    yield "mlp", str(ROOT / "examples/mlp.yaml"), "cpu", [1, 4, 8]
    yield "block", str(ROOT / "examples/block.yaml"), "cpu", [1, 4, 8]
    yield "llama_tiny", str(ROOT / "examples/llama_tiny.yaml"), "cpu", [1, 2, 4]
    d = yaml.safe_load((ROOT / "examples/llama3_1b.yaml").read_text())
    d["model"]["config"]["num_hidden_layers"] = 2
    d["model"]["max_seq_len"] = 256
    yield "llama3_1b (2 layers)", d, "h200", [16, 64, 132]
    yield "llama3_1b (2 layers)", d, "h100", [132]
    if full:
        yield "llama3_1b", str(ROOT / "examples/llama3_1b.yaml"), "h200", [132]
        yield "llama3_1b", str(ROOT / "examples/llama3_1b.yaml"), "h100", [132]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from tilec.api import compile as tilec_compile
    from tilec.compiler.config import parse_config

    rows = []
    print(f"{'model':<22} {'target':<6} {'workers':>7} {'tasks':>6} {'predicted':>10} "
          f"{'cp':>8} {'work':>8} {'memory':>8} {'ratio':>6} {'floor':>8} {'vs floor':>8}  (us)")
    for name, source, target, worker_counts in cases(args.full):
        if isinstance(source, dict):
            source = parse_config(source, str(ROOT / "examples/llama3_1b.yaml"))
        for workers in worker_counts:
            t0 = time.perf_counter()
            # aot=False: the GPU binary does not change the schedule, only the compile time
            s = tilec_compile(source, target=target, workers=workers, aot=False).summary()
            predicted, cp = s["predicted_step_us"], s["critical_path_us"]
            work, memory, floor = s["work_bound_us"], s["memory_bound_us"], s["hbm_floor_us"]
            rows.append({"model": name, "target": target, "workers": workers,
                         "tasks": s["tasks"], "predicted_us": predicted,
                         "critical_path_us": cp, "work_bound_us": work,
                         "memory_bound_us": memory, "lower_bound_us": s["lower_bound_us"],
                         "ratio": predicted / s["lower_bound_us"],
                         "hbm_floor_us": floor, "hbm_floor_measured": s["hbm_floor_measured"],
                         "predicted_over_hbm_floor": s["predicted_over_hbm_floor"],
                         "compile_s": time.perf_counter() - t0})
            r = rows[-1]
            vs = f"{r['predicted_over_hbm_floor']:>8.2f}" if floor else f"{'-':>8}"
            print(f"{name:<22} {target:<6} {workers:>7} {r['tasks']:>6} {predicted:>10.1f} "
                  f"{cp:>8.1f} {work:>8.1f} {memory:>8.1f} {r['ratio']:>6.2f} "
                  f"{floor:>8.1f} {vs}", flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
