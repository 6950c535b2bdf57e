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
schedule (`PrefillSlots`), a chunk of tokens per launch: each step is then at most one
prefill launch (one chunk of one slot's prompt) and one decode launch (every slot that
is decoding). `make_slots` picks the slots object; it is the one seam through which
`generate_batch` and the server get a prefill. The KV cache needs no reset between
sequences: every step masks the positions after its own.
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
    # the launches that fed this sequence: of the prefill schedule (a chunk of its
    # prompt each) and of the decode step (a batch engine's launch feeds other slots too)
    prefill_steps: int = 0
    decode_steps: int = 0
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
        self.chunks = 0                    # of them, prefill launches (a chunk of its prompt)
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
        self.chunks += fed > 1   # (a step feeds a slot more than one token only in a chunk)
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
    busy slot up to `prefill_chunk` prompt tokens, or one new token. Here one token
    per step, through the engine's decode step. A slot with no sequence idles: it is
    fed token 0 at position 0 (or at its `parked` position), which writes only its own
    cache at that position (the slot's sequence overwrites it before reading it) and
    its outputs are dropped. `reset` replaces the executor (fresh state, event counters
    and step count), for after an engine fault.
    """

    count = 1
    prefill_chunk = 1

    def __init__(self, spec: GenerationSpec, executor: Executor,
                 make_executor: Callable[[], Executor] | None = None):
        self.spec = spec
        self.executor = executor
        self._make_executor = make_executor
        self.count = slot_count(spec, executor)
        self.prefill_steps = 0     # launches of the prefill schedule
        self.decode_steps = 0      # launches of the decode step

    @property
    def backend(self) -> str:
        return self.executor.backend

    def choose(self, feeds: dict[int, Feed]) -> dict[int, Feed]:
        """What the next step takes of what each busy slot would feed: here all of it.
        A slot left out (or fed fewer tokens) takes the rest at a later step."""
        return feeds

    def step(self, feeds: dict[int, Feed], parked: dict[int, int] | None = None
             ) -> dict[int, SlotOutput]:
        """One engine step for the given slots (the others idle; an idle slot in
        `parked` at that position, else 0); an output for each fed slot."""
        tokens = torch.zeros(self.count, dtype=torch.int64)
        positions = torch.zeros(self.count, dtype=torch.int64)
        for slot, pos in (parked or {}).items():
            positions[slot] = pos
        for slot, (fed, pos) in feeds.items():
            if not 0 <= slot < self.count:
                raise RunError(f"this engine has {self.count} sequence slot(s); asked to "
                               f"step slot {slot}")
            if len(fed) != 1:
                raise RunError("this engine takes one token per step")
            tokens[slot], positions[slot] = fed[0], pos
        spec = self.spec
        out = self.executor.run({spec.token_input: tokens, spec.pos_input: positions})
        self.decode_steps += 1
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


SLOT_INPUT = "slot"     # a prefill schedule's inputs beyond the decode step's token and pos:
LAST_INPUT = "last"     # the cache slot of its sequence (batch > 1), the row whose logits count


class PrefillSlots(DecodeSlots):
    """Sequence slots whose prompts go into the cache a chunk at a time: a chunk of up
    to `prefill_chunk` tokens (the prefill schedule's token input) in one launch of
    `prefill`, an executor of that schedule running on the decode executor's KV cache
    (`Executor.use_state_of`); then one token per decode step.

    Each step is at most one prefill launch, for one slot still prefilling, then at
    most one decode launch, for every slot that is decoding: a long prompt never holds
    up the running sequences' next tokens by more than one chunk's launch. The slot
    whose prompt came first is prefilled first (oldest first, not round-robin: its
    first token is not pushed back by later prompts', and the prompts get their first
    tokens in the order they came; round-robin over k prompts would delay every one of
    them about k-fold). A prefill engine of a batched decoder (batch > 1) takes the
    chunk's slot (`slot`); at batch 1 it has none.

    A chunk shorter than the prefill's rows is padded at its end with token 0: the
    padded rows write cache positions past the chunk, which later chunks or decode
    steps write (each at its own position) before any step reads them; the engine's
    `last` input names the chunk's last real row, whose logits predict the next token.
    Where the padded rows would run past max_seq_len, or one prompt token is left, the
    prompt goes through the decode launch a token per step instead. A slot still
    prefilling but not in this step's prefill launch idles in the decode launch at its
    next position (`parked`), which its next chunk writes before anything reads it:
    position 0 would overwrite its first prompt token's keys."""

    def __init__(self, spec: GenerationSpec, executor: Executor, prefill: Executor,
                 make_executor: Callable[[], Executor] | None = None,
                 make_prefill: Callable[[Executor], Executor] | None = None):
        super().__init__(spec, executor, make_executor)
        self.prefill = prefill
        self._make_prefill = make_prefill
        inputs = {io.name: io for io in prefill.engine.manifest.inputs}
        token, pos = (inputs.get(name) for name in (spec.token_input, spec.pos_input))
        wanted = {spec.token_input, spec.pos_input, LAST_INPUT} | \
            ({SLOT_INPUT} if self.count > 1 else set())
        if token is None or pos is None or len(token.shape) != 1 or token.shape[0] < 2 \
                or pos.shape != (1,) or not set(inputs) <= wanted \
                or any(inputs[n].shape != (1,) for n in set(inputs) - {spec.token_input}) \
                or (self.count > 1 and not {SLOT_INPUT, LAST_INPUT} <= set(inputs)):
            slot = f", the {SLOT_INPUT} [1] of its sequence" if self.count > 1 else ""
            raise RunError(f"the prefill engine's inputs {sorted(inputs)} are not a chunk of "
                           f"{spec.token_input} [P > 1], the {spec.pos_input} [1] of the "
                           f"first{slot} and the {LAST_INPUT} [1] row whose logits count "
                           f"(this decoder engine has {self.count} slot(s))")
        self.prefill_chunk = token.shape[0]
        self._inputs = set(inputs)
        prefill.use_state_of(executor)
        self._order: dict[int, int] = {}   # slot -> when its sequence was first fed
        self._fed = 0

    def choose(self, feeds: dict[int, Feed]) -> dict[int, Feed]:
        """The oldest slot's prompt chunk (if any slot has one to prefill) and every
        slot's single token; the other prefilling slots wait."""
        for slot in feeds:
            if slot not in self._order:
                self._order[slot] = self._fed
                self._fed += 1
        chosen, chunked = {}, None
        for slot in sorted(feeds, key=self._order.__getitem__):
            fed, pos = feeds[slot]
            if len(fed) == 1:
                chosen[slot] = feeds[slot]
            elif pos + self.prefill_chunk > self.spec.max_seq_len:
                chosen[slot] = (fed[:1], pos)   # the decode launch, a token per step
            elif chunked is None:
                chosen[slot] = chunked = feeds[slot]
        return chosen

    def step(self, feeds: dict[int, Feed], parked: dict[int, int] | None = None
             ) -> dict[int, SlotOutput]:
        chunks = {slot: feed for slot, feed in feeds.items() if len(feed[0]) > 1}
        if len(chunks) > 1:
            raise RunError("a step runs one prefill chunk")
        outs = {slot: self._prefill(slot, *feed) for slot, feed in chunks.items()}
        tokens = {slot: feed for slot, feed in feeds.items() if slot not in chunks}
        if tokens:
            # the chunk's slot idles after its chunk: at the position its first decode
            # step writes (before reading it), never over the chunk's own keys
            idle = {**(parked or {}),
                    **{slot: pos + len(fed) for slot, (fed, pos) in chunks.items()}}
            outs.update(super().step(tokens, idle))
        return outs

    def _prefill(self, slot: int, fed: list[int], pos: int) -> SlotOutput:
        if not 0 <= slot < self.count:
            raise RunError(f"this engine has {self.count} sequence slot(s); asked to "
                           f"prefill slot {slot}")
        spec, rows = self.spec, self.prefill_chunk
        tokens = torch.zeros(rows, dtype=torch.int64)
        tokens[:len(fed)] = torch.tensor(fed, dtype=torch.int64)
        last = len(fed) - 1   # the chunk's last token: its logits predict the next
        inputs = {spec.token_input: tokens, spec.pos_input: torch.tensor([pos])}
        if LAST_INPUT in self._inputs:
            inputs[LAST_INPUT] = torch.tensor([last])
        if SLOT_INPUT in self._inputs:
            inputs[SLOT_INPUT] = torch.tensor([slot])
        out = self.prefill.run(inputs)
        self.prefill_steps += 1
        logits = out[spec.logits_output]
        row = 0 if LAST_INPUT in self._inputs else last   # (without `last`: every row's)
        chosen = out[spec.next_token_output].reshape(-1)[row]
        return SlotOutput(logits.reshape(logits.shape[0], -1)[row].float(), int(chosen))

    def free(self, slot: int) -> None:
        self._order.pop(slot, None)

    def reset(self) -> None:
        """A new decode executor, and a new prefill executor where there is a way to
        make one (a fault may have come from it) on the new one's state (made on it:
        `make_prefill(decode executor)`), else the old one moved onto it."""
        super().reset()
        if self._make_prefill is not None:
            self.prefill = self._make_prefill(self.executor)
        else:
            self.prefill.use_state_of(self.executor)
        self._order.clear()


def make_slots(spec: GenerationSpec, executor: Executor, prefill: Executor | None = None,
               make_executor: Callable[[], Executor] | None = None,
               make_prefill: Callable[[Executor], Executor] | None = None) -> DecodeSlots:
    """The slots that `generate_batch` and the server's scheduler drive: with an
    executor of the decoder's prefill schedule, prompts go in a chunk per launch
    (PrefillSlots), else a token per decode step (DecodeSlots). `make_executor` and
    `make_prefill` make fresh executors for `reset` (after an engine fault): the
    latter of the prefill entry, on the decode executor it is given."""
    if prefill is None:
        return DecodeSlots(spec, executor, make_executor)
    return PrefillSlots(spec, executor, prefill, make_executor, make_prefill)


def advance(slots: DecodeSlots, running: dict[int, Sequence]) -> dict[int, int | None]:
    """One engine step for the sequences in `running` (slot -> sequence, none finished):
    each that the step takes (`slots.choose`) takes what it feeds and, once its prompt
    is in, picks a token. Returns each slot's new token (None while its prompt is
    still being fed, or when this step did not take it)."""
    feeds = slots.choose({slot: seq.feed(slots.prefill_chunk) for slot, seq in running.items()})
    parked = {slot: seq.cached for slot, seq in running.items() if slot not in feeds}
    try:
        outs = slots.step(feeds, parked)
    except NaNValuesError:   # the interpreter's argmax refuses a row of NaN
        if len(running) != 1:
            raise
        (slot, seq), = running.items()
        tokens, pos = feeds[slot]
        raise nan_logits(pos + len(tokens) - 1, seq.steps + 1) from None
    return {slot: seq.took(len(feeds[slot][0]), outs.get(slot)) if slot in feeds else None
            for slot, seq in running.items()}


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
    slots = make_slots(spec, executor, prefill)
    waiting = deque(enumerate(prompts))
    running: dict[int, tuple[int, Sequence, float]] = {}   # slot -> (prompt index, ., start)
    done: dict[int, Generation] = {}
    first: dict[int, float] = {}   # prompt index -> seconds to its first new token
    while waiting or running:
        for slot in range(slots.count):
            if slot not in running and waiting:
                index, prompt = waiting.popleft()
                seq = Sequence(prompt, max_new_tokens, sampling, stop_ids, keep_logits)
                running[slot] = (index, seq, time.perf_counter())
        advance(slots, {slot: seq for slot, (_, seq, _) in running.items()})
        now = time.perf_counter()
        for slot, (index, seq, start) in list(running.items()):
            if seq.tokens and index not in first:
                first[index] = now - start
            if seq.finished:
                done[index] = Generation(list(seq.prompt), seq.tokens,
                                         torch.stack(seq.logits) if seq.logits else None,
                                         seq.steps, now - start, executor.backend,
                                         seq.chunks, seq.steps - seq.chunks, first[index])
                del running[slot]
                slots.free(slot)
    return [done[i] for i in range(len(prompts))]
