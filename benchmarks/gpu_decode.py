"""GPU decode benchmark: tilec beside Hugging Face eager and torch.compile.

One command, installs nothing, finishes in minutes on one H200:
    python benchmarks/gpu_decode.py [--config examples/llama3_1b.yaml] [--out DIR]

Llama-3.2-1B shapes, bf16, batch 1, random weights shared by all systems, a 32-token
prompt and 128 new tokens. It first measures device-to-device copy bandwidth, checks
small float32 engines against eager PyTorch on the GPU, then prints ms/token,
tokens/s, achieved GB/s and the fraction of measured bandwidth for each system, plus
tilec's predicted vs measured step time: a table last, and JSON in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tilec  # noqa: E402  (fixes Triton's interpreter mode before torch imports it)
import torch  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def copy_bandwidth_gbps(nbytes: int = 2 << 30, reps: int = 20) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del src, dst
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9   # read + write


@torch.no_grad()
def check_small_engines(quick: bool = False) -> dict:
    """float32 engines on the GPU against eager PyTorch (before trusting any timing)."""
    from tilec.api import compile as tilec_compile
    from tilec.compiler.config import build_model, load_config

    out = {}
    if not quick:
        cfg = load_config(ROOT / "examples/block.yaml")
        module, inputs = build_model(cfg)
        engine = tilec_compile(cfg, target="h200", dtype="float32")
        got = engine.run(backend="gpu", x=inputs[0])["output0"]
        ref = module(inputs[0])
        out["block_rel_err"] = float((got - ref).abs().max() / ref.abs().max())
        log(f"block.yaml on gpu: max rel err {out['block_rel_err']:.2e}")

    cfg = load_config(ROOT / "examples/llama_tiny.yaml")
    module, _ = build_model(cfg)
    engine = tilec_compile(cfg, target="h200", dtype="float32")
    prompt = [5, 9, 2, 7]
    g = engine.generate(prompt, 16, backend="gpu", logits=True, stop_at_eos=False)
    toks, logits = list(prompt), []
    for i in range(len(prompt) + 15):
        r = module(torch.tensor([toks[i]]), torch.tensor([i]))
        if i >= len(prompt) - 1:
            toks.append(int(r["next_token"][0]))
            logits.append(r["logits"][0])
    out["llama_tiny_tokens_equal"] = g.tokens == toks[len(prompt):]
    out["llama_tiny_logits_max_abs"] = float((g.logits - torch.stack(logits)).abs().max())
    log(f"llama_tiny on gpu: tokens equal {out['llama_tiny_tokens_equal']}, "
        f"logits max abs diff {out['llama_tiny_logits_max_abs']:.2e}")
    return out


def to_hf(module, dtype):
    from tilec.models.hf import to_transformers

    return to_transformers(module.to(dtype), device="cuda")


def time_hf_decode(hf, prompt, new_tokens, **gen_kwargs) -> tuple[float, list[int]]:
    """ms per decode token = (generate(N) - generate(1)) / (N - 1), CUDA-event timed."""
    ids = torch.tensor([prompt], device="cuda")

    def run(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = hf.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=None, pad_token_id=0, **gen_kwargs)
        end.record()
        end.synchronize()
        return start.elapsed_time(end), out[0, len(prompt):].tolist()

    run(new_tokens)  # warm-up (and, for compiled models, compilation)
    t1 = min(run(1)[0] for _ in range(3))
    tn, tokens = run(new_tokens)
    return (tn - t1) / (new_tokens - 1), tokens


def matching_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "examples/llama3_1b.yaml"))
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--out", default=os.environ.get("OUT", "build/bench"))
    ap.add_argument("--skip-compile-baseline", action="store_true")
    ap.add_argument("--skip-eager-baseline", action="store_true")
    ap.add_argument("--quick-checks", action="store_true",
                    help="check only llama_tiny on the GPU (saves device time)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip the torch.compile baseline when less than this is left")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import triton

    results: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(),
                     "torch": torch.__version__, "triton": triton.__version__}
    log(f"{results['gpu']}, torch {torch.__version__}, triton {triton.__version__}")
    results["copy_gbps"] = bw = copy_bandwidth_gbps()
    log(f"device-to-device copy: {bw:.0f} GB/s (read + write)")
    results["checks"] = check_small_engines(quick=args.quick_checks)

    from tilec.api import compile as tilec_compile
    from tilec.compiler.config import build_model, load_config

    cfg = load_config(args.config)
    cfg = replace(cfg, dtype="bfloat16", model=replace(cfg.model, max_seq_len=args.max_seq_len))
    t = time.perf_counter()
    engine = tilec_compile(cfg, target="h200")
    results["tilec_compile_s"] = time.perf_counter() - t
    summary = engine.summary()
    log(f"compiled {summary['tasks']} tasks on {summary['workers']} workers in "
        f"{results['tilec_compile_s']:.1f} s; predicted step {summary['predicted_step_us']:.0f} us")
    module, _ = build_model(cfg)
    module = module.to(torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    prompt = torch.randint(0, module.cfg.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()

    ex = engine.executor("gpu")
    t = time.perf_counter()
    engine.generate(prompt[:2], 2, backend="gpu", stop_at_eos=False)   # JIT compile + warm-up
    log(f"kernel JIT + warm-up {time.perf_counter() - t:.1f} s")
    ex.timing = True
    ex.kernel_ms.clear()
    g = engine.generate(prompt, args.new_tokens, backend="gpu", stop_at_eos=False)
    step_ms = statistics.median(ex.kernel_ms)
    wall_ms = g.seconds * 1e3 / g.steps
    c = module.cfg
    avg_len = args.prompt_len + args.new_tokens / 2
    kv_bytes = 2 * c.num_hidden_layers * c.kv_heads * c.dim_head * 2 * avg_len
    floor_bytes = weight_bytes + kv_bytes
    rows = []

    def row(name, ms, tokens):
        rows.append({"system": name, "ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                     "achieved_gbps": floor_bytes / (ms * 1e-3) / 1e9,
                     "fraction_of_copy_bw": floor_bytes / (ms * 1e-3) / 1e9 / bw,
                     "tokens_match_tilec": matching_prefix(tokens, g.tokens)})

    row("tilec kernel (device time)", step_ms, g.tokens)
    row("tilec step (host loop)", wall_ms, g.tokens)
    results["tilec_predicted_step_us"] = summary["predicted_step_us"]
    results["tilec_measured_step_us"] = step_ms * 1e3
    log(f"tilec: {step_ms:.3f} ms/step device, {wall_ms:.3f} ms/step with host loop")
    del ex, engine
    torch.cuda.empty_cache()

    hf = to_hf(module, torch.bfloat16)
    if not args.skip_eager_baseline:
        ms, toks = time_hf_decode(hf, prompt, args.new_tokens)
        row("HF eager", ms, toks)
        log(f"HF eager: {ms:.3f} ms/token, tokens match tilec for {rows[-1]['tokens_match_tilec']}")
    left = args.budget_s - (time.perf_counter() - T0)
    if args.skip_compile_baseline or left < 40:
        log(f"skipping torch.compile baseline ({left:.0f} s of budget left)")
    else:
        try:
            ms, toks = time_hf_decode(hf, prompt, args.new_tokens, cache_implementation="static")
            row("torch.compile reduce-overhead (HF static cache)", ms, toks)
            log(f"torch.compile: {ms:.3f} ms/token")
        except Exception as e:  # the baseline's failure must not hide tilec's numbers
            log(f"torch.compile baseline failed: {type(e).__name__}: {str(e)[:200]}")
    results["rows"] = rows
    results["weight_bytes"] = weight_bytes
    results["floor_bytes_per_token"] = floor_bytes
    (Path(args.out) / "gpu_decode.json").write_text(json.dumps(results, indent=1))
    print()
    print(f"{results['gpu']}  copy bw {bw:.0f} GB/s  weights {weight_bytes / 1e9:.2f} GB  "
          f"floor {floor_bytes / (bw * 1e9) * 1e3:.3f} ms/token")
    print(f"{'system':<48} {'ms/tok':>8} {'tok/s':>8} {'GB/s':>7} {'of bw':>6} {'match':>6}")
    for r in rows:
        print(f"{r['system']:<48} {r['ms_per_token']:8.3f} {r['tokens_per_s']:8.1f} "
              f"{r['achieved_gbps']:7.0f} {r['fraction_of_copy_bw']:6.1%} {r['tokens_match_tilec']:6d}")
    print(f"tilec predicted step {results['tilec_predicted_step_us']:.0f} us, measured "
          f"{results['tilec_measured_step_us']:.0f} us "
          f"(ratio {results['tilec_measured_step_us'] / results['tilec_predicted_step_us']:.2f})")
    print(json.dumps({"checks": results["checks"], "rows": rows}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
