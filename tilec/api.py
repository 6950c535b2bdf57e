"""The Python API. The CLI is a thin layer over these functions.

    import tilec
    engine = tilec.compile(model, (x,), target="cpu", workers=4)
    engine.save("model.engine")
    engine = tilec.load("model.engine")
    outputs = engine.run(x=x)            # {output name: tensor}

Import it as `tilec` (the names are re-exported there); this module is where they live.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from tilec.errors import RunError
from tilec.limits import check_seed
from tilec.runtime import enginefile as engine_file
from tilec.runtime.distributed import rank_from_env
from tilec.runtime.executors import Executor, entry_executor, make_executor
from tilec.runtime.inprocess import parts_executor, random_inputs
from tilec.runtime.generate import Generation

if TYPE_CHECKING:
    from tilec.compiler.config import ModelConfig
    from tilec.passes.verify import VerifyReport
    from tilec.runtime.chat import ChatTemplate
    from tokenizers import Tokenizer


class Engine:
    """A compiled model: the kernel, its schedule and its weights, ready to run.

    Get one from `tilec.compile` or `tilec.load`. An engine is one step of the model:
    `run` executes it once on named inputs; `generate` drives a decoder engine (one
    step per token). Executors are cached per (backend, policy, seed), and their state
    buffers (a KV cache) persist across calls.
    """

    def __init__(self, data: engine_file.EngineFile | engine_file.DeviceEngines):
        self._file = data
        # A multi-device engine runs one device's part per process: this process's
        # (its RANK, under `tilec run` or torchrun), else device 0's, to look at.
        self._parts = data.ranks if isinstance(data, engine_file.DeviceEngines) else (data,)
        found = rank_from_env() if len(self._parts) > 1 else None
        self._data = self._parts[found[0]] if found and 0 <= found[0] < len(self._parts) \
            else self._parts[0]
        self._executors: dict[tuple[str, str, int], Executor] = {}

    def __repr__(self) -> str:
        m = self._data.manifest
        sched = m.schedule
        workers = f"{self.devices} devices x {sched.target.workers - 1} workers (+1 comm)" \
            if self.devices > 1 else f"{sched.target.workers} workers"
        return (f"<tilec.Engine {m.model!r}: target {sched.target.name}, {workers}, "
                f"{len(sched.taskgraph.tasks)} tasks, "
                f"inputs {list(self.input_names)}, outputs {list(self.output_names)}>")

    @property
    def is_plan(self) -> bool:
        """Whether this is a plan (`compile(..., plan=True)`, `tilec compile --plan`): the
        full schedule without weights, to inspect and verify; `run` and `generate`
        refuse it (RunError)."""
        return self._data.is_plan

    @property
    def devices(self) -> int:
        """How many devices (processes) the engine runs on: 1, or a multi-device
        engine's count (`target.devices`), each running its own kernel."""
        return len(self._parts)

    # ---- files -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the engine file (docs/engine-format.md) atomically: an existing file is
        replaced only on success. Missing parent folders are created."""
        engine_file.save(self._file, path)

    # ---- running -----------------------------------------------------------------------
    @property
    def input_names(self) -> tuple[str, ...]:
        """The names `run` takes, in the order the model's forward() takes them."""
        return tuple(s.name for s in self._data.manifest.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The keys of `run`'s result: a returned dict's keys, else output0, output1, ..."""
        return tuple(s.name for s in self._data.manifest.outputs)

    def random_inputs(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """Fresh random inputs of the declared shapes and dtypes: floats ~ N(0, 1),
        integers uniform in their [low, high) (from model.yaml; [0, 2) if unknown)."""
        check_seed(seed)
        return random_inputs(self._data.manifest, seed)

    def executor(self, backend: str = "auto", policy: str = "round_robin",
                 seed: int = 0) -> Executor:
        """The (cached) executor for a backend.

        backend: "auto" (gpu for a CUDA-target engine on a machine with a GPU, else
        interpret), "interpret" (the generated kernel in Triton's interpreter,
        cooperative workers), "reference" (the same schedule, each task in torch) or
        "gpu" (one launch of the persistent kernel per step). policy and seed choose
        the worker interleaving on the CPU backends: round_robin, random (seeded) or
        reverse. `executor(...).run(dict)` takes inputs as a dict, for models whose
        input names clash with `run`'s keywords.
        """
        check_seed(seed)
        self._data.require_weights()
        key = (backend, policy, seed)
        if key not in self._executors:
            self._executors[key] = self.new_executor(backend, policy, seed)
        return self._executors[key]

    def new_executor(self, backend: str = "auto", policy: str = "round_robin", seed: int = 0):
        """A fresh executor (fresh state and step count), not cached: see `executor`."""
        self._data.require_weights()   # a plan: one RunError line, before anything else
        if rank_from_env() is not None:   # this process runs its device's part
            return make_executor(self._data, backend, policy=policy, seed=seed)
        # A multi-device engine outside its ranks: every device in this process, taking
        # turns (`tilec run` starts one process per device instead).
        return parts_executor(self._parts, backend, policy, seed)

    def prefill_executor(self, backend: str = "auto", policy: str = "round_robin",
                         seed: int = 0) -> Executor:
        """The (cached) executor of the engine's prefill entry, over the KV cache and
        weights of `executor(backend, policy, seed)`; a RunError if it has none."""
        key = (backend, policy, seed, "prefill")
        if key not in self._executors:
            self._executors[key] = entry_executor(self.executor(backend, policy, seed),
                                                  "prefill", policy=policy, seed=seed)
        return self._executors[key]

    def run(self, *, backend: str = "auto", policy: str = "round_robin", seed: int = 0,
            **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run one step: inputs by name (`input_names`), outputs by name (`output_names`).

        Every input must be given, with the declared shape and dtype (integers inside
        their [low, high)); anything else is a `RunError`. See `executor` for
        `backend`, `policy` and `seed`. Boolean results come back as float 0/1.
        """
        return self.executor(backend, policy, seed).run(inputs)

    @property
    def generation_spec(self) -> engine_file.GenerationSpec | None:
        """How to drive a decoder engine (vocabulary, max_seq_len, EOS ids), or None
        for an engine that is not a decoder."""
        return self._data.manifest.generation

    def generate(self, prompt_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int,
                 *, backend: str = "auto", temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, logits: bool = False,
                 stop_at_eos: bool = True,
                 policy: str = "round_robin",
                 prefill: bool = True) -> Generation | list[Generation]:
        """Generate from a decoder engine (`model: {family: ...}` or `{hf: ...}`).

        `prompt_ids`: one prompt (a list of ids; returns a `Generation`) or a list of
        prompts (returns a list of them, in order). An engine compiled with
        `model: {batch: B}` runs up to B of them side by side, one per sequence slot;
        each sequence stops on its own and frees its slot for the next prompt, and makes
        exactly the tokens it makes alone. An engine with a prefill entry (a decoder
        compiled with `model.prefill`, on by default) takes a prompt in chunks, one
        launch each, over the decode step's KV cache (a batch engine: into the prompt's
        slot, one chunk per step beside the decode launch of the other slots);
        otherwise (or with `prefill=False`) the prompt is fed one token per step. Then
        each new token is fed back. `Generation.prefill_steps`, `decode_steps` (the
        launches of each entry that fed that sequence) and `ttft_s` (seconds to its
        first new token) say how it went. Greedy (the engine's on-device argmax) unless
        `temperature` > 0, which samples on the host from the logits (optionally from
        the `top_k` most likely, then from the smallest set whose probability reaches
        `top_p`), seeded by `seed`; `tilec serve` samples with the same code
        (runtime.generate.Sampling). `logits=True` keeps the float32
        logits of every generated step in `Generation.logits`. Stops after
        `max_new_tokens` or at an EOS id (`stop_at_eos`). Raises `RunError` for an
        engine that is not a decoder, an empty prompt, an id outside the vocabulary,
        a prompt plus new tokens longer than the engine's max_seq_len, or sampling
        settings out of range.
        """
        from tilec.runtime.generate import Sampling, generate_batch

        self._data.require_weights()
        spec = self._data.manifest.generation
        if spec is None:
            raise RunError("this engine is not a decoder: use run(), not generate()")
        prompts = list(prompt_ids)
        one = not prompts or not all(isinstance(p, Sequence) for p in prompts)
        decode = self.executor(backend, policy, seed)
        chunks = self.prefill_executor(backend, policy, seed) \
            if prefill and "prefill" in self._data.entries else None
        out = generate_batch(decode, spec,
                             [prompts] if one else [list(p) for p in prompts], max_new_tokens,
                             sampling=Sampling(temperature, top_k, top_p, seed),
                             keep_logits=logits, stop_at_eos=stop_at_eos, prefill=chunks)
        return out[0] if one else out

    def tokenizer(self) -> Tokenizer | None:
        """The `tokenizers.Tokenizer` stored with an engine compiled from an `hf:`
        checkpoint that has a tokenizer.json, else None."""
        if self._data.tokenizer is None:
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self._data.tokenizer)

    def chat_template(self) -> ChatTemplate | None:
        """The chat template stored with an engine compiled from an `hf:` checkpoint
        that has one (and a tokenizer.json), else None. `.render(messages)` gives the
        prompt text transformers' `apply_chat_template(messages,
        add_generation_prompt=True, tokenize=False)` gives."""
        if self._data.chat is None:
            return None
        from tilec.runtime.chat import ChatTemplate

        return ChatTemplate.from_json(self._data.chat)

    # ---- looking at it -----------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The data behind `tilec inspect --json`: model, target, workers, tasks, events,
        waits, task kinds, per-worker load, the predicted step time, inputs, outputs."""
        from tilec.inspect import summary

        return summary(self._data)

    def verify(self) -> VerifyReport:
        """Check every schedule invariant of DESIGN.md on the engine as stored.

        Returns a report with `ok`, `checks` ({check name: passed}) and `violations`
        (one line each); it does not raise. `tilec verify --interleavings N` also runs
        random worker interleavings. An engine with a prefill entry: the decode
        step's checks, the prefill's (named `prefill: <check>`), then both together
        (passes/entries.py).
        """
        from tilec.passes.entries import verify_entries
        from tilec.passes.verify_devices import verify_parts

        report = verify_parts(tuple(p.schedule() for p in self._parts))
        if not self._data.entries:
            return report
        return verify_entries(self._data.entry_schedules(), first=report)

    @property
    def data(self) -> engine_file.EngineFile:
        """The engine file's contents (manifest, kernel source, tensors); of a
        multi-device engine, the part of this process's device. Internal: its layout
        follows the engine format version, not the API's stability."""
        return self._data

    def part(self, device: int) -> "Engine":
        """This engine, showing (and running) device `device`'s part."""
        other = Engine(self._file)
        other._data = self._parts[device]
        return other

    @property
    def parts(self) -> tuple[engine_file.EngineFile, ...]:
        """Every device's part (one for a one-device engine). Internal, like `data`."""
        return self._parts


def load(path: str | os.PathLike, trust_engine_code: bool = False, *,
         read_only: bool = False) -> Engine:
    """Load and check an engine file (docs/engine-format.md).

    Any problem (not a tilec engine, another format version, a checksum mismatch, an
    index out of range, a kernel that differs from what this tilec renders) is an
    `EngineError` with a one-line reason. `trust_engine_code=True` runs a stored
    kernel that differs from the rendered one (e.g. written by another tilec version).
    `read_only=True` loads such an engine to read its schedule (what `tilec inspect`
    does): its kernel is then never imported or compiled.
    """
    return Engine(engine_file.load(path, trust_engine_code, read_only=read_only))


def compile(model_or_yaml: torch.nn.Module | str | os.PathLike | ModelConfig,
            example_inputs: Sequence[torch.Tensor] | None = None, *,
            target: str | None = None, workers: int | None = None, dtype: str | None = None,
            policy: str | None = None, tile_m: int | None = None, tile_n: int | None = None,
            tile_k: int | None = None, kv_chunk: int | None = None, devices: int | None = None,
            name: str | None = None,
            seed: int | None = None,
            dump_dir: str | os.PathLike | None = None,
            on_stage: Callable[[str, float], None] | None = None, aot: bool = True,
            output: str | os.PathLike | None = None, plan: bool = False) -> Engine:
    """Compile a model into an Engine.

    model_or_yaml: an `nn.Module` (then `example_inputs` is required: a tuple of
        tensors in forward()'s order, whose shapes and dtypes the engine is built
        for), a model.yaml path (docs/model-yaml.md), or a parsed
        `tilec.compiler.config.ModelConfig`. A module should be in eval mode.
    target: "cpu" | "h100" | "h200" (default: the yaml's, or "cpu").
    workers: persistent workers (default: the yaml's, or the target's: cpu 2, GPU 132).
    dtype: "float32" | "bfloat16": casts the parameters (a module is copied first, the
        caller's stays as it is; example inputs are not cast). Default: the yaml's; for
        a family or hf model, the target's (float32 on cpu, bfloat16 on GPUs).
    policy, tile_m, tile_n, tile_k, kv_chunk: schedule options, as in model.yaml's
        `schedule` (tile sizes are powers of two; unset = the target's choice).
    devices: a multi-device engine of this many devices (default: the yaml's, or 1):
        one kernel per device, each run by its own process (docs/model-yaml.md,
        "Devices").
    name: the engine's model name (default: the yaml's file stem or the class name).
    seed: seeds the weights and example inputs of a yaml model; stored in the engine.
    dump_dir: write every compiler stage as text into this folder.
    on_stage: called as `on_stage(stage_name, seconds)` after each compiler stage.
    aot: GPU targets: also compile the kernel for the target's GPU (no GPU needed) and
        store the binary, so a run launches it without compiling (seconds at compile).
    output: also write the engine file there, as `Engine.save` does; with a GPU
        compile, the weights are written while it finishes (stages `save`, `aot`, `seal`).
    plan: build everything but the weights: a yaml's model is built on PyTorch's meta
        device (an `hf:` folder needs only config.json), the pools are sized but hold
        no data, and no GPU binary is compiled. The engine (`is_plan`) can be inspected,
        verified and saved, and says whether its weights, KV cache and scratch fit each
        device's memory (`summary()["memory"]`); `run` and `generate` refuse it.

    Keyword options override the yaml's target and schedule sections. Mistakes are
    `ConfigError`; an operator tilec cannot lower is `UnsupportedOpError`.
    """
    from tilec.compiler.driver import Outputs, Overrides, compile_model

    overrides = Overrides(target=target, workers=workers, dtype=dtype, policy=policy,
                          tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, kv_chunk=kv_chunk,
                          devices=devices, name=name, seed=seed)
    outputs = Outputs(output=output, dump_dir=dump_dir, on_stage=on_stage, aot=aot,
                      plan=plan)
    return Engine(compile_model(model_or_yaml, example_inputs, overrides, outputs))


__all__ = ["Engine", "Generation", "compile", "load"]
