"""tilec serve with a prefill engine attached (issue 18 item 2): prompts go into the
cache a chunk per launch, interleaved with the decode of running requests
(runtime.generate.PrefillSlots), and every client still gets exactly the tokens
`generate` (`tilec run`, a token per step on the one-sequence engine) makes for its
prompt and settings; /metrics counts the prefill launches."""
import json
import re
import urllib.request

import pytest
import torch

import tilec.api
from servers import running
from test_openai_api import MODEL, SETTINGS, concurrent_streams, expected, sampling_args, streamed
from tilec.compiler.build import build_model
from tilec.compiler.config import load_config
from tilec.models.llama import LlamaPrefillStep
from tilec.runtime.generate import PrefillSlots

CHUNK = 4
MAX_SEQ = 48
# chunks of 4: 9 tokens -> 2 launches and a token through the decode step, 6 -> 2
# (the second padded), 3 -> 1 (padded)
PROMPTS = [[2, 7, 1, 3, 9, 4, 5, 6, 8], [3, 1, 4, 1, 5, 9], [10, 11, 12]]
LAUNCHES = {9: 2, 6: 2, 3: 1}


def engines(checkpoint, batch: int):
    """A decode engine of `batch` slots from the test checkpoint, and its prefill
    engine (chunk 4) over the same weights."""
    yaml_path = checkpoint.parent / f"chat_tiny_prefill_b{batch}.yaml"
    yaml_path.write_text(json.dumps({"model": {"hf": "ckpt", "max_seq_len": MAX_SEQ,
                                               "batch": batch},
                                     "dtype": "float32", "target": {"name": "cpu", "workers": 1}}))
    decode = tilec.api.compile(str(yaml_path), name=MODEL)
    step, _ = build_model(load_config(str(yaml_path)))
    model = LlamaPrefillStep(step.cfg, MAX_SEQ, CHUNK, batch=batch)
    model.load_state_dict(step.state_dict())
    one = torch.zeros(1, dtype=torch.int64)
    example = (torch.zeros(CHUNK, dtype=torch.int64), one, one) + ((one,) if batch > 1 else ())
    return decode, tilec.api.compile(model, example, workers=1)


@pytest.fixture(scope="module", params=[1, 3], ids=["batch1", "batch3"])
def served(request, checkpoint):
    decode, prefill = engines(checkpoint, request.param)
    with running(decode, max_queue=8, prefill=prefill) as r:
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
