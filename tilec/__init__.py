"""tilec: an ahead-of-time compiler from PyTorch models to one persistent Triton kernel
plus a static tile-level task schedule."""
import os as _os
import sys as _sys

# Triton decides at import time whether its language functions run in the interpreter,
# so the mode is per process and must be fixed before anything imports Triton (torch.export
# does). Without a GPU the interpreter is the only way to run a kernel: make it the default.
if "TRITON_INTERPRET" not in _os.environ and "triton" not in _sys.modules:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"

from tilec.version import __version__  # noqa: E402

__all__ = ["__version__"]
