"""Full-size plans: `tilec compile --plan` of Llama-3-70B and of GLM-5 (transformers'
GlmMoeDsaConfig defaults, the sparse-index and routing role on device 0) on 8 h200
devices, from a Hugging Face folder holding only config.json. Prints each stage's wall
and CPU time as it ends, the peak resident memory, the bytes each device would hold
against an H200's memory, the predicted step and tokens/s, and with --limits what
bounds each device's step.

    .venv/bin/python benchmarks/plan_full.py [--layers N] [--devices 8] [--target h200]
                                             [--max-seq-len 8192] [--only llama|glm5]
                                             [--limits] [--keep PLAN] [--json OUT]

`--layers` plans fewer layers of the same shapes (the suite's cheap form). Nothing here
touches weight data: the models are built on PyTorch's meta device. docs/BENCHMARKS.md
has GLM-5's figures.

Measured 2026-12-06 on the shared 2-core machine (load average 9-12, so the process
got 21% of a core): Llama-3-70B, 80 layers, 8 x h200, max_seq_len 8192: 862,900
tasks, 661 s user + 19 s system CPU (52 min wall), peak RSS 5.0 GB, plan file 776 MB;
each device 22-24 GB of 150.8 GB (weights 19.5-21.3 GB, KV cache 2.7 GB): fits;
predicted step 22.5 ms, 44.5 tokens/s. The stages' shares of the wall time: verify 28%,
schedule 18%, tile 12%, deps 9%, save 7%, partition 7%, memplan 6%, sync 5%, timing 4%.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# meta-llama/Meta-Llama-3-70B's config.json, less the fields tilec treats as metadata
LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
GLM5 = "GlmMoeDsaForCausalLM"
# GLM-5 as the seed runs it: sparse indexing and routing on device 0, the rest on 1-7
GLM5_ROLES = {"indexer": {"devices": [0], "modules": ["indexer", "gate"]},
              "mla": {"devices": "1-7"}}


def glm5_config() -> dict | None:
    """transformers' GlmMoeDsaConfig defaults as a config.json, or None (with a line
    saying why) while tilec has no GLM-5 architecture."""
    from tilec.models.architectures import ARCHITECTURES

    if GLM5 not in ARCHITECTURES:
        print(f"glm5: skipped: tilec has no {GLM5} architecture yet "
              "(tilec/models/architectures.py)")
        return None
    import transformers

    # as save_pretrained writes config.json (to_dict adds every PretrainedConfig field)
    data = json.loads(transformers.GlmMoeDsaConfig().to_json_string())
    data["architectures"] = [GLM5]
    return data


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fewer_layers(config: dict, layers: int) -> dict:
    """`config` with its first `layers` layers (0: all of them)."""
    config = dict(config)
    if layers:
        config["num_hidden_layers"] = layers
        for key in ("layer_types", "mlp_layer_types", "indexer_types"):   # one per layer
            if isinstance(config.get(key), list):
                config[key] = config[key][:layers]
    return config


def plan_engine(name: str, config: dict, *, layers: int, devices: int, target: str,
                max_seq_len: int, roles: dict | None = None, output: str | None = None,
                on_stage=None):
    """`tilec.compile(..., plan=True)` of an hf folder holding only `config` (cut to
    `layers`), on `devices` x `target`, with `roles` when there are several devices."""
    import tilec

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, name)
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(fewer_layers(config, layers)))
        spec = {"name": target, "devices": devices}
        if roles and devices > 1:
            spec["roles"] = roles
        yaml = Path(tmp, f"{name}.yaml")
        yaml.write_text(json.dumps({"model": {"hf": str(folder), "max_seq_len": max_seq_len},
                                    "target": spec}))
        return tilec.compile(str(yaml), plan=True, output=output, on_stage=on_stage)


def limits(parts) -> list[dict]:
    """What the cost model says bounds each device's step: its predicted step, the
    bytes it reads per step (weights and KV cache) over its HBM bandwidth (the floor no
    schedule beats), its critical path (deps found again from the regions: a plan
    stores none), each role's busy time over its workers, and its transfers' time."""
    from tilec.inspect import bytes_moved, role_table, schedule_with_deps
    from tilec.ir.tasks import TRANSFER
    from tilec.passes.cost import critical_path

    out = []
    for d, part in enumerate(parts):
        sched = schedule_with_deps(part)
        target, tasks = sched.target, sched.taskgraph.tasks
        moved = bytes_moved(sched)
        floor_bytes = moved["weights"] + moved["kv"]
        path_us, path = critical_path(sched.taskgraph, target)
        roles = {r["name"]: r["busy_us"] / len(r["workers"])
                 for r in role_table(sched) if r["workers"] and r["tasks"]}
        comm = sum(sched.finish_us[t.id] - sched.start_us[t.id] for t in tasks
                   if t.group == TRANSFER)
        out.append({"device": d, "step_us": max(sched.finish_us, default=0.0),
                    "bytes_per_step": floor_bytes,
                    "hbm_floor_us": floor_bytes / (target.bandwidth_gbps * 1e3),
                    "critical_path_us": path_us, "critical_path_tasks": len(path),
                    "role_busy_us_per_worker": roles, "transfer_us": comm,
                    "transfers": sum(t.group == TRANSFER for t in tasks)})
        sched = None   # one device's deps at a time
    return out


def limit_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        busy = ", ".join(f"{k} {v:.0f}" for k, v in r["role_busy_us_per_worker"].items())
        lines.append(f"device {r['device']}: step {r['step_us']:.0f} us; reads "
                     f"{r['bytes_per_step'] / 1e9:.2f} GB/step, HBM floor "
                     f"{r['hbm_floor_us']:.0f} us; critical path {r['critical_path_us']:.0f} "
                     f"us ({r['critical_path_tasks']} tasks); busy per worker: {busy} us; "
                     f"{r['transfers']} transfers, {r['transfer_us']:.0f} us")
    last = max(rows, key=lambda r: r["step_us"])
    lines.append(f"the step ends on device {last['device']}; the largest HBM floor is "
                 f"{max(r['hbm_floor_us'] for r in rows):.0f} us, the longest critical path "
                 f"{max(r['critical_path_us'] for r in rows):.0f} us")
    return lines


def plan(name: str, config: dict, args, roles: dict | None = None) -> dict:
    """Plan one model; prints and returns its figures."""
    from tilec.inspect import fit_lines, fit_report

    stages: dict[str, float] = {}
    cpu_stages: dict[str, float] = {}
    cpu_mark = [time.process_time()]

    def on_stage(stage: str, dt: float) -> None:
        # printed as each stage ends, so a run stopped by a time limit shows how far it
        # got and what took the time (CPU seconds: the machine is shared)
        now = time.process_time()
        stages[stage], cpu_stages[stage] = dt, now - cpu_mark[0]
        cpu_mark[0] = now
        print(f"  {name}: {stage} {dt:.1f} s, {cpu_stages[stage]:.1f} s CPU "
              f"(peak RSS {_peak_rss() / 1e9:.2f} GB)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        engine = plan_engine(name, config, layers=args.layers, devices=args.devices,
                             target=args.target, max_seq_len=args.max_seq_len, roles=roles,
                             output=str(Path(tmp, "plan.engine")), on_stage=on_stage)
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        size = Path(tmp, "plan.engine").stat().st_size
        if args.keep:
            shutil.copy(Path(tmp, "plan.engine"), args.keep)
    peak = _peak_rss()
    report = fit_report(engine.parts)
    tasks = sum(len(p.manifest.schedule.taskgraph.tasks) for p in engine.parts)
    layers = fewer_layers(config, args.layers)["num_hidden_layers"]
    print(f"{name}: {layers} layers on {args.devices} x {args.target}: planned in "
          f"{seconds:.1f} s ({cpu:.1f} s CPU), peak RSS {peak / 1e9:.2f} GB, {tasks} tasks, "
          f"plan file {size / 1e6:.1f} MB")
    print("  stages, CPU seconds: " + ", ".join(f"{s} {dt:.1f}" for s, dt in cpu_stages.items()))
    for line in fit_lines(report, args.target):
        print(f"  {line}")
    bounds = limits(engine.parts) if args.limits else None
    for line in limit_lines(bounds) if bounds else ():
        print(f"  {line}")
    return {"limits": bounds, "name": name, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_bytes": peak,
            "tasks": tasks, "stages": stages, "cpu_stages": cpu_stages, **report}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=0, help="plan this many layers (0: all)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--target", default="h200")
    p.add_argument("--max-seq-len", type=int, default=8192)
    p.add_argument("--only", choices=["llama", "glm5"])
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--keep", help="also keep the plan file there")
    p.add_argument("--limits", action="store_true",
                   help="also say what bounds each device's step (finds the deps again)")
    args = p.parse_args(argv)
    results = []
    if args.only in (None, "llama"):
        results.append(plan("llama3_70b", LLAMA3_70B, args))
    if args.only in (None, "glm5"):
        config = glm5_config()
        if config is not None:
            results.append(plan("glm5", config, args, GLM5_ROLES))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
