"""A wide argmax runs in stages (chunk maxima, their argmax, the argmax inside the
winning chunk) and must equal torch.argmax exactly, ties included (first index)."""
import pytest
import torch
from torch import nn

import tilec.api as tilec_api
from tilec.compiler.aten_ops import WIDE_ARGMAX, _argmax_chunk


class Argmax(nn.Module):
    def forward(self, x):
        return x.argmax(-1), (x * 2).argmax(-1, keepdim=True)


@pytest.mark.parametrize("shape", [(1, 8192), (3, 5120), (2, 3, 4096), (1, 5000)])
def test_staged_argmax_matches_torch(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    rows = x.view(-1, shape[-1])
    rows[:, 7] = 10.0                  # a tie across chunks: the first index must win
    rows[:, shape[-1] - 3] = 10.0
    rows[-1, 3000] = 11.0              # one row's maximum in a later chunk
    engine = tilec_api.compile(Argmax(), (x,), workers=3)
    expected = Argmax()(x)
    for backend in ("reference", "interpret"):
        out = engine.run(backend=backend, x=x)
        assert torch.equal(out["output0"], expected[0]), backend
        assert torch.equal(out["output1"], expected[1]), backend


def test_staged_only_when_wide_and_divisible():
    assert _argmax_chunk(WIDE_ARGMAX - 1) == 0
    assert _argmax_chunk(8192) == 1024
    assert _argmax_chunk(128256) == 256      # Llama 3's vocabulary: 501 chunks of 256
    assert _argmax_chunk(5000) == 0          # no power-of-two chunk of 64 or more divides it
