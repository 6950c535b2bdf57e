"""Schedule quality: predicted step time over its lower bound, per model and workers.

    .venv/bin/python benchmarks/schedule_quality.py [--full] [--json]

`ratio` is `tilec inspect`'s: predicted / lower bound, the lower bound being the
largest of `cp` (the critical path), `work` (the predicted task times summed over the
workers that run them, per role, the largest: the step if no worker ever idled) and
`memory` (the bytes the tasks move over the datasheet HBM bandwidth). Under the cost
model no schedule of these tasks beats any of the three, so `ratio` is what the list
schedule loses to dependencies and idle workers; 1.00 would hide all of it.

`vs HBM`, predicted over `memory` alone, is the gap to the physical floor. On h200 it
is mostly the per-worker streaming rate the cost model was calibrated with (7.6 GB/s
per worker, measured on an older kernel: 1003 GB/s for 132 workers against 4.8 TB/s),
so it says more about that calibration than about the schedule, until a GPU run
measures the kernel again. h100 carries no calibrated rate. Coarser tiles lengthen cp
and so shrink `ratio`: compare predicted times too. `--full` adds Llama-3.2-1B shapes
with all 16 layers (about a minute each to compile).
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
          f"{'cp':>8} {'work':>8} {'memory':>8} {'ratio':>6} {'vs HBM':>7}  (us)")
    for name, source, target, worker_counts in cases(args.full):
        if isinstance(source, dict):
            source = parse_config(source, str(ROOT / "examples/llama3_1b.yaml"))
        for workers in worker_counts:
            t0 = time.perf_counter()
            # aot=False: the GPU binary does not change the schedule, only the compile time
            s = tilec_compile(source, target=target, workers=workers, aot=False).summary()
            predicted, cp = s["predicted_step_us"], s["critical_path_us"]
            work, memory = s["work_bound_us"], s["memory_bound_us"]
            rows.append({"model": name, "target": target, "workers": workers,
                         "tasks": s["tasks"], "predicted_us": predicted,
                         "critical_path_us": cp, "work_bound_us": work,
                         "memory_bound_us": memory, "lower_bound_us": s["lower_bound_us"],
                         "ratio": predicted / s["lower_bound_us"],
                         "ratio_vs_hbm": predicted / memory,
                         "compile_s": time.perf_counter() - t0})
            r = rows[-1]
            print(f"{name:<22} {target:<6} {workers:>7} {r['tasks']:>6} {predicted:>10.1f} "
                  f"{cp:>8.1f} {work:>8.1f} {memory:>8.1f} "
                  f"{r['ratio']:>6.2f} {r['ratio_vs_hbm']:>7.2f}", flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
