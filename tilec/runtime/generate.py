"""Generation: sequences advanced through the sequence slots of a decoder engine.

A `Sequence` is one prompt's generation: what to feed the engine next, how to pick a
token from a step's outputs (`Sampling`), and when to stop. `DecodeSlots` is the engine
side: how many sequences it holds at once, how many prompt tokens one step may take,
and the step itself. `advance` runs one step for the sequences in the slots.

`generate` and `generate_batch` (`tilec run`, `Engine.generate`) and the server's
scheduler (`tilec serve`) all drive sequences with `advance`, so the same prompt and
settings give the same tokens through any of them.

An engine compiled with `model: {batch: B}` has B slots: one step advances a sequence
in each busy slot (slot b feeds token[b] at pos[b] and writes only slot b's KV cache).
A prompt is fed one token per step, or, with an executor of the decoder's prefill
schedule (`PrefillSlots`, one sequence), a chunk of tokens per launch. The KV cache
needs no reset between sequences: every step masks the positions after its own.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from tilec.errors import RunError
from tilec.limits import seed_problem
from tilec.runtime.enginefile import GenerationSpec
from tilec.runtime.executors import Executor, NaNValuesError


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]                  # the new tokens
    logits: torch.Tensor | None        # float32 [len(tokens), vocab] when asked for
    steps: int
    seconds: float
    backend: str
    prefill_steps: int = 0     # launches of the prefill schedule (chunks of the prompt)
    decode_steps: int = 0      # launches of the decode step
    ttft_s: float = 0.0        # from admission to the first new token

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Sampling:
    """How a token is picked from a step's outputs. Greedy (the engine's on-device
    argmax) when `temperature` is 0; otherwise drawn on the host from the softmax of
    logits / temperature, restricted to the `top_k` most likely tokens (0: all) and then
    to the smallest set whose probability reaches `top_p` (1: all), with a
    torch.Generator seeded by `seed`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def problem(self) -> str | None:
        """What is wrong with these settings, in one line starting with the setting's
        name, or None."""
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            return f"temperature: expected a number >= 0 (0: greedy), found {self.temperature!r}"
        if not _is_int(self.top_k) or self.top_k < 0:
            return f"top_k: expected an integer >= 0 (0: every token), found {self.top_k!r}"
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            return f"top_p: expected a number in (0, 1] (1: every token), found {self.top_p!r}"
        if seed_problem(self.seed):
            return f"seed: expected {seed_problem(self.seed)}, found {self.seed!r}"
        return None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """A token drawn from float32 logits [vocab] (temperature > 0)."""
    scaled = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(scaled, min(sampling.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if sampling.top_p < 1:
        probs = torch.softmax(scaled, -1)
        ranked, order = torch.sort(probs, descending=True, stable=True)
        # drop a token when the more likely ones already reach top_p (never the first)
        drop_ranked = (torch.cumsum(ranked, 0) - ranked) >= sampling.top_p
        drop = torch.zeros_like(drop_ranked).scatter(0, order, drop_ranked)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator))


@dataclass(frozen=True)
class SlotOutput:
    """What a step gives a sequence whose last fed token was its last so far: the
    logits of the next token (float32 [vocab]) and the engine's greedy choice."""

    logits: torch.Tensor
    next_token: int


class Sequence:
    """One prompt's generation: the tokens to feed, the tokens made, when it stops.

    `finish_reason` is None while it runs, then "length" (max_new_tokens made) or
    "stop" (an id of `stop_ids` made, e.g. an end-of-sequence id; it is kept in
    `tokens`). A caller may also `finish` it (a stop string, a client that left).
    """

    def __init__(self, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: tuple[int, ...] = (), keep_logits: bool = False):
        self.prompt = list(prompt)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.stop_ids = frozenset(stop_ids)
        self.tokens: list[int] = []
        self.logits: list[torch.Tensor] | None = [] if keep_logits else None
        self.cached = 0                    # positions of this sequence in the KV cache
        self.steps = 0                     # engine steps that fed it
        self.finish_reason: str | None = None
        self._generator = torch.Generator().manual_seed(sampling.seed) \
            if sampling.temperature > 0 else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason

    def feed(self, chunk: int) -> tuple[list[int], int]:
        """The tokens the next step takes (up to `chunk` of the prompt still to feed,
        else the last new token) and the position of the first."""
        if self.cached < len(self.prompt):
            return self.prompt[self.cached:self.cached + chunk], self.cached
        return [self.tokens[-1]], self.cached

    def took(self, fed: int, out: SlotOutput | None) -> int | None:
        """Record a step that fed `fed` tokens; the new token if the step made one (the
        prompt is all in the cache), else None. Logits that are NaN or +inf are a
        RunError: no token follows from them (each backend would pick its own)."""
        self.cached += fed
        self.steps += 1
        if out is not None and (out.logits.isnan().any() or out.logits.isposinf().any()):
            raise nan_logits(self.cached - 1, self.steps)
        if self.cached < len(self.prompt):
            return None
        if out is None:
            raise RunError("the engine step gave no output for a sequence that needs one")
        if self._generator is None:
            token = out.next_token
        else:
            token = sample(out.logits, self.sampling, self._generator)
        self.tokens.append(token)
        if self.logits is not None:
            self.logits.append(out.logits)
        if token in self.stop_ids:
            self.finish("stop")
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish("length")
        return token


Feed = tuple[list[int], int]   # the tokens a step feeds one slot, the position of the first


def slot_count(spec: GenerationSpec, executor: Executor) -> int:
    """The sequences one step of the executor's engine advances: the length of its
    token input ([B]; 1 for an engine compiled without `batch`)."""
    inputs = {io.name: io for io in executor.engine.manifest.inputs}
    token, pos = inputs[spec.token_input], inputs[spec.pos_input]
    if len(token.shape) != 1 or token.shape != pos.shape or token.shape[0] < 1:
        raise RunError(f"this decoder engine's inputs {spec.token_input} {list(token.shape)} "
                       f"and {spec.pos_input} {list(pos.shape)} are not one token and "
                       "position per slot")
    return token.shape[0]


class DecodeSlots:
    """The sequence slots of a decoder engine and the step that advances them.

    `count` sequences can be in the engine at once (its `batch`); one step feeds each
    busy slot up to `prefill_chunk` prompt tokens, or one new token. Today one token
    per step, through the engine's decode step. A slot with no sequence idles: it is
    fed token 0 at position 0, which writes only its own cache at position 0 (the next
    sequence in the slot overwrites that before reading it) and its outputs are
    dropped. `reset` replaces the executor (fresh state, event counters and step
    count), for after an engine fault.
    """

    count = 1
    prefill_chunk = 1

    def __init__(self, spec: GenerationSpec, executor: Executor,
                 make_executor: Callable[[], Executor] | None = None):
        self.spec = spec
        self.executor = executor
        self._make_executor = make_executor
        self.count = slot_count(spec, executor)

    @property
    def backend(self) -> str:
        return self.executor.backend

    def step(self, feeds: dict[int, Feed]) -> dict[int, SlotOutput]:
        """One engine step for the given slots (the others idle); an output for each."""
        tokens = torch.zeros(self.count, dtype=torch.int64)
        positions = torch.zeros(self.count, dtype=torch.int64)
        for slot, (fed, pos) in feeds.items():
            if not 0 <= slot < self.count:
                raise RunError(f"this engine has {self.count} sequence slot(s); asked to "
                               f"step slot {slot}")
            if len(fed) != 1:
                raise RunError("this engine takes one token per step")
            tokens[slot], positions[slot] = fed[0], pos
        spec = self.spec
        out = self.executor.run({spec.token_input: tokens, spec.pos_input: positions})
        logits = out[spec.logits_output].reshape(self.count, -1).float()
        chosen = out[spec.next_token_output].reshape(self.count)
        return {slot: SlotOutput(logits[slot], int(chosen[slot])) for slot in feeds}

    def free(self, slot: int) -> None:
        """The slot's sequence is done. Nothing to clear: a later sequence overwrites the
        cache from position 0, and each step masks the positions after its own."""

    def reset(self) -> None:
        if self._make_executor is None:
            raise RunError("these slots cannot be reset: no way to make a new executor")
        self.executor = self._make_executor()


class PrefillSlots(DecodeSlots):
    """One sequence slot whose prompt goes into the cache a chunk at a time: each chunk
    of up to `prefill_chunk` tokens (its prefill schedule's token input) in one launch
    of `prefill`, an executor of that schedule running on the decode executor's KV cache
    (`Executor.use_state_of`), then one token per decode step.

    A chunk shorter than the prefill's rows is padded with token 0: the padded rows
    write cache positions past the chunk, which later chunks or decode steps write
    (each at its own position) before any step reads them. Where the padded rows would
    run past max_seq_len, or the chunk is one token, the chunk goes through the decode
    step a token at a time instead."""

    def __init__(self, spec: GenerationSpec, executor: Executor, prefill: Executor,
                 make_executor: Callable[[], Executor] | None = None):
        super().__init__(spec, executor, make_executor)
        if self.count != 1:
            raise RunError(f"chunked prefill runs one sequence at a time; this decoder "
                           f"engine has {self.count} slots (compile it without batch)")
        self.prefill = prefill
        inputs = {io.name: io for io in prefill.engine.manifest.inputs}
        token, pos = (inputs.get(name) for name in (spec.token_input, spec.pos_input))
        if token is None or pos is None or len(token.shape) != 1 or token.shape[0] < 2 \
                or pos.shape != (1,):
            raise RunError(f"the prefill engine's inputs are not a chunk of "
                           f"{spec.token_input} [P > 1] and the {spec.pos_input} [1] of the first")
        self.prefill_chunk = token.shape[0]
        prefill.use_state_of(executor)
        self.prefill_steps = self.decode_steps = 0

    def step(self, feeds: dict[int, Feed]) -> dict[int, SlotOutput]:
        (slot, (fed, pos)), = feeds.items()
        rows = self.prefill_chunk
        if len(fed) == 1 or pos + rows > self.spec.max_seq_len:
            out = None
            for i, token in enumerate(fed):
                out = super().step({slot: ([token], pos + i)})
                self.decode_steps += 1
            return out
        spec = self.spec
        tokens = torch.zeros(rows, dtype=torch.int64)
        tokens[:len(fed)] = torch.tensor(fed, dtype=torch.int64)
        out = self.prefill.run({spec.token_input: tokens,
                                spec.pos_input: torch.tensor([pos], dtype=torch.int64)})
        self.prefill_steps += 1
        last = len(fed) - 1   # the chunk's last token: its logits predict the next
        logits = out[spec.logits_output].reshape(rows, -1)[last].float()
        return {slot: SlotOutput(logits, int(out[spec.next_token_output].reshape(rows)[last]))}

    def reset(self) -> None:
        super().reset()
        self.prefill.use_state_of(self.executor)


def advance(slots: DecodeSlots, running: dict[int, Sequence]) -> dict[int, int | None]:
    """One engine step for the sequences in `running` (slot -> sequence, none finished):
    each takes what it feeds and, once its prompt is in, picks a token. Returns each
    slot's new token (None while its prompt is still being fed)."""
    feeds = {slot: seq.feed(slots.prefill_chunk) for slot, seq in running.items()}
    try:
        outs = slots.step(feeds)
    except NaNValuesError:   # the interpreter's argmax refuses a row of NaN
        if len(running) != 1:
            raise
        (slot, seq), = running.items()
        tokens, pos = feeds[slot]
        raise nan_logits(pos + len(tokens) - 1, seq.steps + 1) from None
    return {slot: seq.took(len(feeds[slot][0]), outs.get(slot)) for slot, seq in running.items()}


def nan_logits(pos: int, step: int) -> RunError:
    """The one error every backend gives for logits that are not numbers: a greedy
    token taken from them would depend on the backend (each treats NaN its own way)."""
    return RunError(f"step {step} (position {pos}): the logits are NaN or +inf; the "
                    "weights or activations overflow, so no token follows from them")


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


def generate(executor: Executor, spec: GenerationSpec, prompt: list[int], max_new_tokens: int,
             *, sampling: Sampling = Sampling(), keep_logits: bool = False,
             stop_at_eos: bool = True, prefill: Executor | None = None) -> Generation:
    """`prefill`: an executor of the decoder's prefill schedule (chunked prefill,
    PrefillSlots); without it the prompt is fed one token per decode step."""
    return generate_batch(executor, spec, [prompt], max_new_tokens, sampling=sampling,
                          keep_logits=keep_logits, stop_at_eos=stop_at_eos,
                          prefill=prefill)[0]


def generate_batch(executor: Executor, spec: GenerationSpec, prompts: list[list[int]],
                   max_new_tokens: int, *, sampling: Sampling = Sampling(),
                   keep_logits: bool = False, stop_at_eos: bool = True,
                   prefill: Executor | None = None) -> list[Generation]:
    """Each prompt's generation, in order, run side by side in the engine's slots: a
    prompt takes a free slot (in order), and its sequence frees the slot when it stops
    (an EOS id, or `max_new_tokens`), for the next prompt. Each sequence makes the
    tokens it makes alone. A Generation's `seconds` runs from its admission to its
    last token."""
    if not prompts:
        raise RunError("no prompts: give at least one")
    for prompt in prompts:
        check_prompt(spec, prompt, max_new_tokens)
    problem = sampling.problem()
    if problem:
        raise RunError(problem)
    stop_ids = spec.eos_token_ids if stop_at_eos else ()
    slots = DecodeSlots(spec, executor) if prefill is None else \
        PrefillSlots(spec, executor, prefill)
    waiting = deque(enumerate(prompts))
    running: dict[int, tuple[int, Sequence, float]] = {}   # slot -> (prompt index, ., start)
    done: dict[int, Generation] = {}
    first: dict[int, float] = {}   # prompt index -> seconds to its first new token
    counted: dict[int, tuple[int, int]] = {}   # prompt index -> the launches before it
    while waiting or running:
        for slot in range(slots.count):
            if slot not in running and waiting:
                index, prompt = waiting.popleft()
                if prefill is not None:   # (one sequence at a time: PrefillSlots)
                    counted[index] = (slots.prefill_steps, slots.decode_steps)
                seq = Sequence(prompt, max_new_tokens, sampling, stop_ids, keep_logits)
                running[slot] = (index, seq, time.perf_counter())
        advance(slots, {slot: seq for slot, (_, seq, _) in running.items()})
        now = time.perf_counter()
        for slot, (index, seq, start) in list(running.items()):
            if seq.tokens and index not in first:
                first[index] = now - start
            if seq.finished:
                steps = (slots.prefill_steps - counted[index][0],
                         slots.decode_steps - counted[index][1]) if prefill is not None \
                    else (0, seq.steps)
                done[index] = Generation(list(seq.prompt), seq.tokens,
                                         torch.stack(seq.logits) if seq.logits else None,
                                         seq.steps, now - start, executor.backend,
                                         *steps, first[index])
                del running[slot]
                slots.free(slot)
    return [done[i] for i in range(len(prompts))]
