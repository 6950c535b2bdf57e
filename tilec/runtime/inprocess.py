"""A whole engine run in this process, as `tilec.Engine` and `tilec verify` run it: an
executor over every device's part (the devices taking turns), and fresh random inputs
(what `tilec run` feeds without `--inputs`, what `tilec verify --interleavings` runs
every interleaving on)."""
from __future__ import annotations

import torch

from tilec.errors import RunError
from tilec.runtime.enginefile import TORCH_DTYPES, EngineFile
from tilec.runtime.executors import make_executor


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


def parts_executor(parts: tuple[EngineFile, ...], backend: str = "auto",
                   policy: str = "round_robin", seed: int = 0):
    """An executor over every device's part of an engine in this process: the one
    part's own, or the devices taking turns (distributed.LocalDevices; `tilec run`
    starts one process per device instead)."""
    if len(parts) == 1:
        return make_executor(parts[0], backend, policy=policy, seed=seed)
    from tilec.runtime.distributed import LocalDevices

    if backend not in ("auto", "interpret", "reference"):
        raise RunError(f"backend {backend!r}: multi-device engines run on the interpret "
                       "and reference backends")
    backend = "interpret" if backend == "auto" else backend
    return LocalDevices(parts, lambda part, comm: make_executor(
        part, backend, policy=policy, seed=seed, comm=comm), policy, seed)
