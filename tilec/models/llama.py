"""The `llama` family: one decode step of a Llama-style decoder as a plain nn.Module.

The module is traced by the ordinary frontend like any user model; nothing about it is
special-cased by name. It is written so the fusion pass finds the decode tasks:
  * the KV cache is module state (one buffer per layer and kind) updated in place with
    `index_copy_` at `pos`, which torch.export turns into a state update; with `batch`
    B > 1 it has a slot dim in front ([B, kv heads, max_seq_len, head dim]) and slot b's
    key goes to position pos[b] of slot b (`cache[slots, :, pos] = k`: one state update
    at per-slot positions);
  * grouped-query attention reads the cache without repeating it: the query heads of
    one KV head form the rows of one [groups, head_dim] x [head_dim, seq] matmul;
  * RoPE uses `x * cos + swap_halves(x) * sin_signed`, whose swap is a concat of two
    views of the projection output (no separate negation op).
Numerically it is Hugging Face's LlamaForCausalLM (RMSNorm in float32, softmax in
float32, its activations: ACTIVATIONS, its rope scaling types: tilec/models/rope.py),
one token per call and sequence. A step of batch B advances B independent sequences:
the projections and the MLP are matmuls of B rows (each weight read once for all),
attention runs per (slot, kv head) over the slot's own cache, masked past its pos[b].
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import nn

from tilec.errors import ConfigError
from tilec.limits import short_repr
from tilec.models.blocks import RMSNorm, norm_of, rope_at, rotate, softcap
from tilec.models.rope import check_rope_scaling, rope_parameters


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    # What some architectures add to Llama (tilec/models/architectures.py):
    qkv_bias: bool = False            # q, k and v projections have a bias, o_proj not (Qwen2)
    qk_norm: bool = False             # RMSNorm over each head's q and k before RoPE (Qwen3)
    # keys older than `sliding_window` positions are hidden, in the layers whose
    # layer_types entry is "sliding_attention" (every layer without layer_types: Mistral)
    sliding_window: int | None = None
    layer_types: list | None = None   # per layer: "full_attention" or "sliding_attention"
    # Gemma3: the sliding layers' own rope_parameters (the others': rope_theta, rope_scaling)
    rope_local: dict | None = None
    # Gemma: RMSNorms scale by 1 + weight, embeddings by sqrt(hidden_size), and the
    # attention and MLP outputs are normed before their residual adds
    # (post_attention_layernorm, post_feedforward_layernorm; pre_feedforward_layernorm
    # before the MLP)
    gemma_norms: bool = False
    # GPT-NeoX: LayerNorms (mean removed, a bias; eps rms_norm_eps) instead of RMSNorms,
    # an MLP of up_proj, act, down_proj without a gate, and the MLP reading the layer's
    # input beside the attention (parallel residual)
    layer_norm: bool = False
    gated_mlp: bool = True
    use_parallel_residual: bool = False
    # GPT-2: a table of max_position_embeddings learned positions added to the token
    # embeddings, no RoPE; scores scaled by head_dim's -1/2 only with scale_attn_weights,
    # and by 1 / (layer index + 1) with scale_attn_by_inverse_layer_idx
    learned_positions: bool = False
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    # the head dims past rope_scaling's partial_rotary_factor pass RoPE unrotated (Phi3);
    # without it the factor must be 1.0 (transformers' Llama rotates every dim)
    partial_rotary: bool = False
    # OPT: the learned positions are read at pos + position_offset (OPT's table has two
    # rows more); LayerNorms without weight and bias (norm_affine false); post-norm layers
    # (norm_before false: each residual add, then its norm); no norm before the lm_head
    # (final_norm false); token embeddings of word_embed_proj_dim wide, projected to
    # hidden_size after the lookup (project_in) and back before the lm_head (project_out)
    position_offset: int = 0
    norm_affine: bool = True
    norm_before: bool = True
    final_norm: bool = True
    word_embed_proj_dim: int | None = None
    query_pre_attn_scalar: float | None = None   # scores scale by its -1/2 (else head_dim's)
    attn_logit_softcapping: float | None = None  # scores become cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits become cap * tanh(logits / cap)
    initializer_range: float = 0.02   # the scale of a family model's random weights
    extra: dict = field(default_factory=dict)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """The head dims RoPE rotates (transformers: int(head_dim * partial_rotary_factor))."""
        if not self.partial_rotary:
            return self.dim_head
        return int(self.dim_head * (self.rope_scaling or {}).get("partial_rotary_factor", 1.0))

    @staticmethod
    def from_dict(data: dict, where: str = "config") -> "LlamaConfig":
        known = {f.name for f in fields(LlamaConfig)} - {"extra"}
        data = dict(data)
        # transformers 5.x writes rope_parameters (rope_theta and scaling inside) instead
        # of 4.x's rope_theta + rope_scaling; accept both, with transformers' priorities:
        # rope_scaling over rope_parameters, and the dict's rope_theta over the top level's.
        params = data.pop("rope_parameters", None)
        scaling = data.get("rope_scaling") or params
        rope_key = "rope_scaling" if data.get("rope_scaling") else "rope_parameters"
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise ConfigError(f"{where}: {rope_key}: expected a mapping, found "
                                  f"{short_repr(scaling)}")
            scaling = dict(scaling)
            if "rope_theta" in scaling:
                data["rope_theta"] = scaling.pop("rope_theta")
            plain = set(scaling) <= {"rope_type", "type"} and \
                scaling.get("rope_type", scaling.get("type", "default")) == "default"
            data["rope_scaling"] = None if plain else scaling
        args = {k: v for k, v in data.items() if k in known}
        cfg = LlamaConfig(**args, extra={k: v for k, v in data.items() if k not in known})
        cfg.validate(where, rope_key)
        return cfg

    def validate(self, where: str, rope_key: str = "rope_scaling") -> None:
        """`rope_key`: the key rope_scaling was read from, named in its errors."""
        def need(ok: bool, key: str, what: str):
            if not ok:
                raise ConfigError(f"{where}: {key}: {what}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            value = getattr(self, key)
            need(isinstance(value, int) and value > 0, key, f"expected a positive integer, found {value!r}")
        for key in ("num_key_value_heads", "head_dim", "word_embed_proj_dim"):
            value = getattr(self, key)
            need(value is None or (isinstance(value, int) and not isinstance(value, bool)
                                   and value > 0),
                 key, f"expected a positive integer or null, found {value!r}")
        for key in ("tie_word_embeddings", "attention_bias", "mlp_bias", "qkv_bias", "qk_norm",
                    "gemma_norms", "partial_rotary", "layer_norm", "gated_mlp",
                    "use_parallel_residual", "learned_positions", "scale_attn_weights",
                    "scale_attn_by_inverse_layer_idx", "norm_affine", "norm_before",
                    "final_norm"):
            value = getattr(self, key)
            need(isinstance(value, bool), key, f"expected true or false, found {value!r}")
        for key in ("rms_norm_eps", "rope_theta", "query_pre_attn_scalar",
                    "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, key)
            need((value is None and key not in ("rms_norm_eps", "rope_theta"))
                 or (isinstance(value, (int, float)) and not isinstance(value, bool)
                     and math.isfinite(value) and value > 0),
                 key, f"expected a positive number, found {value!r}")
        self._validate_opt(need)
        need(self.num_attention_heads % self.kv_heads == 0, "num_key_value_heads",
             f"{self.kv_heads} does not divide num_attention_heads {self.num_attention_heads}")
        need(self.dim_head % 2 == 0 or self.learned_positions, "head_dim",
             f"must be even for RoPE, found {self.dim_head}")
        need(not (self.learned_positions and (self.rope_scaling or self.rope_local)),
             rope_key, "learned positions take no RoPE")
        if self.head_dim is None:
            need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                 "not divisible by num_attention_heads")
        need(isinstance(self.hidden_act, str) and self.hidden_act in ACTIVATIONS, "hidden_act",
             f"{self.hidden_act!r} is not supported by tilec's Llama "
             f"(supported: {', '.join(ACTIVATIONS)})")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling, where, rope_key, self.rotary_dim // 2)
        partial = (self.rope_scaling or {}).get("partial_rotary_factor", 1.0)
        need(partial == 1.0 or self.partial_rotary, f"{rope_key}.partial_rotary_factor",
             f"{partial!r} is not supported (supported: 1.0; this architecture rotates "
             f"every dim of a head)")
        need(self.rotary_dim % 2 == 0, f"{rope_key}.partial_rotary_factor",
             f"{partial!r} of head_dim {self.dim_head} is an odd number of dims")
        self._validate_windows(need)
        if self.rope_local is not None:
            need(isinstance(self.rope_local, dict), "rope_parameters.sliding_attention",
                 f"expected a mapping, found {short_repr(self.rope_local)}")
            self.local_rope(where)

    def _validate_opt(self, need) -> None:
        """OPT's switches, where the rest of the decoder can honour them."""
        offset = self.position_offset
        need(isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0
             and (offset == 0 or self.learned_positions), "position_offset",
             f"expected an integer >= 0 (and 0 without learned_positions), found {offset!r}")
        need(self.norm_affine or self.layer_norm, "norm_affine",
             "false is supported with layer_norm only")
        need(self.norm_before or not (self.use_parallel_residual or self.gemma_norms),
             "norm_before", "false is not supported with use_parallel_residual or gemma_norms")

    def local_rope(self, where: str = "config") -> "LlamaConfig":
        """This config with the sliding layers' rope parameters (itself without any)."""
        if self.rope_local is None:
            return self
        data = {f.name: getattr(self, f.name) for f in fields(self)   # (RoPE's fields only
                if f.name not in ("extra", "rope_theta", "rope_scaling", "rope_local",
                                  "layer_types", "sliding_window")}     # matter)
        return LlamaConfig.from_dict({**data, "rope_parameters": self.rope_local},
                                     f"{where}: rope_parameters.sliding_attention")

    def _validate_windows(self, need) -> None:
        window = self.sliding_window
        need(window is None or (isinstance(window, int) and not isinstance(window, bool)
                                and window > 0),
             "sliding_window", f"expected a positive integer or null, found {window!r}")
        types = self.layer_types
        if types is None:
            return
        need(isinstance(types, (list, tuple)) and len(types) == self.num_hidden_layers
             and all(t in LAYER_TYPES for t in types), "layer_types",
             f"expected a list of {self.num_hidden_layers} entries each one of "
             f"{', '.join(LAYER_TYPES)}, found {short_repr(types)}")
        need(window is not None or "sliding_attention" not in types, "layer_types",
             "names sliding_attention layers but there is no sliding_window")

    def layer_window(self, index: int) -> int | None:
        """The sliding window of layer `index`; None where it attends to every key.
        (compiler/memory.py measures a config's models of one and two layers: a layer
        past layer_types, there, is sized like any other.)"""
        types = self.layer_types
        if types is not None and (index >= len(types) or types[index] != "sliding_attention"):
            return None
        return self.sliding_window

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    def check_max_seq_len(self, max_seq_len: int, where: str) -> None:
        """The rope types whose frequencies transformers changes with the sequence length
        are honoured only where they do not change: tilec's frequencies are fixed."""
        scaling = self.rope_scaling or {}
        if self.learned_positions and max_seq_len > self.max_position_embeddings:
            raise ConfigError(f"{where}: max_position_embeddings: the model has "
                              f"{self.max_position_embeddings} learned positions: max_seq_len "
                              f"must be at most that, found {max_seq_len}")
        if self.rope_type == "dynamic":
            limit, name = self.max_position_embeddings, "max_position_embeddings"
        elif self.rope_type == "longrope":
            limit = scaling.get("original_max_position_embeddings", self.max_position_embeddings)
            name = "rope_scaling.original_max_position_embeddings"
        else:
            return
        if max_seq_len > limit:
            raise ConfigError(
                f"{where}: rope_scaling: rope_type {self.rope_type!r} changes its frequencies "
                f"past {name} {limit}, which tilec does not implement: max_seq_len must be at "
                f"most {limit}, found {max_seq_len}")


LAYER_TYPES = ("full_attention", "sliding_attention")


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' NewGELUActivation, written out as it is (not F.gelu's tanh form)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# hidden_act -> the function, as transformers' ACT2FN computes it
ACTIVATIONS = {
    "silu": nn.functional.silu,
    "swish": nn.functional.silu,
    "gelu": nn.functional.gelu,
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_new,
    "relu": nn.functional.relu,
}

# Values drawn per call (a multiple of 8: see init_random). Large on purpose: the draw
# runs beside a busy main thread, and each call hands the GIL over; with 1 M values per
# call the thousands of hand-overs made the draw finish seconds late.
INIT_CHUNK = 1 << 24
# The standard deviation of the odd integers -255, -253, ..., 255 drawn with equal
# chances: sqrt((256**2 - 1) / 3).
ODD_BYTE_STD = math.sqrt((256 ** 2 - 1) / 3)


def init_random(params: list[tuple[str, nn.Parameter]], seed: int, std: float = 0.02,
                stop: threading.Event | None = None) -> None:
    """Seeded random weights with standard deviation `std` (Hugging Face's scale for
    projections and embeddings), norms at one, so an engine and its eager twin get the
    same weights. `params`: `list(model.named_parameters())`, listed before the model is
    traced (non-strict torch.export swaps fake tensors into the module while it traces,
    and this may run in another thread meanwhile: compiler/build.PendingWeights).

    The values are uniform, not normal (as torch's own nn.Linear initialisation is):
    each is a random byte b (as int8) mapped to (2b + 1) * std / ODD_BYTE_STD, so zero
    mean, the given std, 256 levels. Why: a 1B model's 1.2 G normal numbers took 7-8 s of
    a core with torch's sampler, the largest single cost of compiling it from a
    model.yaml; raw bytes of a PCG64 stream cost a tenth of that. Tensor i draws from
    its own stream, seeded by (seed, i), a chunk of INIT_CHUNK bytes at a time (8 bytes
    per raw draw, so chunks continue the stream exactly: the values do not depend on
    the chunk size, tests/models/test_llama_init.py), through one float32 buffer of a
    chunk, and are rounded into place. `stop`, when set, ends the drawing early (a
    compile that failed)."""
    scale = std / ODD_BYTE_STD
    buf = torch.empty(INIT_CHUNK, dtype=torch.float32)
    with torch.no_grad():
        for index, (name, p) in enumerate(params):
            if name.endswith("norm.weight"):   # every RMSNorm: input_layernorm, q_norm, norm
                p.fill_(1.0)
                continue
            stream = _stream(seed, index)
            flat = p.view(-1)
            for start in range(0, flat.numel(), INIT_CHUNK):
                if stop is not None and stop.is_set():
                    return
                end = min(start + INIT_CHUNK, flat.numel())
                raw = stream.random_raw((end - start + 7) // 8).view(np.int8)[:end - start]
                values = buf[:end - start]
                values.copy_(torch.from_numpy(raw))
                flat[start:end].copy_(values.mul_(2).add_(1).mul_(scale))


def _stream(seed: int, index: int) -> np.random.PCG64:
    """The random stream of the `index`-th parameter."""
    return np.random.PCG64(np.random.SeedSequence((seed, index)))


class Layer(nn.Module):
    def __init__(self, cfg: LlamaConfig, max_seq_len: int, batch: int = 1, chunk: int = 1):
        super().__init__()
        self.batch = batch
        # a prefill's rows: `chunk` consecutive positions of one sequence, one cache
        self.chunk = chunk
        d, hd = cfg.hidden_size, cfg.dim_head
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, hd
        self.input_layernorm = norm_of(cfg, d)
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(d, self.heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = norm_of(cfg, hd)
            self.k_norm = norm_of(cfg, hd)
        # set per layer by the model (LlamaConfig.layer_window); a window as long as the
        # cache hides nothing and is left out of the graph
        self.window: int | None = None
        self.max_seq_len = max_seq_len
        self.post_attention_layernorm = norm_of(cfg, d)
        if cfg.gemma_norms:
            self.pre_feedforward_layernorm = norm_of(cfg, d)
            self.post_feedforward_layernorm = norm_of(cfg, d)
        self.parallel = cfg.use_parallel_residual
        self.norm_before = cfg.norm_before
        self.sandwich = cfg.gemma_norms
        self.scale = (cfg.query_pre_attn_scalar or hd) ** -0.5 if cfg.scale_attn_weights else 1.0
        self.softcap = cfg.attn_logit_softcapping
        if cfg.gated_mlp:
            self.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]
        # batch 1: [kv heads, positions, head dim]; batch B: a slot dim in front
        slots = (batch,) if batch > 1 else ()
        self.register_buffer("k_cache", torch.zeros(*slots, self.kv_heads, max_seq_len, hd),
                             persistent=False)
        self.register_buffer("v_cache", torch.zeros(*slots, self.kv_heads, max_seq_len, hd),
                             persistent=False)

    def forward(self, h, pos, positions, cos, sin_signed, slots=None):
        """h [B, hidden]; pos [B]; `slots`: 0..B-1 (the model's buffer), None at batch 1.
        A prefill (chunk P > 1): h [P, hidden], pos [P] the rows' positions, one
        sequence; with batch B > 1 `slots` is the run-time slot [1] of that sequence."""
        hd, kvh = self.head_dim, self.kv_heads
        lead = (self.chunk,) if self.chunk > 1 else (self.batch,) if slots is not None else ()
        x = self.input_layernorm(h) if self.norm_before else h
        q = self.q_proj(x).view(*lead, self.heads, hd)
        k = self.k_proj(x).view(*lead, kvh, hd)
        v = self.v_proj(x).view(*lead, kvh, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:   # (None: learned positions instead of RoPE)
            q, k = rotate(q, cos, sin_signed), rotate(k, cos, sin_signed)
        self.append(k, v, pos, slots)
        attn = self.attend(q, pos, positions, lead, *self.caches_of(slots))
        if self.parallel:   # transformers' GPT-NeoX order of the adds
            return self.mlp(self.post_attention_layernorm(h)) + self.o_proj(attn) + h
        if not self.norm_before:   # OPT-350m: each residual add, then its norm
            h = self.input_layernorm(h + self.o_proj(attn))
            return self.post_attention_layernorm(h + self.mlp(h))
        if not self.sandwich:
            h = h + self.o_proj(attn)
            return h + self.mlp(self.post_attention_layernorm(h))
        h = h + self.post_attention_layernorm(self.o_proj(attn))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))

    def caches_of(self, slots) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values a step attends over: the cache itself, or in a slot
        prefill (batch > 1) its run-time slot's [kv heads, positions, head dim], taken
        whole (a gather of one row of B, whose index the kernel checks: a slot outside
        [0, B) is a RunError, never a read outside the cache)."""
        if self.chunk == 1 or self.batch == 1:
            return self.k_cache, self.v_cache
        shape = self.k_cache.shape[1:]
        return self.k_cache[slots].view(shape), self.v_cache[slots].view(shape)

    def attend(self, q, pos, positions, lead, k_cache, v_cache):
        """The attention output [rows, heads * head dim] of q [*lead, heads, head dim]
        over the cache, each row masked past its own position. A KV head's query heads
        (and a prefill's rows: P x groups of them) are the rows of one matmul with its
        cache, which is never repeated (nor copied, but for a slot prefill's slot)."""
        hd, kvh, groups = self.head_dim, self.kv_heads, self.heads // self.kv_heads
        chunk = self.chunk
        if chunk > 1:   # [kv heads, P x groups, head dim]: a copy of q, not of the cache
            q = q.view(chunk, kvh, groups, hd).transpose(0, 1).reshape(kvh, chunk * groups, hd)
        else:
            q = q.view(*lead, kvh, groups, hd)
        scores = softcap((q @ k_cache.transpose(-2, -1)) * self.scale, self.softcap)
        if chunk > 1:   # [kv heads, P, groups, positions]; row i at pos[i]
            scores, at = scores.view(kvh, chunk, groups, -1), pos.view(-1, 1, 1)
        else:           # each slot's own position
            at = pos.view(-1, 1, 1, 1) if lead else pos
        scores = scores.masked_fill(positions > at, float("-inf"))
        if self.window is not None and self.window < self.max_seq_len:
            # transformers' sliding window: key k is seen from position q iff k > q - window
            scores = scores.masked_fill(positions <= at - self.window, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if chunk == 1:
            return (probs @ v_cache).reshape(self.batch, self.heads * hd)
        out = probs.view(kvh, chunk * groups, -1) @ v_cache          # [kvh, P x groups, hd]
        return out.view(kvh, chunk, groups, hd).transpose(0, 1).reshape(chunk, self.heads * hd)

    def append(self, k, v, pos, slots) -> None:
        """This step's keys and values into the cache: at `pos` (batch 1), or slot b's
        at position pos[b] of slot b (a slot's writes never touch another's rows); a
        prefill's row i at position pos[i] (one state update of P positions), of slot
        `slots` [1] with batch > 1 (`slot_append`)."""
        if self.chunk > 1 and self.batch > 1:
            self.slot_append(self.k_cache, k, pos, slots)
            self.slot_append(self.v_cache, v, pos, slots)
            return
        if slots is None and self.chunk > 1:
            self.k_cache.index_copy_(1, pos, k.transpose(0, 1).to(self.k_cache.dtype))
            self.v_cache.index_copy_(1, pos, v.transpose(0, 1).to(self.v_cache.dtype))
            return
        if slots is None:
            self.k_cache.index_copy_(1, pos, k.unsqueeze(1).to(self.k_cache.dtype))
            self.v_cache.index_copy_(1, pos, v.unsqueeze(1).to(self.v_cache.dtype))
            return
        self.k_cache[slots, :, pos] = k.to(self.k_cache.dtype)
        self.v_cache[slots, :, pos] = v.to(self.v_cache.dtype)

    def slot_append(self, cache, x, pos, slot) -> None:
        """x [P, kv heads, head dim] into `cache` [B, kv heads, positions, head dim]:
        row i of kv head h at position pos[i] of slot `slot`, as one state update of
        P x kv heads rows of the cache seen as [B x kv heads x positions, head dim], at
        (slot * kv heads + h) * positions + pos[i]. That index is in range exactly when
        the slot is in [0, B) (h < kv heads, pos[i] in range), so the kernel's check of
        it is the slot's check; a position outside the cache would land in a
        neighbouring head's rows, so it becomes -1 (out of range: one RunError, no
        write)."""
        size = self.max_seq_len
        heads = torch.arange(self.kv_heads, device=pos.device).view(-1, 1)
        rows = (slot * self.kv_heads + heads) * size + pos.view(1, -1)   # [kv heads, P]
        rows = torch.where((pos >= 0) & (pos < size), rows, -1).reshape(-1)
        flat = cache.view(-1, cache.shape[-1])
        flat.index_copy_(0, rows, x.transpose(0, 1).reshape(rows.shape[0], -1).to(cache.dtype))

    def mlp(self, x):
        if not hasattr(self, "gate_proj"):
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _lay_out_constants(model: nn.Module) -> None:
    """Replace the (meta) parameters of `model`, then its own buffers (not its layers':
    those are the KV caches, the engine's state), by views into one flat CPU tensor per
    dtype, in that order (a tied parameter once), each aligned to POOL_ALIGN elements:
    the order and alignment in which the memory plan places weights (see
    DecoderStep.empty). The layers' buffers get memory of their own."""
    from tilec.ir.schedule import POOL_ALIGN

    constants = list(model.named_parameters()) + list(model._buffers.items())
    ends: dict[torch.dtype, int] = {}
    offsets = []
    for _, t in constants:
        start = -(-ends.get(t.dtype, 0) // POOL_ALIGN) * POOL_ALIGN
        offsets.append(start)
        ends[t.dtype] = start + t.numel()
    flat = {dt: torch.empty(end, dtype=dt) for dt, end in ends.items()}
    real = {id(t): flat[t.dtype][start:start + t.numel()].view(t.shape)
            for (_, t), start in zip(constants, offsets)}
    params = {id(p): nn.Parameter(real[id(p)], requires_grad=p.requires_grad)
              for _, p in model.named_parameters()}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = params[id(p)]
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = real[id(buf)] if module is model else \
                    torch.empty_like(buf, device="cpu")


class DecoderStep(nn.Module):
    """What the decode-step families share: token embeddings, `num_hidden_layers` of
    `layer(cfg, max_seq_len)`, the final RMSNorm, an lm_head (the embeddings, if tied)
    and the cache positions 0..max_seq_len-1 (the causal mask compares them to `pos`).
    `batch`: the sequences one step advances (its slots); a family that decodes more
    than one says so with `batched`.

    forward() runs each of `layers` once, in order, each handed the hidden state of the
    one before and otherwise the same values: so the compiler traces two layers and
    builds the others from the second (compiler/layers.py, which checks the two agree)."""

    repeated_layers = "layers"
    batched = False

    def __init__(self, cfg, max_seq_len: int, layer, batch: int = 1):
        super().__init__()
        self.cfg = cfg
        self.max_seq_len = max_seq_len
        self.batch = batch
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layer(cfg, max_seq_len) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("positions", torch.arange(max_seq_len), persistent=False)
        if batch > 1:   # the slot of each row of a step (the cache writes' first index)
            self.register_buffer("slots", torch.arange(batch), persistent=False)

    @classmethod
    def empty(cls, cfg, max_seq_len: int, dtype: torch.dtype, batch: int = 1):
        """A model with uninitialised weights in `dtype` and correct buffers, built
        without a float32 copy or a default initialisation (a 1B model in seconds).

        The parameters and the model's own buffers are views into one flat tensor per
        dtype, in that order, each starting at a multiple of POOL_ALIGN elements: where
        the memory plan puts a model's weights in the engine's weight pools. Packing
        the engine then takes that tensor as the pool instead of copying 2.5 GB into a
        new one (pack.fill_pool checks that the offsets agree, and copies if not)."""
        with torch.device("meta"):
            model = cls(cfg, max_seq_len, batch=batch) if batch != 1 else cls(cfg, max_seq_len)
        # Cast on meta, where it costs nothing: materialising in float32 first and then
        # casting read 5 GB and wrote 2.5 GB for a 1B model in bfloat16.
        model = model.to(dtype)
        _lay_out_constants(model)
        with torch.no_grad():
            for name, value in model.rope_buffers().items():
                getattr(model, name).copy_(value)
            model.positions.copy_(torch.arange(max_seq_len))
            if batch > 1:
                model.slots.copy_(torch.arange(batch))
        model.reset_cache()
        return model

    def inverse_frequencies(self) -> torch.Tensor:
        """RoPE's inverse frequencies (the `inv_freq` buffer every family registers)."""
        raise NotImplementedError

    def rope_buffers(self) -> dict[str, torch.Tensor]:
        """The RoPE buffers' values, by buffer name."""
        return {"inv_freq": self.inverse_frequencies()}

    def reset_cache(self) -> None:
        raise NotImplementedError


class LlamaDecodeStep(DecoderStep):
    """forward(token [B] int64, pos [B] int64) -> {"logits": [B, vocab], "next_token": [B]}
    (B: `batch`, 1 by default)"""

    batched = True

    def __init__(self, cfg: LlamaConfig, max_seq_len: int, batch: int = 1):
        cfg.check_max_seq_len(max_seq_len, "model")
        super().__init__(cfg, max_seq_len, functools.partial(Layer, batch=batch), batch)
        for index, layer in enumerate(self.layers):
            layer.window = cfg.layer_window(index)
            if cfg.scale_attn_by_inverse_layer_idx:
                layer.scale /= float(index + 1)
        if cfg.learned_positions:
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings + cfg.position_offset,
                                                cfg.hidden_size)
        self.norm = norm_of(cfg, cfg.hidden_size) if cfg.final_norm else nn.Identity()
        width = cfg.word_embed_proj_dim
        if width is not None and width != cfg.hidden_size:   # OPT-350m
            self.embed_tokens = nn.Embedding(cfg.vocab_size, width)
            self.lm_head = nn.Linear(width, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
            self.project_in = nn.Linear(width, cfg.hidden_size, bias=False)
            self.project_out = nn.Linear(cfg.hidden_size, width, bias=False)
        if cfg.gemma_norms:
            # sqrt(hidden_size) rounded to the weights' dtype, as transformers rounds it
            self.embed_scale = {dt: torch.tensor(cfg.hidden_size ** 0.5, dtype=dt,
                                                 device="cpu").item()
                                for dt in (torch.float32, torch.bfloat16, torch.float16)}
        # transformers scales cos and sin by it (yarn, longrope); 1.0 otherwise
        self.rope_attention_factor = rope_parameters(cfg)[1]
        self.register_buffer("inv_freq", self.inverse_frequencies(), persistent=False)
        if cfg.rope_local is not None:   # Gemma3: the sliding layers' own RoPE
            self.local_attention_factor = rope_parameters(cfg.local_rope())[1]
            self.register_buffer("inv_freq_local", rope_parameters(cfg.local_rope())[0],
                                 persistent=False)

    def inverse_frequencies(self) -> torch.Tensor:
        return rope_parameters(self.cfg)[0]

    def rope_buffers(self) -> dict[str, torch.Tensor]:
        buffers = super().rope_buffers()
        if self.cfg.rope_local is not None:
            buffers["inv_freq_local"] = rope_parameters(self.cfg.local_rope())[0]
        return buffers

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        slots = getattr(self, "slots", None)
        return self.decode(token, pos, slots, per_row=slots is not None)

    def decode(self, token, pos, slots, per_row: bool, used=None) -> dict[str, torch.Tensor]:
        """Rows `token` at positions `pos` (one each) through every layer; `per_row`:
        RoPE per row ([rows, 1, rotary dims], over each row's heads). `used`: the rows
        whose logits are wanted (an index tensor): only they go through the final norm
        and the lm_head."""
        h = self.embed_tokens(token)                              # [rows, hidden]
        if self.cfg.gemma_norms:
            h = h * self.embed_scale[h.dtype]
        if hasattr(self, "project_in"):
            h = self.project_in(h)
        if self.cfg.learned_positions:   # (OPT's first position is row 2 of its table)
            table = self.embed_positions.weight[self.cfg.position_offset:]
            h = h + nn.functional.embedding(pos, table)
        rope = (None, None) if self.cfg.learned_positions else \
            rope_at(pos, self.inv_freq, self.rope_attention_factor, h.dtype)
        local = rope if self.cfg.rope_local is None else \
            rope_at(pos, self.inv_freq_local, self.local_attention_factor, h.dtype)
        if per_row:
            rope, local = (tuple(t if t is None else t.unsqueeze(1) for t in pair)
                           for pair in (rope, local))
        for layer in self.layers:
            h = layer(h, pos, self.positions, *(local if layer.window else rope), slots)
        if used is not None:
            h = h[used]
        h = self.norm(h)
        if hasattr(self, "project_out"):
            h = self.project_out(h)
        logits = softcap(self.lm_head(h), self.cfg.final_logit_softcapping)
        logits = logits.to(torch.float32)
        return {"logits": logits, "next_token": logits.argmax(dim=-1)}

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.k_cache.zero_()
            layer.v_cache.zero_()


class LlamaPrefillStep(LlamaDecodeStep):
    """forward(token [P] int64, pos [1] int64, last [1] int64, slot [1] int64)
    -> {"logits": [1, vocab], "next_token": [1]}: one chunk of P prompt tokens of one
    sequence at positions pos .. pos+P-1, in one call, and the logits of its row `last`.

    Row i attends to the cache's keys at positions <= pos + i (the ones before the chunk
    and the chunk's own, appended first), and appends its keys and values at pos + i, in
    the same KV cache (same buffers, same layout) as LlamaDecodeStep of the same `batch`:
    at batch B > 1 all in the cache slot `slot` (a run-time index, checked like every
    other: LlamaDecodeStep's Layer.slot_append), and at batch 1 there is no `slot`.

    A chunk shorter than P is padded by the host at its end: its padded rows write cache
    positions past the prompt, which every decode step writes (at its own position)
    before it reads them. So the row whose logits predict the next token is the chunk's
    last real one, which the host names at run time in `last` (a gather of that row,
    index-checked); only that row goes through the final norm and the lm_head (the
    other P - 1 rows' P x vocab x hidden of lm_head work would be thrown away). Padding
    at the front instead, to keep the used row at P - 1, would give the padded rows
    positions before the chunk's, whose cache rows hold the sequence's real keys.

    Without `last` (batch 1 only: forward(token, pos), the first form) every row's
    logits are computed: {"logits": [P, vocab], "next_token": [P]}."""

    def __init__(self, cfg: LlamaConfig, max_seq_len: int, chunk: int, batch: int = 1):
        if not isinstance(chunk, int) or not 1 < chunk <= max_seq_len:
            raise ConfigError(f"model: prefill.chunk: expected an integer in [2, max_seq_len "
                              f"{max_seq_len}], found {chunk!r}")
        self.chunk = chunk
        super().__init__(cfg, max_seq_len, batch)
        for layer in self.layers:
            layer.chunk = chunk
        self.register_buffer("chunk_rows", torch.arange(chunk), persistent=False)

    @classmethod
    def over(cls, decode: LlamaDecodeStep, chunk: int) -> "LlamaPrefillStep":
        """A prefill step of `chunk` rows over `decode`'s own parameters and buffers
        (the same tensor objects: nothing copied or drawn, and a family model's weights
        may still be being drawn into them), so the compiled entries share them by name
        (memplan.share_fixed). Built by __init__ (on the meta device, where it allocates
        nothing), so every attribute __init__ sets is set; then each module's tensors
        are replaced by the decode step's module of the same name, which must hold
        tensors of the same names (a ValueError otherwise); `chunk_rows` is its own."""
        if type(decode) is not LlamaDecodeStep:
            raise ValueError(f"a prefill step is built over a LlamaDecodeStep, not "
                             f"{type(decode).__name__}")
        with torch.device("meta"):
            step = cls(decode.cfg, decode.max_seq_len, chunk, decode.batch)
        mine = {"": {"chunk_rows"}}   # per module: tensors only the prefill step has
        for name, module in step.named_modules():
            theirs = decode.get_submodule(name)
            if name and type(theirs) is not type(module):
                raise ValueError(f"prefill step module {name!r}: {type(module).__name__}, "
                                 f"the decode step's is {type(theirs).__name__}")
            for table in ("_parameters", "_buffers"):
                own, other = getattr(module, table), getattr(theirs, table)
                keep = mine.get(name, set()) if table == "_buffers" else set()
                if set(own) - keep != set(other):
                    raise ValueError(f"prefill step module {name!r}: {table[1:]} "
                                     f"{sorted(set(own) - keep)}, the decode step's "
                                     f"{sorted(other)}")
                own.update(other)
        step.chunk_rows = torch.arange(chunk, device=decode.positions.device)
        return step.train(decode.training)

    def forward(self, token: torch.Tensor, pos: torch.Tensor, last: torch.Tensor | None = None,
                slot: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.batch > 1 and (slot is None or last is None):
            raise ValueError(f"a prefill step of batch {self.batch} takes token, pos, last "
                             "and slot")
        if self.batch == 1 and slot is not None:
            raise ValueError("a prefill step of batch 1 takes no slot")
        return self.decode(token, pos + self.chunk_rows, slot, per_row=True, used=last)
