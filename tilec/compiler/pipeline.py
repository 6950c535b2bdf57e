"""The one pipeline: model -> ir.Graph -> passes -> kernel -> Engine (DESIGN.md diagram).

    export ▶ lower ▶ fuse ▶ tile ▶ [partition] ▶ deps ▶ roles ▶ schedule ▶ sync ▶ memplan ▶ verify ▶ render ▶ pack ▶ aot

Each stage is a pure function of the previous stage's result; `compile_module` runs
them in order, reports each stage's time, and can dump every stage as text. `aot`
runs for GPU targets only (and not with `CompileOptions(aot=False)`): it compiles the
kernel for the target's GPU, on a machine without one, and the engine stores the cubin.
It needs only the rendered source, which can be predicted after `tile`, so it runs in
a child process from there on (SpeculativeAOT); the stage is the wait for it at the end.
`partition` runs for multi-device targets only: it cuts the task graph into one part
per device, with transfers between them, and every stage after it runs on each part;
the engine is then one Engine per device (`DeviceEngines`).
A family model's random weights are drawn in the background meanwhile; `weights`
(before `pack`) is the wait for them, if any.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from tilec.codegen.aot import PendingKernel
from tilec.gcpause import without_cyclic_gc
from tilec.codegen.render import Rendered, render
from tilec.codegen.sass import disassemble
from tilec.compiler import frontend
from tilec.compiler.config import workers_problem
from tilec.errors import ConfigError
from tilec.ir.graph import contiguous_strides
from tilec.ir.schedule import Schedule
from tilec.ir.serial import to_plain
from tilec.ir.stream import RING_CHUNK_ELEMS
from tilec.ir.target import TARGETS, Role, Target
from tilec.limits import short_repr
from tilec.passes.deps import deps
from tilec.passes.fuse import fuse
from tilec.passes.memplan import memplan, unplaced
from tilec.passes.partition import MAX_DEVICES, device_target, partition, time_devices
from tilec.passes.roles import resolve_device_roles, resolve_roles, roles
from tilec.passes.schedule import schedule
from tilec.passes.sync import sync
from tilec.passes.tile import TileOptions, tile, tile_plan
from tilec.passes.verify import check
from tilec.passes.verify_devices import verify_parts
from tilec.runtime.engine import (AOTKernel, DeviceEngines, Engine, GenerationSpec, IOSpec,
                                  Manifest, PendingSave, TORCH_DTYPES, aot_text,
                                  encode_tables, save)
from tilec.runtime.sizes import resident_problem
from tilec.version import __version__

MAX_WAITS = 8


@dataclass(frozen=True)
class CompileOptions:
    target: Target = TARGETS["cpu"]
    policy: str = "critical_path"
    tiles: TileOptions = TileOptions()
    max_waits: int = MAX_WAITS
    aot: bool = True        # GPU targets: compile the kernel to a cubin and store it


def target_options(name: str, workers: int | None = None, policy: str = "critical_path",
                   tile_m: int | None = None, tile_n: int | None = None,
                   tile_k: int | None = None, roles: tuple[Role, ...] = (),
                   kv_chunk: int | None = None, devices: int = 1) -> CompileOptions:
    """`roles` as model.yaml gives them: checked here, once the worker count is final.
    With `devices` > 1 they own devices (Role.devices), not workers."""
    if not isinstance(name, str) or name not in TARGETS:
        raise ConfigError(f"unknown target {short_repr(name)} (choose from {', '.join(TARGETS)})")
    target = TARGETS[name]
    if workers is not None:
        if workers_problem(workers, name):
            raise ConfigError(f"workers: expected {workers_problem(workers, name)}, found "
                              f"{short_repr(workers)}")
        target = replace(target, workers=workers)
    if not isinstance(devices, int) or not 1 <= devices <= MAX_DEVICES:
        raise ConfigError(f"devices: expected an integer from 1 to {MAX_DEVICES}, found "
                          f"{short_repr(devices)}")
    target = replace(target, devices=devices)
    for r in roles:
        if (devices > 1 and r.workers) or (devices == 1 and r.devices):
            key = "devices" if r.devices else "workers"
            raise ConfigError(f"target.roles.{r.name}.{key}: roles own devices on a "
                              f"multi-device target and workers on one device; this target "
                              f"has {devices} device{'s' if devices > 1 else ''}")
    if roles and devices > 1:
        target = replace(target, device_roles=resolve_device_roles(roles, devices))
    elif roles:
        target = replace(target, roles=resolve_roles(roles, target.workers))
    base = default_tiles(target)
    tiles = replace(base, tile_m=tile_m or base.tile_m, tile_n=tile_n or base.tile_n,
                    tile_k=tile_k or base.tile_k, kv_chunk=kv_chunk or base.kv_chunk,
                    workers=target.workers if target.backend == "cuda" else 1)
    return CompileOptions(target=target, policy=policy, tiles=tiles)


def default_tiles(target: Target) -> TileOptions:
    if target.backend == "cpu":
        # The interpreter pays per task and per numpy call, not per element: few, big tiles.
        # Workers take turns in one process, so more tiles never run faster here; and
        # registers are numpy arrays, so tiles need no size bound.
        return TileOptions(tile_m=32, tile_n=128, tile_k=128, row_chunk=4096,
                           max_tile_elems=1 << 22)
    # GPU: the tile pass picks each matmul's width between these (balance_widths). A
    # matvec tile's K chunk is then as long as a chunk of RING_CHUNK_ELEMS allows (16 KB
    # of bf16, one stage of the weight ring): 64 for 128 columns (128 contiguous bytes
    # of each [N, K] weight row), 1024 for 8 columns (one 16-byte vector of a row).
    return TileOptions(tile_m=16, tile_n=128, tile_k=2048, row_chunk=1024, min_tile_n=8,
                       max_tile_elems=RING_CHUNK_ELEMS)


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


@dataclass(frozen=True)
class InputInfo:
    name: str
    low: int = 0
    high: int | None = None


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
                   chat: str | None = None) -> Engine | DeviceEngines:
    """`weights_ready`, if given, blocks until the module's weights are written: the
    stages before `pack` read only shapes, so a family model's random weights are drawn
    meanwhile (config.PendingWeights); the wait is timed as the stage `weights`.
    `release_constants`: the module is tilec's own and may lose its weights to `pack`
    (see there); it is unusable afterwards. `output`: write the engine file there too;
    when the GPU compile is still running after `manifest`, the tensors are written
    meanwhile (`save`) and the binary, header and checksum after it (`seal`)."""
    progress = progress or Progress()
    dump = _Dumper(dump_dir)
    exported = progress.run("export", frontend.export, module, example_inputs)
    if dump.on:   # (the dumps' arguments alone can take seconds to build)
        dump.text("01_exported_fx.txt", str(exported.program.graph_module.graph))
    lowered = progress.run("lower", frontend.lower, exported,
                           tuple(i.name for i in input_info))
    frontend.check_input_ranges(lowered, input_info)
    dump.json("02_ir.json", lowered.graph)
    fused = progress.run("fuse", fuse, lowered.graph)
    dump.json("03_fused.json", fused.groups)
    multi = options.target.devices > 1
    target = device_target(options.target) if multi else options.target
    with SpeculativeAOT(target.arch if options.aot and target.backend == "cuda" and not multi
                        else None, target.workers, name) as gpu_kernel:
        taskgraph = progress.run("tile", _tile, fused, options, gpu_kernel)
        if multi:
            parts = progress.run("partition", partition, taskgraph, options.target)
        else:
            parts = (taskgraph,)
        del taskgraph
        parts = progress.run("deps", _each(deps), parts)
        parts = progress.run("roles", _each(roles), parts, target)
        for p in parts if dump.on else ():
            dump.json(_per_device("04_tasks.json", p), {
                "tilings": p.tilings, "tasks": p.tasks, "transfers": p.transfers,
                "deps": [(d.before, d.after, d.kind, d.buffer) for d in p.deps],
                "roles": p.roles})
        scheds = progress.run("schedule", _each(schedule), parts, target, options.policy)
        scheds = progress.run("sync", _each(sync), scheds, options.max_waits)
        max_waits = max([len(w) for s in scheds for w in s.waits] + [1])
        if max_waits != options.max_waits:
            tg = scheds[0].taskgraph
            gpu_kernel.guess(tg.fused, tg.tilings, tg.buffers, max_waits)
        if multi:   # the devices' predicted times, with each transfer waiting for its parties
            scheds = progress.run("timing", time_devices, scheds)
        # Nothing after sync reads the deps (verify recomputes conflicts from the regions,
        # and the engine does not store them): free them before the weights are packed
        # (2.3 M objects, a few hundred MB, for Llama-1B).
        scheds = tuple(replace(s, taskgraph=replace(s.taskgraph, deps=())) for s in scheds)
        del parts
        scheds = progress.run("memplan", _each(memplan), scheds)
        for s in scheds:
            dump.json(_per_device("05_schedule.json", s.taskgraph),
                      {"queues": s.queues, "events": s.events, "waits": s.waits,
                       "signal": s.signal, "buffers": s.buffers, "pools": s.pools})
        report = progress.run("verify", verify_parts, scheds)
        dump.text("07_verify.txt", verify_text(report))
        check(report)
        rendered = progress.run("render", _each(render_schedule), scheds, max_waits, name)
        for s, r in zip(scheds, rendered):
            dump.text(_per_device("06_kernel.py", s.taskgraph), r.source)
        gpu_kernel.start(rendered[0].source, scheds[0].pools)
        if weights_ready is not None:
            progress.run("weights", weights_ready)
        engines = progress.run("pack", pack_devices, scheds, rendered, lowered, max_waits,
                               name, input_info, seed, None, release_constants)
        for e in engines:
            if generation is not None:
                e.manifest = replace(e.manifest, generation=generation)
            e.tokenizer, e.chat = tokenizer, chat
        if gpu_kernel.arch is not None:
            # a save encodes the manifest before anything else: do it while the GPU
            # compile runs on, then write the weights meanwhile too
            progress.run("manifest", engines[0].manifest_text)
            pending = progress.run("save", PendingSave, engines[0], output) if output else None
            try:
                engines[0].aot = progress.run("aot", gpu_kernel.result)
                problem = resident_problem(target, target.workers, engines[0].aot)
                if problem:   # the registers and shared memory are known only now
                    raise ConfigError(f"workers: {problem}; use fewer workers")
            except BaseException:
                if pending is not None:
                    pending.cancel()
                raise
            if pending is not None:
                progress.run("seal", pending.finish, engines[0].aot)
                output = None
            dump.text("08_aot.json", aot_text(engines[0].aot))
            if dump.on:   # the compiled code, to read what the kernel really does
                dump.text("08_kernel.ptx", gpu_kernel.ptx)
                listing = disassemble(engines[0].aot.cubin, hex_bits=False)
                if listing is not None:   # nvdisasm comes with Triton's CUDA backend
                    dump.text("08_kernel.sass", listing)
    result = DeviceEngines(tuple(engines)) if multi else engines[0]
    if output is not None:
        progress.run("save", save, result, output)
    return result


class SpeculativeAOT:
    """The `aot` stage: the kernel compiled for the target's GPU (None: no compile), in
    a child process (aot.PendingKernel) started as soon as the kernel's source can be
    predicted, so that its seconds of one core overlap the passes, the verifier and
    pack on the other. The source depends on where buffers are only through which pool
    holds each one and their alignment (memplan.unplaced), and on the record's number of
    waits, known after `sync`: so a first compile starts once `tile` has chosen the
    tilings (tile_plan), guessing the cap (what sync leaves a large model's busiest
    tasks), and another after `sync` if the guess was wrong. `result` uses a compile
    only if it was for exactly the rendered source and pools, and otherwise compiles
    them anew: the binary is the same as if the compile had started after `render`.
    Leaving the `with` block stops any compile still running (a compile that failed,
    or a guess not used)."""

    def __init__(self, arch: int | None, workers: int, name: str):
        self.arch, self.workers, self.name = arch, workers, name
        self.pending: PendingKernel | None = None
        self.ptx = ""   # the PTX of the binary `result` returned

    def __enter__(self) -> SpeculativeAOT:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop the compile running, if any (its result is not wanted)."""
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None

    def guess(self, fused, tilings, buffers, max_waits: int) -> None:
        """Start compiling the kernel `render` will make of these tilings and buffers once
        memplan has placed them, if sync leaves at most `max_waits` waits a task."""
        if self.arch is None:
            return
        buffers, pools = unplaced(buffers)
        source = render(fused, tilings, buffers, pools, max_waits, self.workers, self.name,
                        __version__).source
        self.start(source, pools)

    def start(self, source: str, pools) -> None:
        """Compile `source` for this pool list, unless that compile is running already."""
        if self.arch is None or (self.pending is not None and
                                 self.pending.is_for(source, pools, self.arch)):
            return
        self.cancel()
        self.pending = PendingKernel(source, pools, self.arch)

    def result(self) -> AOTKernel:
        """The binary of the last source `start`ed (waits for its compile); its PTX is
        then `self.ptx`."""
        pending, self.pending = self.pending, None
        binary = pending.result()
        self.ptx = pending.ptx
        return binary


def _tile(fused, options: CompileOptions, gpu_kernel: SpeculativeAOT):
    """The tile pass, with the GPU compile started as soon as the tiles are chosen."""
    plan = tile_plan(fused, options.tiles, options.target)
    gpu_kernel.guess(fused, plan.tilings, plan.buffers, options.max_waits)
    return tile(fused, options.tiles, options.target, plan)


def _each(fn):
    """A pass over one device's part, run over every device's (one part: one device)."""
    def over_parts(parts, *args):
        return tuple(fn(p, *args) for p in parts)
    over_parts.__name__ = fn.__name__
    return over_parts


def _per_device(name: str, taskgraph) -> str:
    """Stage dump names: `04_tasks.json`, or `04_tasks.device1.json` per device."""
    return name if taskgraph.devices == 1 else _device_dump(name, taskgraph.device)


def _device_dump(name: str, device: int) -> str:
    stem, ext = name.split(".", 1)
    return f"{stem}.device{device}.{ext}"


STAGE_DUMPS = ("01_exported_fx.txt", "02_ir.json", "03_fused.json", "07_verify.txt",
               "08_aot.json")
DEVICE_DUMPS = ("04_tasks.json", "05_schedule.json", "06_kernel.py")   # one per device


def dump_names(devices: int) -> list[str]:
    """Every file `--dump-dir` may write for an engine of `devices` devices."""
    if devices == 1:
        return [*STAGE_DUMPS, *DEVICE_DUMPS]
    return [*STAGE_DUMPS, *(_device_dump(n, d) for n in DEVICE_DUMPS for d in range(devices))]


def pack_devices(scheds, rendered, lowered, max_waits, name, input_info, seed, binary,
                 release_constants) -> list[Engine]:
    """One Engine per device, each pool holding the device's own parts of the weights
    and the state (memplan). Constants are released (see pack) only by the last
    device's pack, after every device has copied its parts."""
    return [pack(s, r, lowered, max_waits, name, input_info, seed,
                 binary if i == 0 else None, release_constants and i == len(scheds) - 1)
            for i, (s, r) in enumerate(zip(scheds, rendered))]


def render_schedule(sched: Schedule, max_waits: int, name: str) -> Rendered:
    return render(sched.taskgraph.fused, sched.taskgraph.tilings, sched.buffers, sched.pools,
                  max_waits, sched.target.workers, name, __version__)


def pack(sched: Schedule, rendered: Rendered, lowered: frontend.Lowered, max_waits: int,
         name: str, input_info: tuple[InputInfo, ...], seed: int,
         binary: AOTKernel | None = None, release_constants: bool = False) -> Engine:
    """`release_constants`: the module is tilec's own (built from a model.yaml), so each
    weight's memory is freed once it is copied into its pool: the peak is then one copy
    of the weights, not two. Never for a caller's module."""
    tensors = encode_tables(sched, rendered.opcodes, max_waits)
    tensors["args"] = torch.tensor(rendered.args, dtype=torch.int64).reshape(
        len(rendered.args), rendered.max_args)
    placed = {b.name: b for b in sched.buffers}
    users = Counter(_storage(t) for t in lowered.constants.values()) if release_constants \
        else None
    for pool in sched.pools:
        if pool.kind in ("weight", "state"):
            tensors[f"pool.{pool.name}"] = fill_pool(pool, sched.buffers, lowered.constants,
                                                     users)
    info = {i.name: i for i in input_info}
    inputs = []
    for user_name, value in zip(lowered.input_names, lowered.graph.inputs):
        t = lowered.graph.op(value).type
        extra = info.get(user_name, InputInfo(user_name))
        inputs.append(IOSpec(user_name, value, t.shape, contiguous_strides(t.shape), 0,
                             t.dtype, extra.low, extra.high))
    outputs = []
    ops = lowered.graph.by_name()
    for out_name, operand in lowered.graph.outputs:
        buf = placed[operand.value]
        outputs.append(IOSpec(out_name, buf.name, operand.shape, operand.strides,
                              operand.offset, ops[operand.value].type.dtype))
    # The task table holds queues, signals and waits; conflicts are recomputed from the
    # regions by whoever needs them (verify), so the edges are not stored either.
    stored = replace(sched, queues=(), signal=(), waits=(),
                     taskgraph=replace(sched.taskgraph, deps=()))
    manifest = Manifest(name, stored, tuple(inputs), tuple(outputs), rendered.opcodes,
                        rendered.kinds, max_waits, rendered.max_args, seed)
    return Engine(manifest, rendered.source, tensors, aot=binary, kernel_checked=True)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def fill_pool(pool, buffers, constants: dict[str, torch.Tensor],
              users: Counter | None = None) -> torch.Tensor:
    """One flat pool: each constant at its buffer's offset, zeros elsewhere. Only the
    gaps are zeroed (zeroing a pool of weights, then writing every byte again, cost a
    second pass over gigabytes). With `users` (constants per storage, counted over all
    pools), a constant's storage is freed after the last constant in it is copied; and
    if the constants already lie as the pool wants them, their memory becomes the pool
    (only then: a caller's module must not share memory with the engine)."""
    data = _laid_out(pool, buffers, constants) if users is not None else None
    if data is not None:   # the weights lie where the pool wants them: take them as is
        spans = [(b.offset, b.offset + b.type.numel) for b in buffers
                 if b.pool == pool.name and b.name in constants]
        _zero_gaps(data, spans)
        return data
    data = torch.empty(pool.numel, dtype=TORCH_DTYPES[pool.dtype])
    spans = []
    for b in buffers:
        if b.pool == pool.name and b.name in constants:
            constant = constants[b.name]
            value = constant.to(data.dtype).contiguous().reshape(-1)
            lo, hi = b.stored or (0, value.numel())   # a device's part of a weight
            data[b.offset + lo:b.offset + hi] = value[lo:hi]
            spans.append((b.offset + lo, b.offset + hi))
            if users is not None:
                users[_storage(constant)] -= 1
                if users[_storage(constant)] == 0:
                    del value
                    try:
                        constant.untyped_storage().resize_(0)
                    except RuntimeError:
                        pass   # not ours to free (numpy or mmap memory): it stays
    _zero_gaps(data, spans)
    return data


def _zero_gaps(data: torch.Tensor, spans: list[tuple[int, int]]) -> None:
    end = 0
    for start, stop in sorted(spans) + [(len(data), len(data))]:
        if start > end:
            data[end:start] = 0
        end = max(end, stop)


def _laid_out(pool, buffers, constants: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The pool as a view of the memory its constants already share, if each lies there
    at its buffer's offset, whole and contiguous (a family model's parameters are laid
    out so: models/llama.py, DecoderStep.empty); None otherwise."""
    dtype = TORCH_DTYPES[pool.dtype]
    storage = None
    for b in buffers:
        if b.pool != pool.name or b.name not in constants:
            continue
        c = constants[b.name]
        if b.stored or c.dtype != dtype or not c.is_contiguous() or \
                c.storage_offset() != b.offset:
            return None
        if storage is None:
            storage = c.untyped_storage()
        elif c.untyped_storage().data_ptr() != storage.data_ptr():
            return None
    if storage is None or storage.nbytes() < pool.numel * dtype.itemsize:
        return None
    return torch.empty(0, dtype=dtype).set_(storage)[:pool.numel]


def verify_text(report) -> str:
    """The verifier's report as the stage dump 07_verify.txt."""
    lines = [f"{'ok  ' if ok else 'FAIL'} {name}" for name, ok in report.checks.items()]
    lines.append("schedule verified: ok" if report.ok else
                 f"schedule verified: {len(report.violations)} violations")
    return "\n".join(lines + list(report.violations)) + "\n"


class _Dumper:
    """Writes each stage as text when `tilec compile --dump-dir` asks for it."""

    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def on(self) -> bool:
        return self.folder is not None

    def text(self, name: str, text: str) -> None:
        if self.folder:
            (self.folder / name).write_text(text)

    def json(self, name: str, obj) -> None:
        if self.folder:
            (self.folder / name).write_text(json.dumps(to_plain(obj), indent=1))
