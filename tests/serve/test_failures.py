"""What tilec serve answers when things go wrong: every bad request is a 400 with the
OpenAI error object, a full queue a 429, a client that leaves frees its slot at the
next step, an engine fault fails the requests in the engine (500) and the server goes
on with the next ones."""
from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import tilec.api
from servers import openai, running, tilec_run
from tilec.errors import ScheduleHangError

MODEL = "chat_tiny"


def post(url: str, body: bytes | dict, path: str = "/v1/completions",
         method: str = "POST") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data if method == "POST" else None,
                                     method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def is_error_object(body: dict) -> bool:
    return set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"} \
        and isinstance(body["error"]["message"], str) and body["error"]["message"]


def recorded_jobs(server, monkeypatch) -> list:
    """The scheduler's jobs, in the order they are submitted from now on."""
    jobs = []
    submit = server.scheduler.submit

    def recording(job):
        jobs.append(job)
        submit(job)

    monkeypatch.setattr(server.scheduler, "submit", recording)
    return jobs


def until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


OK = {"model": MODEL, "prompt": [1, 2], "max_tokens": 2}
BAD_COMPLETIONS = [   # (body, param of the error, words of its message)
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b'{"model": "chat_tiny", "prompt": [1], "temperature": NaN}', None, "not valid JSON"),
    ({"prompt": [1]}, "model", "model"),
    ({**OK, "model": "gpt-4"}, "model", "does not exist"),
    ({"model": MODEL}, "prompt", "prompt"),
    ({**OK, "prompt": []}, "prompt", "empty"),
    ({**OK, "prompt": [1, 999]}, "prompt", "outside the vocabulary"),
    ({**OK, "prompt": [-1]}, "prompt", "outside the vocabulary"),
    ({**OK, "prompt": [1.5]}, "prompt", "token ids"),
    ({**OK, "prompt": ["a b", "c"]}, "prompt", "one prompt"),
    ({**OK, "prompt": [1] * 45, "max_tokens": 4}, "max_tokens", "exceeds max_seq_len 48"),
    ({**OK, "prompt": [1] * 48}, "prompt", "exceeds max_seq_len 48"),
    ({**OK, "max_tokens": 0}, "max_tokens", "at least 1"),
    ({**OK, "max_tokens": "5"}, "max_tokens", "integer"),
    ({**OK, "max_tokens": True}, "max_tokens", "integer"),
    ({**OK, "temperature": -1}, "temperature", "temperature"),
    ({**OK, "temperature": "hot"}, "temperature", "number"),
    ({**OK, "top_p": 0}, "top_p", "top_p"),
    ({**OK, "top_p": 1.5}, "top_p", "top_p"),
    ({**OK, "top_k": -2}, "top_k", "top_k"),
    ({**OK, "seed": -1}, "seed", "seed"),
    ({**OK, "seed": 2 ** 32}, "seed", "from 0 to 4294967295"),
    ({**OK, "stop": [""]}, "stop", "stop"),
    ({**OK, "stop": 5}, "stop", "stop"),
    ({**OK, "stop": ["x"] * 17}, "stop", "at most"),
    ({**OK, "n": 2}, "n", "does not support"),
    ({**OK, "best_of": 3}, "best_of", "does not support"),
    ({**OK, "logprobs": 2}, "logprobs", "does not support"),
    ({**OK, "echo": True}, "echo", "does not support"),
    ({**OK, "presence_penalty": 0.5}, "presence_penalty", "does not support"),
    ({**OK, "logit_bias": {"1": 5}}, "logit_bias", "does not support"),
    ({**OK, "suffix": "x"}, "suffix", "does not support"),
    ({**OK, "stream": "yes"}, "stream", "true or false"),
    ({**OK, "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
]
BAD_CHATS = [
    ({"model": MODEL}, "messages", "messages"),
    ({"model": MODEL, "messages": []}, "messages", "non-empty"),
    ({"model": MODEL, "messages": [{"content": "hi"}]}, "messages", "role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages", "content"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages",
     "unknown role tool"),   # the template's raise_exception
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "does not support"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 40}], "max_tokens": 20},
     "max_tokens", "exceeds max_seq_len"),
]


@pytest.mark.parametrize("body, param, words", BAD_COMPLETIONS,
                         ids=[f"completions{i}" for i in range(len(BAD_COMPLETIONS))])
def test_bad_completion_requests_are_400(served, body, param, words):
    status, answer = post(served.url, body)
    assert status == 400 and is_error_object(answer), answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param and words in answer["error"]["message"], answer


@pytest.mark.parametrize("body, param, words", BAD_CHATS,
                         ids=[f"chat{i}" for i in range(len(BAD_CHATS))])
def test_bad_chat_requests_are_400(served, body, param, words):
    status, answer = post(served.url, body, "/v1/chat/completions")
    assert status == 400 and is_error_object(answer), answer
    assert answer["error"]["param"] == param and words in answer["error"]["message"], answer


def test_bad_requests_through_the_openai_client(served):
    client = served.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="nope", prompt=[1], max_tokens=1)
    assert e.value.status_code == 400 and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1] * 40, max_tokens=9)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[0, 99999], max_tokens=1)
    assert "outside the vocabulary" in e.value.message


def test_wrong_path_method_and_size_are_error_objects(served):
    assert post(served.url, OK, "/v1/nothing")[0] == 404
    status, answer = post(served.url, OK, "/v1/completions", method="GET")
    assert status == 405 and is_error_object(answer)
    status, answer = post(served.url, b" " * (8 << 20 | 1))
    assert status == 413 and is_error_object(answer)
    status, answer = post(served.url, OK, "/v1/nothing")
    assert is_error_object(answer)


def test_full_queue_is_429(served, monkeypatch):
    monkeypatch.setattr(served.server.scheduler, "max_queue", 0)   # the slot only
    client = served.client()
    stream = client.completions.create(model=MODEL, prompt=[1, 2], max_tokens=20, stream=True,
                                       temperature=0)
    next(iter(stream))   # running: the slot is taken
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt=[1], max_tokens=1)
    assert e.value.status_code == 429 and e.value.code == "queue_full"
    stream.close()


def test_requests_wait_in_the_queue_for_the_slot(served, monkeypatch, engine_path):
    monkeypatch.setattr(served.server.scheduler, "max_queue", 1)
    client = served.client()
    first = client.completions.create(model=MODEL, prompt=[1, 2], max_tokens=6, stream=True,
                                      temperature=0)
    next(iter(first))
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(client.completions.create(
        model=MODEL, prompt=[5, 5], max_tokens=3, temperature=0)))
    waiting.start()
    until(lambda: served.server.scheduler.queue_depth == 1)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt=[1], max_tokens=1)
    assert len(list(first)) == 6   # 5 tokens left and the finish event
    waiting.join(120)
    ref = tilec_run(engine_path, "--prompt-ids", "5,5", "--max-new-tokens", 3)
    assert answers[0].choices[0].token_ids == ref["new_tokens"]


def test_streaming_client_that_leaves_frees_its_slot(served, monkeypatch, engine_path):
    jobs = recorded_jobs(served.server, monkeypatch)
    client = served.client()
    stream = client.completions.create(model=MODEL, prompt=[3, 1], max_tokens=40, stream=True,
                                       temperature=0)
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    job = jobs[0]
    until(lambda: job.cancelled and job not in served.server.scheduler._running.values())
    assert job.steps_after_cancel <= 1 and len(job.sequence.tokens) < 40
    ref = tilec_run(engine_path, "--prompt-ids", "2,2", "--max-new-tokens", 3)
    out = client.completions.create(model=MODEL, prompt=[2, 2], max_tokens=3, temperature=0)
    assert out.choices[0].token_ids == ref["new_tokens"]


def test_waiting_client_that_leaves_whole_request_frees_its_slot(served, monkeypatch):
    jobs = recorded_jobs(served.server, monkeypatch)
    host, port = served.url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": [4, 4], "max_tokens": 40}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        until(lambda: jobs and len(jobs[0].sequence.tokens) >= 2)
    job = jobs[0]
    until(lambda: job.cancelled and job not in served.server.scheduler._running.values())
    assert job.steps_after_cancel <= 1 and len(job.sequence.tokens) < 40


def test_engine_fault_fails_the_request_in_the_slot_and_the_server_goes_on(
        served, monkeypatch, engine_path):
    """A watchdog expiry in a step: the streaming request in the slot ends with an error
    event, the one waiting in the queue gets its tokens from a fresh executor."""
    slots = served.server.scheduler.slots
    broken = slots.executor
    armed = threading.Event()
    run = broken.run

    def failing(inputs):
        if armed.is_set():
            raise ScheduleHangError("watchdog: worker 0 in task 3 waits on event 2 (seen 0, "
                                    "wanted 1)")
        return run(inputs)

    monkeypatch.setattr(broken, "run", failing)
    client = served.client()
    stream = client.completions.create(model=MODEL, prompt=[6, 1], max_tokens=40, stream=True,
                                       temperature=0)
    got = []
    answers = []
    queued = threading.Thread(target=lambda: answers.append(client.completions.create(
        model=MODEL, prompt=[2, 6], max_tokens=3, temperature=0)))
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got += chunk.choices[0].token_ids
            if not armed.is_set():
                queued.start()
                until(lambda: served.server.scheduler.queue_depth == 1)
                armed.set()
    assert "engine fault" in e.value.message and "watchdog" in e.value.message
    assert 1 <= len(got) < 40
    assert got == tilec_run(engine_path, "--prompt-ids", "6,1", "--max-new-tokens", len(got))[
        "new_tokens"]
    queued.join(120)
    ref = tilec_run(engine_path, "--prompt-ids", "2,6", "--max-new-tokens", 3)
    assert answers[0].choices[0].token_ids == ref["new_tokens"]
    assert slots.executor is not broken

    monkeypatch.setattr(slots.executor, "run", lambda inputs: (_ for _ in ()).throw(
        RuntimeError("index 70000 out of range")))
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt=[1], max_tokens=2)
    assert e.value.status_code == 500 and e.value.code == "engine_fault"
    assert "out of range" in e.value.message
    out = client.completions.create(model=MODEL, prompt=[2, 6], max_tokens=3, temperature=0)
    assert out.choices[0].token_ids == ref["new_tokens"]


def test_engine_without_tokenizer_takes_ids_and_refuses_text(engine_path):
    engine = tilec.api.load(engine_path)
    bare = tilec.api.Engine(dataclasses.replace(engine.data, tokenizer=None, chat=None))
    with running(bare, max_queue=4) as r:
        out = r.client().completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4,
                                            temperature=0)
        ids = out.choices[0].token_ids
        assert out.choices[0].text == " ".join(map(str, ids))
        for body, path, param in [({**OK, "prompt": "the cat"}, "/v1/completions", "prompt"),
                                  ({**OK, "stop": "x"}, "/v1/completions", "stop"),
                                  ({"model": MODEL, "messages": [{"role": "user", "content": "a"}]},
                                   "/v1/chat/completions", "messages")]:
            status, answer = post(r.url, body, path)
            assert status == 400 and answer["error"]["param"] == param, answer
