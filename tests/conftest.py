"""Shared test set-up.

Triton fixes interpreter mode per process when it is imported, and `import tilec` is
what decides the mode, so it runs here, before any test module imports torch or
triton. The suite runs the generated kernels in the interpreter (on CPU) by default,
even on a machine with a GPU; the `gpu` tests need a process without it:

    TRITON_INTERPRET=0 python -m pytest -m gpu
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import tilec  # noqa: E402,F401  (before torch and triton, on purpose)

import pytest  # noqa: E402
import torch  # noqa: E402

from tilec.codegen.loader import interpreting  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU"
    elif interpreting():
        reason = "needs a process without the Triton interpreter: TRITON_INTERPRET=0 pytest -m gpu"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
