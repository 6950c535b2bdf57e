"""The operators of issue 15 compile for sm_90 (H100/H200) without a GPU, in float32 and
bfloat16: one engine holding all of them (test_ops.py checks each against eager)."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tilec.api
from tilec.codegen import aot


class Issue15Ops(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.ln = nn.LayerNorm(32)
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, x, y, q, k, v, mask):
        h = self.fc(x)
        capped = torch.tanh(h / 30.0) * 30.0
        return (self.ln(capped), self.gn(h.view(2, 4, 16)),
                F.scaled_dot_product_attention(q, k, v, is_causal=True),
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                torch.cumsum(x, 0) + torch.arange(32), x.mean() + x.sum(0) + x.amax(1, True),
                x.abs() ** y + torch.div(x, y, rounding_mode="floor")
                + torch.div(x, y, rounding_mode="trunc") + torch.clamp(x, y, y + 1),
                torch.logical_not(x > y) | (x < 0), (h > 0).any(-1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_issue15_ops_compile_for_sm90(dtype):
    low = getattr(torch, dtype)
    args = (torch.randn(4, 32, dtype=low), torch.randn(4, 32, dtype=low),
            *(torch.randn(1, 2, 4, 8, dtype=low) for _ in range(3)), torch.rand(4, 4) > 0.5)
    engine = tilec.api.compile(Issue15Ops(), args, target="h200", workers=8, dtype=dtype,
                               aot=False)
    outputs = engine.summary()["outputs"]
    assert [o["dtype"] for o in outputs[-2:]] == ["bool", "bool"]
    info = aot.compile_for_gpu(engine.data.kernel_source, engine.data.manifest.schedule.pools,
                               arch=90)
    assert info["cubin"][:4] == b"\x7fELF"
    assert re.fullmatch(r"sm_90a?", info["ptx_target"])
