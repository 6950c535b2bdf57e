"""The `mla_dsa` family: one decode step of a decoder with multi-head latent attention
(MLA) over a compressed KV cache and DeepSeek sparse attention (DSA): a lightning
indexer scores every cached token and attention reads only the top-k of them.

Written from the public equations (DeepSeek-V2 for MLA, DeepSeek-V3.2 for the
indexer), as an eager PyTorch reference for tilec's engines, one token per call:

  MLA    c_q = RMSNorm(W_DQ x);  [q_nope, q_rope] = W_UQ c_q  (per head)
         [c_kv, k_rope] = W_DKV x;  c_kv = RMSNorm(c_kv);  RoPE on q_rope and k_rope
         the cache holds c_kv [S, kv_lora_rank] and k_rope [S, rope_dim], shared by all
         heads; W_UK and W_UV (the two halves of kv_b_proj) are absorbed:
         score_s = (q_nope W_UK) . c_kv_s + q_rope . k_rope_s,  o = softmax(score) C_kv W_UV
  DSA    index score I_s = sum_j w_j ReLU(q^I_j . k^I_s), with q^I = W_IQ c_q (n heads),
         k^I_s = W_IK x_s (cached), w = W_IW x; attention keeps the top-k positions
         s <= pos by I_s and masks the rest.

The indexer here applies no RoPE to its queries and keys (V3.2 rotates part of them),
and the MLP is a dense SwiGLU (the published models use mixture-of-experts layers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from tilec.errors import ConfigError
from tilec.models.llama import DecoderStep, RMSNorm, swap_halves


@dataclass(frozen=True)
class MlaDsaConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    q_lora_rank: int = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    index_n_heads: int = 2
    index_head_dim: int = 16
    index_topk: int = 8
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02   # the scale of a family model's random weights

    @staticmethod
    def from_dict(data: dict, where: str = "config") -> "MlaDsaConfig":
        known = {f.name for f in fields(MlaDsaConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown mla_dsa config key {unknown[0]!r}")
        cfg = MlaDsaConfig(**data)
        for f in fields(MlaDsaConfig):
            value = getattr(cfg, f.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if f.type == "int" and not (number and isinstance(value, int) and value > 0):
                raise ConfigError(f"{where}: {f.name}: expected a positive integer, "
                                  f"found {value!r}")
            if f.type == "float" and not (number and value > 0):
                raise ConfigError(f"{where}: {f.name}: expected a positive number, "
                                  f"found {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{where}: {f.name}: expected true or false, "
                                  f"found {value!r}")
        if cfg.qk_rope_head_dim % 2:
            raise ConfigError(f"{where}: qk_rope_head_dim: must be even for RoPE, "
                              f"found {cfg.qk_rope_head_dim}")
        return cfg


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_tables(inv_freq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and the signed sin of `pos` for a rotation in two halves (x * cos +
    swap_halves(x) * sin_signed, as in the llama family)."""
    angles = pos.float() * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2), angles.sin()
    return cos, torch.cat([-sin, sin])


class Indexer(nn.Module):
    """DSA's lightning indexer: scores every cached token for the query and keeps the
    top k. Its own module (as in DeepSeek-V3.2's code), so model.yaml roles can give it
    to its own workers or devices (`roles: {indexer: {modules: [indexer]}}`)."""

    def __init__(self, cfg: MlaDsaConfig, max_seq_len: int):
        super().__init__()
        c = self.cfg = cfg
        self.index_q_proj = nn.Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim,
                                      bias=False)
        self.index_k_proj = nn.Linear(c.hidden_size, c.index_head_dim, bias=False)
        self.index_weights_proj = nn.Linear(c.hidden_size, c.index_n_heads, bias=False)
        self.register_buffer("index_cache", torch.zeros(max_seq_len, c.index_head_dim),
                             persistent=False)

    def forward(self, c_q, x, pos, positions) -> torch.Tensor:
        """0 for the top-k positions s <= pos by index score, -inf elsewhere: [S]."""
        c = self.cfg
        q_index = self.index_q_proj(c_q).view(c.index_n_heads, c.index_head_dim)
        self.index_cache.index_copy_(0, pos, self.index_k_proj(x).to(self.index_cache.dtype))
        # sum over index heads as a product: [1, heads] @ [heads, S]
        weights = self.index_weights_proj(x)
        scores = (weights @ torch.relu(q_index @ self.index_cache.T)).view(-1)
        scores = scores.masked_fill(positions > pos, float("-inf"))
        top = torch.topk(scores, min(c.index_topk, scores.shape[0])).indices
        hidden = torch.full_like(scores, float("-inf")).index_fill(0, top, 0.0)
        return hidden.masked_fill(positions > pos, float("-inf"))


class Layer(nn.Module):
    def __init__(self, cfg: MlaDsaConfig, max_seq_len: int):
        super().__init__()
        c = cfg
        self.cfg = cfg
        d, h = c.hidden_size, c.num_attention_heads
        self.input_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.q_a_proj = nn.Linear(d, c.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.q_b_proj = nn.Linear(c.q_lora_rank, h * (c.qk_nope_head_dim + c.qk_rope_head_dim),
                                  bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(h * c.v_head_dim, d, bias=False)
        self.indexer = Indexer(cfg, max_seq_len)
        self.post_attention_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.gate_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, d, bias=False)
        # the compressed cache: latent and rotated key part (the indexer keeps its keys)
        self.register_buffer("ckv_cache", torch.zeros(max_seq_len, c.kv_lora_rank),
                             persistent=False)
        self.register_buffer("kpe_cache", torch.zeros(max_seq_len, c.qk_rope_head_dim),
                             persistent=False)

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [heads, nope, kv_lora] and W_UV [heads, v, kv_lora] from kv_b_proj."""
        c = self.cfg
        w = self.kv_b_proj.weight.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim,
                                       c.kv_lora_rank)
        return w[:, :c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]

    def queries(self, x, cos, sin_signed):
        """(c_q, q_nope [heads, nope], q_rope [heads, rope] rotated)."""
        c = self.cfg
        c_q = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(c_q).view(c.num_attention_heads, -1)
        q_nope, q_pe = q[:, :c.qk_nope_head_dim], q[:, c.qk_nope_head_dim:]
        return c_q, q_nope, q_pe * cos + swap_halves(q_pe) * sin_signed

    def forward(self, h, pos, positions, cos, sin_signed):
        h = h + self.o_proj(self.attention(self.input_layernorm(h), pos, positions, cos,
                                           sin_signed))
        x = self.post_attention_layernorm(h)
        return h + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    def attention(self, x, pos, positions, cos, sin_signed):
        """Append this token to the caches and attend: [1, heads * v_head_dim]."""
        c = self.cfg
        heads, nope, rope = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
        c_q, q_nope, q_pe = self.queries(x, cos, sin_signed)
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(kv[:, :c.kv_lora_rank])
        k_pe = kv[:, c.kv_lora_rank:]
        k_pe = k_pe * cos + swap_halves(k_pe) * sin_signed
        self.ckv_cache.index_copy_(0, pos, c_kv.to(self.ckv_cache.dtype))
        self.kpe_cache.index_copy_(0, pos, k_pe.to(self.kpe_cache.dtype))
        selection = self.indexer(c_q, x, pos, positions)
        w_uk, w_uv = self.absorbed()
        q_latent = (q_nope.unsqueeze(1) @ w_uk).squeeze(1)              # [heads, kv_lora]
        scores = q_latent @ self.ckv_cache.T + q_pe @ self.kpe_cache.T   # [heads, S]
        scores = scores * (nope + rope) ** -0.5 + selection
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
        o_latent = probs @ self.ckv_cache                                # [heads, kv_lora]
        return (o_latent.unsqueeze(1) @ w_uv.transpose(1, 2)).reshape(1, heads * c.v_head_dim)


class MlaDsaDecodeStep(DecoderStep):
    """forward(token [1] int64, pos [1] int64) -> {"logits": [1, vocab], "next_token": [1]}"""

    def __init__(self, cfg: MlaDsaConfig, max_seq_len: int):
        super().__init__(cfg, max_seq_len, Layer)
        self.register_buffer("inv_freq", self.inverse_frequencies(), persistent=False)

    def inverse_frequencies(self) -> torch.Tensor:
        return rope_inv_freq(self.cfg.qk_rope_head_dim, self.cfg.rope_theta)

    def reset_cache(self) -> None:
        for layer in self.layers:
            for cache in (layer.ckv_cache, layer.kpe_cache, layer.indexer.index_cache):
                cache.zero_()

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        cos, sin_signed = rope_tables(self.inv_freq, pos)
        h = self.embed_tokens(token)
        for layer in self.layers:
            h = layer(h, pos, self.positions, cos.to(h.dtype), sin_signed.to(h.dtype))
        logits = self.lm_head(self.norm(h)).float()
        return {"logits": logits, "next_token": logits.argmax(-1)}


def explicit_attention(layer: Layer, x, pos, positions, cos, sin_signed) -> torch.Tensor:
    """MLA without absorption, for checking `Layer.attention` (after it has appended this
    token): decompress each selected cached token's key and value with kv_b_proj and
    attend per head over them. Returns [1, heads * v_head_dim]."""
    c = layer.cfg
    heads, nope = c.num_attention_heads, c.qk_nope_head_dim
    c_q, q_nope, q_pe = layer.queries(x, cos, sin_signed)
    selected = layer.indexer(c_q, x, pos, positions) == 0
    kv = layer.kv_b_proj(layer.ckv_cache[selected]).view(-1, heads, nope + c.v_head_dim)
    k_nope, v = kv[..., :nope], kv[..., nope:]                       # [n, heads, .]
    k_pe = layer.kpe_cache[selected]                                 # [n, rope]
    scores = torch.einsum("hd,nhd->hn", q_nope, k_nope) + q_pe @ k_pe.T
    probs = torch.softmax(scores / math.sqrt(nope + c.qk_rope_head_dim), dim=-1)
    return torch.einsum("hn,nhd->hd", probs, v).reshape(1, -1)
