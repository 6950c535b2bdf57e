"""Decode fusion in a Llama step: split-KV attention found from the traced graph, tiled
into partial tasks over chunks of keys plus a merge, chunks beyond the position
skipped; RoPE and the cache appends next to the projections; results equal to eager
PyTorch on both CPU executors, float32 and bfloat16."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import tilec.api as tilec_api
from tilec.compiler import build
from tilec.compiler import config as cfgmod
from tilec.ir.attention import attention_parts, partial_names
from tilec.runtime.executors import make_executor

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "llama_tiny.yaml")
CHUNK = 16          # llama_tiny: max_seq_len 64 -> 4 chunks per kv head


@pytest.fixture(scope="module")
def split_engine():
    return tilec_api.compile(EXAMPLE, workers=3, kv_chunk=CHUNK)


@pytest.fixture(scope="module")
def eager():
    cfg = cfgmod.load_config(EXAMPLE)
    model, _ = build.build_model(cfg)
    return model


def _attention_groups(engine):
    fused = engine.data.manifest.schedule.taskgraph.fused
    return [g for g in fused.groups if g.kind == "attention"], fused.graph.by_name()


def test_fusion_finds_one_attention_group_per_layer(split_engine):
    groups, ops = _attention_groups(split_engine)
    assert len(groups) == 2                       # llama_tiny has two layers
    buffers = {b.name for b in split_engine.data.manifest.schedule.buffers}
    for g in groups:
        parts = attention_parts(g, ops)
        # scores, probabilities and the scaled/masked scores live in registers only
        for name in (g.anchor, parts.x, parts.p, *parts.score_ops, *parts.softmax_ops):
            assert name not in buffers
        assert ops[parts.pv].kind == "matmul" and parts.pv in g.outputs
        assert [ops[m].attr("fn") for m, _, _ in parts.masks] == ["where"]


def test_tiles_are_partials_per_chunk_plus_a_merge(split_engine):
    sched = split_engine.data.manifest.schedule
    groups, ops = _attention_groups(split_engine)
    for g in groups:
        tiles = sorted(t.tile for t in sched.taskgraph.tasks if t.group == g.name)
        kv_heads = ops[g.anchor].type.shape[0]
        chunks = 64 // CHUNK
        assert tiles == [(h, 0, c) for h in range(kv_heads) for c in range(chunks + 1)]
        assert all(name in {b.name for b in sched.buffers} for name in partial_names(g.name))


def test_auto_chunks_one_per_worker_share():
    engine = tilec_api.compile(EXAMPLE, target="h200", workers=8)
    groups, ops = _attention_groups(engine)
    tasks = [t for t in engine.data.manifest.schedule.taskgraph.tasks if t.group == groups[0].name]
    partials = [t for t in tasks if t.tile[2] < max(t.tile[2] for t in tasks)]
    assert len(partials) >= 8 and len(tasks) > len(partials)


def _step(executor, token, pos):
    return executor.run({"token": torch.tensor([token]), "pos": torch.tensor([pos])})


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_split_attention_matches_eager(split_engine, eager, backend):
    ex = make_executor(split_engine.data, backend)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (24,), generator=gen).tolist()
    for pos, token in enumerate(tokens):    # crosses a chunk boundary at 16
        out = _step(ex, token, pos)
        ref = eager(torch.tensor([token]), torch.tensor([pos]))
        assert (out["logits"] - ref["logits"]).abs().max().item() <= 1e-4, f"pos {pos}"


def test_chunks_beyond_the_position_are_never_read(split_engine, eager, monkeypatch):
    """Every address the interpreted kernel loads is recorded: no load touches a cache
    slot in a chunk wholly past the position (and the cache there holds NaN, so a
    stray read would also show in the logits)."""
    from triton.runtime import interpreter

    ex = make_executor(split_engine.data, "interpret")
    sched = split_engine.data.manifest.schedule
    forbidden = []
    for b in (b for b in sched.buffers if b.kind == "state"):
        cache = ex.pools[b.pool][b.offset:b.offset + b.type.numel].view(b.type.shape)
        cache[:, CHUNK:] = float("nan")        # [kv heads, positions, head dim]
        for head in cache:
            tail = head[CHUNK:]
            forbidden.append((tail.data_ptr(), tail.data_ptr() + tail.numel() * tail.element_size()))
    loaded = []
    original = interpreter.interpreter_builder.create_masked_load

    def recording_load(ptrs, mask, *args):
        loaded.append(ptrs.data[mask.data].astype("uint64"))
        return original(ptrs, mask, *args)

    monkeypatch.setattr(interpreter.interpreter_builder, "create_masked_load", recording_load)
    for pos, token in enumerate([5, 9, 2, 7]):
        out = _step(ex, token, pos)
        ref = eager(torch.tensor([token]), torch.tensor([pos]))
        assert (out["logits"] - ref["logits"]).abs().max().item() <= 1e-4
    addresses = torch.from_numpy(np.concatenate(loaded).astype("int64"))
    assert addresses.numel() > 0
    for lo, hi in forbidden:
        assert not ((addresses >= lo) & (addresses < hi)).any()


def test_rope_and_appends_sit_next_to_the_projections(split_engine):
    """The value's cache append runs in the v projection's epilogue; the query's RoPE in
    the attention prologue; the key's RoPE and append in one task. No other task
    touches a cache or the rotated query."""
    fused = split_engine.data.manifest.schedule.taskgraph.fused
    ops = fused.graph.by_name()
    for g in fused.groups:
        kinds = [ops[m].kind for m in g.members]
        if "state_update" not in kinds:
            continue
        if g.kind == "matmul":      # v = x @ Wv, appended from registers
            assert ops[g.anchor].kind == "matmul" and kinds.count("state_update") == 1
        else:                       # k * cos + swap_halves(k) * sin, appended
            assert g.kind == "row" and "concat" in kinds and kinds.count("state_update") == 1
    appends = [g for g in fused.groups if any(ops[m].kind == "state_update" for m in g.members)]
    assert sorted(g.kind for g in appends) == ["matmul", "matmul", "row", "row"]
    for g in (g for g in fused.groups if g.kind == "attention"):
        assert any(ops[m].kind == "concat" for m in g.prologue)   # swap_halves(q)


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_bfloat16_split_engine_matches_eager(backend):
    """bf16 weights and activations with fp32 accumulation, against the float32 model:
    no further from it than a small multiple of eager PyTorch's own bf16 error. (Eager
    rounds after every op, the engine keeps fused values in fp32 registers; the tiny
    random model amplifies a one-ulp difference from layer to layer, so an absolute
    bound would say more about the model than about the engine.)"""
    engine = tilec_api.compile(EXAMPLE, workers=3, kv_chunk=CHUNK, dtype="bfloat16")
    cfg = cfgmod.load_config(EXAMPLE)
    eager32, _ = build.build_model(cfg)
    eager16, _ = build.build_model(dataclasses.replace(cfg, dtype="bfloat16"))
    ex = make_executor(engine.data, backend)
    gen = torch.Generator().manual_seed(11)
    engine_err, eager_err = [], []
    for pos, token in enumerate(torch.randint(0, 256, (20,), generator=gen).tolist()):
        args = torch.tensor([token]), torch.tensor([pos])
        truth = eager32(*args)["logits"]
        engine_err.append((_step(ex, token, pos)["logits"].float() - truth).abs().max().item())
        eager_err.append((eager16(*args)["logits"].float() - truth).abs().max().item())
    assert max(engine_err) <= 3 * max(eager_err), (engine_err, eager_err)
    assert max(eager_err) < 0.1 * truth.abs().max().item()   # bf16 noise, not a broken model
