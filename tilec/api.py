"""The Python API. The CLI is a thin layer over these functions.

    engine = tilec.compile(model, (x,), target="cpu", workers=4)
    engine.save("model.engine")
    engine = tilec.load("model.engine")
    outputs = engine.run(x=x)
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from tilec.errors import ConfigError, RunError
from tilec.ir.target import TARGETS
from tilec.runtime import engine as engine_file
from tilec.runtime.executors import Executor, make_executor


class Engine:
    """A compiled model: the kernel, its schedule and its weights, ready to run."""

    def __init__(self, data: engine_file.Engine):
        self._data = data
        self._executors: dict[tuple, Executor] = {}

    # ---- files -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the engine file atomically (an existing file is replaced only on success)."""
        engine_file.save(self._data, path)

    # ---- running -----------------------------------------------------------------------
    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._data.manifest.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._data.manifest.outputs)

    def random_inputs(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """Fresh random inputs of the declared shapes (ints from their [low, high))."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for s in self._data.manifest.inputs:
            dtype = engine_file.TORCH_DTYPES[s.dtype]
            if dtype.is_floating_point:
                out[s.name] = torch.randn(s.shape, generator=g).to(dtype)
            else:
                high = s.high if s.high is not None else 2
                out[s.name] = torch.randint(s.low, high, s.shape, generator=g, dtype=dtype)
        return out

    def executor(self, backend: str = "auto", policy: str = "round_robin",
                 seed: int = 0) -> Executor:
        key = (backend, policy, seed)
        if key not in self._executors:
            self._executors[key] = make_executor(self._data, backend, policy=policy, seed=seed)
        return self._executors[key]

    def run(self, backend: str = "auto", policy: str = "round_robin", seed: int = 0,
            **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run one step. Inputs by name; outputs by the model's output names."""
        return self.executor(backend, policy, seed).run(inputs)

    @property
    def generation_spec(self):
        return self._data.manifest.generation

    def generate(self, prompt_ids: list[int], max_new_tokens: int, *, backend: str = "auto",
                 temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                 logits: bool = False, stop_at_eos: bool = True,
                 policy: str = "round_robin") -> "Generation":
        """Generate from a decoder engine: the prompt is fed one token per step; greedy
        (on the device) unless `temperature` > 0."""
        from tilec.runtime.generate import generate

        spec = self._data.manifest.generation
        if spec is None:
            raise RunError("this engine is not a decoder: use run(), not generate()")
        return generate(self.executor(backend, policy, seed), spec, list(prompt_ids),
                        max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                        keep_logits=logits, stop_at_eos=stop_at_eos)

    def tokenizer(self):
        """The `tokenizers.Tokenizer` stored with an hf: engine, or None."""
        if self._data.tokenizer is None:
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self._data.tokenizer)

    # ---- looking at it -----------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The data behind `tilec inspect --json`."""
        from tilec.inspect import summary

        return summary(self._data)

    def verify(self):
        """Check every schedule invariant of DESIGN.md on the engine as stored."""
        from tilec.passes.verify import verify

        return verify(self._data.schedule())

    @property
    def data(self) -> engine_file.Engine:
        return self._data


def load(path: str | os.PathLike, trust_engine_code: bool = False) -> Engine:
    """Load and check an engine file (see docs/engine-format.md)."""
    return Engine(engine_file.load(path, trust_engine_code))


def compile(model_or_yaml: Any, example_inputs: tuple[torch.Tensor, ...] | None = None, *,
            target: str | None = None, workers: int | None = None, dtype: str | None = None,
            policy: str | None = None, tile_m: int | None = None, tile_n: int | None = None,
            tile_k: int | None = None, name: str | None = None, seed: int | None = None,
            dump_dir: str | None = None,
            on_stage: Callable[[str, float], None] | None = None) -> Engine:
    """Compile a model into an Engine.

    `model_or_yaml` is an `nn.Module` (with `example_inputs`), a model.yaml path, or a
    parsed config (`tilec.compiler.config.ModelConfig`). Keyword options override the
    yaml's target and schedule sections.
    """
    from tilec.compiler import config as cfgmod
    from tilec.compiler.pipeline import InputInfo, Progress, compile_module, target_options

    if isinstance(model_or_yaml, (str, os.PathLike)):
        cfg = cfgmod.load_config(model_or_yaml)
    elif isinstance(model_or_yaml, cfgmod.ModelConfig):
        cfg = model_or_yaml
    elif isinstance(model_or_yaml, torch.nn.Module):
        cfg = None
    else:
        raise ConfigError(f"tilec.compile takes an nn.Module, a model.yaml path or a "
                          f"ModelConfig, not {type(model_or_yaml).__name__}")
    generation, tokenizer = None, None
    if cfg is not None:
        target_name = target or cfg.target.name
        if dtype is None and cfg.dtype is None and not isinstance(cfg.model, cfgmod.ModuleSpec):
            dtype = TARGETS[target_name].dtype if target_name in TARGETS else None
        if dtype is not None:
            cfg = replace(cfg, dtype=dtype)
        if seed is not None:
            cfg = replace(cfg, seed=seed)
        module, inputs = cfgmod.build_model(cfg)
        specs = cfg.inputs
        if not isinstance(cfg.model, cfgmod.ModuleSpec):
            specs = cfgmod.decoder_inputs(module.cfg.vocab_size, module.max_seq_len)
            generation, tokenizer = _decoder_extras(cfg, module)
        info = tuple(InputInfo(s.name, s.low, s.high) for s in specs)
        t, s = cfg.target, cfg.schedule
        workers = t.workers if workers is None else workers   # 0 is an error, not "unset"
        options = target_options(target or t.name, workers, policy or s.policy,
                                 tile_m or s.tile_m, tile_n or s.tile_n, tile_k or s.tile_k)
        name = name or Path(cfg.path).stem
        seed = cfg.seed
    else:
        module = model_or_yaml
        if example_inputs is None:
            raise ConfigError("tilec.compile(module) needs example_inputs")
        inputs = tuple(example_inputs)
        if dtype is not None:
            module = module.to(cfgmod.FLOAT_DTYPES[dtype])
        info = ()
        options = target_options(target or "cpu", workers, policy or "critical_path",
                                 tile_m, tile_n, tile_k)
        name = name or type(module).__name__
        seed = seed or 0
    data = compile_module(module, inputs, name=name, options=options, input_info=info,
                          seed=seed, progress=Progress(on_stage), dump_dir=dump_dir,
                          generation=generation)
    data.tokenizer = tokenizer
    return Engine(data)


def _decoder_extras(cfg, module):
    from tilec.compiler.config import CheckpointSpec
    from tilec.runtime.engine import GenerationSpec

    eos, tokenizer = (), None
    if isinstance(cfg.model, CheckpointSpec):
        from tilec.models.hf import eos_token_ids, tokenizer_json

        eos, tokenizer = eos_token_ids(cfg.model.folder), tokenizer_json(cfg.model.folder)
    return GenerationSpec(module.cfg.vocab_size, module.max_seq_len, eos), tokenizer


__all__ = ["Engine", "compile", "load"]
