"""Shared by the server tests (conftest.py re-exports the fixtures): a tiny Hugging
Face checkpoint with a word-level tokenizer and a chat template, compiled once; an
in-process server on a free port (uvicorn in a thread, the engine on the reference
backend); `tilec run` in-process."""
from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
openai = pytest.importorskip("openai")

import tilec.api  # noqa: E402
from tilec.cli import main  # noqa: E402
from tilec.serve import listen  # noqa: E402
from tilec.serve.app import Server  # noqa: E402

WORDS = ["<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "big", "red",
         "and", "then", "it", "slept", "hello", "there", "how", "are", "you", "."]
SPECIAL = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Uses what chat templates in the wild use: bos_token, a namespace, trim_blocks and
# lstrip_blocks whitespace control, a filter, raise_exception.
CHAT_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|{{ message['role'] }}|>
{{ message['content'] | trim }}<|end|>
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""
BACKEND = "reference"


def make_checkpoint(folder: Path) -> None:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()   # joins words with spaces
    tok.add_special_tokens(SPECIAL)
    eos = len(WORDS) + 1
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + len(SPECIAL) + 4, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64, tie_word_embeddings=False,
                                   bos_token_id=len(WORDS), eos_token_id=eos)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # larger than HF's init: varied tokens, no near-ties
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=gen))
        model.lm_head.weight[eos] = 0.0   # logit 0, below the largest: generations run their length
    model.save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>",
                                                chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / "ckpt"
    make_checkpoint(folder)
    return folder


@pytest.fixture(scope="session")
def engine_path(checkpoint) -> Path:
    yaml_path = checkpoint.parent / "chat_tiny.yaml"
    # (a token per step: test_prefill_serve compares its chunked prefill with this)
    yaml_path.write_text(json.dumps({"model": {"hf": "ckpt", "max_seq_len": 48, "prefill": False},
                                     "dtype": "float32", "target": {"name": "cpu", "workers": 1}}))
    out = checkpoint.parent / "chat_tiny.engine"
    tilec.api.compile(str(yaml_path)).save(out)
    return out


class Running:
    """An in-process server: `url`, `server` (tilec.serve.app.Server), `client()`."""

    def __init__(self, server: Server):
        self.server = server
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server.start()
        self.http = uvicorn.Server(uvicorn.Config(server.app, lifespan="on", log_level="warning"))
        self.thread = threading.Thread(target=self.http.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.http.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, **kwargs):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                             timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self) -> None:
        self.http.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


@contextlib.contextmanager
def running(engine, **kwargs):
    r = Running(Server(engine, BACKEND, **kwargs))
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def served(engine_path):
    with running(tilec.api.load(engine_path), max_queue=16) as r:
        yield r


def tilec_run(engine_path: Path, *args) -> dict:
    """`tilec run ENGINE --backend reference --json ARGS...` in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", str(engine_path), "--backend", BACKEND, "--json",
                     *[str(a) for a in args]])
    assert code == 0
    return json.loads(out.getvalue())
