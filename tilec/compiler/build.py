"""Building what a model.yaml names (compiler/config.ModelConfig): the module with
seeded weights, and example inputs. A `module:` model is imported from its file and
built by its factory; a `family:` model (tilec/models/, FAMILIES) is built empty in its
dtype and its random weights drawn in a background thread (PendingWeights); an `hf:`
checkpoint is read. Mistakes are ConfigErrors naming the yaml and the key."""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import threading
import traceback
from typing import Callable, Iterable

import torch

from tilec.compiler import memory
from tilec.compiler.config import (FLOAT_DTYPES, INT_DTYPES, InputSpec, ModelConfig,
                                   ModuleSpec, FamilySpec, _fail, _is_int, _suggest)
from tilec.compiler.family_config import family_classes
from tilec.errors import ConfigError


def build_model(cfg: ModelConfig) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Import the model file, build the module with seeded weights, make example inputs."""
    model, inputs, pending = build_model_async(cfg)
    if pending is not None:
        pending.wait()
    return model, inputs


class PendingWeights:
    """A family model's seeded random weights, being drawn by a background thread.

    Drawing the 1.2 G values of a 1B model takes 1-2 s of one core. Until it
    packs the engine, the compiler reads only the module's shapes (export traces it with
    fake tensors in place of the parameters), so `tilec.compile` exports and runs the
    passes meanwhile, on the other core, and calls `wait()` before packing."""

    def __init__(self, draw: Callable[[threading.Event], None]):
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(draw,), daemon=True,
                                        name="tilec-weights")
        self._thread.start()

    def _run(self, draw: Callable[[threading.Event], None]) -> None:
        try:
            draw(self._stop)
        except BaseException as exc:   # raised again by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until every weight is written."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stop drawing (the compile failed; the weights stay incomplete); a no-op once
        they are drawn."""
        self._stop.set()
        self._thread.join()


def build_model_async(cfg: ModelConfig) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...],
                                                 PendingWeights | None]:
    """`build_model`, except that a family model's random weights may still be being
    drawn when it returns: they are complete once the `PendingWeights` (None when
    there is nothing to wait for) says so. Until then only the module's shapes,
    dtypes and buffers may be used."""
    spec = cfg.model
    if not isinstance(spec, ModuleSpec):
        return _build_decoder(cfg)
    factory = _factory(cfg)
    memory.check(cfg.path, memory.input_needs(cfg.inputs) + memory.module_needs(
        lambda: factory(**spec.kwargs), "model.kwargs" if spec.kwargs else "model.module"))
    torch.manual_seed(cfg.seed)   # before the factory runs, so the weights are seeded
    model = _call_factory(cfg, factory)
    if cfg.dtype is not None:
        model = model.to(FLOAT_DTYPES[cfg.dtype])
    return model, random_inputs(cfg.inputs, cfg.seed), None


def build_plan(cfg: ModelConfig) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The model a model.yaml names, on PyTorch's meta device: every parameter, buffer
    and example input has its shape and dtype and no memory (`tilec compile --plan`).
    Any model: a family's decode step or an hf checkpoint's (from config.json alone)
    is built by its own constructor, a `module:` by its factory, under the meta device.
    Nothing is drawn, read or allocated, so no memory check is needed."""
    spec = cfg.model
    if isinstance(spec, ModuleSpec):
        factory = _factory(cfg)
        with torch.device("meta"):
            model = _call_factory(cfg, factory)
        specs = cfg.inputs
    else:
        step, config = decoder_class(cfg)
        _check_batch(cfg, step)
        with torch.device("meta"):
            model = (step(config, spec.max_seq_len, batch=spec.batch) if spec.batch != 1
                     else step(config, spec.max_seq_len)).eval()
        specs = decoder_inputs(model.cfg.vocab_size, spec.max_seq_len, spec.batch)
    dtype = cfg.dtype or ("float32" if isinstance(spec, FamilySpec) else None)
    if dtype is not None:
        model = model.to(FLOAT_DTYPES[dtype])
    inputs = tuple(torch.empty(s.shape, dtype={**FLOAT_DTYPES, **INT_DTYPES}[s.dtype],
                               device="meta") for s in specs)
    return model, inputs


def decoder_class(cfg: ModelConfig):
    """(decode step class, its config) of a `family:` or `hf:` model."""
    spec = cfg.model
    if isinstance(spec, FamilySpec):
        config_class, step = family_classes(spec.family)
        return step, config_class.from_dict(spec.config)
    from tilec.models.hf import checkpoint_class

    return checkpoint_class(spec.folder, spec.max_seq_len)


def _check_batch(cfg: ModelConfig, step: type) -> None:
    """Refuse `model.batch` > 1 for a decode step that advances one sequence."""
    spec = cfg.model
    if spec.batch > 1 and not step.batched:
        what = f"the {spec.family} family" if isinstance(spec, FamilySpec) else \
            f"{step.__name__} (model.hf)"
        raise ConfigError(f"{cfg.path}: model.batch: {what} decodes one sequence per step "
                          f"(batch 1), found {spec.batch}")


def _factory(cfg: ModelConfig):
    """A `module:` model's factory, its kwargs checked against its signature."""
    spec = cfg.model
    module = _import_file(spec.file, cfg.path)
    factory = getattr(module, spec.factory, None)
    if not callable(factory):
        names = [n for n in vars(module) if not n.startswith("_")]
        raise ConfigError(f"{cfg.path}: model.module: {os.path.basename(spec.file)} has no "
                          f"callable {spec.factory!r}{_suggest(spec.factory, names)}")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        params = signature.parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            for key in spec.kwargs:
                if key not in params or params[key].kind is inspect.Parameter.POSITIONAL_ONLY:
                    raise ConfigError(f"{cfg.path}: model.kwargs.{key}: {spec.factory}"
                                      f"{signature} takes no argument {key!r}"
                                      f"{_suggest(key, params, 'model.kwargs.')}")
        try:
            signature.bind(**spec.kwargs)
        except TypeError as exc:
            raise ConfigError(f"{cfg.path}: model.kwargs: {spec.factory}{signature} "
                              f"rejects them: {exc}") from None
    _check_kwarg_types(signature, spec, cfg.path)
    return factory


def _call_factory(cfg: ModelConfig, factory) -> torch.nn.Module:
    spec = cfg.model
    try:
        model = factory(**spec.kwargs)
    except Exception as exc:   # a mistake in the kwargs or in the model file: one line
        raise ConfigError(f"{cfg.path}: model.module: {spec.factory}(**model.kwargs) raised "
                          f"{type(exc).__name__}{_where_in(exc, spec.file)}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{cfg.path}: model.module: expected {spec.factory}(**kwargs) to "
                          f"return a torch.nn.Module, found {type(model).__name__}")
    return model.eval()


SIMPLE_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _check_kwarg_types(signature: inspect.Signature | None, spec: ModuleSpec,
                       path: str) -> None:
    """Each kwarg against its parameter's annotation, where that is int, float, bool
    or str: `dim: "8"` for `dim: int` failed deep inside torch, far from the yaml."""
    if signature is None:
        return
    for key, value in spec.kwargs.items():
        param = signature.parameters.get(key)
        if param is None:
            continue
        hint = param.annotation
        kind = SIMPLE_TYPES.get(hint) if isinstance(hint, str) else \
            hint if hint in SIMPLE_TYPES.values() else None
        if kind is None:
            continue
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float:
            ok = _is_int(value) or isinstance(value, float)
        if not ok:
            _fail(path, f"model.kwargs.{key}", f"{kind.__name__} (as {spec.factory} "
                  f"declares {key}: {kind.__name__})", value)


def _where_in(exc: BaseException, file: str) -> str:
    """` at FILE:LINE` of the innermost frame of `exc` in the model's file, or ""."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == file]
    return f" at {os.path.basename(file)}:{frames[-1].lineno}" if frames else ""


def decoder_inputs(vocab_size: int, max_seq_len: int, batch: int = 1) -> tuple[InputSpec, ...]:
    """A decode step's inputs: the token fed this step to each of its `batch` slots, and
    its position in that slot's sequence."""
    return (InputSpec("token", (batch,), "int64", 0, vocab_size),
            InputSpec("pos", (batch,), "int64", 0, max_seq_len))


def _build_decoder(cfg: ModelConfig) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...],
                                              PendingWeights | None]:
    from tilec.models.llama import init_random

    spec = cfg.model
    pending = None
    if isinstance(spec, FamilySpec):
        # Built in its dtype (`cfg.dtype` needs no cast afterwards), weights drawn in the
        # background: see PendingWeights.
        dtype = FLOAT_DTYPES[cfg.dtype or "float32"]
        config_class, step = family_classes(spec.family)
        _check_batch(cfg, step)
        config = config_class.from_dict(spec.config)
        memory.check(cfg.path, memory.decoder_needs(cfg.path, step, config, spec.max_seq_len,
                                                    dtype, "model.config", batch=spec.batch))
        model = step.empty(config, spec.max_seq_len, dtype, batch=spec.batch).eval()
        std = model.cfg.initializer_range
        params = list(model.named_parameters())
        pending = PendingWeights(lambda stop: init_random(params, cfg.seed, std, stop))
    else:
        from tilec.models.hf import load_checkpoint, read_config, step_class

        _check_batch(cfg, step_class(spec.folder))
        # read in float32, then cast: both copies at once
        memory.check(cfg.path, memory.decoder_needs(
            cfg.path, step_class(spec.folder), read_config(spec.folder), spec.max_seq_len, None,
            "model.hf", copies=2 if cfg.dtype is not None else 1, batch=spec.batch))
        model = load_checkpoint(spec.folder, spec.max_seq_len, spec.batch).eval()
        if cfg.dtype is not None:
            model = model.to(FLOAT_DTYPES[cfg.dtype])
    specs = decoder_inputs(model.cfg.vocab_size, spec.max_seq_len, spec.batch)
    return model, random_inputs(specs, cfg.seed), pending


def random_inputs(specs: Iterable[InputSpec], seed: int) -> tuple[torch.Tensor, ...]:
    """Example inputs: floats ~ N(0, 1), ints uniform in [low, high); one generator, seed+1."""
    gen = torch.Generator().manual_seed(seed + 1)   # +1: independent of the weights' stream
    tensors = []
    for s in specs:
        if s.dtype in INT_DTYPES:
            t = torch.randint(s.low, s.high, s.shape, generator=gen, dtype=INT_DTYPES[s.dtype])
        else:   # draw in float32 so a dtype change keeps the same values, rounded
            t = torch.randn(s.shape, generator=gen, dtype=torch.float32).to(FLOAT_DTYPES[s.dtype])
        tensors.append(t)
    return tuple(tensors)


def _import_file(file: str, cfg_path: str):
    digest = hashlib.sha1(file.encode()).hexdigest()[:12]
    name = f"tilec_model_{os.path.splitext(os.path.basename(file))[0]}_{digest}"
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    import_spec = importlib.util.spec_from_file_location(name, file)
    if import_spec is None or import_spec.loader is None:
        raise ConfigError(f"{cfg_path}: model.module: cannot import {file} (expected a .py file)")
    module = importlib.util.module_from_spec(import_spec)
    sys.modules[name] = module      # dataclasses and torch.export look the module up by name
    folder = os.path.dirname(file)
    sys.path.insert(0, folder)      # so the model file can import its neighbours
    try:
        import_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ConfigError(f"{cfg_path}: model.module: importing {file} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(folder)
    return module
