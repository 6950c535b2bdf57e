"""RoPE's inverse frequencies for each rope scaling type a Hugging Face Llama config may
name, computed as transformers' modeling_rope_utils computes them (tests compare the
logits of checkpoints saved by transformers), and the check of a `rope_scaling` dict.

`cfg` is a LlamaConfig (tilec/models/llama.py): `rotary_dim`, `rope_theta`,
`rope_scaling`, `rope_type` and `max_position_embeddings` are what is read.
"""
from __future__ import annotations

import math

import torch

from tilec.errors import ConfigError
from tilec.limits import short_repr

# rope type -> (required, optional) keys of rope_scaling besides rope_type/type, rope_theta
# and partial_rotary_factor, as transformers validates them
ROPE_KEYS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast",
                           "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "longrope": (("long_factor", "short_factor"),
                 ("factor", "attention_factor", "original_max_position_embeddings")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"),
               ("original_max_position_embeddings",)),
}


# what each key's value must be: a positive number unless listed here
ZERO_OR_MORE = ("mscale", "mscale_all_dim")
COUNTS = ("original_max_position_embeddings",)
LISTS = ("long_factor", "short_factor")


def check_rope_scaling(scaling: dict, where: str, name: str = "rope_scaling",
                       half_dim: int | None = None) -> None:
    """A ConfigError naming `where`: `name`.KEY unless `scaling` is a rope scaling
    tilec implements: a type of ROPE_KEYS with the keys transformers requires for it,
    no others, each value of its kind (`half_dim`: the number of frequencies, which
    longrope's factor lists must match)."""
    if not isinstance(scaling, dict):
        raise ConfigError(f"{where}: {name}: expected a mapping, found {short_repr(scaling)}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(kind, str) or kind not in ROPE_KEYS:
        raise ConfigError(f"{where}: {name}: rope_type {short_repr(kind)} is not supported by "
                          f"tilec's Llama (supported: {', '.join(ROPE_KEYS)})")
    required, optional = ROPE_KEYS[kind]
    allowed = set(required) | set(optional) | {"rope_type", "type", "rope_theta",
                                               "partial_rotary_factor"}
    for key, value in scaling.items():
        if key not in allowed:
            raise ConfigError(f"{where}: {name}: {short_repr(key)} is not supported with "
                              f"rope_type {kind!r} (supported: {', '.join(sorted(allowed))})")
        if key in ("rope_type", "type"):
            continue
        problem = _value_problem(key, value, half_dim)
        if problem:
            raise ConfigError(f"{where}: {name}.{key}: expected {problem}, found "
                              f"{short_repr(value)}")
    for key in required:
        if key not in scaling:
            raise ConfigError(f"{where}: {name}.{key}: required for rope_type {kind}")
    partial = scaling.get("partial_rotary_factor", 1.0)
    if not (_number(partial) and 0 < partial <= 1):
        raise ConfigError(f"{where}: {name}.partial_rotary_factor: expected a number in "
                          f"(0, 1], found {short_repr(partial)}")
    if kind == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
        raise ConfigError(f"{where}: {name}: low_freq_factor and high_freq_factor must differ "
                          f"(the smoothing divides by their difference)")


def _value_problem(key: str, value, half_dim: int | None) -> str | None:
    """What the value of rope scaling key `key` must be, if `value` is not that."""
    if key == "truncate":
        return None if isinstance(value, bool) else "true or false"
    if key in LISTS:
        if not (isinstance(value, list) and all(_number(v) and v > 0 for v in value)):
            return "a list of positive numbers"
        if half_dim is not None and len(value) != half_dim:
            return f"{half_dim} numbers (one per frequency: the rotary dims / 2)"
        return None
    if key in COUNTS:
        return None if _number(value) and int(value) == value and value >= 1 \
            else "a positive integer"
    if key in ZERO_OR_MORE:
        return None if _number(value) and value >= 0 else "a number >= 0"
    return None if _number(value) and value > 0 else "a positive number"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def rope_parameters(cfg) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies and the factor transformers multiplies cos and sin by,
    for each rope type of ROPE_KEYS as transformers' modeling_rope_utils computes them
    (`dynamic` and `longrope` at lengths where their frequencies stay fixed: see
    LlamaConfig.check_max_seq_len)."""
    dim = cfg.rotary_dim
    base = cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    scaling = cfg.rope_scaling or {}
    kind = cfg.rope_type
    old_ctx = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling, old_ctx), 1.0
    if kind == "yarn":
        return _yarn_parameters(cfg, scaling, old_ctx)
    if kind == "longrope":
        factor = scaling.get("factor") or cfg.max_position_embeddings / old_ctx
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else \
                math.sqrt(1 + math.log(factor) / math.log(old_ctx))
        short = torch.tensor(scaling["short_factor"], dtype=torch.float32)
        return 1.0 / (short * base ** exponents), attention
    return inv_freq, 1.0   # default; dynamic below max_position_embeddings


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict, old_ctx: float) -> torch.Tensor:
    """Llama 3's frequency-dependent scaling."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_parameters(cfg, scaling: dict, old_ctx: float) -> tuple[torch.Tensor, float]:
    """YaRN: frequencies blended between interpolation and extrapolation by a linear ramp
    over the dimensions, cos and sin scaled by an attention factor."""
    dim, base = cfg.rotary_dim, cfg.rope_theta
    factor = scaling.get("factor") or cfg.max_position_embeddings / old_ctx

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all \
            else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(scaling.get("beta_fast") or 32)
    high = correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001   # as transformers does: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention
