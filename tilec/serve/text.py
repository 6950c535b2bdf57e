"""Prompts to token ids and token ids to text, for the server.

With the engine's tokenizer (an `hf:` checkpoint's tokenizer.json) a prompt may be text
and the output is decoded text. Without one, a prompt is a list of token ids and the
text of the output is the ids in decimal, separated by spaces; stop strings need a
tokenizer.

Text is made one token at a time (`TextStream`), the way streaming servers detokenize:
decode a short window of recent ids with and without the new one, and emit the
difference once it does not end in an incomplete character. The non-streamed text is
the same pieces joined, so a streamed and a non-streamed answer agree. A stop string
ends the text before it; text that could be the start of one is held back until it is
known not to be.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from tilec.runtime.chat import ChatTemplate

INCOMPLETE = "\ufffd"   # what a decoder gives for a byte sequence cut inside a character


class PromptError(ValueError):
    """A prompt this engine cannot take (the message says why, in one line)."""


class Codec:
    """The engine's tokenizer and chat template, or neither."""

    def __init__(self, tokenizer: Tokenizer | None, chat: ChatTemplate | None):
        self.tokenizer = tokenizer
        self.chat = chat

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise PromptError("this engine has no tokenizer: give the prompt as a list of "
                              "token ids")
        return self.tokenizer.encode(text).ids   # special tokens added, as `tilec run --prompt`

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """The ids of the chat rendered by the checkpoint's template with the
        generation prompt, encoded without added special tokens (as transformers'
        apply_chat_template does: the template writes them)."""
        if self.chat is None or self.tokenizer is None:
            raise PromptError("this engine has no chat template (compile it from an hf: "
                              "checkpoint with a tokenizer.json and a chat template); use "
                              "/v1/completions")
        import jinja2

        try:
            text = self.chat.render(messages)
        except jinja2.TemplateError as e:
            raise PromptError(f"the chat template refused the messages: {e}") from None
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def stream(self, stop: tuple[str, ...] = ()) -> TextStream:
        return TextStream(self.tokenizer, stop)


class TextStream:
    """The text of one sequence's new tokens, a piece per token, cut at a stop string."""

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...] = ()):
        if stop and tokenizer is None:
            raise PromptError("stop strings need an engine with a tokenizer")
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.stopped = False         # a stop string ended the text
        self._start = 0              # the decode window: ids[_start:] ...
        self._read = 0               # ... of which ids[_start:_read] were emitted
        self._held = ""              # decoded, not yet given out: may begin a stop string

    def push(self, token: int) -> str:
        """The text `token` adds (may be empty: held back, or after a stop string)."""
        self.ids.append(token)
        if self.stopped:
            return ""
        if self.tokenizer is None:
            return self._give(f" {token}" if len(self.ids) > 1 else str(token))
        before = self._decode(self.ids[self._start:self._read])
        after = self._decode(self.ids[self._start:])
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""
        self._start, self._read = self._read, len(self.ids)
        return self._give(after[len(before):])

    def flush(self) -> str:
        """At the end: the text still held back (an incomplete character at the end of
        the output, or a possible start of a stop string that did not come)."""
        if self.stopped:
            return ""
        text = ""
        if self.tokenizer is not None and self._read < len(self.ids):
            before = self._decode(self.ids[self._start:self._read])
            text = self._decode(self.ids[self._start:])[len(before):]
            self._start = self._read = len(self.ids)
        out = self._held + text
        self._held = ""
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _give(self, piece: str) -> str:
        text = self._held + piece
        if not self.stop:
            self._held = ""
            return text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[:min(hits)]
        keep = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]
