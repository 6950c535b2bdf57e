"""The Hugging Face decoder architectures `hf:` reads, as one table: what each one's
config.json may hold and how it maps onto tilec's one parametrised decoder
(LlamaConfig and LlamaDecodeStep, tilec/models/llama.py).

Every config.json field is honoured, metadata (hf.METADATA), or refused: a field tilec
does not know may change what the model computes, and ignoring it would be a silently
wrong answer. What an architecture fixes that its config.json does not say (Qwen2's
q/k/v biases, Qwen3's q/k norms) is a `trait`; where transformers' config class has a
default other than LlamaConfig's, the architecture's `defaults` give it, so a
config.json that leaves the field out means what it means to transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tilec.errors import ConfigError
from tilec.models.deepseek_hf import FIELDS as DEEPSEEK_FIELDS

# Fields every architecture here honours (the first two read_config checks).
COMMON = (
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "max_position_embeddings",
)
# Qwen's sliding-window switches: transformers turns them into layer_types
QWEN_WINDOWS = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
QWEN_DEFAULTS = {"vocab_size": 151936, "intermediate_size": 22016,
                 "max_position_embeddings": 32768, "use_sliding_window": False,
                 "sliding_window": None, "max_window_layers": 28}


GEMMA_FIELDS = ("hidden_activation", "attention_bias", "query_pre_attn_scalar",
                "attn_logit_softcapping", "final_logit_softcapping", "sliding_window",
                "layer_types", "use_bidirectional_attention")
GEMMA_DEFAULTS = {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                  "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                  "query_pre_attn_scalar": 256, "sliding_window": 4096}


@dataclass(frozen=True)
class Architecture:
    name: str                      # the config.json `architectures` entry
    model_type: str
    fields: tuple[str, ...]        # config.json fields honoured beyond COMMON
    traits: dict = field(default_factory=dict)     # LlamaConfig fields it fixes
    defaults: dict = field(default_factory=dict)   # transformers' defaults, where not LlamaConfig's
    # what transformers' config class derives from the fields (in place; path for errors)
    derive: Callable[[dict, str], None] | None = None
    # a checkpoint tensor of a layer -> the parameters whose rows it stacks, in order
    fused: dict = field(default_factory=dict)
    fused_per_head: bool = False   # GPT-NeoX: the rows go head by head (q, k, v of head 0, ...)
    prefix: str = "model."         # of every checkpoint tensor but the lm_head's
    layers: str = "layers"         # the checkpoint's name of the layer list
    conv1d: bool = False           # GPT-2: a layer's matrices are stored [in, out]
    base: tuple[str, ...] = COMMON  # the fields honoured before `fields`
    names: dict = field(default_factory=dict)   # our module -> the checkpoint's, where not Llama's
    family: str = "llama"          # the decode step it becomes: llama, or deepseek (MLA + MoE)

    @property
    def honoured(self) -> tuple[str, ...]:
        return self.base + self.fields


def _qwen_windows(cfg: dict, path: str) -> None:
    """Qwen's window fields as transformers reads them: the window only with
    use_sliding_window, and layer_types (if not given) sliding from layer
    max_window_layers on."""
    use = cfg.pop("use_sliding_window")
    first = cfg.pop("max_window_layers")
    if not isinstance(use, bool):
        raise ConfigError(f"{path}: use_sliding_window: expected true or false, found {use!r}")
    if not use:
        cfg["sliding_window"] = None
    if cfg.get("layer_types") is None:
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise ConfigError(f"{path}: max_window_layers: expected an integer >= 0, "
                              f"found {first!r}")
        slides = cfg["sliding_window"] is not None
        cfg["layer_types"] = ["sliding_attention" if slides and i >= first else
                              "full_attention" for i in range(_layers(cfg))]


def _gemma(cfg: dict, path: str) -> None:
    """Gemma 2's names and derived fields: hidden_activation is the MLP's activation,
    layer_types (if not given) alternate sliding and full from layer 0, attention is
    causal unless use_bidirectional_attention (refused: a decoder here is causal)."""
    cfg["hidden_act"] = cfg.pop("hidden_activation")
    bidirectional = cfg.pop("use_bidirectional_attention", None)
    if bidirectional not in (None, False):
        raise ConfigError(f"{path}: use_bidirectional_attention: {bidirectional!r} is not "
                          f"supported (tilec's decoders attend causally)")
    if cfg.get("layer_types") is None:
        cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                              for i in range(_layers(cfg))]


def _phi3(cfg: dict, path: str) -> None:
    """Phi-3's partial_rotary_factor is rope_parameters' default; its
    original_max_position_embeddings is read by longrope only (refused with another
    rope type than default: tilec reads longrope's own key)."""
    partial = cfg.pop("partial_rotary_factor", None)
    rope_key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    rope = dict(cfg.get(rope_key) or {})
    if partial is not None and "partial_rotary_factor" not in rope:
        rope["partial_rotary_factor"] = partial
        cfg[rope_key] = rope
    original = cfg.pop("original_max_position_embeddings", None)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if original is not None and kind != "default":
        raise ConfigError(f"{path}: original_max_position_embeddings: {original!r} is not "
                          f"supported with rope_type {kind!r} for Phi3ForCausalLM (give it "
                          f"in {rope_key})")


def _gpt_neox(cfg: dict, path: str) -> None:
    """GPT-NeoX's names: layer_norm_eps is the norms' eps; RoPE turns a quarter of each
    head unless rope_parameters says otherwise; is_decoder is not read (it attends
    causally)."""
    cfg["rms_norm_eps"] = cfg.pop("layer_norm_eps")
    cfg.pop("is_decoder", None)
    rope_key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    rope = dict(cfg.get(rope_key) or {"rope_type": "default"})
    rope.setdefault("partial_rotary_factor", 0.25)
    cfg[rope_key] = rope


def _gemma3(cfg: dict, path: str) -> None:
    """Gemma 3 as Gemma 2, but layer_types (if not given) slide but for every
    sliding_window_pattern-th layer, and rope_parameters holds one set per layer type."""
    pattern = cfg.pop("sliding_window_pattern", 6)
    cfg.pop("_sliding_window_pattern", None)   # transformers overwrites it with the above
    if cfg.get("layer_types") is None:
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
            raise ConfigError(f"{path}: sliding_window_pattern: expected a positive integer, "
                              f"found {pattern!r}")
        cfg["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                              for i in range(_layers(cfg))]
    _gemma(cfg, path)
    rope = cfg.get("rope_parameters")
    if not (isinstance(rope, dict) and set(rope) == {"full_attention", "sliding_attention"}):
        raise ConfigError(f"{path}: rope_parameters: expected one mapping per layer type "
                          f"(full_attention, sliding_attention), found {rope!r:.80}")
    cfg["rope_parameters"] = rope["full_attention"]
    cfg["rope_local"] = rope["sliding_attention"]


GPT2_NAMES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers",
              "n_head": "num_attention_heads", "n_positions": "max_position_embeddings",
              "n_inner": "intermediate_size", "activation_function": "hidden_act",
              "layer_norm_epsilon": "rms_norm_eps"}


def _gpt2(cfg: dict, path: str) -> None:
    """GPT-2's names for the common fields (n_inner null: 4 * n_embd); cross-attention
    and reorder_and_upcast_attn are refused (not a decoder-only model, and another
    order of the score arithmetic)."""
    for theirs, ours in GPT2_NAMES.items():
        cfg[ours] = cfg.pop(theirs)
    if cfg["intermediate_size"] is None:
        cfg["intermediate_size"] = 4 * cfg["hidden_size"] if isinstance(cfg["hidden_size"], int) \
            else None
    for key in ("add_cross_attention", "reorder_and_upcast_attn"):
        if cfg.pop(key) is not False:
            raise ConfigError(f"{path}: {key}: only false is supported")


OPT_NAMES = {"ffn_dim": "intermediate_size", "activation_function": "hidden_act",
             "do_layer_norm_before": "norm_before",
             "layer_norm_elementwise_affine": "norm_affine"}


def _opt(cfg: dict, path: str) -> None:
    """OPT's names for the common fields; enable_bias is every projection's bias (the
    MLP's too); do_layer_norm_before false (OPT-350m) makes the layers post-norm and
    drops the final norm, as _remove_final_layer_norm does; word_embed_proj_dim null
    means hidden_size."""
    for key in ("do_layer_norm_before", "layer_norm_elementwise_affine", "enable_bias",
                "_remove_final_layer_norm"):   # (named as config.json names them)
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"{path}: {key}: expected true or false, found {cfg[key]!r}")
    for theirs, ours in OPT_NAMES.items():
        cfg[ours] = cfg.pop(theirs)
    cfg["attention_bias"] = cfg["mlp_bias"] = cfg.pop("enable_bias")
    cfg["final_norm"] = cfg["norm_before"] and not cfg.pop("_remove_final_layer_norm")


def _layers(cfg: dict) -> int:
    """num_hidden_layers where it is a count (else LlamaConfig's check names it)."""
    layers = cfg.get("num_hidden_layers", 32)
    return layers if isinstance(layers, int) and not isinstance(layers, bool) else 0


ARCHITECTURES = {a.name: a for a in (
    Architecture("LlamaForCausalLM", "llama", ("hidden_act", "attention_bias", "mlp_bias")),
    Architecture("Qwen2ForCausalLM", "qwen2", ("hidden_act",) + QWEN_WINDOWS,
                 traits={"qkv_bias": True}, defaults=QWEN_DEFAULTS, derive=_qwen_windows),
    Architecture("Qwen3ForCausalLM", "qwen3", ("hidden_act", "attention_bias") + QWEN_WINDOWS,
                 traits={"qk_norm": True}, defaults={**QWEN_DEFAULTS, "head_dim": 128},
                 derive=_qwen_windows),
    Architecture("MistralForCausalLM", "mistral", ("hidden_act", "sliding_window"),
                 defaults={"intermediate_size": 14336, "num_key_value_heads": 8,
                           "max_position_embeddings": 131072, "sliding_window": 4096}),
    Architecture("Gemma2ForCausalLM", "gemma2", GEMMA_FIELDS, traits={"gemma_norms": True},
                 defaults={**GEMMA_DEFAULTS, "vocab_size": 256000,
                           "max_position_embeddings": 8192,
                           "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
                 derive=_gemma),
    Architecture("Gemma3ForCausalLM", "gemma3_text",
                 GEMMA_FIELDS + ("sliding_window_pattern", "_sliding_window_pattern"),
                 traits={"gemma_norms": True, "qk_norm": True},
                 defaults={**GEMMA_DEFAULTS, "vocab_size": 262208,
                           "max_position_embeddings": 131072,
                           "rope_parameters": {
                               "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default",
                                                     "rope_theta": 1e4}}},
                 derive=_gemma3),
    Architecture("Phi3ForCausalLM", "phi3",
                 ("hidden_act", "sliding_window", "partial_rotary_factor",
                  "original_max_position_embeddings"),
                 traits={"partial_rotary": True},
                 defaults={"vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
                           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
                 derive=_phi3,
                 fused={"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                        "gate_up_proj": ("gate_proj", "up_proj")}),
    Architecture("GPT2LMHeadModel", "gpt2",
                 tuple(GPT2_NAMES) + ("scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                                      "add_cross_attention", "reorder_and_upcast_attn"),
                 base=("architectures", "model_type", "vocab_size", "tie_word_embeddings"),
                 traits={"learned_positions": True, "layer_norm": True, "gated_mlp": False,
                         "attention_bias": True, "mlp_bias": True},
                 defaults={"vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
                           "n_layer": 12, "n_head": 12, "n_inner": None,
                           "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                           "tie_word_embeddings": True, "add_cross_attention": False,
                           "reorder_and_upcast_attn": False},
                 derive=_gpt2, fused={"qkv_proj": ("q_proj", "k_proj", "v_proj")},
                 prefix="transformer.", layers="h", conv1d=True,
                 names={"embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f",
                        "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
                        "qkv_proj": "attn.c_attn", "o_proj": "attn.c_proj",
                        "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}),
    Architecture("GPTNeoXForCausalLM", "gpt_neox",
                 ("hidden_act", "layer_norm_eps", "use_parallel_residual", "attention_bias",
                  "is_decoder"),
                 traits={"layer_norm": True, "gated_mlp": False, "mlp_bias": True,
                         "partial_rotary": True},
                 defaults={"vocab_size": 50432, "hidden_size": 6144, "intermediate_size": 24576,
                           "num_hidden_layers": 44, "num_attention_heads": 64,
                           "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                           "use_parallel_residual": True, "attention_bias": True},
                 derive=_gpt_neox, fused={"qkv_proj": ("q_proj", "k_proj", "v_proj")},
                 fused_per_head=True, prefix="gpt_neox.",
                 names={"embed_tokens": "embed_in", "norm": "final_layer_norm",
                        "lm_head": "embed_out",
                        "qkv_proj": "attention.query_key_value", "o_proj": "attention.dense",
                        "up_proj": "mlp.dense_h_to_4h", "down_proj": "mlp.dense_4h_to_h"}),
    Architecture("OPTForCausalLM", "opt",
                 tuple(OPT_NAMES) + ("enable_bias", "_remove_final_layer_norm",
                                     "word_embed_proj_dim"),
                 base=("architectures", "model_type", "vocab_size", "hidden_size",
                       "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                       "tie_word_embeddings"),
                 # nn.LayerNorm's eps (OPT's config has none); positions 0, 1, ... are
                 # rows 2, 3, ... of the table (OPTLearnedPositionalEmbedding's offset)
                 traits={"learned_positions": True, "position_offset": 2, "layer_norm": True,
                         "gated_mlp": False, "rms_norm_eps": 1e-5},
                 defaults={"vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12,
                           "ffn_dim": 3072, "max_position_embeddings": 2048,
                           "do_layer_norm_before": True, "_remove_final_layer_norm": False,
                           "word_embed_proj_dim": None, "num_attention_heads": 12,
                           "activation_function": "relu", "enable_bias": True,
                           "layer_norm_elementwise_affine": True, "tie_word_embeddings": True},
                 derive=_opt, prefix="model.decoder.",
                 names={"norm": "final_layer_norm", "input_layernorm": "self_attn_layer_norm",
                        "post_attention_layernorm": "final_layer_norm",
                        "o_proj": "self_attn.out_proj", "up_proj": "fc1", "down_proj": "fc2"}),
)}


# DeepSeek: MLA and mixture-of-experts layers, its own decode step and checkpoint reader
# (tilec/models/deepseek.py, deepseek_hf.py, which lists the fields it honours).
# DeepSeek-V3.2 and GLM-5 add the DSA indexer.
for _name, _type in (("DeepseekV3ForCausalLM", "deepseek_v3"),
                     ("DeepseekV32ForCausalLM", "deepseek_v32"),
                     ("GlmMoeDsaForCausalLM", "glm_moe_dsa")):
    ARCHITECTURES[_name] = Architecture(_name, _type, DEEPSEEK_FIELDS[_name], base=(),
                                        family="deepseek")


def architecture_of(data: dict, path: str) -> Architecture:
    """The architecture config.json names, or a ConfigError naming the field."""
    archs = data.get("architectures") or []
    found = [ARCHITECTURES[a] for a in archs if isinstance(a, str) and a in ARCHITECTURES] \
        if isinstance(archs, list) else []
    if not found:
        raise ConfigError(f"{path}: architectures: {archs!r} is not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    arch = found[0]
    model_type = data.get("model_type", arch.model_type)
    if model_type != arch.model_type:
        raise ConfigError(f"{path}: model_type: {model_type!r} is not supported with "
                          f"{arch.name} (expected {arch.model_type!r})")
    return arch


def decoder_fields(arch: Architecture, data: dict, path: str) -> dict:
    """config.json's honoured fields (with the architecture's defaults and traits) as
    LlamaConfig.from_dict takes them."""
    cfg = {**arch.defaults, **{k: v for k, v in data.items() if k in arch.honoured}}
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    if arch.derive is not None:
        arch.derive(cfg, path)
    return {**cfg, **arch.traits}
