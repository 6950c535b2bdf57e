"""The mla_dsa reference model (tilec/models/mla_dsa.py) against the equations it is
written from: the absorbed decode attention equals MLA computed the explicit way (keys
and values decompressed per token), the indexer keeps exactly the top-k positions by
its own score, and with top-k at least the sequence, sparse attention is dense. Then
what tilec says when asked to compile it today."""
import pytest
import torch

import tilec.api as tilec_api
from tilec.errors import UnsupportedOpError
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
        kept = (layer.indexer_selection(c_q, x, p, positions) == 0).nonzero().flatten()
        # the score from the equation: I_s = sum_j w_j ReLU(q_j . k_s), s <= pos
        q = layer.index_q_proj(c_q).view(c.index_n_heads, c.index_head_dim)
        w = layer.index_weights_proj(x).view(-1)
        keys = layer.index_cache[:pos + 1]
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


def test_compiling_it_names_the_operator_tilec_lacks():
    """Not compiled yet: the frontend stops at the first ATen op it cannot lower, the
    indexer's top-k, with one line naming it and the model's source line (torch.export
    records module forward frames only, so the line is the call into the helper)."""
    m = model()
    with pytest.raises(UnsupportedOpError) as info:
        tilec_api.compile(m, (torch.tensor([1]), torch.tensor([0])))
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "aten.topk" in message and "mla_dsa.py:" in message
