"""The Hugging Face decoders besides Llama (tilec/models/architectures.py) against
transformers: tiny random checkpoints written by transformers' own save_pretrained,
compiled through `hf:`, 16 greedy tokens equal to generate(do_sample=False) and logits
within 1e-3 (float32), on both CPU executors; each architecture's own fields honoured
or refused by name."""
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tilec.api as tilec_api
from tilec.errors import ConfigError
from tilec.models.hf import load_checkpoint

from test_llama_hf import NEW_TOKENS, compare, hf_greedy
from test_llama_hf_fields import eager_logits, randomize

PROMPT = [3, 1, 4, 1, 5]
SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5)
GPT2_SIZES = dict(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                  bos_token_id=1, eos_token_id=2)
OPT_SIZES = dict(vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=32)
OWN_SIZES = {"GPT2": GPT2_SIZES, "OPT": OPT_SIZES}

# name: (transformers class prefix, config fields beyond SIZES). The windows are shorter
# than the 21 positions a test runs, so they hide keys. One layer where one shows what
# differs (the interpreter takes about 1.5 s per layer and token).
CASES = {
    "qwen2": ("Qwen2", dict(num_hidden_layers=1)),
    "qwen2_window": ("Qwen2", dict(use_sliding_window=True, sliding_window=6,
                                   max_window_layers=1)),
    "qwen3": ("Qwen3", dict(head_dim=16, attention_bias=True, num_hidden_layers=1)),
    "mistral_window": ("Mistral", dict(sliding_window=8, num_hidden_layers=1)),
    # sliding layer 0, full layer 1; caps small enough to bend these scores and logits
    "gemma2": ("Gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                              attn_logit_softcapping=2.0, final_logit_softcapping=5.0)),
    # Gemma 3: q/k norms, layer 0 sliding with its own RoPE base, layer 1 full
    "gemma3": ("Gemma3Text", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                                  sliding_window_pattern=2, rope_parameters={
                                      "full_attention": {"rope_type": "default",
                                                         "rope_theta": 1e6},
                                      "sliding_attention": {"rope_type": "linear",
                                                            "factor": 2.0, "rope_theta": 100.0}})),
    # fused qkv and gate_up; RoPE on half of each head; a window over all layers
    "phi3": ("Phi3", dict(num_hidden_layers=1, partial_rotary_factor=0.5, sliding_window=7,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # LayerNorms, an ungated MLP, parallel residual, q/k/v fused head by head, RoPE on
    # a quarter of each head (its default)
    # learned positions, Conv1D matrices stored [in, out], fused c_attn; layer 1's
    # scores scaled by a further 1/2
    "gpt2": ("GPT2", dict(scale_attn_by_inverse_layer_idx=True)),
    "gpt_neox": ("GPTNeoX", dict(num_hidden_layers=1, num_key_value_heads=None,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # learned positions read two rows on (OPT's offset), LayerNorms, ReLU, biases; token
    # embeddings 48 wide, projected in and out
    "opt": ("OPT", dict(word_embed_proj_dim=48)),
    # OPT-350m's post-norm layers without a final norm; norms without weight and bias,
    # projections without biases, another activation
    "opt_post_norm": ("OPT", dict(num_hidden_layers=1, do_layer_norm_before=False,
                                  layer_norm_elementwise_affine=False, enable_bias=False,
                                  activation_function="gelu")),
}


def build(prefix, seed=0, **fields):
    """A tiny `prefix`ForCausalLM with test_llama_hf_fields' weights."""
    sizes = OWN_SIZES.get(prefix, SIZES)
    cfg = getattr(transformers, f"{prefix}Config")(**{**sizes, **fields})
    torch.manual_seed(seed)
    name = "GPT2LMHeadModel" if prefix == "GPT2" else f"{prefix.removesuffix('Text')}ForCausalLM"
    model = getattr(transformers, name)(cfg).eval()
    randomize(model, seed)
    return model


def save(folder, prefix, seed=0, **fields):
    """build()'s model, saved as a checkpoint in `folder`."""
    model = build(prefix, seed, **fields)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    prefix, fields = CASES[request.param]
    folder = tmp_path_factory.mktemp("ckpt") / request.param
    model = save(folder, prefix, **fields)
    yaml_path = folder.parent / f"{request.param}.yaml"
    yaml_path.write_text(json.dumps({"model": {"hf": request.param, "max_seq_len": 32},
                                     "dtype": "float32", "target": "cpu"}))
    return request.param, model, yaml_path


def test_engine_matches_transformers(checkpoint):
    """Compiled (2 workers, keys in chunks of 16), on both CPU executors."""
    name, model, yaml_path = checkpoint
    engine = tilec_api.compile(str(yaml_path), workers=2, kv_chunk=16)
    ref_tokens, ref_logits = hf_greedy(model, PROMPT)
    for backend in ("reference", "interpret"):
        g = engine.generate(PROMPT, NEW_TOKENS, backend=backend, logits=True,
                            stop_at_eos=False)
        assert len(g.tokens) == NEW_TOKENS
        compare(g.tokens, g.logits, ref_tokens, ref_logits)


@pytest.mark.parametrize("name, prefix, fields, without", [
    ("qwen2_window", "Qwen2", CASES["qwen2_window"][1], dict(use_sliding_window=False)),
    ("mistral_window", "Mistral", CASES["mistral_window"][1], dict(sliding_window=None)),
    ("qwen3_norms", "Qwen3", CASES["qwen3"][1], None),
    ("gemma2_caps", "Gemma2", CASES["gemma2"][1],
     dict(attn_logit_softcapping=None, final_logit_softcapping=None)),
    ("gemma2_window", "Gemma2", CASES["gemma2"][1], dict(sliding_window=32)),
    ("gemma3_local_rope", "Gemma3Text", CASES["gemma3"][1], dict(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}})),
    ("phi3_partial", "Phi3", CASES["phi3"][1], dict(partial_rotary_factor=1.0)),
    ("gpt2_layer_scale", "GPT2", CASES["gpt2"][1], dict(scale_attn_by_inverse_layer_idx=False)),
    ("gpt_neox_sequential", "GPTNeoX", CASES["gpt_neox"][1], dict(use_parallel_residual=False)),
    ("opt_post_norm", "OPT", CASES["opt_post_norm"][1], dict(do_layer_norm_before=True)),
    ("opt_final_norm", "OPT", CASES["opt"][1], dict(_remove_final_layer_norm=True)),
])
def test_what_differs_from_llama_matters(tmp_path, name, prefix, fields, without):
    """tilec's module follows transformers, and the architecture's own part moves the
    logits (the same weights without it answer differently), so the test above can
    fail on it."""
    hf = save(tmp_path / name, prefix, **fields)
    ours = load_checkpoint(tmp_path / name, max_seq_len=32)
    want = hf_greedy(hf, PROMPT)[1]
    assert (eager_logits(ours, PROMPT, NEW_TOKENS) - want).abs().max().item() < 1e-4
    if without is None:   # Qwen3: the q/k norms at one instead of their weights
        with torch.no_grad():
            for layer in ours.layers:
                layer.q_norm.weight.fill_(1.0)
                layer.k_norm.weight.fill_(1.0)
        other = eager_logits(ours, PROMPT, NEW_TOKENS)
    else:
        other = hf_greedy(save(tmp_path / "other", prefix, **{**fields, **without}), PROMPT)[1]
    assert (other - want).abs().max().item() > 1e-2


def edit(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("case, changes, message", [
    ("qwen2", dict(attention_bias=True), "attention_bias: True is not supported by tilec's "
                                         "Qwen2ForCausalLM"),
    ("mistral_window", dict(layer_types=["full_attention"]), "layer_types"),
    ("qwen2", dict(layer_types=["sliding_attention"]),
     "layer_types: names sliding_attention layers but there is no sliding_window"),
    ("qwen3", dict(layer_types=["full_attention"] * 2), "layer_types: expected a list of 1"),
    ("mistral_window", dict(sliding_window=0), "sliding_window: expected a positive integer"),
    ("qwen2", dict(model_type="llama"), "model_type: 'llama' is not supported with "
                                        "Qwen2ForCausalLM (expected 'qwen2')"),
    ("qwen3", dict(max_window_layers=-1, layer_types=None), "max_window_layers"),
    ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                    "partial_rotary_factor": 0.5}),
     "rope_parameters.partial_rotary_factor: 0.5 is not supported"),
    ("phi3", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "original_max_position_embeddings: 4096 is not supported with rope_type 'linear'"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention: True"),
    ("gpt2", dict(rope_theta=1e4), "rope_theta: 10000.0 is not supported by tilec's "
                                   "GPT2LMHeadModel"),
    ("gpt2", dict(add_cross_attention=True), "add_cross_attention: only false"),
    ("gemma3", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
     "rope_parameters: expected one mapping per layer type"),
    ("gemma2", dict(hidden_act="silu"), "hidden_act: 'silu' is not supported by tilec's "
                                        "Gemma2ForCausalLM"),
    ("opt", dict(do_layer_norm_before=1), "do_layer_norm_before: expected true or false"),
    ("opt", dict(layer_norm_eps=1e-6), "layer_norm_eps: 1e-06 is not supported by tilec's "
                                       "OPTForCausalLM"),
    ("opt", dict(activation_function="quick_gelu"), "hidden_act: 'quick_gelu' is not supported"),
])
def test_refused_fields_are_named(tmp_path, case, changes, message):
    prefix, fields = CASES[case]
    save(tmp_path / "c", prefix, **fields)
    edit(tmp_path / "c", **changes)
    with pytest.raises(ConfigError, match="config.json: " + re.escape(message)):
        load_checkpoint(tmp_path / "c", max_seq_len=32)


def test_defaults_are_the_architectures(tmp_path):
    """A config.json without a field means transformers' default for that architecture
    (Qwen3's head_dim 128, Mistral's 8 kv heads), not Llama's."""
    save(tmp_path / "q", "Qwen3", **CASES["qwen3"][1])
    data = json.loads((tmp_path / "q" / "config.json").read_text())
    assert data.pop("head_dim") == 16
    (tmp_path / "q" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"q_proj.weight has shape \(64, 64\), config.json "
                                          r"implies \(512, 64\)"):
        load_checkpoint(tmp_path / "q", max_seq_len=32)


def test_every_tensor_is_consumed(tmp_path):
    """Qwen2's q/k/v biases are read; a bias it has no place for is refused by name."""
    from safetensors.torch import load_file, save_file

    save(tmp_path / "c", "Qwen2")
    ours = load_checkpoint(tmp_path / "c", max_seq_len=32)
    assert ours.layers[0].q_proj.bias.abs().sum() > 0
    path = tmp_path / "c" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.ones(64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="o_proj.bias .* would be ignored"):
        load_checkpoint(tmp_path / "c", max_seq_len=32)
