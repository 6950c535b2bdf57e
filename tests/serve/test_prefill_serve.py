"""tilec serve of an engine with a prefill entry (issue 18 item 2; one engine file,
batch 1 and 3): prompts go into the cache a chunk per launch of that entry,
interleaved with the decode of running requests (runtime.generate.PrefillSlots), and
every client still gets exactly the tokens `generate` (`tilec run` of the one-sequence
engine compiled with `prefill: false`, a token per step) makes for its prompt and
settings; /metrics counts the prefill launches; `prefill=False` serves the same file
a token per step."""
import json
import re
import urllib.request

import openai
import pytest

import tilec.api
from servers import running
from test_openai_api import MODEL, SETTINGS, concurrent_streams, expected, sampling_args, streamed
from tilec.runtime.generate import PrefillSlots

CHUNK = 4
MAX_SEQ = 48
# chunks of 4: 9 tokens -> 2 launches and a token through the decode step, 6 -> 2
# (the second padded), 3 -> 1 (padded)
PROMPTS = [[2, 7, 1, 3, 9, 4, 5, 6, 8], [3, 1, 4, 1, 5, 9], [10, 11, 12]]
LAUNCHES = {9: 2, 6: 2, 3: 1}


def engine(checkpoint, batch: int):
    """One engine file of `batch` slots from the test checkpoint: its decode step and
    its prefill entry (chunk 4) over the same weights and KV cache."""
    yaml_path = checkpoint.parent / f"chat_tiny_prefill_b{batch}.yaml"
    yaml_path.write_text(json.dumps({"model": {"hf": "ckpt", "max_seq_len": MAX_SEQ,
                                               "batch": batch, "prefill": {"chunk": CHUNK}},
                                     "dtype": "float32", "target": {"name": "cpu", "workers": 1}}))
    return tilec.api.compile(str(yaml_path), name=MODEL)


@pytest.fixture(scope="module", params=[1, 3], ids=["batch1", "batch3"])
def served(request, checkpoint):
    with running(engine(checkpoint, request.param), max_queue=8) as r:
        yield r


def prefill_launches(served) -> int:
    with urllib.request.urlopen(f"{served.url}/metrics") as r:
        text = r.read().decode()
    return int(re.search(r"^tilec_prefill_launches_total (\d+)$", text, re.M).group(1))


@pytest.mark.parametrize("name", ["greedy", "sampled"])
def test_streamed_completion_gives_generate_tokens(served, engine_path, name):
    assert isinstance(served.server.scheduler.slots, PrefillSlots)
    prompt, n = PROMPTS[0], 5
    ref = expected(engine_path, prompt, n, SETTINGS[name])["new_tokens"]
    before = prefill_launches(served)
    ids, _, _, _ = streamed(served.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=n, stream=True, **sampling_args(SETTINGS[name])))
    assert ids == ref
    assert prefill_launches(served) - before == LAUNCHES[len(prompt)]


def test_concurrent_clients_get_their_own_tokens(served, engine_path):
    jobs = [(prompt, 4, SETTINGS[("greedy", "sampled")[i % 2]])
            for i, prompt in enumerate(PROMPTS + PROMPTS[:2])]
    refs = [expected(engine_path, *job)["new_tokens"] for job in jobs]
    before = prefill_launches(served)
    slots = served.server.scheduler.slots
    kinds = []   # per step: (prompt chunks, single tokens) it fed
    step = slots.step
    slots.step = lambda feeds, parked: (kinds.append(
        (sum(len(f) > 1 for f, _ in feeds.values()), sum(len(f) == 1 for f, _ in feeds.values()))),
        step(feeds, parked))[1]
    try:
        assert concurrent_streams(served, jobs) == refs
    finally:
        del slots.step
    assert prefill_launches(served) - before == sum(LAUNCHES[len(p)] for p, _, _ in jobs)
    assert all(chunks <= 1 for chunks, _ in kinds)   # one prefill launch a step at most
    if slots.count > 1:   # a new request's chunk beside the running ones' tokens
        assert any(chunks and tokens for chunks, tokens in kinds)


def test_prefill_fault_fails_the_request_and_rebuilds_both_executors(served, engine_path):
    """An engine fault in a prefill launch: that request gets a 500, and the next one
    its exact tokens from a new decode executor and a new prefill executor on its
    state."""
    slots = served.server.scheduler.slots
    decode, prefill = slots.executor, slots.prefill

    def fault(inputs):
        raise RuntimeError("index 70000 out of range")

    prefill.run = fault
    client = served.client()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2)
    assert e.value.status_code == 500 and e.value.code == "engine_fault"
    ref = expected(engine_path, PROMPTS[1], 3, SETTINGS["greedy"])["new_tokens"]
    before = prefill_launches(served)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=3,
                                    **sampling_args(SETTINGS["greedy"]))
    assert out.choices[0].token_ids == ref
    assert prefill_launches(served) - before == LAUNCHES[len(PROMPTS[1])]
    assert slots.executor is not decode and slots.prefill is not prefill
