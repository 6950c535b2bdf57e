"""A DeepseekV3ForCausalLM checkpoint (config.json + safetensors, as transformers 5.x
saves it) as tilec's DeepseekDecodeStep (tilec/models/deepseek.py).

Every config.json field is honoured, metadata (hf.METADATA and METADATA here), or
refused by name; every checkpoint tensor is consumed or refused.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from tilec.errors import ConfigError
from tilec.limits import short_repr
from tilec.models.deepseek import DeepseekConfig, DeepseekDecodeStep
from tilec.models.rope import check_rope_scaling

# config.json fields that are DeepseekConfig's own
OWN = tuple(f for f in DeepseekConfig.__dataclass_fields__
            if f not in ("initializer_range", "rope_scaling"))
# fields honoured by checking them against what tilec computes
CHECKED = ("head_dim", "qk_head_dim", "num_key_value_heads", "attention_bias", "rope_theta",
           "rope_scaling", "rope_parameters", "topk_method", "scoring_func", "moe_layer_freq")
FIELDS = ("architectures", "model_type") + OWN + CHECKED
METADATA = {
    "num_nextn_predict_layers": "multi-token-prediction modules: transformers' greedy "
                                "generate() does not use them (tilec refuses their tensors)",
    "num_mtp_layers": "multi-token-prediction modules: transformers' greedy generate() does "
                      "not use them (tilec refuses their tensors)",
    "output_router_logits": "a transformers forward option (what it returns)",
    "ep_size": "the expert-parallel split of training: the same function with any value",
}


def deepseek_config(data: dict, path: str) -> DeepseekConfig:
    """config.json's fields (known to be honoured or metadata) as a DeepseekConfig."""
    def refuse(key: str, value, why: str):
        raise ConfigError(f"{path}: {key}: {short_repr(value)} is not supported by tilec's "
                          f"DeepseekV3ForCausalLM ({why})")

    cfg = {k: data[k] for k in OWN if k in data}
    heads = data.get("num_attention_heads", DeepseekConfig.num_attention_heads)
    rope_dim = data.get("qk_rope_head_dim", DeepseekConfig.qk_rope_head_dim)
    nope = data.get("qk_nope_head_dim", DeepseekConfig.qk_nope_head_dim)
    expect = {"head_dim": rope_dim, "qk_head_dim": _sum(nope, rope_dim),
              "num_key_value_heads": heads, "attention_bias": False,
              "topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1}
    for key, wanted in expect.items():
        if data.get(key) is not None and data[key] != wanted:
            refuse(key, data[key], f"supported: {wanted!r}, what the other fields imply")
    rope = data.get("rope_scaling") or data.get("rope_parameters")
    rope_key = "rope_scaling" if data.get("rope_scaling") else "rope_parameters"
    if "rope_theta" in data:
        cfg["rope_theta"] = data["rope_theta"]
    if rope is not None:
        if not isinstance(rope, dict):
            refuse(rope_key, rope, "expected a mapping")
        rope = dict(rope)
        if "rope_theta" in rope:
            cfg["rope_theta"] = rope.pop("rope_theta")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            refuse(f"{rope_key}.partial_rotary_factor", rope["partial_rotary_factor"],
                   "DeepSeek rotates all qk_rope_head_dim dims: 1.0 only")
        if kind == "yarn":
            check_rope_scaling(rope, path, rope_key, rope_dim // 2 if isinstance(rope_dim, int)
                               else None)
            cfg["rope_scaling"] = {"rope_type": "yarn", **{
                k: v for k, v in rope.items() if k not in ("rope_type", "type")}}
        elif kind != "default" or set(rope) - {"rope_type", "type"}:
            refuse(rope_key, data[rope_key], "rope types default and yarn only")
    return DeepseekConfig.from_dict(cfg, path)


def _sum(a, b):
    return a + b if isinstance(a, int) and isinstance(b, int) else None


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def load_deepseek(cfg: DeepseekConfig, files: dict[str, Path], tensors,
                  max_seq_len: int) -> DeepseekDecodeStep:
    """The model with the checkpoint's tensors: a parameter's own tensor, or for the
    stacked expert pools one tensor per expert (`mlp.experts.J.gate_proj.weight`, as
    transformers saves them)."""
    model = DeepseekDecodeStep(cfg, max_seq_len)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for key in sorted(files):
        target, rows = _target(key, cfg)
        if target not in params or rows is not None and rows >= params[target].shape[0]:
            raise ConfigError(f"{files[key].name}: tensor {key} would be ignored: tilec's "
                              f"DeepseekV3ForCausalLM with this config.json has no such tensor")
        tensor = tensors.get(key)
        if not tensor.is_floating_point():
            raise ConfigError(f"{files[key].name}: tensor {key} has dtype {tensor.dtype}, "
                              f"expected a floating-point type (quantized weights are not "
                              f"supported)")
        param = params[target]
        dest = param[rows] if rows is not None else param
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ConfigError(f"{files[key].name}: tensor {key} has shape "
                              f"{tuple(tensor.shape)}, config.json implies {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(tensor.to(param.dtype))
        filled.add(target if rows is None else f"{target}[{rows}]")
    for name, param in params.items():
        parts = param.shape[0] if name.endswith(_POOLS) else None
        done = name in filled or parts is not None and all(
            f"{name}[{j}]" in filled for j in range(parts)) or \
            name == "lm_head.weight" and cfg.tie_word_embeddings
        if not done:
            raise ConfigError(f"{next(iter(files.values())).parent}: tensor for {name} "
                              f"missing from the checkpoint")
    return model.eval()


_POOLS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")


def _target(key: str, cfg: DeepseekConfig):
    """Our parameter for checkpoint tensor `key`, and the expert it fills (None: all)."""
    m = _EXPERT.match(key)
    if m:
        layer, expert, which = m.groups()
        return f"layers.{layer}.mlp.experts.{which}_proj", int(expert)
    if key == "lm_head.weight":
        return key, None
    return (key[len("model."):] if key.startswith("model.") else key), None
