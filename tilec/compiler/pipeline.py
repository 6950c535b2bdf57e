"""The one pipeline: model -> ir.Graph -> passes -> kernel -> engine file (DESIGN.md diagram),
as data: `STAGES`, a list of named stages over one `CompileState`, read like the stage
table of docs/architecture.md.

    export ▶ lower ▶ fuse ▶ tilings ▶ tile ▶ [partition] ▶ deps ▶ roles ▶ schedule ▶ sync
    ▶ [timing] ▶ [shard] ▶ memplan ▶ verify ▶ render ▶ [weights] ▶ pack ▶ (hooks' stages: manifest ▶ aot)

Each stage is a pure function of the state the previous ones left (it returns a new
state; only `aot` completes the engine it stores the binary in); `run_stages` runs them
in order, reports each one's time and, with a dump folder, writes its dump as text as
it ends. Work beside the stages is a hook at their boundaries (compiler/hooks.py): the
GPU compile, started from `tilings` on in a child process, adds the stages `manifest`
and `aot`; the engine file's two-step save runs around `aot`.
`partition` runs for multi-device targets only: it cuts the task graph into one part
per device, with transfers between them, and every stage after it runs on each part;
the engine is then one EngineFile per device (`DeviceEngines`). A family model's random
weights are drawn in the background meanwhile; `weights` (before `pack`) is the wait
for them, if any.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from tilec.codegen.render import Rendered, render
from tilec.compiler import frontend
from tilec.compiler.hooks import EngineOutput, GpuCompile
from tilec.compiler.options import CompileOptions, InputInfo
from tilec.compiler.pack import pack_devices, pack_entry
from tilec.compiler.stage import Hook, Stage
from tilec.gcpause import without_cyclic_gc
from tilec.ir import printer
from tilec.ir.abi import MAX_WAITS
from tilec.ir.schedule import Schedule
from tilec.ir.serial import to_plain
from tilec.passes.deps import deps
from tilec.passes.fuse import fuse
from tilec.passes.entries import verify_entries
from tilec.passes.memplan import memplan, share_fixed
from tilec.passes.shard import shard_weights
from tilec.passes.partition import device_target, partition, time_devices
from tilec.passes.roles import roles
from tilec.passes.schedule import schedule
from tilec.passes.sync import sync
from tilec.passes.tile import tile, tile_plan
from tilec.passes.verify import check
from tilec.passes.verify_devices import verify_parts
from tilec.runtime.enginefile import DeviceEngines, EngineFile, GenerationSpec
from tilec.version import __version__


@dataclass(frozen=True)
class CompileState:
    """Everything a compile knows: what it was asked, then each stage's result."""

    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    name: str = "model"
    options: CompileOptions = CompileOptions()
    input_info: tuple[InputInfo, ...] = ()
    seed: int = 0
    generation: GenerationSpec | None = None
    tokenizer: str | None = None
    chat: str | None = None
    weights_ready: Callable[[], None] | None = None
    release_constants: bool = False
    # the stages' results, in stage order
    exported: Any = None            # export: frontend.Exported
    lowered: Any = None             # lower: frontend.Lowered
    fused: Any = None               # fuse: FusedGraph
    plan: Any = None                # tilings: passes.tile.TilePlan
    parts: tuple = ()               # tile .. roles: one TaskGraph per device
    scheds: tuple[Schedule, ...] = ()   # schedule .. memplan: one Schedule per device
    max_waits: int = MAX_WAITS      # sync: the most waits a task has (at least 1)
    report: Any = None              # verify: VerifyReport
    rendered: tuple[Rendered, ...] = ()
    engines: tuple[EngineFile, ...] = ()
    # A decoder's prefill entry: its own CompileState, run through memplan by
    # plan_entry before this one starts; `share` places its weights and state with
    # this one's, `entries` renders and packs it into this engine (one file).
    prefill: "CompileState | None" = None

    @property
    def multi(self) -> bool:
        return self.options.target.devices > 1

    @property
    def target(self):
        """The target a one-device engine is scheduled for (device 0's on several)."""
        return self.target_of(0)

    def target_of(self, device: int):
        """The target device `device`'s part is scheduled for: on several devices, its
        device role's worker roles and a comm worker (partition.device_target)."""
        return device_target(self.options.target, device) if self.multi else self.options.target

    @property
    def engine(self) -> EngineFile | DeviceEngines:
        return DeviceEngines(self.engines) if self.multi else self.engines[0]


# ----------------------------------------------------------------------------- stages

def _export(s: CompileState) -> CompileState:
    return replace(s, exported=frontend.export(s.module, s.example_inputs))


def _lower(s: CompileState) -> CompileState:
    lowered = frontend.lower(s.exported, tuple(i.name for i in s.input_info))
    frontend.check_input_ranges(lowered, s.input_info)
    return replace(s, lowered=lowered)


def _fuse(s: CompileState) -> CompileState:
    return replace(s, fused=fuse(s.lowered.graph))


def _tilings(s: CompileState) -> CompileState:
    """Block sizes, tile grids and buffers: all the kernel's source needs of `tile`."""
    return replace(s, plan=tile_plan(s.fused, s.options.tiles, s.options.target))


def _tile(s: CompileState) -> CompileState:
    return replace(s, parts=(tile(s.fused, s.options.tiles, s.options.target, s.plan),))


def _partition(s: CompileState) -> CompileState:
    return replace(s, parts=partition(s.parts[0], s.options.target))


def _deps(s: CompileState) -> CompileState:
    return replace(s, parts=tuple(deps(p) for p in s.parts))


def _roles(s: CompileState) -> CompileState:
    return replace(s, parts=tuple(roles(p, s.target_of(p.device)) for p in s.parts))


def _schedule(s: CompileState) -> CompileState:
    scheds = tuple(schedule(p, s.target_of(p.device), s.options.policy) for p in s.parts)
    return replace(s, scheds=scheds, parts=())


def _sync(s: CompileState) -> CompileState:
    scheds = tuple(sync(x, s.options.max_waits) for x in s.scheds)
    max_waits = max([len(w) for x in scheds for w in x.waits] + [1])
    return replace(s, scheds=scheds, max_waits=max_waits)


def _timing(s: CompileState) -> CompileState:
    """The devices' predicted times, with each transfer waiting for its parties."""
    return replace(s, scheds=time_devices(s.scheds))


def _shard(s: CompileState) -> CompileState:
    """Each device's weights cut to the boxes its tasks touch (passes/shard.py)."""
    return replace(s, scheds=tuple(replace(x, taskgraph=shard_weights(x.taskgraph))
                                   for x in s.scheds))


def _memplan(s: CompileState) -> CompileState:
    # Nothing after sync reads the deps (verify recomputes conflicts from the regions,
    # and the engine does not store them): free them before the weights are packed
    # (2.3 M objects, a few hundred MB, for Llama-1B).
    scheds = tuple(replace(x, taskgraph=replace(x.taskgraph, deps=())) for x in s.scheds)
    return replace(s, scheds=tuple(memplan(x) for x in scheds))


def _share(s: CompileState) -> CompileState:
    """One place for every weight and state buffer of both entries (memplan.share_fixed)."""
    decode, prefill = share_fixed((s.scheds[0], s.prefill.scheds[0]))
    return replace(s, scheds=(decode,), prefill=replace(s.prefill, scheds=(prefill,)))


def _verify(s: CompileState) -> CompileState:
    report = verify_parts(s.scheds)
    if s.prefill is not None:   # each entry alone, then both over their shared state
        report = verify_entries((("decode", s.scheds[0]), ("prefill", s.prefill.scheds[0])),
                                first=report)
    return replace(s, report=report)


def _render(s: CompileState) -> CompileState:
    return replace(s, rendered=tuple(render_schedule(x, s.max_waits, s.name)
                                     for x in s.scheds))


def _weights(s: CompileState) -> CompileState:
    s.weights_ready()
    return s


def _pack(s: CompileState) -> CompileState:
    engines = pack_devices(s.scheds, s.rendered, s.lowered, s.max_waits, s.name,
                           s.input_info, s.seed, None, s.release_constants,
                           s.options.plan)
    for e in engines:
        if s.generation is not None:
            e.manifest = replace(e.manifest, generation=s.generation)
        e.tokenizer, e.chat = s.tokenizer, s.chat
    return replace(s, engines=tuple(engines))


def _entries(s: CompileState) -> CompileState:
    """The prefill entry rendered and packed beside the decode step: its own tables and
    kernel, the decode step's weight and state pools (with any constant only the prefill
    has written into them)."""
    p = s.prefill
    (sched,) = p.scheds
    rendered = render_schedule(sched, p.max_waits, s.name)
    engine = s.engines[0]
    entry = pack_entry(sched, rendered, p.lowered, p.max_waits, s.name, p.input_info,
                       s.seed, engine.tensors, {b.name for b in s.scheds[0].buffers},
                       s.options.plan)
    entry.manifest = replace(entry.manifest, entry="prefill")
    engine.entries = {"prefill": entry}
    engine.manifest = replace(engine.manifest, entries=("decode", "prefill"))
    return replace(s, prefill=replace(p, rendered=(rendered,)))


def render_schedule(sched: Schedule, max_waits: int, name: str) -> Rendered:
    return render(sched.taskgraph.fused, sched.taskgraph.tilings, sched.buffers, sched.pools,
                  max_waits, sched.target.workers, name, __version__)



# ----------------------------------------------------------------------------- dumps

def _dump_exported(s):
    return {"01_exported_fx.txt": str(s.exported.program.graph_module.graph)}


def _dump_ir(s):
    return {"02_ir.json": _json(s.lowered.graph), "02_ir.txt": printer.graph_text(s.lowered.graph)}


def _dump_fused(s):
    return {"03_fused.json": _json(s.fused.groups), "03_fused.txt": printer.fused_text(s.fused)}


def _dump_tasks(s):
    out = {}
    for p in s.parts:
        out[_per_device("04_tasks.json", p)] = _json({
            "tilings": p.tilings, "tasks": p.tasks, "transfers": p.transfers,
            "deps": [(d.before, d.after, d.kind, d.buffer) for d in p.deps],
            "roles": p.roles})
        out[_per_device("04_tasks.txt", p)] = printer.tasks_text(p)
    return out


def _dump_schedule(s):
    out = {}
    for x in s.scheds:
        out[_per_device("05_schedule.json", x.taskgraph)] = _json(
            {"queues": x.queues, "events": x.events, "waits": x.waits,
             "signal": x.signal, "buffers": x.buffers, "pools": x.pools})
        out[_per_device("05_schedule.txt", x.taskgraph)] = printer.schedule_text(x)
    return out


def _dump_verify(s):
    return {"06_verify.txt": verify_text(s.report)}


def _dump_kernel(s):
    return {_per_device("07_kernel.py", x.taskgraph): r.source
            for x, r in zip(s.scheds, s.rendered)}


def _multi(s: CompileState) -> bool:
    return s.multi


def _has_prefill(s: CompileState) -> bool:
    return s.prefill is not None


STAGES: tuple[Stage, ...] = (
    Stage("export", _export, _dump_exported),
    Stage("lower", _lower, _dump_ir),
    Stage("fuse", _fuse, _dump_fused),
    Stage("tilings", _tilings),
    Stage("tile", _tile),
    Stage("partition", _partition, when=_multi),
    Stage("deps", _deps),
    Stage("roles", _roles, _dump_tasks),
    Stage("schedule", _schedule),
    Stage("sync", _sync),
    Stage("timing", _timing, when=_multi),
    Stage("shard", _shard, when=_multi),
    Stage("memplan", _memplan, _dump_schedule),
    Stage("share", _share, when=_has_prefill),
    Stage("verify", _verify, _dump_verify, check=lambda s: check(s.report)),
    Stage("render", _render, _dump_kernel),
    Stage("weights", _weights, when=lambda s: s.weights_ready is not None),
    Stage("pack", _pack),
    Stage("entries", _entries, when=_has_prefill),
)
# What plan_entry runs of a further entry before the engine's own compile places it.
ENTRY_STAGES = STAGES[:[st.name for st in STAGES].index("memplan") + 1]


# ----------------------------------------------------------------------------- running

@dataclass
class Progress:
    """Stage timings; `on_stage(name, seconds)` is called as each stage finishes."""

    on_stage: Callable[[str, float], None] | None = None
    times: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
        self.times[name] = dt
        if self.on_stage:
            self.on_stage(name, dt)
        return out



def run_stages(stages, state: CompileState, progress: Progress, dumps: "Dumps",
               hooks: tuple[Hook, ...] = ()) -> CompileState:
    """Run `stages` in order, each timed, dumped as it ends, then told to the hooks;
    `finish` every hook at the end and `close` each, also when a stage raised."""
    failed = True
    try:
        for stage in stages:
            if stage.when is not None and not stage.when(state):
                continue
            state = progress.run(stage.name, stage.run, state)
            if dumps.on and stage.dump is not None:   # (building them can take seconds)
                dumps.write(stage.dump(state))
            if stage.check is not None:
                stage.check(state)
            for h in hooks:
                h.after(stage.name, state, progress)
        for h in hooks:
            h.finish(state, progress)
        failed = False
    finally:
        for h in hooks:
            h.close(failed)
    return state


@without_cyclic_gc
def compile_module(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], *,
                   name: str = "model", options: CompileOptions = CompileOptions(),
                   input_info: tuple[InputInfo, ...] = (), seed: int = 0,
                   progress: Progress | None = None, dump_dir: str | None = None,
                   generation: GenerationSpec | None = None,
                   weights_ready: Callable[[], None] | None = None,
                   release_constants: bool = False,
                   output: str | None = None,
                   tokenizer: str | None = None,
                   chat: str | None = None,
                   prefill: CompileState | None = None) -> EngineFile | DeviceEngines:
    """Run STAGES and the hooks the options ask for. `weights_ready`, if given, blocks
    until the module's weights are written: the stages before `pack` read only shapes,
    so a family model's random weights are drawn meanwhile (build.PendingWeights); the
    wait is timed as the stage `weights`. `release_constants`: the module is tilec's own
    and may lose its weights to `pack` (see there); it is unusable afterwards. `output`:
    write the engine file there too (hooks.EngineOutput). `prefill`: the decoder's
    prefill entry as plan_entry left it, compiled into the same engine."""
    state = CompileState(module, tuple(example_inputs), name, options, input_info, seed,
                         generation, tokenizer, chat, weights_ready, release_constants,
                         prefill=prefill)
    hooks: list[Hook] = []
    target = state.target
    if options.aot and not options.plan and target.backend == "cuda" and not state.multi:
        hooks.append(GpuCompile(target.arch, target.workers, name, options.max_waits, prefill))
    if output is not None:
        hooks.append(EngineOutput(output))
    stages = STAGES + tuple(s for h in hooks for s in h.stages)
    state = run_stages(stages, state, progress or Progress(), Dumps(dump_dir), tuple(hooks))
    return state.engine


def plan_entry(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], *,
               name: str, options: CompileOptions, input_info: tuple[InputInfo, ...],
               progress: Progress) -> CompileState:
    """A further entry of an engine (a decoder's prefill) through memplan, for
    compile_module(prefill=...) to place beside its own; its stages are timed as
    `prefill <stage>`. Nothing is dumped for it."""
    state = CompileState(module, tuple(example_inputs), name, options, input_info)
    on_stage = progress.on_stage
    timed = Progress(None if on_stage is None else lambda n, dt: on_stage(f"prefill {n}", dt))
    state = run_stages(ENTRY_STAGES, state, timed, Dumps(None))
    progress.times.update({f"prefill {n}": dt for n, dt in timed.times.items()})
    return state


def _per_device(name: str, taskgraph) -> str:
    """Stage dump names: `04_tasks.json`, or `04_tasks.device1.json` per device."""
    return name if taskgraph.devices == 1 else _device_dump(name, taskgraph.device)


def _device_dump(name: str, device: int) -> str:
    stem, ext = name.split(".", 1)
    return f"{stem}.device{device}.{ext}"


STAGE_DUMPS = ("01_exported_fx.txt", "02_ir.json", "02_ir.txt", "03_fused.json",
               "03_fused.txt", "06_verify.txt", "08_aot.json", "08_kernel.ptx",
               "08_kernel.sass", "08_aot.prefill.json", "08_kernel.prefill.ptx",
               "08_kernel.prefill.sass")
DEVICE_DUMPS = ("04_tasks.json", "04_tasks.txt", "05_schedule.json", "05_schedule.txt",
                "07_kernel.py")   # one per device


def dump_names(devices: int) -> list[str]:
    """Every file `--dump-dir` may write for an engine of `devices` devices."""
    if devices == 1:
        return [*STAGE_DUMPS, *DEVICE_DUMPS]
    return [*STAGE_DUMPS, *(_device_dump(n, d) for n in DEVICE_DUMPS for d in range(devices))]


def verify_text(report) -> str:
    """The verifier's report as the stage dump 06_verify.txt."""
    lines = [f"{'ok  ' if ok else 'FAIL'} {name}" for name, ok in report.checks.items()]
    lines.append("schedule verified: ok" if report.ok else
                 f"schedule verified: {len(report.violations)} violations")
    return "\n".join(lines + list(report.violations)) + "\n"



def _json(obj) -> str:
    return json.dumps(to_plain(obj), indent=1)


class Dumps:
    """Writes each stage's dump when `tilec compile --dump-dir` asks for it."""

    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def on(self) -> bool:
        return self.folder is not None

    def write(self, files: dict[str, str]) -> None:
        for name, text in files.items():
            (self.folder / name).write_text(text)
