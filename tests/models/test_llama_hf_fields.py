"""Every config.json field of a Hugging Face Llama checkpoint is honoured (same logits as
transformers) or refused with the field and its value named; every tensor in the
checkpoint is consumed or refused by name. Checkpoints are written by transformers'
own save_pretrained from tiny random configs."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tilec.api as tilec_api
from tilec.cli import main
from tilec.errors import ConfigError
from tilec.models.hf import load_checkpoint

from engines import eager_greedy
from test_llama_hf import compare, hf_greedy

PROMPT = [3, 1, 4, 1, 5]
NEW = 12


def save(folder, seed=0, **fields):
    """A tiny Llama with `fields` saved by transformers; weights larger than HF's init so
    the fields under test move the logits well above the float32 noise."""
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               rms_norm_eps=1e-5)
    cfg.update(fields)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    return model


def randomize(model, seed):
    """Weights larger than HF's init (norms near one): greedy choices are not near-ties
    and every tensor moves the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name   # (GPT-2: ln_1, ln_2, ln_f)
            base, scale = (1.0, 0.1) if is_norm and name.endswith("weight") else (0.0, 0.15)
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))


def edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def eager_logits(model, prompt, new):
    """tilec's Llama module, one token per call, greedy: the logits of each new token."""
    return eager_greedy(model, prompt, new)[1]


def rope(kind, **params):
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 500.0, **params}}


HONOURED = {
    "hidden_act_gelu_pytorch_tanh": dict(hidden_act="gelu_pytorch_tanh"),
    "hidden_act_gelu": dict(hidden_act="gelu"),
    "hidden_act_gelu_new": dict(hidden_act="gelu_new"),
    "hidden_act_relu": dict(hidden_act="relu"),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "rope_linear": rope("linear", factor=2.0),
    "rope_dynamic": rope("dynamic", factor=2.0),     # max_seq_len within 64: fixed frequencies
    "rope_yarn": rope("yarn", factor=4.0, original_max_position_embeddings=16),
    "rope_yarn_mscale": rope("yarn", factor=4.0, original_max_position_embeddings=16,
                             mscale=0.7, mscale_all_dim=1.0, beta_fast=16, beta_slow=2,
                             truncate=False),
    "rope_longrope": rope("longrope", original_max_position_embeddings=32,
                          short_factor=[1.0 + 0.1 * i for i in range(8)],
                          long_factor=[2.0 + i for i in range(8)]),
    "rope_llama3": rope("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=16),
}


@pytest.mark.parametrize("name", sorted(HONOURED))
def test_honoured_field_matches_transformers(tmp_path, name):
    hf = save(tmp_path / name, **HONOURED[name])
    ours = load_checkpoint(tmp_path / name, max_seq_len=32)
    got = eager_logits(ours, PROMPT, NEW)
    want = hf_greedy(hf, PROMPT)[1][:NEW]
    assert (got - want).abs().max().item() < 1e-4
    if name != "rope_dynamic":   # (dynamic is the default up to max_position_embeddings)
        # the field matters here: the same weights without it answer differently
        plain = save(tmp_path / "plain", **rope("default"))
        assert (hf_greedy(plain, PROMPT)[1][:NEW] - want).abs().max().item() > 1e-2


def test_transformers4_rope_fields(tmp_path):
    """4.x writes rope_theta and rope_scaling ({type: ...}) at the top level."""
    hf = save(tmp_path / "c", **rope("linear", factor=2.0))
    edit_config(tmp_path / "c", rope_parameters=None, rope_theta=500.0,
                rope_scaling={"type": "linear", "factor": 2.0})
    got = eager_logits(load_checkpoint(tmp_path / "c", max_seq_len=32), PROMPT, NEW)
    assert (got - hf_greedy(hf, PROMPT)[1][:NEW]).abs().max().item() < 1e-4


def test_engine_honours_fields(tmp_path):
    """Compiled, on both CPU backends: an activation, both bias flags and YaRN at once."""
    fields = dict(hidden_act="gelu_pytorch_tanh", attention_bias=True, mlp_bias=True,
                  **rope("yarn", factor=4.0, original_max_position_embeddings=16))
    hf = save(tmp_path / "ckpt", **fields)
    (tmp_path / "m.yaml").write_text(json.dumps(
        {"model": {"hf": "ckpt", "max_seq_len": 32}, "dtype": "float32", "target": "cpu"}))
    engine = tilec_api.compile(str(tmp_path / "m.yaml"), workers=3, kv_chunk=16)
    ref_tokens, ref_logits = hf_greedy(hf, PROMPT)
    for backend, new in (("reference", NEW), ("interpret", 4)):
        g = engine.generate(PROMPT, new, backend=backend, logits=True, stop_at_eos=False)
        compare(g.tokens, g.logits, ref_tokens[:new], ref_logits[:new])


REFUSED = {
    # name: (config.json changes, the error's words)
    "hidden_act": (dict(hidden_act="gelu_fast"),
                   "config.json: hidden_act: 'gelu_fast' is not supported by tilec's Llama "
                   "(supported: silu, swish, gelu, gelu_pytorch_tanh, gelu_new, relu)"),
    "unknown_field": (dict(sliding_window=16), "config.json: sliding_window: 16 is not supported"),
    "quantization": (dict(quantization_config={"quant_method": "awq"}),
                     "config.json: quantization_config: {'quant_method': 'awq'} is not supported"),
    "model_type": (dict(model_type="qwen2"), "config.json: model_type: 'qwen2' is not supported"),
    "rope_type": (rope("proportional"), "rope_type 'proportional' is not supported"),
    "rope_key": (rope("linear", factor=2.0, beta_fast=3),
                 "rope_parameters: 'beta_fast' is not supported with rope_type 'linear'"),
    "rope_missing_key": (rope("llama3", factor=8.0),
                         "rope_parameters.low_freq_factor: required for rope_type llama3"),
    "rope_value": (rope("yarn", factor="x", original_max_position_embeddings=16),
                   "rope_parameters.factor: expected a positive number, found 'x'"),
    "longrope_lengths": (rope("longrope", original_max_position_embeddings=32,
                              short_factor=[1.0] * 3, long_factor=[1.0] * 8),
                         "rope_parameters.short_factor: expected 8 numbers (one per "
                         "frequency: the rotary dims / 2)"),
    "partial_rotary": (rope("default", partial_rotary_factor=0.5),
                       "partial_rotary_factor: 0.5 is not supported"),
    "dynamic_past_max_positions": (dict(max_position_embeddings=16, **rope("dynamic", factor=2.0)),
                                   "rope_type 'dynamic' changes its frequencies past "
                                   "max_position_embeddings 16"),
    "bias_flag_type": (dict(mlp_bias="yes"), "mlp_bias: expected true or false, found 'yes'"),
    # the checkpoint has q/k/v/o biases that config.json does not announce
    "extra_tensor": (dict(attention_bias=False),
                     "tensor model.layers.0.self_attn.k_proj.bias (32,) would be ignored"),
}


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    folder = tmp_path_factory.mktemp("biased") / "ckpt"
    save(folder, attention_bias=True)
    return folder


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_field(biased, tmp_path, capsys, name):
    changes, message = REFUSED[name]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in biased.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    edit_config(folder, **changes)
    (tmp_path / "m.yaml").write_text(json.dumps({"model": {"hf": "ckpt", "max_seq_len": 32}}))
    code = main(["compile", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "e.bin")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "Traceback" not in err, err
    assert message in err[-1], err   # (the lines above it name the yaml being compiled)
    assert not (tmp_path / "e.bin").exists()


def test_tied_lm_head_stored_anyway(tmp_path):
    """A tied checkpoint that stores lm_head.weight too: consumed if it is the embedding,
    refused if it differs (transformers would tie it and drop it)."""
    from safetensors.torch import load_file, save_file

    hf = save(tmp_path / "c", tie_word_embeddings=True)
    path = tmp_path / "c" / "model.safetensors"
    tensors = load_file(path)
    embed = tensors["model.embed_tokens.weight"]
    save_file({**tensors, "lm_head.weight": embed.clone()}, path, metadata={"format": "pt"})
    got = eager_logits(load_checkpoint(tmp_path / "c", max_seq_len=32), PROMPT, NEW)
    assert (got - hf_greedy(hf, PROMPT)[1][:NEW]).abs().max().item() < 1e-4
    save_file({**tensors, "lm_head.weight": embed + 1}, path, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="tensor lm_head.weight .* differs from what this "
                                          "config.json implies"):
        load_checkpoint(tmp_path / "c", max_seq_len=32)


def test_family_form_takes_the_same_fields(tmp_path):
    """model: {family: llama, config: ...} honours and refuses what config.json does."""
    from tilec.compiler.config import load_config

    config = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, hidden_act="gelu_pytorch_tanh",
                  rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 16})
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps({"model": {"family": "llama", "config": config}}))
    assert load_config(path).model.config["hidden_act"] == "gelu_pytorch_tanh"
    path.write_text(json.dumps({"model": {"family": "llama", "config": dict(
        config, rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta": 2})}}))
    with pytest.raises(ConfigError, match="model.config: rope_scaling: 'beta' is not "
                                          "supported with rope_type 'yarn'"):
        load_config(path)
