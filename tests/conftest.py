"""Shared test set-up.

`import tilec` must come before anything imports torch or triton: it decides whether
Triton runs in interpreter mode (no GPU: yes), and Triton fixes that per process at
import time.
"""
import tilec  # noqa: F401  (first, on purpose)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
