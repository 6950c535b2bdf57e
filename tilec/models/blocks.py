"""The pieces the decoder families are built of: norms, soft-capping and RoPE, each
written as transformers computes it (in the ops the frontend lowers)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """`plus_one`: Gemma's, which scales by 1 + weight in float32 before the cast back."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.plus_one = plus_one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (x * (1.0 + self.weight.to(torch.float32))).to(dtype)
        return self.weight * x.to(dtype)


class LayerNorm(nn.Module):
    """nn.LayerNorm's function, written out (the frontend lowers its parts); `affine`
    false: without weight and bias (nn.LayerNorm's elementwise_affine)."""

    def __init__(self, dim: int, eps: float, affine: bool = True):
        super().__init__()
        if affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        scaled = centred * torch.rsqrt((centred * centred).mean(-1, keepdim=True) + self.eps)
        if not hasattr(self, "weight"):
            return scaled
        return scaled * self.weight + self.bias


def norm_of(cfg, dim: int) -> nn.Module:
    """The norm an architecture uses (RMSNorm, Gemma's, or LayerNorm)."""
    if cfg.layer_norm:
        return LayerNorm(dim, cfg.rms_norm_eps, cfg.norm_affine)
    return RMSNorm(dim, cfg.rms_norm_eps, cfg.gemma_norms)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma's soft-capping, as transformers writes it; `x` itself without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([x[..., half:], x[..., :half]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE over the first cos.shape[-1] dims of each head; the others pass (partial
    rotary)."""
    dims = cos.shape[-1]
    if dims == x.shape[-1]:
        return x * cos + swap_halves(x) * sin_signed
    turned = x[..., :dims]
    return torch.cat([turned * cos + swap_halves(turned) * sin_signed, x[..., dims:]], dim=-1)


def rope_at(pos: torch.Tensor, inv_freq: torch.Tensor, factor: float,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin_signed) of position `pos`, [1, rotary dims] each, in `dtype`
    (`factor`: what transformers scales them by, 1.0 but for yarn and longrope)."""
    freqs = pos.to(torch.float32)[:, None] * inv_freq[None, :]
    cos = torch.cat([freqs, freqs], dim=-1).cos()
    sin = freqs.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)
