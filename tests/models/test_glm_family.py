"""The DeepSeek families in model.yaml (`family: glm_moe_dsa`, `deepseek_v32`,
`deepseek_v3`: tilec/models/deepseek.py with seeded random weights, configured by
config.json's field names): transformers' defaults, the compiled engine against its
eager twin step by step, the example (examples/glm_dsa_tiny.yaml) through the CLI, and
config errors named by key. The model itself is checked against transformers in
tests/models/test_dsa_hf.py."""
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
from tilec.models.deepseek import DeepseekConfig, DeepseekDecodeStep
from tilec.models.deepseek_hf import FAMILIES, OWN, DeepseekFamily

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "glm_dsa_tiny.yaml"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_empty_config_is_transformers_defaults(family):
    """`{family: glm_moe_dsa}` alone is GLM-5's own shape (78 layers, 256 experts, ...),
    as transformers' GlmMoeDsaConfig() is; likewise V3.2 and V3."""
    transformers = pytest.importorskip("transformers")
    arch = FAMILIES[family]
    ours = DeepseekFamily(arch).from_dict({})
    theirs = getattr(transformers, arch.replace("ForCausalLM", "Config"))()
    for name in OWN[arch]:
        if name == "mlp_layer_types":
            assert [ours.is_moe(i) for i in range(ours.num_hidden_layers)] == \
                [t == "sparse" for t in theirs.mlp_layer_types]
        elif name == "rope_theta":
            assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
        elif name == "indexer_types":
            assert list(ours.indexer_types) == theirs.indexer_types
        else:
            assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.index_rope_interleave == (family == "glm_moe_dsa")
    assert (ours.index_topk is None) == (family == "deepseek_v3")


def test_the_example_builds_with_its_init_scale():
    m, inputs = build_model(load_config(EXAMPLE))
    assert type(m) is DeepseekDecodeStep and m.cfg.index_topk == 4
    assert [type(layer.mlp).__name__ for layer in m.layers] == ["MLP", "MoE"]
    # layer 1 shares layer 0's selection: no indexer of its own
    assert [hasattr(layer.self_attn, "indexer") for layer in m.layers] == [True, False]
    assert [t.dtype for t in inputs] == [torch.int64, torch.int64]
    std = m.layers[0].self_attn.q_a_proj.weight.std().item()
    assert 0.15 < std < 0.25   # initializer_range 0.2, not torch's default init


def test_layers_of_different_kinds_are_not_built_from_two():
    """A [dense, dense, MoE] stack: layers 0 and 1 agree, so building layer 2 from layer
    1 would make it dense; the model's layers repeat from layer 2 only, which leaves
    none to build. With one dense layer and two MoE ones, nor; with four MoE ones, the
    last two are built from the first two."""
    cfg = DeepseekConfig(vocab_size=16, hidden_size=16, intermediate_size=16,
                         moe_intermediate_size=8, num_hidden_layers=3, num_attention_heads=2,
                         kv_lora_rank=8, q_lora_rank=8, qk_nope_head_dim=8,
                         qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_group=1,
                         topk_group=1, num_experts_per_tok=2, first_k_dense_replace=2)
    from tilec.compiler.layers import declared_layers

    assert DeepseekDecodeStep(cfg, 8).repeated_from == 2
    assert declared_layers(DeepseekDecodeStep(cfg, 8)) is None
    one_dense = DeepseekDecodeStep(DeepseekConfig(**{**cfg.__dict__,
                                                     "first_k_dense_replace": 1}), 8)
    assert one_dense.repeated_from == 1 and declared_layers(one_dense) is None
    longer = DeepseekDecodeStep(DeepseekConfig(**{**cfg.__dict__,
                                                  "num_hidden_layers": 6}), 8)
    assert (declared_layers(longer).first, declared_layers(longer).count) == (2, 6)


def eager_greedy(m, prompt: list[int], new: int) -> list[int]:
    m.reset_cache()
    tokens = list(prompt)
    for pos in range(len(prompt) + new - 1):
        out = m(torch.tensor([tokens[pos]]), torch.tensor([pos]))
        if pos >= len(prompt) - 1:
            tokens.append(int(out["next_token"]))
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def example_engine(tmp_path_factory):
    """`tilec compile examples/glm_dsa_tiny.yaml -o glm.engine`, once for the module."""
    path = tmp_path_factory.mktemp("glm") / "glm.engine"
    assert main(["compile", str(EXAMPLE), "-o", str(path)]) == 0
    return path


@torch.no_grad()
def test_the_example_compiles_and_generates(example_engine, capsys, monkeypatch):
    """Past index_topk (4): the prompt and the new tokens fill 11 positions. The eager
    twin breaks top-k ties as tilec does (the lowest position first): random weights
    give the indexer tied scores (zero where every head's ReLU is zero)."""
    path = example_engine
    capsys.readouterr()
    prompt = [5, 77, 130, 9, 31, 200, 64, 8]   # longer than index_topk
    assert main(["run", str(path), "--prompt-ids", ",".join(map(str, prompt)),
                 "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m, _ = build_model(load_config(EXAMPLE))
    monkeypatch.setattr(torch, "topk", lowest_index_topk)
    assert out["new_tokens"] == eager_greedy(m, prompt, 4)
    engine = tilec_api.load(str(path))
    assert engine.generate(prompt, 4, backend="reference").tokens == out["new_tokens"]


@pytest.mark.slow
def test_the_example_runs_with_the_cli_defaults(example_engine, capsys):
    """`tilec compile examples/glm_dsa_tiny.yaml -o x && tilec run x`: 16 greedy steps,
    past index_topk (4), where the indexer starts dropping cached tokens."""
    capsys.readouterr()
    assert main(["run", str(example_engine)]) == 0
    assert "generated 16 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("config, message", [
    ({"index_topk": 0}, "model.config: index_topk: expected a positive integer, found 0"),
    ({"index_heads": 2}, "model.config: unknown glm_moe_dsa config key 'index_heads' "
                         "(did you mean 'index_n_heads'?)"),
    ({"qk_rope_head_dim": 7}, "model.config: qk_rope_head_dim: must be even"),
    ({"initializer_range": "big"}, "model.config: initializer_range: expected a positive number"),
    ({"indexer_types": ["shared"] * 78}, "model.config: indexer_types: layer 0 is 'shared'"),
    ({"indexer_types": ["full"] * 3}, "model.config: indexer_types: 3 entries for 78 layers"),
    ({"num_key_value_heads": 8}, "model.config: num_key_value_heads: 8 is not supported"),
])
def test_config_errors_name_the_key(tmp_path, config, message):
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps({"model": {"family": "glm_moe_dsa", "config": config}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1
