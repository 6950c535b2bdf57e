"""The one prepared GPU run (issue 20): tilec's decode step against the copy bandwidth,
torch.compile and Hugging Face eager, in one command that installs nothing.

    python benchmarks/gpu_decode.py [--out DIR] [--budget-s S] [--config YAML] ...

On one H100/H200, in under 6 minutes, in this order (each step's result is kept even
if a later one fails):

 1. device-to-device copy bandwidth: the bandwidth the floor is measured against;
 2. correctness on the GPU: float32 engines (examples/block.yaml, llama_tiny.yaml)
    against eager PyTorch (tokens equal, logits close);
 3. the watchdog: a small engine with a planted hang (a wait for one signal more than
    its event ever gets) must stop with ScheduleHangError naming worker, task, event;
 4. tilec on Llama-3.2-1B shapes (bf16, batch 1, random weights; `--config`): the
    engine's AOT cubin must launch without any JIT; `--new-tokens` timed with CUDA
    events around each launch;
 5. torch.compile(mode="reduce-overhead") on the same weights, its greedy tokens
    compared with tilec's;
 6. a measured profile of one step (every task stamps the GPU's global timer): a
    Perfetto trace and, per task kind, measured against predicted task time, to
    calibrate the cost model (passes/cost.py, ir/target.py);
 7. Hugging Face eager on the same weights.
Steps 5-7 are skipped when what is left of `--budget-s` would not fit them.

Then a table and the JSON (also written to DIR/gpu_decode.json), last. The exit status
is 0 when every check passed, 1 when one failed (the figures still print), 2 on bad
arguments or without a GPU (one `error:` line, at once).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tilec  # noqa: E402  (fixes Triton's interpreter mode before torch imports it)
import torch  # noqa: E402

T0 = time.perf_counter()
GOALS = {"fraction_of_copy_bw": 0.80, "speedup_vs_torch_compile": 1.5,
         "prediction_error": 0.20}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "examples/llama3_1b.yaml"))
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--out", default=os.environ.get("OUT", "build/bench"),
                    help="folder for gpu_decode.json, the profile trace and its summary")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="skip the baselines that would not fit in what is left of this")
    ap.add_argument("--skip-compile-baseline", action="store_true")
    ap.add_argument("--skip-eager-baseline", action="store_true")
    ap.add_argument("--skip-profile", action="store_true")
    args = ap.parse_args(argv)
    if args.prompt_len < 1 or args.new_tokens < 2:
        ap.error("--prompt-len must be at least 1 and --new-tokens at least 2")
    if args.prompt_len + args.new_tokens > args.max_seq_len:
        ap.error(f"--prompt-len + --new-tokens ({args.prompt_len + args.new_tokens}) "
                 f"exceeds --max-seq-len ({args.max_seq_len})")
    return args


def left_s(args) -> float:
    return args.budget_s - (time.perf_counter() - T0)


# ---- 1. copy bandwidth ------------------------------------------------------------------

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


# ---- 2. correctness -----------------------------------------------------------------------

@torch.no_grad()
def check_small_engines() -> dict:
    """float32 engines on the GPU against eager PyTorch (before trusting any timing)."""
    from tilec.api import compile as tilec_compile
    from tilec.compiler.build import build_model
    from tilec.compiler.config import load_config

    out = {}
    cfg = load_config(ROOT / "examples/block.yaml")
    module, inputs = build_model(cfg)
    engine = tilec_compile(cfg, target="h200", dtype="float32")
    got = engine.run(backend="gpu", x=inputs[0])["output0"]
    ref = module(inputs[0])
    out["block_rel_err"] = float((got - ref).abs().max() / ref.abs().max())
    out["block_ok"] = out["block_rel_err"] <= 1e-4
    log(f"block.yaml on gpu: max rel err {out['block_rel_err']:.2e}")

    cfg = load_config(ROOT / "examples/llama_tiny.yaml")
    module, _ = build_model(cfg)
    tiny = tilec_compile(cfg, target="h200", dtype="float32")
    prompt = [5, 9, 2, 7]
    g = tiny.generate(prompt, 16, backend="gpu", logits=True, stop_at_eos=False)
    toks, logits = list(prompt), []
    for i in range(len(prompt) + 15):
        r = module(torch.tensor([toks[i]]), torch.tensor([i]))
        if i >= len(prompt) - 1:
            toks.append(int(r["next_token"][0]))
            logits.append(r["logits"][0])
    out["llama_tiny_tokens_equal"] = g.tokens == toks[len(prompt):]
    out["llama_tiny_logits_max_abs"] = float((g.logits - torch.stack(logits)).abs().max())
    out["llama_tiny_ok"] = out["llama_tiny_tokens_equal"] and out["llama_tiny_logits_max_abs"] <= 1e-3
    log(f"llama_tiny on gpu: tokens equal {out['llama_tiny_tokens_equal']}, "
        f"logits max abs diff {out['llama_tiny_logits_max_abs']:.2e}")
    return out


# ---- 3. the watchdog ----------------------------------------------------------------------

def plant_hang(tasks: torch.Tensor, events, queue_start: list[int]) -> tuple[int, int, int]:
    """The first record with a wait now wants one signal more than its event ever gets
    (the table edited in place). Returns (worker, record row, event)."""
    table = tasks.cpu()
    for w in range(len(queue_start) - 1):
        for row in range(queue_start[w], queue_start[w + 1]):
            if int(table[row, 5]):
                ev = int(table[row, 6])
                table[row, 7] = events[ev].signals + 1
                tasks.copy_(table)
                return w, row, ev
    raise RuntimeError("no task of the engine waits: nothing to plant a hang in")


def check_watchdog(spin_limit: int = 1 << 14) -> dict:
    """A planted hang in a small engine: the kernel must stop (not hang the GPU) and
    the host must raise ScheduleHangError naming the worker and the event."""
    from tilec.api import compile as tilec_compile
    from tilec.errors import ScheduleHangError

    engine = tilec_compile(str(ROOT / "examples/block.yaml"), target="h200", workers=8,
                           dtype="float32", aot=False)
    ex = engine.new_executor("gpu")
    ex.spin_limit = spin_limit
    worker, row, ev = plant_hang(ex.tables["tasks"], ex.schedule.events,
                                 ex.tables["queue_start"].tolist())
    t = time.perf_counter()
    try:
        ex.run(engine.random_inputs(0))
    except ScheduleHangError as e:
        message = str(e)
        fired = f"worker {worker} " in message and f"event {ev} " in message
        log(f"watchdog fired after {time.perf_counter() - t:.2f} s: {message}")
        return {"fired": fired, "message": message, "planted": [worker, row, ev]}
    log("watchdog did NOT fire on the planted hang")
    return {"fired": False, "message": "", "planted": [worker, row, ev]}


# ---- 4. tilec ------------------------------------------------------------------------------

def tilec_decode(args, cfg, prompt: list[int]) -> dict:
    from tilec.api import compile as tilec_compile

    t = time.perf_counter()
    engine = tilec_compile(cfg, target="h200")
    compile_s = time.perf_counter() - t
    summary = engine.summary()
    log(f"compiled {summary['tasks']} tasks on {summary['workers']} workers in {compile_s:.1f} s; "
        f"predicted step {summary['predicted_step_us']:.0f} us, HBM floor "
        f"{summary['hbm_floor_us']:.0f} us")
    ex = engine.executor("gpu")
    launch = "aot cubin" if ex.binary is not None else "jit"
    log(f"tilec launches its kernel from: {launch}")
    engine.generate(prompt[:2], 2, backend="gpu", stop_at_eos=False)   # warm-up
    ex.timing = True
    ex.kernel_ms.clear()
    g = engine.generate(prompt, args.new_tokens, backend="gpu", stop_at_eos=False)
    step_ms = statistics.median(ex.kernel_ms)
    ex.timing = False
    out = {"engine": engine, "tokens": g.tokens, "step_ms": step_ms,
           "wall_ms": g.seconds * 1e3 / g.steps, "compile_s": compile_s, "launch": launch,
           "predicted_step_us": summary["predicted_step_us"],
           "hbm_floor_us": summary["hbm_floor_us"],
           "predicted_over_hbm_floor": summary["predicted_over_hbm_floor"],
           "streaming": summary["kernel"]["streaming"], "aot": summary["kernel"]["aot"]}
    log(f"tilec: {step_ms:.3f} ms/step device, {out['wall_ms']:.3f} ms/step with host loop")
    return out


# ---- 6. the measured profile ---------------------------------------------------------------

def summarize_profile(engine, trace) -> dict:
    """Per task kind of one profiled step: tasks, measured and predicted mean task time
    (us), their ratio, weight bytes per task and the measured GB/s per worker; and the
    step's measured span against the predicted one. `trace`: an executor's records
    (step, worker, task id, start s, end s), one step's."""
    from tilec.inspect import WEIGHT_KINDS, task_moved
    from tilec.viz.timeline import task_kinds

    data = engine.data
    sched = data.schedule()
    tg = sched.taskgraph
    kinds = task_kinds(data.manifest, sched)
    buffers = {b.name: b for b in tg.buffers}
    rows: dict[str, dict] = defaultdict(lambda: {"tasks": 0, "measured_us": 0.0,
                                                 "predicted_us": 0.0, "weight_bytes": 0})
    for _, _, tid, began, ended in trace:
        r = rows[kinds[tid]]
        r["tasks"] += 1
        r["measured_us"] += (ended - began) * 1e6
        r["predicted_us"] += sched.finish_us[tid] - sched.start_us[tid]
        r["weight_bytes"] += sum(n for name, n in task_moved(tg.tasks[tid], buffers)
                                 if buffers[name].kind in WEIGHT_KINDS)
    table = []
    for kind, r in sorted(rows.items(), key=lambda kv: -kv[1]["measured_us"]):
        n = r["tasks"]
        table.append({"kind": kind, "tasks": n, "measured_us": r["measured_us"] / n,
                      "predicted_us": r["predicted_us"] / n,
                      "measured_over_predicted": r["measured_us"] / r["predicted_us"]
                      if r["predicted_us"] else None,
                      "weight_bytes_per_task": r["weight_bytes"] / n,
                      "measured_gbps_per_worker": r["weight_bytes"] / r["measured_us"] / 1e3
                      if r["measured_us"] else 0.0})
    span = (max(e for *_, e in trace) - min(b for *_, b, _ in trace)) * 1e6 if trace else 0.0
    return {"kinds": table, "measured_step_us": span,
            "predicted_step_us": max(sched.finish_us, default=0.0)}


def profile_step(engine, out_dir: Path, prompt: list[int]) -> dict:
    """One profiled decode step of `engine` on the GPU: the trace and its summary
    written to out_dir (profile.trace.json, profile_summary.json)."""
    from tilec.viz.timeline import measured
    from tilec.viz.trace import write_chrome_trace

    ex = engine.new_executor("gpu")
    spec = engine.generation_spec
    ex.start_profile()              # the stamping variant (JIT-compiled on first use)
    for pos, token in enumerate(prompt[:2]):   # the second step is the measured one
        ex.trace.clear()
        ex.run({spec.token_input: torch.tensor([token], dtype=torch.int64),
                spec.pos_input: torch.tensor([pos], dtype=torch.int64)})
    trace = list(ex.trace)
    data = engine.data
    write_chrome_trace(measured(data.manifest, data.schedule(), trace, "gpu"),
                       str(out_dir / "profile.trace.json"))
    summary = summarize_profile(engine, trace)
    (out_dir / "profile_summary.json").write_text(json.dumps(summary, indent=1))
    log(f"profile: {len(trace)} task spans, measured step span "
        f"{summary['measured_step_us']:.0f} us (predicted {summary['predicted_step_us']:.0f})")
    return summary


# ---- 5 and 7. baselines ---------------------------------------------------------------------------

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


# ---- the report -----------------------------------------------------------------------------

def goals(results: dict) -> dict:
    """Issue 20's goals, each None when its figures are missing."""
    rows = {r["system"]: r for r in results.get("rows", [])}
    tilec_row = rows.get("tilec kernel (device time)")
    compiled = next((r for name, r in rows.items() if name.startswith("torch.compile")), None)
    out = {"fraction_of_copy_bw": None, "speedup_vs_torch_compile": None,
           "prediction_error": None}
    if tilec_row:
        out["fraction_of_copy_bw"] = tilec_row["fraction_of_copy_bw"]
        if compiled:
            out["speedup_vs_torch_compile"] = compiled["ms_per_token"] / tilec_row["ms_per_token"]
        measured_us = tilec_row["ms_per_token"] * 1e3
        out["prediction_error"] = abs(results["tilec_predicted_step_us"] - measured_us) / measured_us
    met = {k: (v >= GOALS[k] if k != "prediction_error" else v <= GOALS[k]) if v is not None
           else None for k, v in out.items()}
    return {"figures": out, "goal": GOALS, "met": met}


def report(results: dict) -> str:
    lines = [f"{results.get('gpu', '?')}  copy bw {results.get('copy_gbps', 0):.0f} GB/s  "
             f"floor {results.get('floor_ms_per_token', 0):.3f} ms/token (weights + KV over "
             f"the copy bandwidth)",
             f"{'system':<48} {'ms/tok':>8} {'tok/s':>8} {'GB/s':>7} {'of bw':>6} {'match':>6}"]
    for r in results.get("rows", []):
        lines.append(f"{r['system']:<48} {r['ms_per_token']:8.3f} {r['tokens_per_s']:8.1f} "
                     f"{r['achieved_gbps']:7.0f} {r['fraction_of_copy_bw']:6.1%} "
                     f"{r['tokens_match_tilec']:6d}")
    g = results.get("goals", {})
    for k, v in g.get("figures", {}).items():
        lines.append(f"goal {k}: {'-' if v is None else f'{v:.3f}'} "
                     f"(goal {GOALS[k]}: {'met' if g['met'][k] else 'not met' if v is not None else 'not measured'})")
    lines.append(f"checks passed: {results.get('checks_passed')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu_decode.py needs a CUDA GPU and torch sees none "
              "(nothing was run)", file=sys.stderr)
        return 2
    import triton
    from tilec.compiler.build import build_model
    from tilec.compiler.config import load_config

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(),
                     "torch": torch.__version__, "triton": triton.__version__,
                     "args": vars(args), "rows": [], "skipped": []}
    checks: dict = {}
    try:
        log(f"{results['gpu']}, torch {torch.__version__}, triton {triton.__version__}")
        results["copy_gbps"] = bw = copy_bandwidth_gbps()
        log(f"device-to-device copy: {bw:.0f} GB/s (read + write)")
        checks.update(check_small_engines())
        checks["watchdog"] = check_watchdog()

        cfg = load_config(args.config)
        cfg = replace(cfg, dtype="bfloat16",
                      model=replace(cfg.model, max_seq_len=args.max_seq_len))
        module, _ = build_model(cfg)
        module = module.to(torch.bfloat16)
        prompt = torch.randint(0, module.cfg.vocab_size, (args.prompt_len,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        c = module.cfg
        kv_bytes = 2 * c.num_hidden_layers * c.kv_heads * c.dim_head * 2 * \
            (args.prompt_len + args.new_tokens / 2)
        floor_bytes = weight_bytes + kv_bytes
        results.update(weight_bytes=weight_bytes, floor_bytes_per_token=floor_bytes,
                       floor_ms_per_token=floor_bytes / (bw * 1e9) * 1e3)

        def row(name, ms, tokens):
            gbps = floor_bytes / (ms * 1e-3) / 1e9
            results["rows"].append({"system": name, "ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                                    "achieved_gbps": gbps, "fraction_of_copy_bw": gbps / bw,
                                    "tokens_match_tilec": matching_prefix(tokens, tilec_tokens)})

        t = tilec_decode(args, cfg, prompt)
        tilec_tokens = t["tokens"]
        checks["tilec_launched_aot_cubin"] = t["launch"] == "aot cubin"
        results.update({f"tilec_{k}": v for k, v in t.items() if k not in ("engine", "tokens")})
        row("tilec kernel (device time)", t["step_ms"], tilec_tokens)
        row("tilec step (host loop)", t["wall_ms"], tilec_tokens)

        hf = to_hf(module, torch.bfloat16)
        if args.skip_compile_baseline or left_s(args) < 90:
            results["skipped"].append("torch.compile")
            log(f"skipping torch.compile ({left_s(args):.0f} s of the budget left)")
        else:
            try:
                ms, toks = time_hf_decode(hf, prompt, args.new_tokens,
                                          cache_implementation="static")
                row("torch.compile reduce-overhead (HF static cache)", ms, toks)
                log(f"torch.compile: {ms:.3f} ms/token")
            except Exception as e:  # the baseline's failure must not hide tilec's numbers
                log(f"torch.compile baseline failed: {type(e).__name__}: {str(e)[:200]}")
        if args.skip_profile or left_s(args) < 60:
            results["skipped"].append("profile")
            log(f"skipping the profile ({left_s(args):.0f} s of the budget left)")
        else:
            results["profile"] = profile_step(t["engine"], out_dir, prompt)
        del t
        torch.cuda.empty_cache()
        if args.skip_eager_baseline or left_s(args) < 30:
            results["skipped"].append("HF eager")
        else:
            ms, toks = time_hf_decode(hf, prompt, args.new_tokens)
            row("HF eager (dynamic cache)", ms, toks)
            log(f"HF eager: {ms:.3f} ms/token")
    except Exception:
        traceback.print_exc()
        checks["completed"] = False
    results["checks"] = checks
    passed = {"block": checks.get("block_ok"), "llama_tiny": checks.get("llama_tiny_ok"),
              "watchdog": checks.get("watchdog", {}).get("fired"),
              "aot_cubin": checks.get("tilec_launched_aot_cubin"),
              "completed": checks.get("completed", True)}
    results["checks_passed"] = all(v is True for v in passed.values())
    if "tilec_predicted_step_us" in results and results["rows"]:
        results["goals"] = goals(results)
    (out_dir / "gpu_decode.json").write_text(json.dumps(results, indent=1, default=str))
    print()
    print(report(results))
    print(json.dumps({k: results.get(k) for k in ("checks", "rows", "goals", "skipped")},
                     default=str))
    return 0 if results["checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
