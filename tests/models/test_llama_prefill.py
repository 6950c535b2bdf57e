"""Chunked prefill (issue 17 item 1): a decoder's prefill schedule takes a chunk of P
prompt tokens of one sequence per launch (LlamaPrefillStep: P rows through every
matmul, attention causal within the chunk and over the cache before it, one KV append
of P positions per layer) and runs on the decode engine's KV cache. Against transformers
(a tiny random GQA Llama through hf:, float32): a 40-token prompt in chunks of 16 takes
3 prefill launches, then decodes the same greedy tokens and logits (within 1e-3) as
transformers' generate and as the decode engine fed one token per step, on both CPU
executors. The verifier orders every chunk's KV append before every attention that
reads the cache, and names the pair when that wait is taken out."""
import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tilec.api as tilec_api  # noqa: E402
from tilec.compiler.build import build_model  # noqa: E402
from tilec.compiler.config import load_config  # noqa: E402
from tilec.errors import ConfigError, RunError  # noqa: E402
from tilec.models.llama import LlamaPrefillStep  # noqa: E402
from tilec.passes.verify import verify  # noqa: E402
import tiny_llama  # noqa: E402
from tiny_llama import save_tiny_llama  # noqa: E402
from tilec.runtime.generate import generate  # noqa: E402

VOCAB = 96
CHUNK = 16
MAX_SEQ = 48
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A GQA Llama of two layers, its decode engine (hf:, batch 1) and its prefill
    engine of chunk 16 over the same weights."""
    root = tmp_path_factory.mktemp("prefill")
    model = save_tiny_llama(transformers, root / "ckpt", VOCAB)
    path = root / "decode.yaml"
    path.write_text(json.dumps({"model": {"hf": "ckpt", "max_seq_len": MAX_SEQ},
                                "dtype": "float32", "target": {"name": "cpu", "workers": 2}}))
    decode = tilec_api.compile(str(path))
    step, _ = build_model(load_config(str(path)))
    prefill_model = LlamaPrefillStep(step.cfg, MAX_SEQ, CHUNK)
    prefill_model.load_state_dict(step.state_dict())
    example = (torch.zeros(CHUNK, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    prefill = tilec_api.compile(prefill_model, example, workers=2)
    # (no token 0: transformers' generate takes it for padding, pad_token_id=0)
    prompt = torch.randint(1, VOCAB, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    return model, decode, prefill, prompt


def hf_greedy(model, prompt):
    return tiny_llama.hf_greedy(model, prompt, NEW_TOKENS)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_chunked_prefill_matches_transformers(hf, backend):
    model, decode, prefill, prompt = hf
    spec = decode.generation_spec
    g = generate(decode.new_executor(backend), spec, prompt, NEW_TOKENS, keep_logits=True,
                 stop_at_eos=False, prefill=prefill.new_executor(backend))
    # 40 tokens in chunks of 16: 16 + 16 + 8 (padded), then one step per further token
    assert (g.prefill_steps, g.decode_steps) == (3, NEW_TOKENS - 1)
    assert 0 < g.ttft_s <= g.seconds
    ref_tokens, ref_logits = hf_greedy(model, prompt)
    assert g.tokens == ref_tokens
    assert (g.logits - ref_logits).abs().max().item() <= 1e-3
    if backend == "reference":   # the same as the decode step fed one token at a time
        one = generate(decode.new_executor(backend), spec, prompt, NEW_TOKENS,
                       keep_logits=True, stop_at_eos=False)
        assert one.tokens == g.tokens and (one.logits - g.logits).abs().max() <= 1e-4
        assert (one.prefill_steps, one.decode_steps) == (0, len(prompt) + NEW_TOKENS - 1)


def test_padded_rows_never_reach_a_read(hf):
    """The padded rows of the last chunk write positions 40..47 of the cache with junk
    (token 0); any other filler gives bitwise the same decode, because each decode step
    writes its position before its attention reads it, and masks the ones after."""
    _, decode, prefill, prompt = hf
    spec = decode.generation_spec
    outs = []
    for filler in (0, 77):
        dec, pre = decode.new_executor("reference"), prefill.new_executor("reference")
        pre.use_state_of(dec)
        for start in (0, 16):
            pre.run({"token": torch.tensor(prompt[start:start + CHUNK]),
                     "pos": torch.tensor([start])})
        tail = torch.full((CHUNK,), filler)
        tail[:8] = torch.tensor(prompt[32:])
        last = pre.run({"token": tail, "pos": torch.tensor([32])})
        token, logits = int(last["next_token"][7]), [last["logits"][7]]
        for pos in range(40, 43):
            out = dec.run({"token": torch.tensor([token]), "pos": torch.tensor([pos])})
            token = int(out["next_token"][0])
            logits.append(out["logits"][0])
        outs.append(torch.stack(logits))
    assert torch.equal(outs[0], outs[1])
    assert spec.max_seq_len == MAX_SEQ


def test_prefill_verified_and_missing_append_wait_caught(hf):
    """A KV head's attention task (its P x groups query rows) reads the cache directly,
    after its layer's KV appends of the chunk (whose regions span every position). Taking
    out the wait on an append is the stale-cache race kv_appends_ordered names."""
    _, _, prefill, _ = hf
    assert prefill.verify().ok
    sched = prefill.data.schedule()
    tasks = sched.taskgraph.tasks
    append_events = {sched.signal[t.id] for t in tasks if t.group.endswith("_state_update")}
    attention = [t for t in tasks if t.group.endswith("_attention")]
    assert len(append_events) == 4 and len(attention) == 2 * 2   # layers x kv heads
    assert all(r.buffer.endswith(("k_cache", "v_cache")) for t in attention
               for r in t.reads[:2])   # the cache itself, not a copy of it
    cut = 0
    for victim in attention:
        waits = list(sched.waits)
        kept = tuple(w for w in waits[victim.id] if w.event not in append_events)
        if kept == waits[victim.id]:
            continue   # ordered after the appends by its queue
        waits[victim.id] = kept
        report = verify(dataclasses.replace(sched, waits=tuple(waits)))
        assert not report.ok and not report.checks["kv_appends_ordered"]
        assert any("kv_appends_ordered" in v and "_cache" in v for v in report.violations)
        cut += 1
    assert cut >= 1


def test_state_shared_only_where_layouts_agree(hf):
    """The prefill runs on the decode engine's KV cache (the same tensors) only if both
    schedules put every state buffer in the same place."""
    _, decode, prefill, _ = hf
    dec = decode.new_executor("reference")
    pre = prefill.new_executor("reference")
    pre.use_state_of(dec)
    states = [p.name for p in decode.data.schedule().pools if p.kind == "state"]
    assert states and all(pre.pools[name] is dec.pools[name] for name in states)
    moved = prefill.new_executor("reference")
    buffers = [dataclasses.replace(b, offset=b.offset + 8) if b.kind == "state" and
               b.name.endswith("layers_1_v_cache") else b for b in moved.schedule.buffers]
    moved.schedule = dataclasses.replace(moved.schedule, buffers=tuple(buffers))
    with pytest.raises(RunError, match="lay out their state differently.*layers_1_v_cache"):
        moved.use_state_of(dec)


def test_chunk_is_checked():
    from tilec.models.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16,
                      num_hidden_layers=1, num_attention_heads=2)
    for chunk in (16, 1, 2.0):
        with pytest.raises(ConfigError, match="prefill.chunk"):
            LlamaPrefillStep(cfg, 8, chunk)
