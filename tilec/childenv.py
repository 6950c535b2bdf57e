"""The environment of a child process that runs tilec: it must import this same tilec.

A child started as `python -m tilec...` imports whatever `tilec` its interpreter finds
first, which need not be the parent's (an editable install of another checkout, a
parent imported from a source tree through its working directory). The compiler's GPU
compile and the multi-device launcher both start such children, and a child running
another tilec renders another kernel, so the parent's package root goes first on
PYTHONPATH.
"""
from __future__ import annotations

import os
from pathlib import Path


def child_env(**overrides: str) -> dict[str, str]:
    """os.environ with this tilec's root first on PYTHONPATH, and `overrides` set."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, path] if path else [root]),
                **overrides)
