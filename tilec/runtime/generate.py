"""The generation loop: one engine step per token, prompt fed one token at a time.

The device picks the greedy token (the engine's argmax); sampling with a temperature
or top-k reads the logits on the host. The KV cache needs no reset between
generations: every step masks positions after its own.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from tilec.errors import RunError
from tilec.runtime.engine import GenerationSpec
from tilec.runtime.executors import Executor, NaNValuesError


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]                  # the new tokens
    logits: torch.Tensor | None        # float32 [len(tokens), vocab] when asked for
    steps: int
    seconds: float
    backend: str

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def check_sampling(temperature: float, top_k: int) -> None:
    """Sampling options: a temperature >= 0 (0: greedy) and a top_k >= 0 (0: all)."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or \
            not 0 <= temperature < math.inf:
        raise RunError(f"temperature: expected a number >= 0 (0: greedy), found {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise RunError(f"top_k: expected an integer >= 0 (0: every token), found {top_k!r}")


def check_prompt(spec: GenerationSpec, prompt: list[int], max_new_tokens: int) -> None:
    if not prompt:
        raise RunError("the prompt is empty: give at least one token id")
    if max_new_tokens < 1:
        raise RunError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    bad = [t for t in prompt if not 0 <= t < spec.vocab_size]
    if bad:
        raise RunError(f"prompt id {bad[0]} is outside the vocabulary [0, {spec.vocab_size})")
    if len(prompt) + max_new_tokens > spec.max_seq_len:
        raise RunError(f"prompt ({len(prompt)} tokens) + {max_new_tokens} new tokens exceeds "
                       f"max_seq_len {spec.max_seq_len} of this engine")


def nan_logits(pos: int, step: int) -> RunError:
    """The one error every backend gives for logits that are not numbers: a greedy
    token taken from them would depend on the backend (each treats NaN its own way)."""
    return RunError(f"step {step} (position {pos}): the logits are NaN or +inf; the "
                    "weights or activations overflow, so no token follows from them")


def generate(executor: Executor, spec: GenerationSpec, prompt: list[int], max_new_tokens: int,
             *, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             keep_logits: bool = False, stop_at_eos: bool = True) -> Generation:
    check_prompt(spec, prompt, max_new_tokens)
    check_sampling(temperature, top_k)
    gen = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    kept: list[torch.Tensor] = []
    steps = 0
    t0 = time.perf_counter()
    feed, pos = prompt[0], 0
    while True:
        try:
            out = executor.run({spec.token_input: torch.tensor([feed], dtype=torch.int64),
                                spec.pos_input: torch.tensor([pos], dtype=torch.int64)})
        except NaNValuesError:
            raise nan_logits(pos, steps + 1) from None
        steps += 1
        logits = out[spec.logits_output].reshape(-1).float()
        if logits.isnan().any() or logits.isposinf().any():
            raise nan_logits(pos, steps)
        pos += 1
        if pos < len(prompt):
            feed = prompt[pos]
            continue
        if temperature > 0:
            scaled = logits / temperature
            if top_k > 0:
                kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            feed = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=gen))
        else:
            feed = int(out[spec.next_token_output].reshape(-1)[0])
        tokens.append(feed)
        if keep_logits:
            kept.append(logits)
        if len(tokens) >= max_new_tokens or (stop_at_eos and feed in spec.eos_token_ids):
            break
    seconds = time.perf_counter() - t0
    return Generation(list(prompt), tokens, torch.stack(kept) if kept else None, steps,
                      seconds, executor.backend)
