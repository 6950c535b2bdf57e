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

from tilec.errors import ConfigError

# Fields every architecture here honours (the first two read_config checks).
COMMON = (
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "max_position_embeddings",
)
# Qwen's sliding-window switches: transformers turns them into layer_types
QWEN_WINDOWS = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
QWEN_DEFAULTS = {"vocab_size": 151936, "intermediate_size": 22016,
                 "max_position_embeddings": 32768, "use_sliding_window": False,
                 "sliding_window": None, "max_window_layers": 28}


@dataclass(frozen=True)
class Architecture:
    name: str                      # the config.json `architectures` entry
    model_type: str
    fields: tuple[str, ...]        # config.json fields honoured beyond COMMON
    traits: dict = field(default_factory=dict)     # LlamaConfig fields it fixes
    defaults: dict = field(default_factory=dict)   # transformers' defaults, where not LlamaConfig's

    @property
    def honoured(self) -> tuple[str, ...]:
        return COMMON + self.fields


ARCHITECTURES = {a.name: a for a in (
    Architecture("LlamaForCausalLM", "llama", ("attention_bias", "mlp_bias")),
    Architecture("Qwen2ForCausalLM", "qwen2", QWEN_WINDOWS, traits={"qkv_bias": True},
                 defaults=QWEN_DEFAULTS),
    Architecture("Qwen3ForCausalLM", "qwen3", ("attention_bias",) + QWEN_WINDOWS,
                 traits={"qk_norm": True}, defaults={**QWEN_DEFAULTS, "head_dim": 128}),
    Architecture("MistralForCausalLM", "mistral", ("sliding_window",),
                 defaults={"intermediate_size": 14336, "num_key_value_heads": 8,
                           "max_position_embeddings": 131072, "sliding_window": 4096}),
)}


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
    if "use_sliding_window" in cfg:
        _qwen_windows(cfg, path)
    return {**cfg, **arch.traits}


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
        layers = cfg.get("num_hidden_layers", 32)
        slides = cfg["sliding_window"] is not None
        cfg["layer_types"] = ["sliding_attention" if slides and i >= first else
                              "full_attention" for i in range(layers if isinstance(layers, int) else 0)]
