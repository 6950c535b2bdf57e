"""tilec serve on a batched engine (`model: {batch: 3}`): the scheduler admits up to
three requests into the engine's slots at once, and each concurrent client gets exactly
the tokens `tilec run` makes for its prompt on the one-sequence engine."""
import json
import threading

import tilec.api
from servers import running, tilec_run
from test_openai_api import MODEL, SETTINGS, sampling_args, streamed

BATCH = 3


def test_concurrent_requests_share_the_step(checkpoint, engine_path):
    yaml_path = checkpoint.parent / "chat_tiny_b3.yaml"
    yaml_path.write_text(json.dumps({"model": {"hf": "ckpt", "max_seq_len": 48, "batch": BATCH},
                                     "dtype": "float32", "target": {"name": "cpu", "workers": 1}}))
    engine = tilec.api.compile(str(yaml_path), name=MODEL)
    clients = 5
    jobs = [([2 + i, 7, 1 + i % 2], 3, SETTINGS[("greedy", "sampled")[i % 2]])
            for i in range(clients)]
    refs = [tilec_run(engine_path, "--prompt-ids", ",".join(map(str, p)), "--max-new-tokens",
                      n, "--temperature", s[0], "--top-k", s[1], "--top-p", s[2],
                      "--seed", s[3])["new_tokens"] for p, n, s in jobs]
    with running(engine, max_queue=8) as served:
        slots = served.server.scheduler.slots
        assert slots.count == served.server.metrics.slots == BATCH
        widest = []
        step = slots.step
        slots.step = lambda feeds: (widest.append(len(feeds)), step(feeds))[1]
        start = threading.Barrier(clients)
        results: list = [None] * clients

        def one(i):
            prompt, n, settings = jobs[i]
            client = served.client()
            start.wait()
            results[i] = streamed(client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=n, stream=True,
                **sampling_args(settings)))[0]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert results == refs
    assert max(widest) > 1 and max(widest) <= BATCH
