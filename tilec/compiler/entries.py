"""A decoder engine's second entry, `prefill`: which chunk it takes (model.yaml's
`model.prefill`, or the target's default) and the module it is compiled from, a
LlamaPrefillStep over the decode step's own tensors.

Default chunks (rows per prefill launch) when model.yaml gives none: GPU targets 128,
a multiple of every tensor-core tile height, so each weight tile a launch streams serves
128 prompt tokens; the `cpu` target 16, small enough that the interpreter's tasks stay
fast in tests and examples. Never more than max_seq_len.

Only the Llama-family decode step (the `llama` family and the hf architectures it
serves) has a prefill step, at batch 1, on one device: an explicit `model.prefill`
elsewhere is a ConfigError naming the key; without it those engines are decode-only.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from tilec.compiler import config as cfgmod
from tilec.errors import ConfigError
from tilec.ir.target import Target
from tilec.models.llama import LlamaDecodeStep, LlamaPrefillStep

GPU_DEFAULT_CHUNK = 128
CPU_DEFAULT_CHUNK = 16


def default_chunk(target: Target) -> int:
    return CPU_DEFAULT_CHUNK if target.backend != "cuda" else GPU_DEFAULT_CHUNK


def prefill_chunk(cfg: cfgmod.ModelConfig, step: type, target: Target) -> int | None:
    """The prefill entry's chunk for a decoder's model.yaml (`step`: its decode step
    class), or None for a decode-only engine; checked before anything is built."""
    spec = cfg.model
    asked = spec.prefill
    if asked == cfgmod.NO_PREFILL:
        return None
    why_not = None
    if step is not LlamaDecodeStep:
        why_not = f"{step.__name__} has no prefill step (its engines are decode-only)"
    elif spec.batch > 1:
        why_not = ("a batch engine (model.batch > 1) is decode-only for now: the prefill "
                   "step fills one sequence's KV cache, not one slot of a batched one")
    elif target.devices > 1:
        why_not = "a multi-device engine (target.devices > 1) is decode-only"
    if why_not is not None:
        if asked is None:
            return None
        raise ConfigError(f"{cfg.path}: model.prefill: {why_not}; remove the key or write "
                          f"`prefill: false`")
    chunk = asked if asked is not None else min(default_chunk(target), spec.max_seq_len)
    return chunk if chunk >= 2 else None


def prefill_step(decode: LlamaDecodeStep, chunk: int) -> LlamaPrefillStep:
    """A LlamaPrefillStep of `chunk` rows over `decode`'s own parameters and buffers (the
    same tensors, nothing copied or drawn: a family model's weights may still be being
    drawn into them), with its own layers (each knows the chunk) and its own row
    offsets. Its buffers have the decode step's names, so the compiled entries share
    them by name (memplan.share_fixed)."""
    if type(decode) is not LlamaDecodeStep or decode.batch != 1:
        raise ConfigError("model.prefill: only a batch-1 Llama-family decode step has one")
    step = copy.copy(decode)
    step.__class__ = LlamaPrefillStep
    step._modules = dict(decode._modules)
    step._buffers = dict(decode._buffers)
    step.layers = nn.ModuleList(copy.copy(layer) for layer in decode.layers)
    for layer in step.layers:
        layer.chunk = chunk
    step.chunk = chunk
    step.register_buffer("chunk_rows", torch.arange(chunk, device=decode.positions.device),
                         persistent=False)
    return step


def prefill_inputs(chunk: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill launch's example inputs: `chunk` tokens and the first one's position."""
    return (torch.zeros(chunk, dtype=torch.int64, device=like.device),
            torch.zeros(1, dtype=torch.int64, device=like.device))
