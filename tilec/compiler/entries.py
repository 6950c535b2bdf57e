"""A decoder engine's second entry, `prefill`: which chunk it takes (model.yaml's
`model.prefill`, or the target's default) and the module it is compiled from, a
LlamaPrefillStep over the decode step's own tensors.

Default chunks (rows per prefill launch) when model.yaml gives none: GPU targets 128,
a multiple of every tensor-core tile height, so each weight tile a launch streams serves
128 prompt tokens; the `cpu` target 16, small enough that the interpreter's tasks stay
fast in tests and examples. Never more than max_seq_len.

Only the Llama-family decode step (the `llama` family and the hf architectures it
serves) has a prefill step, on one device: an explicit `model.prefill` elsewhere is a
ConfigError naming the key; without it those engines are decode-only. A batch engine
(`model.batch` B > 1) has one too: it writes its chunk into one run-time `slot` of the
batched KV cache (LlamaPrefillStep).

A prefill launch's inputs: `token` [P], `pos` [1] (the first row's position), `last`
[1] (the chunk's last real row: only its logits are computed) and, at B > 1, `slot` [1].
"""
from __future__ import annotations

import torch

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
    """A LlamaPrefillStep of `chunk` rows over `decode`'s own parameters and buffers
    (LlamaPrefillStep.over: the same tensors, nothing copied), of the same batch. Its
    buffers have the decode step's names, so the compiled entries share them by name
    (memplan.share_fixed)."""
    if type(decode) is not LlamaDecodeStep:
        raise ConfigError("model.prefill: only a Llama-family decode step has one")
    return LlamaPrefillStep.over(decode, chunk)


def prefill_inputs(chunk: int, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A prefill launch's example inputs (token, pos, last, slot): `chunk` tokens,
    the first one's position, the row whose logits count, and at batch > 1 the slot."""
    def one():
        return torch.zeros(1, dtype=torch.int64, device=like.device)
    rows = (torch.zeros(chunk, dtype=torch.int64, device=like.device), one(), one())
    return rows + ((one(),) if batch > 1 else ())


def prefill_ranges(chunk: int, batch: int, vocab_size: int, max_seq_len: int
                   ) -> tuple[tuple[str, int, int], ...]:
    """Each prefill input's values, [low, high): a position at which the whole chunk fits
    the cache, a row of the chunk, a slot of the batch (an executor refuses any other
    in one RunError before the launch)."""
    ranges = (("token", 0, vocab_size), ("pos", 0, max_seq_len - chunk + 1),
              ("last", 0, chunk))
    return ranges + ((("slot", 0, batch),) if batch > 1 else ())
