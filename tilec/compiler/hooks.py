"""Work beside the pipeline's stages, attached at their boundaries (stage.Hook):

* `GpuCompile`: the kernel compiled for the target's GPU in a child process, started as
  soon as its source can be predicted (after `tilings`, again after `sync` if the wait
  cap was guessed wrong, after `render` with the real source), and a decoder's prefill
  entry's kernel beside it (from the start: plan_entry placed it before this compile
  began); it adds the stages `manifest` (the manifest encoded while the compiles
  run on) and `aot` (the wait for both);
* `EngineOutput`: `tilec.compile(output=)`: the engine file written in two steps
  around `aot` (`save` writes and hashes every tensor while the compile finishes,
  `seal` adds the binary, the header and the checksum), or in one (`save`) at the end.

Each is told `after(stage, state, progress)` as a stage ends, `finish(state, progress)`
when every stage has run and `close(failed)` last, also when a stage raised.
"""
from __future__ import annotations

from tilec.codegen.aot import PendingKernel
from tilec.codegen.render import render
from tilec.codegen.sass import disassemble
from tilec.compiler.stage import Hook, Stage
from tilec.errors import ConfigError
from tilec.ir.abi import AOTKernel
from tilec.passes.memplan import unplaced
from tilec.runtime.enginefile import PendingSave, aot_text, save
from tilec.runtime.sizes import resident_problem
from tilec.version import __version__


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
    them anew: the binary is the same as if the compile had started after `render`."""

    def __init__(self, arch: int | None, workers: int, name: str):
        self.arch, self.workers, self.name = arch, workers, name
        self.pending: PendingKernel | None = None
        self.ptx = ""   # the PTX of the binary `result` returned

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

    def placed(self, sched, max_waits: int) -> None:
        """Start compiling the kernel `render` makes of a schedule memplan has placed:
        a further entry's (the prefill's), which memplan.share_fixed then moves only to
        other aligned offsets in pools of other sizes, neither of which its source
        depends on."""
        if self.arch is None:
            return
        tg = sched.taskgraph
        source = render(tg.fused, tg.tilings, sched.buffers, sched.pools, max_waits,
                        sched.target.workers, self.name, __version__).source
        self.start(source, sched.pools)

    def start(self, source: str, pools) -> None:
        """Compile `source` for this pool list, unless that compile is running already."""
        if self.arch is None or (self.pending is not None and
                                 self.pending.is_for(source, pools, self.arch)):
            return
        self.cancel()
        self.pending = PendingKernel(source, pools, self.arch)

    def result(self) -> AOTKernel | None:
        """The binary of the last source `start`ed (waits for its compile), or None if
        none was; its PTX is then `self.ptx`."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        binary = pending.result()
        self.ptx = pending.ptx
        return binary


class GpuCompile(Hook):
    """The speculative GPU compiles (SpeculativeAOT) at the stage boundaries, one per
    entry of the engine (its decode step; a decoder's prefill), and the stages
    `manifest` and `aot` it adds after `pack`."""

    def __init__(self, arch: int, workers: int, name: str, max_waits: int, prefill=None):
        """`prefill`: the decoder's prefill entry as plan_entry placed it (a
        pipeline.CompileState), whose kernel is then compiled from now on."""
        self.kernel = SpeculativeAOT(arch, workers, name)
        self.prefill = SpeculativeAOT(arch, workers, name)
        if prefill is not None:
            self.prefill.placed(prefill.scheds[0], prefill.max_waits)
        self.max_waits = max_waits   # the wait cap the first compile guesses
        self.stages = (Stage("manifest", encode_manifest),
                       Stage("aot", self.wait, dump=aot_dumps(self.kernels())))

    def kernels(self) -> dict[str, SpeculativeAOT]:
        """The compile of each entry's kernel, by entry name."""
        return {"decode": self.kernel, "prefill": self.prefill}

    def after(self, stage: str, state, progress) -> None:
        if stage == "tilings":
            plan = state.plan
            self.kernel.guess(state.fused, plan.tilings, plan.buffers, self.max_waits)
        elif stage == "sync" and state.max_waits != self.max_waits:
            tg = state.scheds[0].taskgraph
            self.kernel.guess(tg.fused, tg.tilings, tg.buffers, state.max_waits)
        elif stage == "render":
            self.kernel.start(state.rendered[0].source, state.scheds[0].pools)
        elif stage == "entries":   # (the source `placed` foresaw: nothing new starts)
            self.prefill.start(state.prefill.rendered[0].source, state.prefill.scheds[0].pools)

    def wait(self, state):
        """The `aot` stage: the binary of each entry's rendered kernel, stored in that
        entry (EngineFile.aot of the engine, of its prefill entry)."""
        engine, target = state.engines[0], state.target
        for name, kernel in self.kernels().items():
            binary = kernel.result()
            if binary is None:
                continue
            engine.entry(name).aot = binary
            problem = resident_problem(target, target.workers, binary)
            if problem:   # the registers and shared memory are known only now
                which = "" if name == "decode" else f"the {name} entry's kernel: "
                raise ConfigError(f"workers: {which}{problem}; use fewer workers")
        return state

    def close(self, failed: bool) -> None:
        for kernel in self.kernels().values():
            kernel.cancel()   # a compile that failed, or a guess not used


def encode_manifest(state):
    """The `manifest` stage: a save encodes the manifest before anything else, so it is
    done while the GPU compile runs on (EngineFile.manifest_text keeps it)."""
    state.engines[0].manifest_text()
    return state


def aot_dumps(kernels: dict[str, SpeculativeAOT]):
    def dumps(state) -> dict[str, str]:
        """08_aot.json, and the compiled code, to read what the kernel really does; a
        prefill entry's as 08_aot.prefill.json, 08_kernel.prefill.ptx, ..."""
        out = {}
        for name, binary in state.engines[0].binaries().items():
            infix = "" if name == "decode" else f".{name}"
            out[f"08_aot{infix}.json"] = aot_text(binary)
            out[f"08_kernel{infix}.ptx"] = kernels[name].ptx
            listing = disassemble(binary.cubin, hex_bits=False)
            if listing is not None:   # nvdisasm comes with Triton's CUDA backend
                out[f"08_kernel{infix}.sass"] = listing
        return out
    return dumps


class EngineOutput(Hook):
    """`tilec.compile(output=)`: write the engine file. With a GPU compile, `save`
    writes the tensors once the manifest is encoded and `seal` finishes the file once
    the binary is there; otherwise `save` writes it all after the last stage."""

    def __init__(self, path: str):
        self.path = path
        self.pending: PendingSave | None = None
        self.written = False

    def after(self, stage: str, state, progress) -> None:
        if stage == "manifest":
            self.pending = progress.run("save", PendingSave, state.engines[0], self.path)
        elif stage == "aot" and self.pending is not None:
            progress.run("seal", self.pending.finish, state.engines[0].binaries())
            self.pending, self.written = None, True

    def finish(self, state, progress) -> None:
        if not self.written:
            progress.run("save", save, state.engine, self.path)

    def close(self, failed: bool) -> None:
        if self.pending is not None:   # a stage failed between save and seal
            self.pending.cancel()
