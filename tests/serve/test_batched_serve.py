"""tilec serve on a batched engine (`model: {batch: 3}`): the scheduler admits up to
three requests into the engine's slots at once, and each concurrent client gets exactly
the tokens `tilec run` makes for its prompt on the one-sequence engine."""
import json

import tilec.api
from servers import running
from test_openai_api import MODEL, SETTINGS, concurrent_streams, expected

BATCH = 3


def test_concurrent_requests_share_the_step(checkpoint, engine_path):
    yaml_path = checkpoint.parent / "chat_tiny_b3.yaml"
    yaml_path.write_text(json.dumps({"model": {"hf": "ckpt", "max_seq_len": 48, "batch": BATCH,
                                               "prefill": False},
                                     "dtype": "float32", "target": {"name": "cpu", "workers": 1}}))
    engine = tilec.api.compile(str(yaml_path), name=MODEL)
    clients = 5
    jobs = [([2 + i, 7, 1 + i % 2], 3, SETTINGS[("greedy", "sampled")[i % 2]])
            for i in range(clients)]
    refs = [expected(engine_path, *job)["new_tokens"] for job in jobs]
    with running(engine, max_queue=8) as served:
        slots = served.server.scheduler.slots
        assert slots.count == served.server.metrics.slots == BATCH
        widest = []
        step = slots.step
        slots.step = lambda feeds, parked: (widest.append(len(feeds)), step(feeds, parked))[1]
        results = concurrent_streams(served, jobs)
    assert results == refs
    assert max(widest) > 1 and max(widest) <= BATCH
