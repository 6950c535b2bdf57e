"""The memory a compile of a model.yaml will allocate, estimated before anything is
built, and checked against what this machine has available (limits.available_memory).

The sizes a yaml sets (input shapes, `model.kwargs`, a family's config, `max_seq_len`)
multiply: `inputs: [{shape: [100000, 100000]}]` asked for 40 GB, a family's defaults
for 27 GB. The estimate counts what a compile holds at once:

  inputs     the example inputs (their shapes and dtypes)
  weights    the model's parameters, plus the engine's pools that copy them (a
             module's: the factory's tensors and the pools; a family model is built
             where its pools will be, once; an hf checkpoint is read in float32, then cast)
  state      the model's buffers (a decoder's KV cache), likewise

The model is measured by building it on PyTorch's meta device, where tensors have
shapes but no memory; a family model of N layers from two models of one and two layers
(its layers are alike), so that even `num_hidden_layers: 10**9` costs nothing to
measure. The arenas (intermediate values) are not allocated by a compile: the executor
checks them before it allocates them (runtime/executors.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch

from tilec.errors import ConfigError
from tilec.limits import available_memory, gigabytes

ITEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4}


@dataclass(frozen=True)
class Need:
    key: str        # the yaml key that sets this size
    what: str       # what it is, for the error line
    nbytes: int


def check(path: str, needs: Iterable[Need]) -> None:
    """A ConfigError naming the largest need's key unless all of them fit in the memory
    this process can still allocate."""
    needs = [n for n in needs if n.nbytes > 0]
    total = sum(n.nbytes for n in needs)
    free = available_memory()
    if total <= free:
        return
    top = max(needs, key=lambda n: n.nbytes)
    more = f" (about {gigabytes(total)} in all)" if total > top.nbytes else ""
    raise ConfigError(f"{path}: {top.key}: {gigabytes(top.nbytes)} for {top.what}{more}, "
                      f"more than the {gigabytes(free)} of memory available: make it smaller")


def input_needs(specs) -> list[Need]:
    """The example inputs (config.InputSpec), each under its `inputs[i].shape` key."""
    return [Need(f"inputs[{i}].shape", f"the example input {s.name!r} "
                 f"({list(s.shape)} {s.dtype})", math.prod(s.shape) * ITEM_BYTES[s.dtype])
            for i, s in enumerate(specs)]


def module_needs(build: Callable[[], object], key: str) -> list[Need]:
    """A module's weights and buffers, held twice (the module's and the pools'), from
    `build()` run on the meta device. Nothing when that fails: the real build then
    says what is wrong."""
    try:
        with torch.device("meta"):
            model = build()
    except Exception:   # user code that needs real tensors (or is wrong): not measurable
        return []
    if not isinstance(model, torch.nn.Module):
        return []
    params, buffers = _bytes(model)
    return [Need(key, "the module's weights (and the engine's copy of them)", 2 * params),
            Need(key, "the module's buffers (and the engine's copy of them)", 2 * buffers)]


def decoder_needs(path: str, step: type, config, max_seq_len: int,
                  dtype: torch.dtype | None, weights_key: str, copies: int = 1,
                  batch: int = 1) -> list[Need]:
    """A decode-step family model (`step(config, max_seq_len)`) of any depth, measured
    from models of one and two layers on the meta device. `dtype`: the weights' (None:
    as built). `copies`: how many times the build holds them (an hf checkpoint is
    read in float32, then cast). The KV cache is the key `model.max_seq_len`'s (`batch`
    slots of it)."""
    layers = config.num_hidden_layers
    try:
        one, two = (_bytes(_meta(step, replace(config, num_hidden_layers=n), max_seq_len,
                                 dtype, batch)) for n in (1, 2))
    except (RuntimeError, ValueError, OverflowError, TypeError) as exc:
        raise ConfigError(f"{path}: {weights_key}: a model of this shape cannot be built "
                          f"({str(exc).splitlines()[0][:200]})") from None
    params = one[0] + (layers - 1) * (two[0] - one[0])
    cache = one[1] + (layers - 1) * (two[1] - one[1])
    return [Need(weights_key, f"the model's weights ({layers} layers)", copies * params),
            Need("model.max_seq_len", f"the KV cache ({max_seq_len} positions in each of "
                 f"{layers} layers{f', {batch} slots' if batch > 1 else ''})", copies * cache)]


def _meta(step: type, config, max_seq_len: int, dtype: torch.dtype | None,
          batch: int = 1) -> torch.nn.Module:
    with torch.device("meta"):
        model = step(config, max_seq_len, batch=batch) if batch > 1 else step(config, max_seq_len)
    return model.to(dtype) if dtype is not None else model


def _bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter bytes, buffer bytes), each tensor once (tied weights share one)."""
    seen: set[int] = set()

    def total(tensors) -> int:
        n = 0
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                n += t.numel() * t.element_size()
        return n
    return total(model.parameters()), total(model.buffers())
