"""Fresh random inputs for an engine: what `tilec run` feeds without `--inputs`, and
what `tilec verify --interleavings` runs every interleaving on."""
from __future__ import annotations

import torch

from tilec.runtime.engine import TORCH_DTYPES


def random_inputs(manifest, seed: int = 0) -> dict[str, torch.Tensor]:
    """The declared shapes and dtypes of `manifest.inputs`: floats ~ N(0, 1), integers
    uniform in their [low, high) (from model.yaml; [0, 2) if unknown)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in manifest.inputs:
        dtype = TORCH_DTYPES[s.dtype]
        if dtype.is_floating_point:
            out[s.name] = torch.randn(s.shape, generator=g).to(dtype)
        else:
            high = s.high if s.high is not None else 2
            out[s.name] = torch.randint(s.low, high, s.shape, generator=g, dtype=dtype)
    return out
