"""tilec serve through the official openai client: completions and chat completions,
streamed and whole, give exactly the tokens `tilec run` gives for the same prompt and
settings; concurrent clients queue behind the engine's sequence slots and each gets its
own tokens; /v1/models, /health and /metrics."""
from __future__ import annotations

import re
import threading

import pytest

from servers import tilec_run, transformers

MODEL = "chat_tiny"
SETTINGS = {   # temperature, top_k, top_p, seed
    "greedy": (0.0, 0, 1.0, 0),
    "sampled": (0.9, 8, 0.9, 5),
    "hot": (1.5, 0, 1.0, 11),
}


def expected(engine_path, prompt_ids, max_tokens, settings):
    t, k, p, s = settings
    return tilec_run(engine_path, "--prompt-ids", ",".join(map(str, prompt_ids)),
                     "--max-new-tokens", max_tokens, "--temperature", t, "--top-k", k,
                     "--top-p", p, "--seed", s)


def sampling_args(settings) -> dict:
    t, k, p, s = settings
    return {"temperature": t, "top_p": p, "seed": s, "extra_body": {"top_k": k}}


def streamed(stream) -> tuple[list[int], str, str, list]:
    """(token ids, text, finish reason, chunks) of a streamed completion or chat; a
    usage chunk (no choices) is the last chunk."""
    everything = list(stream)
    chunks = [c for c in everything if c.choices]
    assert all(c.choices for c in everything[:-1])
    ids, text = [], ""
    for c in chunks:
        choice = c.choices[0]
        ids += choice.token_ids
        text += choice.text if c.object == "text_completion" else (choice.delta.content or "")
    return ids, text, chunks[-1].choices[0].finish_reason, everything


def check_one_event_per_token(chunks, n_tokens):
    assert len(chunks) == n_tokens + 1
    assert all(len(c.choices[0].token_ids) == 1 and c.choices[0].finish_reason is None
               for c in chunks[:-1])
    assert chunks[-1].choices[0].token_ids == [] and chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_completion_gives_tilec_run_tokens(served, engine_path, name):
    prompt, n = [1, 2, 3], 6
    ref = expected(engine_path, prompt, n, SETTINGS[name])
    client = served.client()
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n,
                                      **sampling_args(SETTINGS[name]))
    choice = whole.choices[0]
    assert choice.token_ids == ref["new_tokens"]
    assert choice.text == ref["text"]
    assert choice.finish_reason == ("length" if len(ref["new_tokens"]) == n else "stop")
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) \
        == (3, len(ref["new_tokens"]), 3 + len(ref["new_tokens"]))
    assert whole.model == MODEL and whole.object == "text_completion"

    ids, text, finish, chunks = streamed(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=n, stream=True,
        stream_options={"include_usage": True}, **sampling_args(SETTINGS[name])))
    usage = chunks.pop().usage   # the usage chunk comes last, with no choices
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, len(ref["new_tokens"]))
    assert ids == ref["new_tokens"] and text == ref["text"] and finish == choice.finish_reason
    check_one_event_per_token(chunks, len(ids))


def test_text_prompt_is_encoded_as_tilec_run_encodes_it(served, engine_path):
    ref = tilec_run(engine_path, "--prompt", "the big red dog ran", "--max-new-tokens", 5)
    out = served.client().completions.create(model=MODEL, prompt="the big red dog ran",
                                             max_tokens=5, temperature=0)
    assert out.usage.prompt_tokens == len(ref["prompt"])
    assert out.choices[0].token_ids == ref["new_tokens"] and out.choices[0].text == ref["text"]


def chat_ids(checkpoint, messages) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    return list(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


@pytest.mark.parametrize("name", ["greedy", "sampled"])
def test_chat_gives_tilec_run_tokens_of_the_transformers_prompt(served, engine_path, checkpoint,
                                                                name):
    messages = [{"role": "system", "content": "hello there"},
                {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "the cat sat"},
                {"role": "user", "content": "and then"}]
    prompt = chat_ids(checkpoint, messages)
    ref = expected(engine_path, prompt, 5, SETTINGS[name])
    client = served.client()
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5,
                                           **sampling_args(SETTINGS[name]))
    choice = whole.choices[0]
    assert whole.usage.prompt_tokens == len(prompt)
    assert choice.token_ids == ref["new_tokens"]
    assert choice.message.role == "assistant" and choice.message.content == ref["text"]
    assert whole.object == "chat.completion"

    ids, text, finish, chunks = streamed(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, stream=True,
        **sampling_args(SETTINGS[name])))
    assert ids == ref["new_tokens"] and text == ref["text"] and finish == choice.finish_reason
    check_one_event_per_token(chunks, len(ids))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_chat_without_max_tokens_runs_to_the_cache(served, engine_path, checkpoint):
    messages = [{"role": "user", "content": "hello"}]
    prompt = chat_ids(checkpoint, messages)
    out = served.client().chat.completions.create(model=MODEL, messages=messages,
                                                  temperature=0)
    ref = expected(engine_path, prompt, 48 - len(prompt), SETTINGS["greedy"])
    assert out.choices[0].token_ids == ref["new_tokens"]


def test_stop_string_ends_the_text_before_it(served, engine_path):
    prompt, n = [4, 5, 6], 10
    ref = expected(engine_path, prompt, n, SETTINGS["greedy"])
    words = ref["text"].split()
    stop = next(w for w in words[1:] if w != words[0])   # not at the start: text before it
    cut = ref["text"].index(stop)
    client = served.client()
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n,
                                      temperature=0, stop=[" zzz", stop])
    choice = whole.choices[0]
    assert choice.text == ref["text"][:cut] and choice.finish_reason == "stop"
    made = len(choice.token_ids)
    assert choice.token_ids == ref["new_tokens"][:made] and made < len(ref["new_tokens"])
    ids, text, finish, _ = streamed(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stop=[" zzz", stop],
        stream=True))
    assert (ids, text, finish) == (choice.token_ids, choice.text, "stop")


def test_eight_concurrent_streams_each_get_their_own_tokens(served, engine_path):
    clients = 8
    jobs = [([1 + i, 7, 2 + i % 3], 4, SETTINGS[("greedy", "sampled", "hot")[i % 3]][:3] + (i,))
            for i in range(clients)]
    refs = [expected(engine_path, *job)["new_tokens"] for job in jobs]
    before = served.server.metrics.ttft.count
    assert concurrent_streams(served, jobs) == refs
    assert served.server.metrics.ttft.count == before + clients


def concurrent_streams(served, jobs) -> list:
    """Each job's (prompt, max tokens, settings) streamed by its own client, all
    started at once: the token ids each got."""
    start = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)

    def one(i):
        prompt, n, settings = jobs[i]
        client = served.client()
        start.wait()
        results[i] = streamed(client.completions.create(model=MODEL, prompt=prompt,
                                                        max_tokens=n, stream=True,
                                                        **sampling_args(settings)))[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def test_models_and_health(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    import urllib.request

    with urllib.request.urlopen(f"{served.url}/health") as r:
        assert r.status == 200


# ---- /metrics against the Prometheus text format --------------------------------------
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*"'
VALUE = r"(?:[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|[+-]?Inf|NaN)"
SAMPLE = re.compile(rf"^({NAME})(?:\{{((?:{LABEL})(?:,{LABEL})*,?)?\}})? ({VALUE})(?: -?\d+)?$")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def parse_prometheus(text: str) -> dict[str, dict]:
    """The text exposition format (0.0.4): family -> {type, samples: [(name, labels,
    value)]}; raises AssertionError on any line outside the grammar."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                assert re.fullmatch(NAME, parts[2]), line
                fam = families.setdefault(parts[2], {"type": None, "samples": []})
                if parts[1] == "TYPE":
                    assert len(parts) == 4 and parts[3] in TYPES and fam["type"] is None \
                        and not fam["samples"], line
                    fam["type"] = parts[3]
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        family = next((f for f in families if name == f or (
            families[f]["type"] in ("histogram", "summary") and
            name in (f + "_bucket", f + "_sum", f + "_count"))), None)
        assert family is not None and families[family]["type"], f"sample before its TYPE: {line}"
        parsed = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels))
        families[family]["samples"].append((name, parsed, float(value)))
    return families


def test_metrics_are_prometheus_text(served):
    import urllib.request

    served.client().completions.create(model=MODEL, prompt=[3, 3], max_tokens=2, temperature=0)
    with urllib.request.urlopen(f"{served.url}/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        families = parse_prometheus(r.read().decode())
    for name, kind in [("tilec_requests_total", "counter"), ("tilec_queue_depth", "gauge"),
                       ("tilec_time_to_first_token_seconds", "histogram"),
                       ("tilec_tokens_per_second", "gauge"),
                       ("tilec_step_seconds", "histogram"),
                       ("tilec_generated_tokens_total", "counter")]:
        assert families[name]["type"] == kind, name
    finished = [v for n, labels, v in families["tilec_requests_total"]["samples"]
                if labels == {"endpoint": "completions", "outcome": "finished"}]
    assert finished and finished[0] >= 1
    for hist in ("tilec_time_to_first_token_seconds", "tilec_step_seconds"):
        samples = families[hist]["samples"]
        buckets = [(labels["le"], v) for n, labels, v in samples if n == hist + "_bucket"]
        counts = [v for _, v in buckets]
        assert buckets[-1][0] == "+Inf" and counts == sorted(counts)
        count = next(v for n, _, v in samples if n == hist + "_count")
        assert counts[-1] == count >= 1
    assert next(v for *_, v in families["tilec_tokens_per_second"]["samples"]) > 0
