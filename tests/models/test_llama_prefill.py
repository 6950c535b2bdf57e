"""Chunked prefill in one engine (issue 17): a decoder engine compiled with
`model: {..., prefill: {chunk: P}}` holds two entries in one file, `decode` and
`prefill` (LlamaPrefillStep: P rows through every matmul, attention causal within the
chunk and over the cache before it, one KV append of P positions per layer), sharing
their weights and KV cache by name (stored once). Against transformers (a tiny random
GQA Llama through hf:, float32): a 40-token prompt in chunks of 16 takes 3 prefill
launches, then decodes the same greedy tokens and logits (within 1e-3) as transformers'
generate and as the decode entry fed one token per step, on both CPU executors. The
verifier checks each entry and both together, and names the pair when a wait or a
queued append is taken out; an edited entry in the file is refused in one line."""
import dataclasses
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

transformers = pytest.importorskip("transformers")

import tilec.api as tilec_api  # noqa: E402
from engines import check_unqueued_prefill_append_caught, resign  # noqa: E402
from tilec.cli import main  # noqa: E402
from tilec.errors import ConfigError, EngineError, RunError  # noqa: E402
from tilec.ir.graph import DTYPE_BYTES  # noqa: E402
from tilec.models.llama import LlamaPrefillStep  # noqa: E402
from tilec.passes.entries import verify_entries  # noqa: E402
from tilec.passes.verify import verify  # noqa: E402
from tilec.runtime import executors  # noqa: E402
from tilec.runtime.executors import entry_executor  # noqa: E402
import tiny_llama  # noqa: E402
from tiny_llama import save_tiny_llama  # noqa: E402

VOCAB = 96
CHUNK = 16
MAX_SEQ = 48
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A GQA Llama of two layers and its one engine file (hf:, batch 1, prefill chunk
    16), saved and loaded back."""
    root = tmp_path_factory.mktemp("prefill")
    model = save_tiny_llama(transformers, root / "ckpt", VOCAB)
    path = root / "engine.yaml"
    path.write_text(json.dumps({"model": {"hf": "ckpt", "max_seq_len": MAX_SEQ,
                                          "prefill": {"chunk": CHUNK}},
                                "dtype": "float32", "target": {"name": "cpu", "workers": 2}}))
    tilec_api.compile(str(path), output=str(root / "engine.bin"))
    engine = tilec_api.load(root / "engine.bin")
    # (no token 0: transformers' generate takes it for padding, pad_token_id=0)
    prompt = torch.randint(1, VOCAB, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    return model, engine, prompt, root


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_chunked_prefill_matches_transformers(hf, backend):
    model, engine, prompt, _ = hf
    g = engine.generate(prompt, NEW_TOKENS, backend=backend, logits=True, stop_at_eos=False)
    # 40 tokens in chunks of 16: 16 + 16 + 8 (padded), then one step per further token
    assert (g.prefill_steps, g.decode_steps) == (3, NEW_TOKENS - 1)
    assert 0 < g.ttft_s <= g.seconds
    ref_tokens, ref_logits = tiny_llama.hf_greedy(model, prompt, NEW_TOKENS)
    assert g.tokens == ref_tokens
    assert (g.logits - ref_logits).abs().max().item() <= 1e-3
    if backend == "reference":   # the same as the decode entry fed one token at a time
        one = engine.generate(prompt, NEW_TOKENS, backend=backend, logits=True,
                              stop_at_eos=False, prefill=False, seed=1)
        assert one.tokens == g.tokens and (one.logits - g.logits).abs().max() <= 1e-4
        assert (one.prefill_steps, one.decode_steps) == (0, len(prompt) + NEW_TOKENS - 1)


def test_one_file_two_entries_share_weights_and_state(hf):
    """One file, weights and KV cache stored once; the prefill executor runs on the
    decode executor's pools (the same tensors)."""
    _, engine, _, _ = hf
    data = engine.data
    assert data.manifest.entries == ("decode", "prefill")
    prefill = data.entries["prefill"]
    assert prefill.manifest.entry == "prefill"
    assert prefill.tensors["pool.w_float32"] is data.tensors["pool.w_float32"]
    dec = engine.new_executor("reference")
    pre = entry_executor(dec, "prefill")
    shared = [p.name for p in data.schedule().pools if p.kind in ("weight", "state")]
    assert shared and all(pre.pools[n] is dec.pools[n] for n in shared)
    arena = [p.name for p in data.schedule().pools if p.kind == "arena"]
    assert arena and all(pre.pools[n] is not dec.pools[n] for n in arena)


class Materialised(TorchDispatchMode):
    """The bytes of every tensor an aten op makes anew (whose storage is none of its
    inputs'), while active: what a piece of code materialises, however it does it."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def storages(tree):
            return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}
        given = storages((args, kwargs))
        self.sizes += [n for ptr, n in storages(out).items() if ptr not in given]
        return out


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_the_prefill_executor_is_made_on_the_decode_pools(hf, backend, monkeypatch):
    """entry_executor never allocates or copies a pool the prefill shares with the
    decode step (the KV cache, the weights: on a GPU a copy of each, held until
    use_state_of dropped it): it asks for its arenas alone, and what it materialises is
    exactly its arenas, events and error words."""
    _, engine, _, _ = hf
    dec = engine.new_executor(backend)
    asked = []
    fresh = executors.fresh_pool
    monkeypatch.setattr(executors, "fresh_pool",
                        lambda e, pool, device: asked.append(pool.name) or fresh(e, pool, device))
    with Materialised() as made:
        pre = entry_executor(dec, "prefill")
    pools = pre.schedule.pools
    arenas = [p for p in pools if p.kind == "arena"]
    assert asked == [p.name for p in arenas]
    assert all(pre.pools[p.name] is dec.pools[p.name] for p in pools if p.kind != "arena")
    own = sum(p.numel * DTYPE_BYTES[p.dtype] for p in arenas)
    assert sum(made.sizes) == own + pre.events.nbytes + pre.error.nbytes, made.sizes


def test_padded_rows_never_reach_a_read(hf):
    """The padded rows of the last chunk write positions 40..47 of the cache with junk
    (token 0); any other filler gives bitwise the same decode, because each decode step
    writes its position before its attention reads it, and masks the ones after."""
    _, engine, prompt, _ = hf
    outs = []
    for filler in (0, 77):
        dec = engine.new_executor("reference")
        pre = entry_executor(dec, "prefill")
        for start in (0, 16):
            pre.run({"token": torch.tensor(prompt[start:start + CHUNK]),
                     "pos": torch.tensor([start]), "last": torch.tensor([CHUNK - 1])})
        tail = torch.full((CHUNK,), filler)
        tail[:8] = torch.tensor(prompt[32:])
        last = pre.run({"token": tail, "pos": torch.tensor([32]), "last": torch.tensor([7])})
        token, logits = int(last["next_token"][0]), [last["logits"][0]]
        for pos in range(40, 43):
            out = dec.run({"token": torch.tensor([token]), "pos": torch.tensor([pos])})
            token = int(out["next_token"][0])
            logits.append(out["logits"][0])
        outs.append(torch.stack(logits))
    assert torch.equal(outs[0], outs[1])


def _entries(engine):
    return (("decode", engine.data.schedule()),
            ("prefill", engine.data.entries["prefill"].schedule()))


def test_prefill_verified_and_missing_append_wait_caught(hf):
    """Within the prefill: a KV head's attention task reads the cache directly, after
    its layer's KV appends of the chunk. Taking out the wait on an append is the
    stale-cache race kv_appends_ordered names, reported under the prefill entry."""
    _, engine, _, _ = hf
    report = engine.verify()
    assert report.ok and "prefill: kv_appends_ordered" in report.checks
    assert report.checks["entry_writes_complete"] and report.checks["entries_share_state"]
    decode, (_, sched) = _entries(engine)
    tasks = sched.taskgraph.tasks
    append_events = {sched.signal[t.id] for t in tasks if t.group.endswith("_state_update")}
    attention = [t for t in tasks if t.group.endswith("_attention")]
    assert len(append_events) == 4 and len(attention) == 2 * 2   # layers x kv heads
    cut = 0
    for victim in attention:
        waits = list(sched.waits)
        kept = tuple(w for w in waits[victim.id] if w.event not in append_events)
        if kept == waits[victim.id]:
            continue   # ordered after the appends by its queue
        waits[victim.id] = kept
        bad = dataclasses.replace(sched, waits=tuple(waits))
        report = verify_entries((decode, ("prefill", bad)))
        assert not report.ok and not report.checks["prefill: kv_appends_ordered"]
        assert any(v.startswith("prefill: kv_appends_ordered") for v in report.violations)
        cut += 1
    assert cut >= 1


def test_unqueued_prefill_append_caught_across_entries(hf):
    """Across entries, order comes from the launches: one runs to its end before the
    next starts, so a prefill's KV append is complete before a later decode reads the
    cache, if the append runs at all. A prefill schedule that drops an append from its
    queues ends its launch without it: entry_writes_complete names the append and the
    decode's attention that would read the stale cache."""
    _, engine, _, _ = hf
    check_unqueued_prefill_append_caught(engine)


def test_moved_state_caught_across_entries(hf):
    _, engine, _, _ = hf
    decode, (_, sched) = _entries(engine)
    buffers = tuple(dataclasses.replace(b, offset=b.offset + 16)
                    if b.name.endswith("layers_1_v_cache") else b for b in sched.buffers)
    report = verify_entries((decode, ("prefill", dataclasses.replace(sched, buffers=buffers))))
    assert not report.checks["entries_share_state"]
    assert any("layers_1_v_cache" in v for v in report.violations)
    assert verify(decode[1]).ok


def test_edited_entry_is_refused(hf, tmp_path, capsys):
    """A signed file whose prefill manifest moves a KV cache, or whose prefill kernel
    is edited, or that lists an entry it does not hold: one error line, exit 2."""
    _, _, _, root = hf
    src = root / "engine.bin"

    def move(meta):
        plain = json.loads(meta["manifest.prefill"])
        for b in plain["schedule"]["buffers"]:
            if b["name"].endswith("layers_0_k_cache"):
                b["offset"] += 16
        meta["manifest.prefill"] = json.dumps(plain)

    cases = {"moved": (move, "prefill entry"),
             "kernel": (lambda m: m.__setitem__("kernel.prefill", m["kernel.prefill"] + "x = 1\n"),
                        "prefill entry: stored kernel source differs"),
             "unlisted": (lambda m: m.pop("manifest.prefill"), "prefill entry"),
             "unknown": (lambda m: m.__setitem__("manifest", m["manifest"].replace(
                 '"entries":["decode","prefill"]', '"entries":["decode","evil"]')),
                 "malformed entry list")}
    for name, (edit, words) in cases.items():
        path = resign(src, tmp_path / name, meta=edit)
        with pytest.raises(EngineError, match=words):
            tilec_api.load(path)
        capsys.readouterr()
        assert main(["run", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and words in err


def test_run_json_reports_launches(hf, capsys):
    _, _, prompt, root = hf
    capsys.readouterr()
    ids = ",".join(map(str, prompt[:20]))
    assert main(["run", str(root / "engine.bin"), "--backend", "reference", "--prompt-ids",
                 ids, "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["prefill_steps"], out["decode_steps"]) == (2, 2)   # 16 + 4 (padded)
    assert 0 < out["ttft_s"] <= out["seconds"]
    (seq,) = out["sequences"]
    assert (seq["prefill_steps"], seq["decode_steps"]) == (2, 2) and seq["ttft_s"] > 0


def test_prefill_key_is_checked(tmp_path):
    from tilec.compiler.config import load_config

    cases = {"x": "model.prefill", 1: "model.prefill", "{chunk: 1}": "model.prefill.chunk",
             "{chunk: 99}": "model.prefill.chunk", "{rows: 4}": "model.prefill.rows"}
    for value, key in cases.items():
        path = tmp_path / "m.yaml"
        path.write_text(f"model: {{family: llama, max_seq_len: 32, prefill: {value}}}\n")
        with pytest.raises(ConfigError, match=key) as e:
            load_config(str(path))
        assert "\n" not in str(e.value)
    path.write_text("model: {module: m.py:f, prefill: {chunk: 4}}\n")
    with pytest.raises(ConfigError, match="model.prefill: only for"):
        load_config(str(path))
    for value, chunk in (("false", 0), ("{}", None), ("{chunk: 8}", 8)):
        path.write_text(f"model: {{family: llama, max_seq_len: 32, prefill: {value}}}\n")
        assert load_config(str(path)).model.prefill == chunk


@pytest.fixture(scope="module")
def one_kv_head():
    """A prefill step of one KV head (chunk 8) and its engine: the chunk's keys
    [1, 8, head dim] are already in the cache's order."""
    import copy

    from tilec.models.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = LlamaPrefillStep(cfg, 16, 8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    token, pos = torch.randint(0, 16, (8,)), torch.tensor([4])
    engine = tilec_api.compile(model, (token, pos), workers=2)
    with torch.no_grad():
        want = copy.deepcopy(model)(token, pos)
    return engine, token, pos, want


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_one_kv_head_append_is_a_row_task(one_kv_head, backend):
    """With one KV head the append's values line up with the k/v matmul's tile, and fuse
    put the append of 8 positions into that matmul's epilogue, which cannot load a
    position per row (codegen stopped on an assertion); it is a row task, equal to eager."""
    engine, token, pos, want = one_kv_head
    groups = engine.data.manifest.schedule.taskgraph.fused.groups
    assert sum(g.name.endswith("_state_update") for g in groups) == 2
    got = engine.run(backend=backend, token=token, pos=pos)
    assert torch.allclose(got["logits"], want["logits"], atol=1e-4, rtol=1e-4)


def test_prefill_refused_where_there_is_none(tmp_path):
    """An explicit model.prefill on a model without a prefill step is one ConfigError
    line naming the key (before anything is built); without the key, or with
    `prefill: false`, such engines and Llama ones are decode-only. (A batch engine has
    one: test_llama_prefill_slots.py.)"""
    tiny = {"vocab_size": 16, "hidden_size": 16, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    cases = {"deepseek": ({"family": "deepseek_v3"}, "DeepseekDecodeStep has no prefill"),
             "devices": ({"family": "llama", "config": tiny}, "multi-device")}
    for name, (model, words) in cases.items():
        path = tmp_path / f"{name}.yaml"
        target = {"name": "cpu", "devices": 2} if name == "devices" else "cpu"
        path.write_text(json.dumps({"model": {**model, "max_seq_len": 8,
                                              "prefill": {"chunk": 4}}, "target": target}))
        with pytest.raises(ConfigError, match=f"model.prefill: .*{words}") as e:
            tilec_api.compile(str(path))
        assert "\n" not in str(e.value)
    path = tmp_path / "off.yaml"
    path.write_text(json.dumps({"model": {"family": "llama", "config": tiny, "max_seq_len": 8,
                                          "prefill": False}}))
    engine = tilec_api.compile(str(path))
    assert engine.data.manifest.entries == ("decode",) and not engine.data.entries
    with pytest.raises(RunError, match="no prefill entry"):
        engine.prefill_executor("reference")


def test_chunk_is_checked():
    from tilec.models.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16,
                      num_hidden_layers=1, num_attention_heads=2)
    for chunk in (16, 1, 2.0):
        with pytest.raises(ConfigError, match="prefill.chunk"):
            LlamaPrefillStep(cfg, 8, chunk)


@pytest.mark.parametrize("batch", [1, 2])
def test_prefill_step_over_decode_is_built_as_init_builds_it(batch):
    """entries.prefill_step: every attribute of every module is what LlamaPrefillStep's
    __init__ sets (the shallow copy it replaced kept the decode step's and missed any
    that __init__ gained), every parameter and buffer is the decode step's own tensor
    (nothing copied), and it computes what a LlamaPrefillStep with those weights does."""
    from tilec.compiler.entries import prefill_step
    from tilec.models.llama import LlamaConfig, LlamaDecodeStep
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(4)
    decode = LlamaDecodeStep(cfg, 16, batch=batch).eval()
    step = prefill_step(decode, 4)
    fresh = LlamaPrefillStep(cfg, 16, 4, batch=batch).eval()
    fresh.load_state_dict(decode.state_dict())

    def plain(module):   # the attributes that are neither tensors nor modules
        return {k: v for k, v in vars(module).items() if not k.startswith("_")}

    for (name, mine), (_, theirs) in zip(step.named_modules(), fresh.named_modules(),
                                         strict=True):
        assert type(mine) is type(theirs) and plain(mine) == plain(theirs), name
    tensors = dict(step.named_parameters()) | dict(step.named_buffers())
    for name, t in list(decode.named_parameters()) + list(decode.named_buffers()):
        assert tensors.pop(name) is t, name
    assert list(tensors) == ["chunk_rows"]
    args = (torch.randint(0, 32, (4,)), torch.tensor([3]), torch.tensor([2])) + \
        ((torch.tensor([1]),) if batch > 1 else ())
    with torch.no_grad():
        want = fresh(*args)["logits"]
        assert torch.equal(step(*args)["logits"], want)
