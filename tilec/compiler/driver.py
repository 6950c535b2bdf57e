"""The compile driver: a model.yaml, a parsed ModelConfig or an `nn.Module` -> an engine,
end to end. `tilec.compile` and `tilec compile` only translate their arguments into
`Overrides` and `Outputs` and call `compile_model`.

    compile_model ─┬─ a yaml:   load_config ▶ options (yaml + overrides) ▶ check files
                   │            ▶ build.build_model_async ▶ pipeline.compile_module
                   └─ a module: options (overrides) ▶ check files ▶ pipeline.compile_module

Every mistake found before the pipeline runs (an option, a file that an output would
overwrite, a dump folder that cannot be made) is a ConfigError or EngineError raised
before any work; from the moment a family model's weights start being drawn in the
background, a failure stops the drawing (build.PendingWeights.cancel).
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from tilec.compiler import build, entries
from tilec.compiler import config as cfgmod
from tilec.compiler.options import InputInfo, target_options
from tilec.compiler.pipeline import Progress, compile_module, dump_names, plan_entry
from tilec.errors import ConfigError
from tilec.ir.target import TARGETS
from tilec.limits import check_seed
from tilec.paths import check_outputs
from tilec.runtime import enginefile as engine_file


@dataclass(frozen=True)
class Overrides:
    """`tilec.compile`'s keywords over a yaml's target and schedule sections (None:
    the yaml's, or for a module the target's default); see tilec.api.compile."""

    target: str | None = None
    workers: int | None = None
    dtype: str | None = None
    policy: str | None = None
    tile_m: int | None = None
    tile_n: int | None = None
    tile_k: int | None = None
    kv_chunk: int | None = None
    devices: int | None = None
    name: str | None = None
    seed: int | None = None

    def check(self) -> None:
        """The same rules as model.yaml's, so the API and the yaml fail alike."""
        if self.dtype is not None and self.dtype not in cfgmod.MODEL_DTYPES:
            raise ConfigError(f"dtype: expected {' or '.join(cfgmod.MODEL_DTYPES)}, "
                              f"found {self.dtype!r}")
        if self.policy is not None and self.policy not in cfgmod.POLICIES:
            raise ConfigError(f"policy: expected {' | '.join(cfgmod.POLICIES)}, "
                              f"found {self.policy!r}")
        for key in cfgmod.TILE_SIZE_KEYS:
            value = getattr(self, key)
            expected = cfgmod.tile_size_problem(key, value)
            if expected:
                raise ConfigError(f"{key}: expected {expected}, found {value!r}")
        if self.seed is not None:
            check_seed(self.seed)


@dataclass(frozen=True)
class Outputs:
    """What a compile writes and tells besides the engine it returns."""

    output: str | None = None       # the engine file (hooks.EngineOutput)
    dump_dir: str | None = None     # every stage as text (pipeline.STAGES' dumps)
    on_stage: Callable[[str, float], None] | None = None   # (stage name, seconds)
    aot: bool = True                # GPU targets: compile the kernel for the GPU now
    plan: bool = False              # everything but the weights (CompileOptions.plan)


def compile_model(model_or_yaml, example_inputs: Sequence[torch.Tensor] | None = None,
                  overrides: Overrides = Overrides(), outputs: Outputs = Outputs()
                  ) -> engine_file.EngineFile | engine_file.DeviceEngines:
    """A model.yaml path, a ModelConfig or an `nn.Module` (with `example_inputs`) ->
    the engine (runtime.enginefile.EngineFile, or DeviceEngines for several devices)."""
    overrides.check()
    outputs = replace(outputs, output=_fspath(outputs.output),
                      dump_dir=_fspath(outputs.dump_dir))
    if outputs.output is not None:
        engine_file.check_writable(outputs.output)
    if isinstance(model_or_yaml, (str, os.PathLike)):
        return compile_yaml(cfgmod.load_config(model_or_yaml), overrides, outputs)
    if isinstance(model_or_yaml, cfgmod.ModelConfig):
        return compile_yaml(model_or_yaml, overrides, outputs)
    if isinstance(model_or_yaml, torch.nn.Module):
        if example_inputs is None:
            raise ConfigError("tilec.compile(module) needs example_inputs")
        return compile_nn(model_or_yaml, tuple(example_inputs), overrides, outputs)
    raise ConfigError(f"tilec.compile takes an nn.Module, a model.yaml path or a "
                      f"ModelConfig, not {type(model_or_yaml).__name__}")


def compile_yaml(cfg: cfgmod.ModelConfig, o: Overrides, outputs: Outputs):
    """A parsed model.yaml, with `o` over its settings."""
    target_name = o.target or cfg.target.name
    dtype = o.dtype
    if dtype is None and cfg.dtype is None and not isinstance(cfg.model, cfgmod.ModuleSpec):
        dtype = TARGETS[target_name].dtype if target_name in TARGETS else None
    if dtype is not None:
        cfg = replace(cfg, dtype=dtype)
    if o.seed is not None:
        cfg = replace(cfg, seed=o.seed)
    t, s = cfg.target, cfg.schedule
    with naming_the_yaml(cfg):
        options = target_options(target_name, t.workers if o.workers is None else o.workers,
                                 o.policy or s.policy, o.tile_m or s.tile_m,
                                 o.tile_n or s.tile_n, o.tile_k or s.tile_k,
                                 kv_chunk=o.kv_chunk or s.kv_chunk, roles=t.roles or (),
                                 devices=t.devices if o.devices is None else o.devices,
                                 batch=getattr(cfg.model, "batch", 1))
    check_files(yaml_input_files(cfg), outputs, options.target.devices)
    chunk = None   # (after the outputs are checked: this reads a checkpoint's config.json)
    if not isinstance(cfg.model, cfgmod.ModuleSpec):
        chunk = entries.prefill_chunk(cfg, build.decoder_class(cfg)[0], options.target)
    if outputs.plan:   # on the meta device: nothing drawn, read or allocated
        (module, inputs), weights = build.build_plan(cfg), None
    else:
        # After the options are checked: from here a family model's weights are being
        # drawn in the background until compile_module has them (build.PendingWeights).
        module, inputs, weights = build.build_model_async(cfg)
    generation = tokenizer = chat = None
    specs = cfg.inputs
    if not isinstance(cfg.model, cfgmod.ModuleSpec):
        specs = build.decoder_inputs(module.cfg.vocab_size, module.max_seq_len, module.batch)
        generation, tokenizer, chat = decoder_extras(cfg, module)
    name = o.name or Path(cfg.path).stem
    options = replace(options, aot=outputs.aot, plan=outputs.plan)
    progress = Progress(outputs.on_stage)
    try:
        with naming_the_yaml(cfg):
            prefill = None if chunk is None else plan_prefill(module, chunk, inputs[0], name,
                                                               options, progress)
            return compile_module(
                module, inputs, name=name, options=options,
                input_info=tuple(InputInfo(s.name, s.low, s.high) for s in specs),
                seed=cfg.seed, progress=progress, prefill=prefill,
                dump_dir=outputs.dump_dir, generation=generation,
                weights_ready=weights.wait if weights is not None else None,
                release_constants=True,   # tilec built the module
                output=outputs.output, tokenizer=tokenizer, chat=chat)
    finally:
        if weights is not None:
            weights.cancel()   # a compile that failed leaves no thread drawing


def plan_prefill(decode, chunk: int, token: torch.Tensor, name: str, options, progress):
    """The decoder's prefill entry (compiler/entries.py) through memplan: a chunk of
    `chunk` tokens from a position at which the whole chunk fits the cache."""
    module = entries.prefill_step(decode, chunk)
    info = tuple(InputInfo(*r) for r in entries.prefill_ranges(
        chunk, decode.batch, decode.cfg.vocab_size, decode.max_seq_len))
    return plan_entry(module, entries.prefill_inputs(chunk, decode.batch, token), name=name,
                      options=options, input_info=info, progress=progress)


def compile_nn(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], o: Overrides,
               outputs: Outputs):
    """A caller's module: never changed (a dtype cast works on a copy), never released."""
    if o.dtype is not None:   # nn.Module.to works in place: leave the caller's alone
        module = copy.deepcopy(module).to(cfgmod.FLOAT_DTYPES[o.dtype])
    options = target_options(o.target or "cpu", o.workers, o.policy or "critical_path",
                             o.tile_m, o.tile_n, o.tile_k, kv_chunk=o.kv_chunk,
                             devices=1 if o.devices is None else o.devices)
    check_files([("the model's module file", _source_file(module))], outputs,
                options.target.devices)
    # A plan of a caller's module: its weights exist already; the engine gets no copy.
    return compile_module(module, inputs, name=o.name or type(module).__name__,
                          options=replace(options, aot=outputs.aot, plan=outputs.plan),
                          seed=o.seed or 0,
                          progress=Progress(outputs.on_stage), dump_dir=outputs.dump_dir,
                          output=outputs.output)


@contextlib.contextmanager
def naming_the_yaml(cfg):
    """Roles are checked against the final worker count and the traced model, and the
    inputs' ranges against the traced model, after the yaml is parsed: their errors
    name a yaml key path, so prefix the yaml file too."""
    try:
        yield
    except ConfigError as e:
        if cfg is None or not str(e).startswith(("target.", "inputs:")):
            raise
        raise ConfigError(f"{cfg.path}: {e}") from None


def check_files(inputs, outputs: Outputs, devices: int) -> None:
    """No output (the engine file, a stage dump) overwrites an input or another output."""
    dump_dir = outputs.dump_dir
    dumps = [] if dump_dir is None else [("dump_dir", dump_dir)] + \
        [("a stage dump", Path(dump_dir, n)) for n in dump_names(devices)]
    check_outputs(inputs, [("output", outputs.output), *dumps])
    if dump_dir is not None:
        _check_dump_dir(dump_dir)


def yaml_input_files(cfg) -> list[tuple[str, str]]:
    """The files a model.yaml compile reads: the yaml, and the module file it names or
    the files of the checkpoint folder."""
    files = [("the model.yaml", cfg.path)]
    if isinstance(cfg.model, cfgmod.ModuleSpec):
        files.append(("the model's module file", cfg.model.file))
    elif isinstance(cfg.model, cfgmod.CheckpointSpec):
        with contextlib.suppress(OSError), os.scandir(cfg.model.folder) as entries:
            files += [("the checkpoint file", e.path) for e in entries if e.is_file()]
    return files


def _source_file(module: torch.nn.Module) -> str | None:
    import inspect

    try:
        return inspect.getsourcefile(type(module))
    except TypeError:   # defined in C, or in the interpreter's __main__ of a -c script
        return None


def _check_dump_dir(dump_dir) -> None:
    """The folder for the stage dumps is a folder, or can be made (the nearest folder
    above it that exists is writable): checked before the compile, creating nothing."""
    folder = Path(dump_dir).absolute()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"dump_dir {dump_dir}: a file, not a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not (existing.is_dir() and os.access(existing, os.W_OK)):
        raise ConfigError(f"dump_dir {dump_dir}: {existing} is not a writable folder")


def decoder_extras(cfg, module):
    """A decoder's GenerationSpec, and an hf checkpoint's tokenizer and chat template."""
    eos, tokenizer, chat = (), None, None
    if isinstance(cfg.model, cfgmod.CheckpointSpec):
        from tilec.models.hf import chat_template, eos_token_ids, tokenizer_json

        folder = cfg.model.folder
        eos, tokenizer = eos_token_ids(folder), tokenizer_json(folder)
        template = chat_template(folder) if tokenizer is not None else None
        chat = template.to_json() if template is not None else None
    return engine_file.GenerationSpec(module.cfg.vocab_size, module.max_seq_len, eos), \
        tokenizer, chat


def _fspath(path) -> str | None:
    return os.fspath(path) if path is not None else None
