"""DeepSeek-V3 (`DeepseekV3ForCausalLM` of transformers 5.x) as one decode step: multi-head
latent attention (MLA) over a compressed cache, dense MLP layers, then mixture-of-experts
layers whose experts run in a static schedule.

Numerically it is transformers' model, one token per call:
  * MLA: q from q_proj, or q_b_proj(RMSNorm(q_a_proj x)) with q_lora_rank; [c_kv, k_rot]
    from kv_a_proj_with_mqa, c_kv normed; RoPE on q_rot and k_rot only (interleaved
    pairs with rope_interleave, as transformers' apply_rotary_pos_emb_interleave);
    the cache holds c_kv [S, kv_lora_rank] and k_rot [S, qk_rope_head_dim], shared by
    the heads. W_UK and W_UV (kv_b_proj's halves) are absorbed into the query and the
    output: per step the cache is read once, never decompressed per head.
  * MoE: the router's sigmoid scores plus e_score_correction_bias choose the experts
    (group-limited: the topk_group groups with the largest sum of their best two
    scores), weighted by their plain scores (normalised with norm_topk_prob) times
    routed_scaling_factor; the shared experts run beside them.

Experts in a static schedule: the routed experts of a layer are stacked pools
[E, ...]; the step indexes them with the router's top-k ids (`pool[ids]`) and
multiplies batched, one batch entry per expert slot. The frontend lowers "pool indexed
by a run-time id, then matmul" into a matmul whose B operand's batch offset is read
at run time (compiler/aten_ops.py `_index`), so the tasks are the same every step and
only the bytes they stream change.

`Attention.scores` is where DeepSeek-V3.2 / GLM-5's sparse attention (the DSA
indexer's mask over the cache) adds on: it returns the scores before the softmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from tilec.errors import ConfigError
from tilec.models.blocks import LayerNorm, RMSNorm
from tilec.models.llama import DecoderStep
from tilec.models.rope import rope_parameters

ACTIVATIONS = {"silu": F.silu}


@dataclass(frozen=True)
class DeepseekConfig:
    """transformers' DeepseekV3Config fields that change what the model computes
    (its defaults), less the ones tilec refuses (tilec/models/architectures.py)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or YaRN's parameters (rope_type "yarn" and its keys: tilec/models/rope.py)
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # "dense" or "sparse" (MoE) per layer; None: dense up to first_k_dense_replace
    mlp_layer_types: tuple | None = None
    # DSA (DeepSeek-V3.2, GLM-5): the lightning indexer keeps index_topk cached tokens;
    # None: no indexer (DeepSeek-V3)
    index_topk: int | None = None
    index_n_heads: int = 64
    index_head_dim: int = 128
    # "full" (runs its indexer) or "shared" (the previous full layer's selection) per
    # layer (GLM-5); None: every layer full
    indexer_types: tuple | None = None
    # not a transformers field but the architecture's: GLM-5's indexer turns RoPE pairs,
    # DeepSeek-V3.2's turns halves
    index_rope_interleave: bool = False

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe(self, layer: int) -> bool:
        if self.mlp_layer_types is not None:
            return _of_layer(self.mlp_layer_types, layer) == "sparse"
        return layer >= self.first_k_dense_replace

    def indexer_type(self, layer: int) -> str | None:
        """"full", "shared" or None (no DSA)."""
        if self.index_topk is None:
            return None
        return "full" if self.indexer_types is None else _of_layer(self.indexer_types, layer)

    @staticmethod
    def from_dict(data: dict, where: str = "config") -> "DeepseekConfig":
        known = {f.name: f for f in fields(DeepseekConfig)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{where}: {unknown[0]}: not a DeepSeek-V3 config field")
        lists = {k: tuple(v) for k, v in data.items()
                 if isinstance(v, list) and known[k].type == "tuple | None"}
        cfg = DeepseekConfig(**{**data, **lists})
        for name, f in known.items():
            value = getattr(cfg, name)
            _check_field(where, name, f.type, value)
        need = _needs(where)
        need(cfg.hidden_act in ACTIVATIONS, "hidden_act",
             f"{cfg.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        need(cfg.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even for RoPE")
        need(cfg.n_routed_experts % cfg.n_group == 0, "n_group",
             f"{cfg.n_group} does not divide n_routed_experts {cfg.n_routed_experts}")
        need(cfg.topk_group <= cfg.n_group, "topk_group", f"more than n_group {cfg.n_group}")
        need(cfg.n_group == 1 or cfg.n_routed_experts // cfg.n_group >= 2, "n_group",
             "groups of fewer than 2 experts (the router scores a group by its best two)")
        need(cfg.num_experts_per_tok <= cfg.topk_group * cfg.n_routed_experts // cfg.n_group,
             "num_experts_per_tok", "more than the experts of topk_group groups")
        _check_layer_types(cfg, need)
        return cfg


def _check_layer_types(cfg: DeepseekConfig, need) -> None:
    """mlp_layer_types and the DSA fields: one known word per layer, a shared indexer
    layer after a full one, an indexer that can rotate and has q_lora_rank's residual."""
    for key, words in (("mlp_layer_types", ("dense", "sparse")),
                       ("indexer_types", ("full", "shared"))):
        value = getattr(cfg, key)
        if value is None:
            continue
        need(len(value) == cfg.num_hidden_layers, key,
             f"{len(value)} entries for {cfg.num_hidden_layers} layers")
        bad = [v for v in value if v not in words]
        need(not bad, key, f"{bad[:1]!r}: expected {' or '.join(words)}")
    if cfg.index_topk is None:
        return
    need(cfg.q_lora_rank is not None, "q_lora_rank",
         "required with the DSA indexer (it reads q_a_layernorm's output)")
    need(cfg.qk_rope_head_dim <= cfg.index_head_dim, "index_head_dim",
         f"smaller than qk_rope_head_dim {cfg.qk_rope_head_dim} (the indexer rotates that many)")
    need(cfg.indexer_types is None or cfg.indexer_types[0] == "full", "indexer_types",
         "layer 0 is 'shared': there is no earlier full layer to share")


def _of_layer(kinds: tuple, layer: int) -> str:
    """Layer `layer`'s entry; past the end the last one: from_dict checks there is one
    per layer, but compiler/memory.py sizes a model by building it with other layer
    counts (dataclasses.replace of num_hidden_layers)."""
    return kinds[min(layer, len(kinds) - 1)]


def _needs(where: str):
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ConfigError(f"{where}: {key}: {what}")
    return need


def _check_field(where: str, name: str, kind: str, value) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    need = _needs(where)
    if kind == "int":
        need(number and isinstance(value, int) and (value > 0 or name == "first_k_dense_replace"
                                                    and value == 0),
             name, f"expected a positive integer, found {value!r}")
    elif kind == "int | None":
        need(value is None or number and isinstance(value, int) and value > 0, name,
             f"expected a positive integer or null, found {value!r}")
    elif kind == "float":
        need(number and value > 0, name, f"expected a positive number, found {value!r}")
    elif kind == "bool":
        need(isinstance(value, bool), name, f"expected true or false, found {value!r}")
    elif kind == "str":
        need(isinstance(value, str), name, f"expected a string, found {value!r}")
    elif kind == "tuple | None":
        need(value is None or isinstance(value, tuple), name, f"expected a list, found {value!r}")


def rope_tables(pos: torch.Tensor, inv_freq: torch.Tensor, factor: float, dtype: torch.dtype):
    """cos and sin of `pos`'s angles, [1, rope_dim / 2] each (transformers' first half of
    cat(freqs, freqs)), times YaRN's attention factor (1.0 without scaling)."""
    freqs = pos.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype)


def yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def rope_parameters_of(cfg: DeepseekConfig) -> tuple[torch.Tensor, float, float]:
    """(inverse frequencies, the factor cos and sin are scaled by, the scores' scale)
    as transformers computes them for DeepSeek: with YaRN, the frequencies and factor
    of tilec/models/rope.py over the qk_rope_head_dim rotary dims, and the scores'
    1/sqrt(qk_head_dim) times mscale(factor, mscale_all_dim)^2 (yarn_apply_mscale)."""
    dim = cfg.qk_rope_head_dim   # transformers: head_dim = qk_rope_head_dim
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_scaling is None:
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0, scale
    yarn = SimpleNamespace(rotary_dim=dim, rope_theta=cfg.rope_theta, rope_type="yarn",
                           rope_scaling=cfg.rope_scaling,
                           max_position_embeddings=cfg.max_position_embeddings)
    inv_freq, factor = rope_parameters(yarn)
    if cfg.rope_scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(cfg.rope_scaling["factor"], cfg.rope_scaling["mscale_all_dim"]) ** 2
    return inv_freq, factor, scale


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool):
    """RoPE on the last dim of x as transformers' DeepSeek applies it: with `interleave`
    dims (2i, 2i+1) turn together and the result lists the evens' then the odds'
    results (apply_rotary_pos_emb_interleave); else the halves turn (rotate_half)."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Indexer(nn.Module):
    """DSA's lightning indexer (transformers' DeepseekV32Indexer / GlmMoeDsaIndexer) for
    one token: index score I_s = sum_h w_h ReLU(softmax_scale q_h . k_s) with q from
    q_a_layernorm's output (wq_b), k = LayerNorm(wk x) cached, RoPE on the first
    qk_rope_head_dim dims of both, w = weights_proj x / sqrt(heads). Returns the mask
    the attention scores add: 0 at the top-k positions s <= pos, -inf elsewhere [S].
    Its own module, so `target.roles` can give it its own workers or devices
    (`modules: [indexer]`)."""

    def __init__(self, cfg: DeepseekConfig, max_seq_len: int):
        super().__init__()
        c = self.cfg = cfg
        self.wq_b = nn.Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, bias=False)
        self.wk = nn.Linear(c.hidden_size, c.index_head_dim, bias=False)
        self.k_norm = LayerNorm(c.index_head_dim, 1e-6)   # transformers' eps
        self.weights_proj = nn.Linear(c.hidden_size, c.index_n_heads, bias=False)
        self.register_buffer("k_cache", torch.zeros(max_seq_len, c.index_head_dim),
                             persistent=False)

    def rotated(self, x, cos, sin):
        """x [.., index_head_dim] with its first qk_rope_head_dim dims rotated."""
        r = self.cfg.qk_rope_head_dim
        turned = rotate(x[..., :r], cos, sin, self.cfg.index_rope_interleave)
        return torch.cat([turned, x[..., r:]], dim=-1)

    def forward(self, x, q_resid, pos, positions, cos, sin):
        c = self.cfg
        q = self.rotated(self.wq_b(q_resid).view(c.index_n_heads, c.index_head_dim), cos, sin)
        k = self.rotated(self.k_norm(self.wk(x)), cos, sin)
        self.k_cache.index_copy_(0, pos, k.to(self.k_cache.dtype))
        scores = torch.relu((q.float() @ self.k_cache.float().T) * c.index_head_dim ** -0.5)
        weights = self.weights_proj(x).float() * c.index_n_heads ** -0.5     # [1, heads]
        index = (weights @ scores).view(-1)                                  # [S]
        # future positions -inf: the top-k takes every visible position before any of
        # them (transformers' topk over pos + 1 cached tokens selects the same ones)
        index = index.masked_fill(positions > pos, float("-inf"))
        top = torch.topk(index, min(c.index_topk, index.shape[0])).indices
        return torch.full_like(index, float("-inf")).index_fill(0, top, 0.0).to(x.dtype)


class Attention(nn.Module):
    """MLA with absorbed projections over the compressed cache (module names and shapes
    as transformers' DeepseekV3Attention, so checkpoints map one to one)."""

    def __init__(self, cfg: DeepseekConfig, max_seq_len: int, layer: int):
        super().__init__()
        c = self.cfg = cfg
        d, h = c.hidden_size, c.num_attention_heads
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, 1e-6)   # transformers' default eps
            self.q_b_proj = nn.Linear(c.q_lora_rank, h * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(h * c.v_head_dim, d, bias=False)
        if c.indexer_type(layer) == "full":
            self.indexer = Indexer(c, max_seq_len)
        self.register_buffer("ckv_cache", torch.zeros(max_seq_len, c.kv_lora_rank),
                             persistent=False)
        self.register_buffer("kpe_cache", torch.zeros(max_seq_len, c.qk_rope_head_dim),
                             persistent=False)
        self.scale = rope_parameters_of(c)[2]

    def queries(self, x, cos, sin):
        """q_a_layernorm's output (None without q_lora_rank), q_nope [heads, nope] and the
        rotated q_rot [heads, rope] of one token."""
        c = self.cfg
        q_resid = None if c.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_proj(x) if q_resid is None else self.q_b_proj(q_resid)
        q = q.view(c.num_attention_heads, c.qk_head_dim)
        q_nope, q_rot = q[:, :c.qk_nope_head_dim], q[:, c.qk_nope_head_dim:]
        return q_resid, q_nope, rotate(q_rot, cos, sin, c.rope_interleave)

    def scores(self, x, pos, positions, cos, sin, selection):
        """Append this token to the caches; the scaled, masked scores of each head over
        the cache [heads, S] and the DSA selection they used (this layer's indexer's, or
        `selection`, the previous full layer's, on a shared layer; None without DSA)."""
        c = self.cfg
        q_resid, q_nope, q_rot = self.queries(x, cos, sin)
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(kv[:, :c.kv_lora_rank])
        k_rot = rotate(kv[:, c.kv_lora_rank:], cos, sin, c.rope_interleave)
        self.ckv_cache.index_copy_(0, pos, c_kv.to(self.ckv_cache.dtype))
        self.kpe_cache.index_copy_(0, pos, k_rot.to(self.kpe_cache.dtype))
        w_uk, _ = self.absorbed()
        q_latent = (q_nope.unsqueeze(1) @ w_uk).squeeze(1)               # [heads, kv_lora]
        scores = q_latent @ self.ckv_cache.T + q_rot @ self.kpe_cache.T   # [heads, S]
        scores = scores * self.scale
        if hasattr(self, "indexer"):
            selection = self.indexer(x, q_resid, pos, positions, cos, sin)
        if selection is not None:
            # -inf off the selection (transformers fills finfo.min: the same zero weights)
            scores = scores + selection
        return scores.masked_fill(positions > pos, float("-inf")), selection

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [heads, nope, kv_lora] and W_UV [heads, v, kv_lora] from kv_b_proj."""
        c = self.cfg
        w = self.kv_b_proj.weight.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim,
                                       c.kv_lora_rank)
        return w[:, :c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]

    def forward(self, x, pos, positions, cos, sin, selection=None):
        c = self.cfg
        scores, selection = self.scores(x, pos, positions, cos, sin, selection)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
        o_latent = probs @ self.ckv_cache                                 # [heads, kv_lora]
        _, w_uv = self.absorbed()
        out = (o_latent.unsqueeze(1) @ w_uv.transpose(1, 2))              # [heads, 1, v]
        return self.o_proj(out.reshape(1, c.num_attention_heads * c.v_head_dim)), selection


class MLP(nn.Module):
    def __init__(self, cfg: DeepseekConfig, intermediate: int):
        super().__init__()
        d = cfg.hidden_size
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gate_proj = nn.Linear(d, intermediate, bias=False)
        self.up_proj = nn.Linear(d, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, d, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """transformers' DeepseekV3TopkRouter for one token: (expert ids [k], weights [k])."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts),
                                                    requires_grad=False)

    def _apply(self, fn, recurse=True):
        """transformers keeps the router in float32 whatever the model's dtype
        (_keep_in_fp32_modules_strict): a cast of the model leaves its values as they
        are, a move still moves them."""
        kept = {name: p.detach().clone() for name, p in self._parameters.items()}
        super()._apply(fn, recurse)
        for name, p in self._parameters.items():
            if p.dtype != torch.float32:
                p.data = kept[name].to(p.device)
        return self

    def forward(self, x):
        c = self.cfg
        e = c.n_routed_experts
        scores = torch.sigmoid(x.float() @ self.weight.float().T)          # [1, E]
        choice = scores + self.e_score_correction_bias.float()
        if c.topk_group < c.n_group:
            # a group's score is the sum of its best two; the topk_group best groups
            # stay (each group's score compared with the topk_group-th best: the same
            # selection as transformers' scatter of the top groups, ties apart)
            grouped = choice.view(c.n_group, e // c.n_group)
            group_scores = torch.topk(grouped, 2).values.sum(-1).view(1, c.n_group)
            kth = torch.topk(group_scores, c.topk_group).values[:, c.topk_group - 1:]
            dropped = (group_scores < kth).view(c.n_group, 1).expand(c.n_group, e // c.n_group)
            choice = choice.masked_fill(dropped.reshape(1, e), float("-inf"))
        ids = torch.topk(choice, c.num_experts_per_tok).indices.view(-1)   # [k]
        weights = F.embedding(ids, scores.view(e, 1)).view(-1)              # scores[ids]
        if c.norm_topk_prob:
            weights = weights / (weights.sum() + 1e-20)
        return ids, weights * c.routed_scaling_factor


class Experts(nn.Module):
    """The routed experts as stacked pools, one batch entry per chosen expert (slot):
    each slot's output [k, 1, D], weighted by its routing weight."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gate_proj = nn.Parameter(torch.zeros(e, i, d))
        self.up_proj = nn.Parameter(torch.zeros(e, i, d))
        self.down_proj = nn.Parameter(torch.zeros(e, d, i))

    def forward(self, x, ids, weights):
        k, d = ids.shape[0], x.shape[-1]
        xs = x.view(1, 1, d).expand(k, 1, d)
        gate = torch.bmm(xs, self.gate_proj[ids].transpose(1, 2))          # [k, 1, I]
        up = torch.bmm(xs, self.up_proj[ids].transpose(1, 2))
        # each slot's routing weight scales its hidden state (transformers scales the
        # down projection's output: the same sum, rounded differently)
        hidden = self.act(gate) * up * weights.view(k, 1, 1)
        return torch.bmm(hidden, self.down_proj[ids].transpose(1, 2))      # [k, 1, D]


class MoE(nn.Module):
    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x):
        ids, weights = self.gate(x)
        routed = self.experts(x, ids, weights.to(x.dtype))
        # the combine, one add per slot onto the shared experts' output: elementwise ops
        # on the shared down projection's result, so they run in its epilogue
        out = self.shared_experts(x)
        for slot in range(routed.shape[0]):
            out = out + routed[slot]
        return out


class Layer(nn.Module):
    def __init__(self, cfg: DeepseekConfig, max_seq_len: int, index: int):
        super().__init__()
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, max_seq_len, index)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe(index) else MLP(cfg, cfg.intermediate_size)

    def forward(self, h, pos, positions, cos, sin, selection=None):
        out, selection = self.self_attn(self.input_layernorm(h), pos, positions, cos, sin,
                                        selection)
        h = h + out
        return h + self.mlp(self.post_attention_layernorm(h)), selection


class DeepseekDecodeStep(DecoderStep):
    """forward(token [1] int64, pos [1] int64) -> {"logits": [1, vocab], "next_token": [1]}"""

    def __init__(self, cfg: DeepseekConfig, max_seq_len: int):
        counter = iter(range(cfg.num_hidden_layers))
        super().__init__(cfg, max_seq_len, lambda c, s: Layer(c, s, next(counter)))
        # the compiler builds layers S+2.. from a trace of layers 0..S+1 (DecoderStep,
        # compiler/layers.py): sound for the last run of layers S.. of one kind (an MLP
        # kind and a full indexer or none: a shared layer reads another layer's
        # selection), GLM-5's 75 MoE layers after its 3 dense ones
        kinds = [(cfg.is_moe(i), cfg.indexer_type(i)) for i in range(cfg.num_hidden_layers)]
        first = len(kinds) - 1
        while first > 0 and kinds[first - 1] == kinds[-1]:
            first -= 1
        if kinds[-1][1] == "shared":
            self.repeated_layers = None
        self.repeated_from = first
        self.register_buffer("inv_freq", self.inverse_frequencies(), persistent=False)
        self.rope_factor = rope_parameters_of(cfg)[1]

    def inverse_frequencies(self) -> torch.Tensor:
        return rope_parameters_of(self.cfg)[0]

    def reset_cache(self) -> None:
        for name, buffer in self.named_buffers():
            if name.endswith("_cache"):
                buffer.zero_()

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed_tokens(token)
        cos, sin = rope_tables(pos, self.inv_freq, self.rope_factor, h.dtype)
        selection = None
        for layer in self.layers:
            h, selection = layer(h, pos, self.positions, cos, sin, selection)
        logits = self.lm_head(self.norm(h)).float()
        return {"logits": logits, "next_token": logits.argmax(-1)}
