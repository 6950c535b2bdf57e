"""A DeepseekV3ForCausalLM, DeepseekV32ForCausalLM or GlmMoeDsaForCausalLM (GLM-5)
checkpoint (config.json + safetensors, as transformers 5.x saves it) as tilec's
DeepseekDecodeStep (tilec/models/deepseek.py); the same fields configure the
`deepseek_v3`, `deepseek_v32` and `glm_moe_dsa` families (random weights).

Every config.json field is honoured, metadata (hf.METADATA and METADATA here), or
refused by name; every checkpoint tensor is consumed or refused.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tilec.errors import ConfigError
from tilec.limits import short_repr
from tilec.models.deepseek import DeepseekConfig, DeepseekDecodeStep
from tilec.models.rope import check_rope_scaling

# config.json fields that are DeepseekConfig's own, per architecture
DSA = ("index_topk", "index_n_heads", "index_head_dim")
_NOT_V3 = ("initializer_range", "rope_scaling", "index_rope_interleave", "mlp_layer_types",
           "indexer_types") + DSA
OWN_V3 = tuple(f for f in DeepseekConfig.__dataclass_fields__ if f not in _NOT_V3)
OWN = {
    "DeepseekV3ForCausalLM": OWN_V3,
    # V3.2 and GLM-5 rotate MLA's pairs always (no rope_interleave field)
    "DeepseekV32ForCausalLM": tuple(f for f in OWN_V3 if f != "rope_interleave") +
    ("mlp_layer_types",) + DSA,
    "GlmMoeDsaForCausalLM": tuple(f for f in OWN_V3 if f != "rope_interleave") +
    ("mlp_layer_types", "indexer_types") + DSA,
}
# fields honoured by checking them against what tilec computes
CHECKED = ("head_dim", "qk_head_dim", "num_key_value_heads", "attention_bias", "rope_theta",
           "rope_scaling", "rope_parameters", "topk_method", "scoring_func", "moe_layer_freq")
# GLM-5's older spellings of indexer_types (GlmMoeDsaConfig derives it from them)
GLM_PATTERN = ("index_topk_pattern", "index_topk_freq", "index_skip_topk_offset")
FIELDS = {
    name: ("architectures", "model_type") + own + CHECKED +
    (() if name == "DeepseekV3ForCausalLM" else ("layer_types", "mlp_bias")) +
    (GLM_PATTERN if name == "GlmMoeDsaForCausalLM" else ())
    for name, own in OWN.items()}
# transformers' defaults where they are not DeepseekConfig's (DeepSeek-V3's)
DEFAULTS = {
    "DeepseekV3ForCausalLM": {},
    "DeepseekV32ForCausalLM": dict(max_position_embeddings=163840, index_topk=2048,
                                   index_n_heads=64, index_head_dim=128),
    "GlmMoeDsaForCausalLM": dict(
        vocab_size=154880, hidden_size=6144, intermediate_size=12288, num_hidden_layers=78,
        num_attention_heads=64, q_lora_rank=2048, v_head_dim=256, qk_nope_head_dim=192,
        n_group=1, topk_group=1, max_position_embeddings=202752, rms_norm_eps=1e-5,
        index_topk=2048, index_n_heads=32, index_head_dim=128, index_rope_interleave=True),
}
METADATA = {
    "num_nextn_predict_layers": "multi-token-prediction modules: transformers' greedy "
                                "generate() does not use them (tilec refuses their tensors)",
    "num_mtp_layers": "multi-token-prediction modules: transformers' greedy generate() does "
                      "not use them (tilec refuses their tensors)",
    "output_router_logits": "a transformers forward option (what it returns)",
    "ep_size": "the expert-parallel split of training: the same function with any value",
}


def deepseek_config(data: dict, path: str,
                    arch: str = "DeepseekV3ForCausalLM") -> DeepseekConfig:
    """config.json's fields (known to be honoured or metadata) as a DeepseekConfig of
    architecture `arch` (a key of OWN)."""
    def refuse(key: str, value, why: str):
        raise ConfigError(f"{path}: {key}: {short_repr(value)} is not supported by tilec's "
                          f"{arch} ({why})")

    cfg = {**DEFAULTS[arch], **{k: data[k] for k in OWN[arch] if k in data}}
    heads = data.get("num_attention_heads", DeepseekConfig.num_attention_heads)
    rope_dim = data.get("qk_rope_head_dim", DeepseekConfig.qk_rope_head_dim)
    nope = data.get("qk_nope_head_dim", cfg.get("qk_nope_head_dim",
                                                 DeepseekConfig.qk_nope_head_dim))
    layers = cfg.get("num_hidden_layers", DeepseekConfig.num_hidden_layers)
    expect = {"head_dim": rope_dim, "qk_head_dim": _sum(nope, rope_dim),
              "num_key_value_heads": heads, "attention_bias": False, "mlp_bias": False,
              "topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1,
              "layer_types": ["indexed_attention"] * layers if isinstance(layers, int) else None}
    for key, wanted in expect.items():
        if data.get(key) is not None and wanted is not None and data[key] != wanted:
            refuse(key, data[key], f"supported: {short_repr(wanted)}, what the other fields imply")
    topk = cfg.get("index_topk")
    if arch != "DeepseekV3ForCausalLM" and not (isinstance(topk, int) and
                                                not isinstance(topk, bool) and topk > 0):
        raise ConfigError(f"{path}: index_topk: expected a positive integer, found "
                          f"{short_repr(topk)}")
    if arch == "GlmMoeDsaForCausalLM" and data.get("indexer_types") is None:
        cfg["indexer_types"] = _glm_indexer_types(data, layers, refuse)
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


def _glm_indexer_types(data: dict, layers, refuse) -> list | None:
    """GlmMoeDsaConfig's indexer_types from index_topk_pattern ("FSS..." or a list), or
    index_topk_freq / index_skip_topk_offset (defaults 1 and 2: every layer full)."""
    pattern = data.get("index_topk_pattern")
    if pattern is not None:
        if isinstance(pattern, str):
            if set(pattern) - {"F", "S"}:
                refuse("index_topk_pattern", pattern, "letters F and S only")
            return [{"F": "full", "S": "shared"}[c] for c in pattern]
        return list(pattern) if isinstance(pattern, list) else \
            refuse("index_topk_pattern", pattern, "a string of F and S, or a list")
    freq, offset = data.get("index_topk_freq", 1), data.get("index_skip_topk_offset", 2)
    for key, value in (("index_topk_freq", freq), ("index_skip_topk_offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool):
            refuse(key, value, "an integer")
    if not isinstance(layers, int):
        return None
    freq = max(freq, 1)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(layers)]


# model.yaml's DeepSeek families: random weights, config.json's fields
FAMILIES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
            "glm_moe_dsa": "GlmMoeDsaForCausalLM"}


@dataclass(frozen=True)
class DeepseekFamily:
    """How model.yaml's `model.config` configures a DeepSeek family: the fields of its
    architecture's config.json, with transformers' defaults (GLM-5's own shapes for
    `glm_moe_dsa`), and initializer_range, the scale of the random weights."""

    arch: str

    def keys(self) -> tuple[str, ...]:
        return tuple(k for k in FIELDS[self.arch] if k not in ("architectures", "model_type")) \
            + ("initializer_range",)

    def from_dict(self, data: dict, where: str = "config") -> DeepseekConfig:
        cfg = deepseek_config(data, where, self.arch)
        if "initializer_range" in data:
            cfg = replace(cfg, initializer_range=data["initializer_range"])
            DeepseekConfig.from_dict(asdict(cfg), where)   # checks its type
        return cfg


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
                              f"model with this config.json has no such tensor")
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
