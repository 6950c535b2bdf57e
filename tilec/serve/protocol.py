"""The OpenAI API shapes: requests checked into `Params`, responses and stream chunks
built from what the scheduler made, and the error object.

A request field that would change the answer and that tilec cannot honour (n > 1,
logprobs, penalties, tools, ...) is refused with a 400, never ignored. Fields that do
not change it (user, metadata, ...) are accepted and ignored.
"""
from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from tilec.errors import RunError
from tilec.runtime.enginefile import GenerationSpec
from tilec.runtime.generate import Sampling, check_prompt
from tilec.serve.text import Codec, PromptError

COMPLETION_MAX_TOKENS = 16    # OpenAI's default for /v1/completions; chat: up to the cache
MAX_STOP_STRINGS = 16
# Accepted only at the value that changes nothing: (name, allowed values)
NEUTRAL_ONLY = (("n", (1,)), ("best_of", (1,)), ("echo", (False,)),
                ("logprobs", (None, False, 0)), ("top_logprobs", (None, 0)),
                ("presence_penalty", (None, 0)), ("frequency_penalty", (None, 0)),
                ("logit_bias", (None, {})), ("suffix", (None, "")),
                ("tools", (None, [])), ("functions", (None, [])),
                ("tool_choice", (None, "none")), ("function_call", (None, "none")),
                ("response_format", (None, {"type": "text"})))


class APIError(Exception):
    """An answer other than 200, as the OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body: a JSON object (NaN and Infinity are not JSON)."""
    def no_constant(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise bad(f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


@dataclass(frozen=True)
class Params:
    """What a checked request asks the scheduler for."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class Context:
    """What checking a request needs to know about the engine."""

    model: str
    spec: GenerationSpec
    codec: Codec


def parse_completion(body: dict[str, Any], ctx: Context) -> Params:
    _check_common(body, ctx)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]   # a batch of one
    if isinstance(prompt, str):
        ids = _encoded(lambda: ctx.codec.encode(prompt), "prompt")
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("one prompt per request", "prompt")
    else:
        raise bad("prompt: expected a string or a list of token ids", "prompt")
    return _params(body, ctx, ids, COMPLETION_MAX_TOKENS)


def parse_chat(body: dict[str, Any], ctx: Context) -> Params:
    _check_common(body, ctx)
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages):
        raise bad("messages: expected a non-empty list of messages", "messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise bad(f"messages[{i}]: expected an object with a string role", "messages")
        if not isinstance(m.get("content"), (str, list, type(None))):
            raise bad(f"messages[{i}].content: expected a string or a list of parts", "messages")
    ids = _encoded(lambda: ctx.codec.chat_prompt(messages), "messages")
    return _params(body, ctx, ids, None)


def _encoded(encode, param: str) -> list[int]:
    try:
        return encode()
    except PromptError as e:
        raise bad(str(e), param) from None


def _check_common(body: dict[str, Any], ctx: Context) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model: expected the model id (GET /v1/models lists it)", "model")
    if model != ctx.model:
        raise bad(f"the model {model!r} does not exist: this server serves {ctx.model!r}",
                  "model", "model_not_found")
    for name, allowed in NEUTRAL_ONLY:
        if name in body and not any(_same(body[name], a) for a in allowed):
            raise bad(f"{name}: tilec does not support {body[name]!r} (only "
                      f"{' or '.join(json.dumps(a) for a in allowed)})", name)


def _params(body: dict[str, Any], ctx: Context, prompt: list[int],
            default_max: int | None) -> Params:
    spec = ctx.spec
    max_tokens = _optional(body, "max_tokens", _is_int, "an integer >= 1")
    if max_tokens is None:
        max_tokens = _optional(body, "max_completion_tokens", _is_int, "an integer >= 1")
    if max_tokens is None:
        max_tokens = default_max if default_max is not None \
            else max(spec.max_seq_len - len(prompt), 1)
    if max_tokens < 1:
        raise bad(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    try:
        check_prompt(spec, prompt, max_tokens)
    except RunError as e:   # the messages `tilec run` gives for the same prompt
        too_long = all(0 <= t < spec.vocab_size for t in prompt) and \
            len(prompt) + max_tokens > spec.max_seq_len
        param = "max_tokens" if too_long and len(prompt) < spec.max_seq_len else "prompt"
        raise bad(str(e), param, "context_length_exceeded" if too_long else None) from None
    temperature = _optional(body, "temperature", _is_number, "a number", 1.0)
    top_p = _optional(body, "top_p", _is_number, "a number", 1.0)
    top_k = _optional(body, "top_k", _is_int, "an integer", 0)
    top_k = 0 if top_k == -1 else top_k   # -1 means no limit to some clients
    seed = _optional(body, "seed", _is_int, "an integer")
    if seed is None:   # OpenAI: without a seed, sampling is not reproducible
        seed = secrets.randbits(32)
    sampling = Sampling(float(temperature), top_k, float(top_p), seed)
    problem = sampling.problem()
    if problem:
        raise bad(problem, problem.split(":")[0])
    stop = _stop(body.get("stop"))
    try:
        ctx.codec.stream(stop)
    except PromptError as e:
        raise bad(str(e), "stop") from None
    stream = _optional(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and
                                    isinstance(options.get("include_usage", False), bool)):
        raise bad("stream_options: expected {\"include_usage\": true or false}", "stream_options")
    if options is not None and not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return Params(prompt, max_tokens, sampling, stop, stream, include_usage)


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)):
        raise bad("stop: expected a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"stop: at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(stops)


def _optional(body, name: str, ok, expected: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not ok(value):
        raise bad(f"{name}: expected {expected}, got {json.dumps(value)[:80]}", name)
    return value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _same(value, allowed) -> bool:
    return type(value) is type(allowed) and value == allowed if allowed is not None \
        else value is None


# ---- responses ---------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Answer:
    """The response body and stream chunks of one request. Each choice carries
    `token_ids` (an extension field, as vLLM's), the ids its text came from."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model
        self.id = new_id(kind)
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") \
            if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, part: dict[str, Any], token_ids: list[int],
                finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, **part, "logprobs": None, "finish_reason": finish_reason,
                "token_ids": token_ids}

    def whole(self, text: str, token_ids: list[int], finish_reason: str,
              prompt_tokens: int) -> dict[str, Any]:
        part = {"message": {"role": "assistant", "content": text}} if self.kind == "chat" \
            else {"text": text}
        return {**self._head(False), "choices": [self._choice(part, token_ids, finish_reason)],
                "usage": usage(prompt_tokens, len(token_ids))}

    def chunk(self, text: str, token_ids: list[int], finish_reason: str | None = None,
              role: bool = False) -> dict[str, Any]:
        """A stream event; `role`: the first of a chat's (its delta names the role)."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role \
                else ({"content": text} if text or finish_reason is None else {})
            part = {"delta": delta}
        else:
            part = {"text": text}
        return {**self._head(True), "choices": [self._choice(part, token_ids, finish_reason)]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._head(True), "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}
