"""`tilec` command line: argument parsing and printing only; the work is in tilec.api."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tilec import signals
from tilec.errors import RunError, TilecError
from tilec.limits import error_line
from tilec.paths import check_outputs


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake in the arguments as one `error:` line and exit 2, like
    every other mistake (argparse prints the usage, then the message)."""

    def error(self, message: str):
        print(f"error: {error_line(f'{self.prog}: {message} (see {self.prog} --help)')}",
              file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tilec",
        description="Compile a PyTorch model into one persistent Triton kernel and a static "
                    "tile-level schedule; run, inspect and verify it.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a model.yaml into an engine file")
    c.add_argument("model", help="model.yaml")
    c.add_argument("-o", "--output", required=True, help="engine file to write")
    c.add_argument("--target", help="cpu | h100 | h200 (default: the yaml's)")
    c.add_argument("--workers", type=int, help="number of persistent workers (default: the yaml's or the target's)")
    c.add_argument("--devices", type=int, help="devices of a multi-device engine, one kernel and "
                   "process each (default: the yaml's, or 1)")
    c.add_argument("--dump-dir", help="write every compiler stage as text into this folder")
    c.add_argument("--no-aot", action="store_true",
                   help="GPU targets: do not compile the kernels (decode's, prefill's) for "
                        "the GPU now (the first run of each compiles it)")
    c.add_argument("--plan", action="store_true",
                   help="build everything but the weights (an hf: folder needs only "
                        "config.json): an engine to inspect and verify, never to run; "
                        "says whether it fits each device's memory and predicts the step")

    r = sub.add_parser("run", help="run an engine on inputs")
    r.add_argument("engine")
    r.add_argument("--backend", default="auto", choices=["auto", "gpu", "interpret", "reference"])
    r.add_argument("--inputs", help="safetensors file with one tensor per input (default: seeded random inputs)")
    r.add_argument("--output", help="write the outputs to this safetensors file")
    r.add_argument("--seed", type=int, default=0, help="seed of the random inputs and of --policy random")
    r.add_argument("--policy", default="round_robin", choices=["round_robin", "random", "reverse"],
                   help="worker interleaving on CPU backends")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--prompt-ids", action="append",
                   help="decoder engines: comma-separated prompt token ids; repeat it for a "
                        "batch of prompts, run side by side in the engine's sequence slots")
    r.add_argument("--prompt", help="decoder engines with a tokenizer: prompt text")
    r.add_argument("--max-new-tokens", type=int, default=16, help="decoder engines: tokens to generate")
    r.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (0: greedy)")
    r.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens")
    r.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches p")
    r.add_argument("--logits-out", help="write the float32 logits of every generated step (safetensors)")
    r.add_argument("--trust-engine-code", action="store_true",
                   help="run the stored kernel even if it differs from what this tilec renders")
    r.add_argument("--profile", metavar="FILE",
                   help="write the measured timeline (one span per task: host clock on "
                        "CPU backends, the GPU's global timer on gpu) as Chrome/Perfetto "
                        "trace JSON")

    i = sub.add_parser("inspect", help="show an engine's schedule")
    i.add_argument("engine")
    i.add_argument("--json", action="store_true",
                   help="print one JSON object (keys documented in tilec/inspect.py)")
    i.add_argument("--aot", action="store_true",
                   help="GPU targets without a stored binary: compile the kernel for the GPU "
                        "now and report registers, spills and shared memory (takes seconds)")
    i.add_argument("--trace", metavar="FILE",
                   help="write the predicted timeline as Chrome/Perfetto trace JSON")
    i.add_argument("--dot", metavar="FILE", help="write a Graphviz DOT graph (see --level)")
    i.add_argument("--level", choices=["ops", "tasks"], default="ops",
                   help="--dot: ops clustered by fusion group, or tasks coloured by worker")
    i.add_argument("--html", metavar="FILE",
                   help="write a self-contained HTML report with a Gantt chart")
    i.add_argument("--device", type=int, default=0,
                   help="multi-device engines: the device whose schedule to show (default 0)")
    i.add_argument("--entry", choices=["decode", "prefill"], default="decode",
                   help="engines with a prefill entry: the entry whose schedule the summary, "
                        "--trace, --dot and --html show (default decode)")

    s = sub.add_parser("serve", help="serve a decoder engine over an OpenAI-compatible HTTP API")
    s.add_argument("engine")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a sequence slot; more are answered 429")
    s.add_argument("--backend", default="auto", choices=["auto", "gpu", "interpret", "reference"])
    s.add_argument("--trust-engine-code", action="store_true",
                   help="run the stored kernel even if it differs from what this tilec renders")

    v = sub.add_parser("verify", help="prove an engine's schedule race- and deadlock-free")
    v.add_argument("engine")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.add_argument("--interleavings", type=int, default=0,
                   help="also run N seeded random interleavings and compare bitwise")
    return p


def entry() -> None:
    """The `tilec` command and `python -m tilec`: `main`, then the process ends. After a
    compile it ends at once (output flushed), without tearing the interpreter down:
    that took 0.8 s of a 1B model's compile, with nothing left to do. Every other
    command, and `main` called in-process, exits the usual way."""
    argv = sys.argv[1:]
    try:
        code = main(argv)
    except KeyboardInterrupt:   # in the moment main's own handler was not in place
        code = _interrupted()
    if next((a for a in argv if not a.startswith("-")), None) == "compile":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    with signals.interrupts_raise():   # Ctrl-C unwinds: a save removes its temporary file
        try:
            return _main(argv)
        except KeyboardInterrupt:
            return _interrupted()


def _interrupted() -> int:
    print("error: interrupted", file=sys.stderr)
    return 130


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:   # --help, or a mistake in the arguments (one line printed)
        return e.code if isinstance(e.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)   # for the ranks `run` starts
    try:
        return COMMANDS[args.command](args)
    except TilecError as e:
        if args.debug:
            raise
        print(f"error: {error_line(str(e)) or type(e).__name__}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tilec ... | head`: the reader left; not an error
        return 0
    except Exception as e:  # a bug in tilec, or an input no check foresaw: still one line
        if args.debug:
            raise
        first = error_line(str(e))[:300]
        print(f"error: internal error: {type(e).__name__}: {first} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 2


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def cmd_compile(args) -> int:
    import tilec

    console = _console()
    t0 = time.perf_counter()
    console.print(f"[bold]tilec compile[/bold] {args.model}")

    def on_stage(name: str, seconds: float) -> None:
        console.print(f"  {name:<9} {seconds * 1000:9.1f} ms")

    from tilec.api import compile as compile_model

    engine = compile_model(args.model, target=args.target, workers=args.workers,
                           devices=args.devices, dump_dir=args.dump_dir, on_stage=on_stage,
                           aot=not args.no_aot, output=args.output, plan=args.plan)
    # Read from the manifest: engine.summary() (tilec inspect's report) recomputes every
    # dependency edge and the critical path, seconds for a 1B model.
    m = engine.data.manifest
    size = Path(args.output).stat().st_size
    tasks = sum(len(p.manifest.schedule.taskgraph.tasks) for p in engine.parts)
    events = sum(len(p.manifest.schedule.events) for p in engine.parts)
    on = f"{engine.devices} devices x {m.schedule.target.workers - 1} (+1 comm)" if engine.devices > 1 \
        else f"{m.schedule.target.workers}"
    console.print(f"wrote {args.output} ({size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s: "
                  f"{tasks} tasks on {on} workers, {events} events, {len(m.kinds)} opcodes, "
                  f"target {m.schedule.target.name}")
    if args.plan:
        from tilec.inspect import fit_lines, fit_report

        console.print("a plan (no weights; inspect and verify it, it cannot run):",
                      highlight=False)
        for line in fit_lines(fit_report(engine.parts), m.schedule.target.name):
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    del tilec
    return 0


def cmd_run(args) -> int:
    import torch

    from tilec.api import load

    check_outputs([("the engine", args.engine), ("--inputs", args.inputs)],
                  [("--output", args.output), ("--logits-out", args.logits_out),
                   ("--profile", args.profile)])
    for path in (args.profile, args.output, args.logits_out):
        _check_writable(path)   # before the run, not after it
    engine = load(args.engine, trust_engine_code=args.trust_engine_code)
    if engine.is_plan:   # before any process, executor or input
        from tilec.runtime.enginefile.format import PLAN_REFUSAL

        raise RunError(f"{args.engine}: {PLAN_REFUSAL}")
    if engine.devices > 1:   # one process per device: start them, or be one of them
        from tilec.runtime.distributed import reports_outputs, run_ranks

        code = run_ranks(args.argv, engine.devices, args.backend,
                         check=lambda: _check_prompt(engine, args))
        if code is not None:
            return code
        if not reports_outputs():
            args.profile = args.output = args.logits_out = None
    if args.profile:  # the executor run / generate use below, cached by the engine
        engine.executor(args.backend, args.policy, args.seed).start_profile()
    if engine.generation_spec is not None and not args.inputs:
        code = _generate(engine, args)
        _write_profile(engine, args)
        return code
    if args.prompt_ids is not None or args.prompt is not None:
        raise RunError(f"{args.engine} is not a decoder engine: --prompt-ids and --prompt "
                       "need one (use --inputs)")
    if args.inputs:
        from safetensors.torch import load_file

        try:
            inputs = load_file(args.inputs)
        except Exception as e:
            raise RunError(f"cannot read inputs file {args.inputs}: {str(e).splitlines()[0]}") from None
    else:
        inputs = engine.random_inputs(args.seed)
    t0 = time.perf_counter()
    ex = engine.executor(args.backend, args.policy, args.seed)
    outputs = ex.run(inputs)
    seconds = time.perf_counter() - t0
    _write_profile(engine, args)
    if args.output:
        _save_tensors({k: v.contiguous() for k, v in outputs.items()}, args.output)
    if args.json:
        print(json.dumps({
            "backend": ex.backend, "seconds": seconds,
            "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                            "sum": float(v.double().sum()), "values": v.flatten()[:8].tolist()}
                        for k, v in outputs.items()},
        }))
        return 0
    print(f"ran {args.engine} on backend {ex.backend} in {seconds:.3f} s")
    torch.set_printoptions(precision=4, threshold=16, edgeitems=3)
    for k, v in outputs.items():
        print(f"{k}: shape {list(v.shape)} {str(v.dtype).replace('torch.', '')}")
        print(f"  {v}")
    return 0


def _check_prompt(engine, args) -> None:
    if engine.generation_spec is not None and not args.inputs:
        from tilec.runtime.generate import check_prompt

        for prompt in _parse_prompts(engine, args):
            check_prompt(engine.generation_spec, prompt, args.max_new_tokens)


def _check_writable(path: str | None) -> None:
    if path and os.path.isdir(path):
        raise TilecError(f"cannot write {path}: it is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path)) if path else None
    if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        raise TilecError(f"cannot write {path}: {folder} is not a writable folder")


def _save_tensors(tensors, path: str) -> None:
    """A safetensors file, written as engines are (safetensors' own writer gives every
    file mode 0600, whatever the umask)."""
    from safetensors.torch import save

    from tilec.runtime.atomic_file import write_file

    write_file(path, save(tensors))


def _write_profile(engine, args) -> None:
    if not args.profile:
        return
    from tilec.viz.timeline import measured
    from tilec.viz.trace import write_chrome_trace

    ex = engine.executor(args.backend, args.policy, args.seed)
    data = engine.data
    try:
        write_chrome_trace(measured(data.manifest, data.schedule(), ex.trace, ex.backend),
                           args.profile)
    except OSError as e:
        raise TilecError(f"cannot write {e.filename}: {e.strerror}") from None
    print(f"wrote {args.profile}: {len(ex.trace)} task spans measured on {ex.backend}",
          file=sys.stderr)


def _parse_prompts(engine, args) -> list[list[int]]:
    """The prompts to run: --prompt's text, or each --prompt-ids (default: one prompt, [1])."""
    if args.prompt_ids and args.prompt:
        raise RunError("give --prompt-ids or --prompt, not both")
    if args.prompt:
        tok = engine.tokenizer()
        if tok is None:
            raise RunError("--prompt needs an engine compiled from an hf: checkpoint with a "
                           "tokenizer.json; use --prompt-ids")
        return [tok.encode(args.prompt).ids]
    return [_parse_ids(text) for text in args.prompt_ids or ["1"]]


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise RunError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise RunError(f"--prompt-ids: no token ids in {text!r}; give at least one")
    return ids


def _launches(g) -> dict:
    """A generation's launches of each entry and its time to first token (--json)."""
    return {"prefill_steps": g.prefill_steps, "decode_steps": g.decode_steps,
            "ttft_s": g.ttft_s}


def _generate(engine, args) -> int:
    prompts = _parse_prompts(engine, args)
    t0 = time.perf_counter()
    gens = engine.generate(prompts, args.max_new_tokens, backend=args.backend,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, logits=bool(args.logits_out), policy=args.policy)
    seconds = time.perf_counter() - t0
    if args.logits_out:   # "logits", or "logits_I" for the I-th of several prompts
        _save_tensors({"logits" if len(gens) == 1 else f"logits_{i}": g.logits.contiguous()
                       for i, g in enumerate(gens)}, args.logits_out)
    tok = engine.tokenizer()
    texts = [tok.decode(g.tokens) if tok is not None else None for g in gens]
    if args.json:
        sequences = [{"prompt": g.prompt, "new_tokens": g.tokens, "steps": g.steps,
                      **_launches(g), **({"text": text} if text is not None else {})}
                     for g, text in zip(gens, texts)]
        made = sum(len(g.tokens) for g in gens)
        g = gens[0]
        out = {"prompt": g.prompt, "new_tokens": g.tokens, "backend": g.backend,
               "steps": g.steps, **_launches(g), "seconds": g.seconds,
               "tokens_per_s": g.tokens_per_s}
        if texts[0] is not None:
            out["text"] = texts[0]
        if len(gens) > 1:   # the batch: every sequence, and the tokens of all per second
            out = {"backend": g.backend, "seconds": seconds,
                   "tokens_per_s": made / seconds if seconds > 0 else 0.0}
        out["sequences"] = sequences
        print(json.dumps(out))
        return 0
    for i, (g, text) in enumerate(zip(gens, texts)):
        label = f"sequence {i}: " if len(gens) > 1 else ""
        print(f"{label}prompt ({len(g.prompt)} tokens): {g.prompt}")
        print(f"{label}generated {len(g.tokens)} tokens: {g.tokens}")
        if text is not None:
            print(f"{label}text: {text}")
        print(f"{label}{g.steps} steps ({g.prefill_steps} prefill, {g.decode_steps} decode "
              f"launches) on backend {g.backend} in {g.seconds:.2f} s: "
              f"{g.tokens_per_s:.2f} tokens/s, first token after {g.ttft_s:.2f} s")
    return 0


def cmd_inspect(args) -> int:
    from tilec.api import Engine, load
    from tilec.inspect import entries_table, print_summary, summary

    check_outputs([("the engine", args.engine)],
                  [("--trace", args.trace), ("--dot", args.dot), ("--html", args.html)])
    engine = load(args.engine, read_only=True)   # reads the schedule; --aot checks the kernel
    if not 0 <= args.device < engine.devices:
        raise TilecError(f"--device {args.device}: the engine has "
                         f"{engine.devices} device{'s' if engine.devices > 1 else ''}")
    engine = engine.part(args.device)
    entries = entries_table(engine.data)
    if args.entry != "decode":   # its summary and pictures; the entries table is the file's
        engine = Engine(engine.data.entry(args.entry))
    s = summary(engine.data, aot=args.aot)
    s["entries"] = entries
    if len(engine.parts) > 1:
        from tilec.inspect import device_table

        s["device"], s["devices"] = args.device, device_table(engine.parts)
    try:
        written = _inspect_files(engine, s, args)
    except OSError as e:
        raise TilecError(f"cannot write {e.filename}: {e.strerror}") from None
    if args.json:
        print(json.dumps(s))
    else:
        from rich.console import Console

        print_summary(s, Console(highlight=False))
    for w in written:
        print(f"wrote {w}", file=sys.stderr)
    return 0


def _inspect_files(engine, s, args) -> list[str]:
    from tilec.inspect import predicted_timeline

    written = []
    if args.trace:
        from tilec.viz.trace import write_chrome_trace

        if len(engine.parts) > 1:   # every device, one trace process each
            transfers = engine.data.manifest.schedule.taskgraph.transfers
            write_chrome_trace([predicted_timeline(p) for p in engine.parts], args.trace,
                               transfers)
        else:
            write_chrome_trace(predicted_timeline(engine.data), args.trace)
        written.append(f"{args.trace} (predicted timeline, Chrome/Perfetto trace)")
    if args.dot:
        from tilec.inspect import dot_graph

        Path(args.dot).write_text(dot_graph(engine.data, args.level))
        written.append(f"{args.dot} (Graphviz DOT, {args.level})")
    if args.html:
        from tilec.viz.html import report_html

        Path(args.html).write_text(report_html(s, predicted_timeline(engine.data)))
        written.append(f"{args.html} (HTML report)")
    return written


def cmd_verify(args) -> int:
    from tilec.api import load
    from tilec.verify_engine import verify_engine

    engine = load(args.engine, trust_engine_code=False)
    report = verify_engine(engine, interleavings=args.interleavings)
    if args.json:
        print(json.dumps(report))
    else:
        for name, ok in report["checks"].items():
            print(f"{'ok  ' if ok else 'FAIL'} {name}")
        if report["violations"]:
            print(f"first violation: {report['violations'][0]}")
    return 0 if report["ok"] else 1


def cmd_serve(args) -> int:
    from tilec.serve import serve

    return serve(args.engine, args.host, args.port, args.max_queue, args.backend,
                 args.trust_engine_code)


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "inspect": cmd_inspect, "verify": cmd_verify,
            "serve": cmd_serve}

if __name__ == "__main__":
    sys.exit(main())
