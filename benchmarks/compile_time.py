"""Compile time: `tilec compile` beside torch.compile's first call, same model, same run.

    .venv/bin/python benchmarks/compile_time.py [--config examples/llama3_1b.yaml]

tilec compiles for the config's target (h200 for llama3_1b: random weights, bf16).
torch.compile (inductor, default mode) compiles the same decode-step module for this
machine's CPU on its first call; its time is that first call minus an eager call. The
goal is a ratio tilec / torch.compile <= 0.5. Peak memory of the tilec compile is
read from a child process (ru_maxrss) and compared with the weight bytes.

Both sides compile cold: each gets empty Triton and Inductor cache folders. Warm
caches made torch.compile's first call 7 s instead of 40 s on the 2-core machine, and
tilec's `aot` stage 2.5 s instead of 10 s, so the ratio depended on what ran before.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cold_caches(folder: str) -> dict[str, str]:
    """Environment variables that point Triton's and Inductor's caches into `folder`."""
    return {"TRITON_CACHE_DIR": os.path.join(folder, "triton"),
            "TORCHINDUCTOR_CACHE_DIR": os.path.join(folder, "inductor")}


def tilec_compile_seconds(config: str, out: str, caches: str) -> tuple[float, float, str]:
    """Seconds, peak RSS (bytes) and the stage times `tilec compile` printed."""
    Path(out).unlink(missing_ok=True)   # replacing a 2.5 GB file frees its blocks: 0.4 s
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tilec", "compile", config, "-o", out],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **cold_caches(caches)})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"tilec compile failed:\n{proc.stderr}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    stages = "\n".join(line for line in proc.stderr.splitlines() if line.endswith(" ms"))
    return seconds, peak_kb * 1024, stages


def torch_compile_seconds(config: str, caches: str) -> tuple[float, int]:
    os.environ.update(cold_caches(caches))   # before torch is imported: it reads them once
    sys.path.insert(0, str(ROOT))
    import tilec  # noqa: F401
    import torch

    from tilec.compiler.build import build_model
    from tilec.compiler.config import load_config

    from dataclasses import replace

    from tilec.ir.target import TARGETS

    cfg = load_config(config)
    if cfg.dtype is None:  # what `tilec compile` uses for a family model on this target
        cfg = replace(cfg, dtype=TARGETS[cfg.target.name].dtype)
    module, inputs = build_model(cfg)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.no_grad():
        t0 = time.perf_counter()
        module(*inputs)
        eager = time.perf_counter() - t0
        compiled = torch.compile(module)
        t0 = time.perf_counter()
        compiled(*inputs)
        first = time.perf_counter() - t0
    return first - eager, weight_bytes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "examples/llama3_1b.yaml"))
    ap.add_argument("--out", default=str(ROOT / "build/compile_time.engine"))
    args = ap.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tilec_caches, \
            tempfile.TemporaryDirectory() as torch_caches:
        tilec_s, peak, stages = tilec_compile_seconds(args.config, args.out, tilec_caches)
        print(f"tilec compile: {tilec_s:.1f} s, peak RSS {peak / 1e9:.2f} GB; stages (the "
              f"aot compile runs from tile on, `aot` is the wait for it):\n{stages}",
              flush=True)
        torch_s, weight_bytes = torch_compile_seconds(args.config, torch_caches)
    print(f"torch.compile first call: {torch_s:.1f} s", flush=True)
    result = {"config": args.config, "tilec_s": tilec_s, "torch_compile_first_call_s": torch_s,
              "ratio": tilec_s / torch_s, "tilec_peak_rss_bytes": peak,
              "weight_bytes": weight_bytes, "peak_over_weights": peak / weight_bytes}
    print(f"ratio tilec / torch.compile: {result['ratio']:.2f} (goal <= 0.5); "
          f"tilec peak memory {result['peak_over_weights']:.2f}x the weights (goal <= 2)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
