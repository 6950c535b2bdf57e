"""Chunked prefill beside batched decode (issue 17), in one engine file compiled from
`model: {batch: 3, prefill: {chunk: 8}}`: the prefill entry of batch B writes
its chunk into ONE slot of the batched KV cache (a run-time `slot` input, index-checked)
and attends over that slot only; only its `last` row goes through the final norm and
the lm_head. PrefillSlots interleaves: each step is at most one prefill launch (the
oldest prompt still prefilling) and one decode launch (every decoding slot). Against
transformers (a tiny random GQA Llama through hf:, float32): 3 prompts of different
lengths give for each sequence exactly what it gives alone, on both CPU executors."""
import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tilec.api as tilec_api  # noqa: E402
from tilec.cli import main  # noqa: E402
from tilec.compiler.build import build_model  # noqa: E402
from tilec.compiler.config import load_config  # noqa: E402
from tilec.errors import RunError  # noqa: E402
from tilec.models.llama import LlamaPrefillStep  # noqa: E402
from tilec.passes.entries import verify_entries  # noqa: E402
from tilec.runtime.executors import entry_executor, state_layout  # noqa: E402
from tilec.runtime.generate import PrefillSlots  # noqa: E402
import tiny_llama  # noqa: E402
from engines import check_unqueued_prefill_append_caught  # noqa: E402
from tiny_llama import save_tiny_llama  # noqa: E402

VOCAB = 96
CHUNK = 8
MAX_SEQ = 48
BATCH = 3
NEW_TOKENS = 4
# longer than a chunk (3 chunks, the last padded), shorter than one, and two chunks
# and one token left (which goes through the decode launch)
LENGTHS = (20, 5, 17)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The checkpoint, its one batch-3 engine file with a prefill entry of chunk 8
    (token, pos, last, slot) over the decode step's weights and KV cache, and the
    prompts."""
    root = tmp_path_factory.mktemp("prefill_slots")
    model = save_tiny_llama(transformers, root / "ckpt", VOCAB)
    path = root / "engine.yaml"
    path.write_text(json.dumps({"model": {"hf": "ckpt", "max_seq_len": MAX_SEQ, "batch": BATCH,
                                          "prefill": {"chunk": CHUNK}},
                                "dtype": "float32", "target": {"name": "cpu", "workers": 2}}))
    engine = tilec_api.compile(str(path))
    g = torch.Generator().manual_seed(2)
    # (no token 0: transformers' generate takes it for padding, pad_token_id=0)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    return model, engine, prompts, path


def executors(engine, backend):
    """A decode executor and a prefill executor on its state."""
    decode = engine.new_executor(backend)
    return decode, entry_executor(decode, "prefill")


def caches(executor) -> dict[str, torch.Tensor]:
    """A copy of each KV-cache buffer [B, kv heads, positions, head dim] of an executor."""
    out = {}
    for b in executor.schedule.buffers:
        if b.kind == "state":
            flat = executor.pools[b.pool].view(-1)[b.offset:b.offset + b.type.numel]
            out[b.name] = flat.view(b.type.shape).clone()
    return out


def test_prefill_entry_shape(hf):
    """One file, two entries: the prefill's inputs (with their value ranges) and
    outputs, its state laid out as the decode step's, both verified together."""
    _, engine, _, _ = hf
    assert engine.data.manifest.entries == ("decode", "prefill")
    prefill = engine.data.entry("prefill")
    assert [(io.name, io.shape, io.low, io.high) for io in prefill.manifest.inputs] == \
        [("token", (CHUNK,), 0, VOCAB), ("pos", (1,), 0, MAX_SEQ - CHUNK + 1),
         ("last", (1,), 0, CHUNK), ("slot", (1,), 0, BATCH)]
    assert [io.shape for io in prefill.manifest.outputs] == [(1, VOCAB), (1,)]
    layout = state_layout(prefill.schedule())
    assert layout and layout == state_layout(engine.data.schedule())
    report = engine.verify()
    assert report.ok, report


def test_slot_prefill_append_and_state_checked_across_entries(hf):
    """The verifier covers the slot prefill beside the batched decode: a prefill that
    drops a KV append (into the slot's rows of the shared cache) from its queues, or
    whose cache lies elsewhere than the decode step's, is named."""
    _, engine, _, _ = hf
    check_unqueued_prefill_append_caught(engine)
    decode = ("decode", engine.data.schedule())
    sched = engine.data.entry("prefill").schedule()
    buffers = tuple(dataclasses.replace(b, offset=b.offset + 16)
                    if b.name.endswith("layers_1_k_cache") else b for b in sched.buffers)
    report = verify_entries((decode, ("prefill", dataclasses.replace(sched, buffers=buffers))))
    assert not report.checks["entries_share_state"]


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_interleaved_batch_matches_transformers_and_alone(hf, backend):
    model, engine, prompts, _ = hf
    gens = engine.generate(prompts, NEW_TOKENS, backend=backend, logits=True,
                           stop_at_eos=False)
    for prompt, g in zip(prompts, gens):
        ref_tokens, ref_logits = tiny_llama.hf_greedy(model, prompt, NEW_TOKENS)
        assert g.tokens == ref_tokens
        assert (g.logits - ref_logits).abs().max().item() <= 1e-3
        if backend == "reference":   # (the interpreter is slow: one backend alone)
            alone, = engine.generate([prompt], NEW_TOKENS, backend=backend, logits=True,
                                     stop_at_eos=False)
            assert alone.tokens == g.tokens and torch.equal(alone.logits, g.logits)
    # step 1-3: A's 3 chunks; 4: B's chunk, decode A; 5-6: C's 2 chunks, decode A, B;
    # 7: decode B and C's last prompt token; 8-10: decode C. Each Generation counts the
    # launches that fed its sequence: A 3 chunks and 3 decode launches (its first token
    # came from its last chunk), B 1 and 3, C 2 and 4 (one for its last prompt token).
    assert [(g.prefill_steps, g.decode_steps) for g in gens] == [(3, 3), (1, 3), (2, 4)]
    assert gens[0].ttft_s < gens[1].ttft_s < gens[2].ttft_s   # oldest first


def test_prefill_writes_only_its_slot(hf):
    """A chunk into slot 1 leaves slots 0 and 2 of every cache bitwise as they were,
    and writes exactly slot 1's positions pos .. pos + P - 1."""
    _, engine, prompts, _ = hf
    dec, pre = executors(engine, "reference")
    g = torch.Generator().manual_seed(5)
    for pos in range(3):   # some keys in every slot
        dec.run({"token": torch.randint(0, VOCAB, (BATCH,), generator=g),
                 "pos": torch.tensor([pos, pos + 8, pos + 20])})
    before = caches(dec)
    pre.run({"token": torch.tensor(prompts[2][:CHUNK]), "pos": torch.tensor([8]),
             "last": torch.tensor([CHUNK - 1]), "slot": torch.tensor([1])})
    after = caches(dec)
    assert len(after) == 4   # k and v of two layers
    for name, cache in after.items():
        for slot in (0, 2):
            assert torch.equal(cache[slot], before[name][slot]), (name, slot)
        changed = (cache[1] != before[name][1]).any(dim=-1).any(dim=0).nonzero().view(-1)
        assert changed.tolist() == list(range(8, 8 + CHUNK)), name


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_bad_slot_last_or_pos_is_one_run_error(hf, backend):
    """A slot outside [0, 3), a `last` row outside the chunk or a chunk running past
    the cache: one RunError (the entry's declared input ranges), nothing written, and
    the next good launch exact."""
    _, engine, prompts, _ = hf
    dec, pre = executors(engine, backend)
    good = {"token": torch.tensor(prompts[0][:CHUNK]), "pos": torch.tensor([0]),
            "last": torch.tensor([CHUNK - 1]), "slot": torch.tensor([2])}
    want = pre.run(good)["logits"]
    before = caches(dec)
    for key, value in (("slot", 3), ("slot", -1), ("last", CHUNK), ("pos", MAX_SEQ - 4)):
        with pytest.raises(RunError) as info:
            pre.run({**good, key: torch.tensor([value])})
        assert len(str(info.value).splitlines()) == 1 and "outside" in str(info.value)
        assert all(torch.equal(c, before[n]) for n, c in caches(dec).items()), key
    assert torch.equal(pre.run(good)["logits"], want)


def test_prefill_of_another_batch_refused(hf):
    """A batch-3 decoder with a prefill engine that takes no slot: refused, with the
    inputs it needs named."""
    _, engine, _, path = hf
    step, _ = build_model(load_config(str(path)))
    lone = LlamaPrefillStep(step.cfg, MAX_SEQ, CHUNK)
    other = tilec_api.compile(lone, (torch.zeros(CHUNK, dtype=torch.int64),
                                     torch.zeros(1, dtype=torch.int64)), workers=1)
    with pytest.raises(RunError, match=r"slot \[1\] of its sequence"):
        PrefillSlots(engine.generation_spec, engine.new_executor("reference"),
                     other.new_executor("reference"))


def test_run_batch_json_reports_each_sequence(hf, tmp_path, capsys):
    """`tilec run` of the batch engine file with --prompt-ids repeated: the prompts go
    through the prefill entry interleaved with decode, and --json's `sequences` give
    each one's tokens (transformers'), launches and time to its first token."""
    model, engine, prompts, _ = hf
    path = tmp_path / "batch.engine"
    engine.save(path)
    capsys.readouterr()
    args = [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]
    assert main(["run", str(path), "--backend", "reference", "--json", "--max-new-tokens",
                 str(NEW_TOKENS), *args]) == 0
    out = json.loads(capsys.readouterr().out)
    seqs = out["sequences"]
    assert [s["new_tokens"] for s in seqs] == \
        [tiny_llama.hf_greedy(model, p, NEW_TOKENS)[0] for p in prompts]
    assert [(s["prefill_steps"], s["decode_steps"]) for s in seqs] == [(3, 3), (1, 3), (2, 4)]
    assert all(s["ttft_s"] > 0 for s in seqs)


@pytest.mark.parametrize("batch", [1, 2])
def test_one_kv_head(batch):
    """With one KV head a chunk's append has the K projection's rows; it compiled into
    the projection's epilogue, which cannot walk n positions (an AssertionError in
    codegen). Now a row group appends: the engine gives eager PyTorch's logits and
    cache."""
    from tilec.models.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(3)
    model = LlamaPrefillStep(cfg, 16, 4, batch=batch).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    one = torch.zeros(1, dtype=torch.int64)
    args = (torch.randint(0, 32, (4,)), torch.tensor([6]), torch.tensor([2])) + \
        ((torch.tensor([batch - 1]),) if batch > 1 else ())
    engine = tilec_api.compile(model, tuple(torch.zeros_like(a) if a.numel() > 1 else one
                                            for a in args), workers=1)
    ex = engine.new_executor("reference")
    out = ex.run(dict(zip(("token", "pos", "last", "slot"), args)))
    with torch.no_grad():
        want = model(*args)["logits"]
    assert (out["logits"] - want).abs().max() <= 1e-5
    cache, = (c for name, c in caches(ex).items() if name.endswith("k_cache"))
    assert (cache - model.layers[0].k_cache).abs().max() <= 1e-5
