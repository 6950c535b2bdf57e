"""tilec: an ahead-of-time compiler from PyTorch models to one persistent Triton kernel
plus a static tile-level task schedule.

The public API is what ``__all__`` lists::

    import tilec
    engine = tilec.compile(model, (x,), target="cpu", workers=4)   # -> tilec.Engine
    engine.save("model.engine")
    engine = tilec.load("model.engine")
    outputs = engine.run(x=x)                                       # {name: tensor}

Everything else (``tilec.compiler``, ``tilec.passes``, ...) is internal and may change
between versions. See README.md and docs/.
"""
import os as _os
import sys as _sys

from tilec import signals as _signals

# The `tilec` command: Ctrl-C while torch is imported (seconds) is one line, not a
# traceback (tilec.signals).
if _signals.started_as_command():
    _signals.exit_on_interrupt()

# Triton decides at import time whether its language functions run in the interpreter,
# so the mode is per process and must be fixed before anything imports Triton (torch.export
# does). Without a GPU the interpreter is the only way to run a kernel: make it the default.
# This block must stay first: nothing above it may import triton or torch.export.
if "TRITON_INTERPRET" not in _os.environ and "triton" not in _sys.modules:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"

from typing import TYPE_CHECKING as _TYPE_CHECKING  # noqa: E402

from tilec.errors import (ConfigError, EngineError, RunError, ScheduleError,  # noqa: E402
                          ScheduleHangError, TilecError, UnsupportedOpError)
from tilec.version import __version__  # noqa: E402

if _TYPE_CHECKING:  # for type checkers and IDEs; at run time these load on first use
    from tilec.api import Engine, compile, load
    from tilec.runtime.generate import Generation

__all__ = [
    "compile", "load", "Engine", "Generation",
    "TilecError", "ConfigError", "UnsupportedOpError", "ScheduleError", "ScheduleHangError",
    "EngineError", "RunError",
    "__version__",
]

# Loaded on first use, so `import tilec` stays cheap (no torch.export, Triton, jinja2).
_LAZY = {"compile": "tilec.api", "load": "tilec.api", "Engine": "tilec.api",
         "Generation": "tilec.runtime.generate"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tilec' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
