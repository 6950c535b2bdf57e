"""The mla_dsa reference model (tilec/models/mla_dsa.py) against the equations it is
written from: the absorbed decode attention equals MLA computed the explicit way (keys
and values decompressed per token), the indexer keeps exactly the top-k positions by
its own score, and with top-k at least the sequence, sparse attention is dense. Then
the compiled engine against it, step by step and in greedy generation, and the family
in model.yaml (examples/glm_dsa_tiny.yaml)."""
import json
from pathlib import Path

import pytest
import torch

import tilec.api as tilec_api
from engines import lowest_index_topk
from tilec.cli import main
from tilec.compiler.build import build_model
from tilec.compiler.config import load_config
from tilec.errors import ConfigError
from tilec.models.llama import init_random
from tilec.models.mla_dsa import (MlaDsaConfig, MlaDsaDecodeStep, explicit_attention,
                                  rope_tables)

MAX_SEQ = 24


def model(seed=0, **overrides):
    m = MlaDsaDecodeStep(MlaDsaConfig(**overrides), MAX_SEQ).eval()
    init_random(list(m.named_parameters()), seed, std=0.2)   # large: varied scores
    return m


def layer_inputs(m, token, pos):
    """What layer 0 sees at this step: its normed input, positions and RoPE tables."""
    p = torch.tensor([pos])
    cos, sin = rope_tables(m.inv_freq, p)
    x = m.layers[0].input_layernorm(m.embed_tokens(torch.tensor([token])))
    return x, p, m.positions, cos, sin


@torch.no_grad()
@pytest.mark.parametrize("topk", [4, 8, 64])
def test_absorbed_attention_equals_explicit_mla(topk):
    m = model(index_topk=topk)
    tokens = torch.randint(0, 256, (14,), generator=torch.Generator().manual_seed(topk)).tolist()
    layer = m.layers[0]
    for pos, token in enumerate(tokens):
        args = layer_inputs(m, token, pos)
        absorbed = layer.attention(*args)
        explicit = explicit_attention(layer, *args)
        assert (absorbed - explicit).abs().max().item() <= 1e-4 * max(1.0, explicit.abs().max().item()), pos


@torch.no_grad()
def test_indexer_keeps_the_top_k_positions_by_its_score():
    m = model(index_topk=5)
    layer = m.layers[0]
    c = m.cfg
    for pos, token in enumerate([3, 1, 4, 1, 5, 9, 2, 6, 5, 3]):
        x, p, positions, cos, sin = layer_inputs(m, token, pos)
        layer.attention(x, p, positions, cos, sin)       # appends this token's index key
        c_q, _, _ = layer.queries(x, cos, sin)
        kept = (layer.indexer(c_q, x, p, positions) == 0).nonzero().flatten()
        # the score from the equation: I_s = sum_j w_j ReLU(q_j . k_s), s <= pos
        q = layer.indexer.index_q_proj(c_q).view(c.index_n_heads, c.index_head_dim)
        w = layer.indexer.index_weights_proj(x).view(-1)
        keys = layer.indexer.index_cache[:pos + 1]
        score = (w[:, None] * torch.relu(q @ keys.T)).sum(0)
        expected = torch.topk(score, min(5, pos + 1)).indices.sort().values
        assert kept.tolist() == expected.tolist(), pos


@torch.no_grad()
def test_topk_beyond_the_sequence_is_dense_attention():
    sparse, dense = model(index_topk=4), model(index_topk=MAX_SEQ)
    gen = torch.Generator().manual_seed(1)
    differs = False
    for pos, token in enumerate(torch.randint(0, 256, (12,), generator=gen).tolist()):
        a = sparse(torch.tensor([token]), torch.tensor([pos]))["logits"]
        b = dense(torch.tensor([token]), torch.tensor([pos]))["logits"]
        if pos < 4:   # at most 4 tokens cached: top-4 keeps them all
            assert torch.equal(a, b), pos
        differs |= not torch.allclose(a, b, atol=1e-3)
    assert differs   # later steps drop tokens, and that shows in the logits


# ---- compiled ---------------------------------------------------------------------------
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "glm_dsa_tiny.yaml"
SPARSE = {"num_hidden_layers": 1, "index_topk": 3, "index_n_heads": 4}
BACKENDS = ("reference", "interpret")


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """A one-layer model whose attention keeps 3 cached tokens, built from model.yaml
    (a decoder engine: it generates), and its eager twin (the same seeded weights)."""
    path = tmp_path_factory.mktemp("mla_dsa") / "sparse.yaml"
    path.write_text(json.dumps({
        "model": {"family": "mla_dsa", "max_seq_len": MAX_SEQ,
                  "config": {**SPARSE, "initializer_range": 0.2}},
        "target": {"name": "cpu", "workers": 2}}))
    m, _ = build_model(load_config(path))
    return m, tilec_api.compile(str(path))


def watch_ties(monkeypatch) -> list:
    """Records each eager top-k that had to choose among equal finite scores at its k-th
    place: torch leaves that choice open, so a comparison there would test torch's
    choice, not tilec's engine."""
    ties = []
    topk = torch.topk

    def watched(x, k, *args, **kwargs):
        out = topk(x, k, *args, **kwargs)
        kth = out.values[-1]
        if kth > float("-inf") and (x == kth).sum() > (out.values == kth).sum():
            ties.append(x)
        return out
    monkeypatch.setattr(torch, "topk", watched)
    return ties


def eager_greedy(m, prompt: list[int], new: int) -> list[int]:
    m.reset_cache()
    tokens = list(prompt)
    for pos in range(len(prompt) + new - 1):
        out = m(torch.tensor([tokens[pos]]), torch.tensor([pos]))
        if pos >= len(prompt) - 1:
            tokens.append(int(out["next_token"]))
    return tokens[len(prompt):]


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_matches_eager_step_by_step(sparse, backend, monkeypatch):
    """Logits and the next token at every step, including the steps past index_topk
    where attention drops cached tokens. The tokens are distinct: a repeated token has
    the same index key in layer 0 (the indexer applies no RoPE), so equal scores."""
    m, engine = sparse
    m.reset_cache()
    ties = watch_ties(monkeypatch)
    tokens = torch.randperm(256, generator=torch.Generator().manual_seed(5))[:8].tolist()
    for pos, token in enumerate(tokens):
        inputs = {"token": torch.tensor([token]), "pos": torch.tensor([pos])}
        out = engine.run(backend=backend, **inputs)
        want = m(**inputs)
        err = (out["logits"] - want["logits"]).abs().max().item()
        assert err <= 1e-3, (pos, err)
        assert torch.equal(out["next_token"], want["next_token"]), pos
    assert not ties, "eager chose among tied scores: pick other tokens"
    assert len(tokens) > SPARSE["index_topk"] + 2   # several steps drop cached tokens


@torch.no_grad()
def test_greedy_generation_matches_eager(sparse, monkeypatch):
    """Generated text repeats tokens, hence ties in the indexer's scores: the eager twin
    breaks them as tilec does (the lowest position first)."""
    m, engine = sparse
    monkeypatch.setattr(torch, "topk", lowest_index_topk)
    prompt = [5, 77, 130]
    want = eager_greedy(m, prompt, 6)
    for backend in BACKENDS:
        assert engine.generate(prompt, 6, backend=backend).tokens == want, backend


@torch.no_grad()
def test_the_example_compiles_and_generates(tmp_path, capsys, monkeypatch):
    path = tmp_path / "glm.engine"
    assert main(["compile", str(EXAMPLE), "-o", str(path)]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--prompt-ids", "1,2", "--max-new-tokens", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m, _ = build_model(load_config(EXAMPLE))
    monkeypatch.setattr(torch, "topk", lowest_index_topk)
    assert out["new_tokens"] == eager_greedy(m, [1, 2], 3)


@pytest.mark.slow
def test_the_example_runs_with_the_cli_defaults(tmp_path, capsys):
    """`tilec compile examples/glm_dsa_tiny.yaml -o x && tilec run x`: 16 greedy steps,
    past index_topk (8), where the indexer starts dropping cached tokens."""
    path = tmp_path / "glm.engine"
    assert main(["compile", str(EXAMPLE), "-o", str(path)]) == 0
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    assert "generated 16 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("config, message", [
    ({"index_topk": 0}, "model.config: index_topk: expected a positive integer, found 0"),
    ({"index_heads": 2}, "model.config: unknown mla_dsa config key 'index_heads'"),
    ({"qk_rope_head_dim": 7}, "model.config: qk_rope_head_dim: must be even"),
    ({"initializer_range": "big"}, "model.config: initializer_range: expected a positive number"),
])
def test_config_errors_name_the_key(tmp_path, config, message):
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps({"model": {"family": "mla_dsa", "config": config}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_the_family_builds_with_its_init_scale():
    cfg = load_config(EXAMPLE)
    m, inputs = build_model(cfg)
    assert type(m).__name__ == "MlaDsaDecodeStep" and m.cfg.index_topk == 8
    assert [t.dtype for t in inputs] == [torch.int64, torch.int64]
    std = m.layers[0].q_a_proj.weight.std().item()
    assert 0.15 < std < 0.25   # initializer_range 0.2, not torch's default init
