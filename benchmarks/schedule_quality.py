"""Schedule quality: predicted step time over its lower bound, per model and workers.

    .venv/bin/python benchmarks/schedule_quality.py [--full]

The lower bound is the larger of the critical path and the bytes the tasks move over
the target's memory bandwidth (as `tilec inspect` reports it). 1.00 would mean the
list schedule hides every dependency and every per-task cost. `--full` adds
Llama-3.2-1B shapes with all 16 layers (about a minute to compile).
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
    if full:
        yield "llama3_1b", str(ROOT / "examples/llama3_1b.yaml"), "h200", [132]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from tilec.api import compile as tilec_compile
    from tilec.compiler.config import parse_config

    rows = []
    for name, source, target, worker_counts in cases(args.full):
        if isinstance(source, dict):
            source = parse_config(source, str(ROOT / "examples/llama3_1b.yaml"))
        for workers in worker_counts:
            t0 = time.perf_counter()
            s = tilec_compile(source, target=target, workers=workers).summary()
            rows.append({"model": name, "target": target, "workers": workers,
                         "tasks": s["tasks"], "predicted_us": s["predicted_step_us"],
                         "lower_bound_us": s["lower_bound_us"],
                         "ratio": s["predicted_step_us"] / s["lower_bound_us"],
                         "compile_s": time.perf_counter() - t0})
            r = rows[-1]
            print(f"{name:<22} {target:<5} {workers:>4} workers {r['tasks']:>6} tasks "
                  f"predicted {r['predicted_us']:10.1f} us  bound {r['lower_bound_us']:10.1f} us  "
                  f"ratio {r['ratio']:.2f}", flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
