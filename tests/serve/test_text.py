"""Text for the server: made a token at a time, held back inside a character or before
a possible stop string, cut at a stop string; and the chat template as the engine
stores it."""
from __future__ import annotations

import json

import pytest

import tilec.api
from engines import resign
from servers import CHAT_TEMPLATE, transformers
from tilec.errors import EngineError
from tilec.models.hf import chat_template
from tilec.serve.text import PromptError, TextStream


class Bytes:
    """A byte-level tokenizer: id = one byte (a character may take several)."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


class Chars:
    """id = one character's code point."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def pieces(stream: TextStream, ids) -> list[str]:
    return [stream.push(i) for i in ids] + [stream.flush()]


def test_a_character_cut_between_tokens_comes_out_whole():
    text = "héllo → wörld ✓"
    out = pieces(TextStream(Bytes()), text.encode())
    assert "".join(out) == text and not any("\ufffd" in p for p in out)
    assert out[1] == "" and out[2] == "é"   # é is two bytes: nothing until both are in


def test_output_ending_inside_a_character_flushes_what_was_decoded():
    out = pieces(TextStream(Bytes()), "ab".encode() + "é".encode()[:1])
    assert "".join(out) == "ab\ufffd"


@pytest.mark.parametrize("text, stops, shown, stopped", [
    ("the cat sat", ("cat",), "the ", True),
    ("the cat sat", ("at s", "zz"), "the c", True),        # spans tokens
    ("the cat sat", ("sat", "cat"), "the ", True),         # the earliest stop wins
    ("the cat sat", ("cab",), "the cat sat", False),       # a prefix held, then given out
    ("the cat sat", ("sat!",), "the cat sat", False),      # held to the end, then flushed
])
def test_stop_strings(text, stops, shown, stopped):
    stream = TextStream(Chars(), stops)
    out = pieces(stream, map(ord, text))
    assert "".join(out) == shown and stream.stopped == stopped
    if not stopped:   # text that could begin a stop string is held back, never lost
        assert any(p == "" for p in out[:-1])


def test_without_tokenizer_text_is_the_ids():
    assert "".join(pieces(TextStream(None), [5, 17, 3])) == "5 17 3"
    with pytest.raises(PromptError):
        TextStream(None, ("x",))


def test_engine_stores_the_chat_template(engine_path, checkpoint, tmp_path):
    engine = tilec.api.load(engine_path)
    stored = engine.chat_template()
    assert stored == chat_template(checkpoint) and stored.template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "the cat"}]
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert engine.tokenizer().encode(stored.render(messages), add_special_tokens=False).ids == ids

    bad = resign(engine_path, tmp_path / "bad.engine", meta=lambda m: m.update(chat="{]"))
    with pytest.raises(EngineError, match="chat template"):
        tilec.api.load(bad)
    odd = resign(engine_path, tmp_path / "odd.engine", meta=lambda m: m.update(
        chat=json.dumps({"template": "x", "special_tokens": {"__class__": "y"}})))
    with pytest.raises(EngineError, match="chat template"):
        tilec.api.load(odd)
