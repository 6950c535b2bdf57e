"""Pausing Python's cyclic garbage collector around work that builds millions of
long-lived objects without cycles (a compile's tasks and deps, a decoded manifest)."""
from __future__ import annotations

import functools
import gc


def without_cyclic_gc(fn):
    """Runs `fn` with Python's cyclic garbage collector paused. The passes build millions
    of small, long-lived objects without cycles (tasks, regions, 2.3 M deps for
    Llama-1B), and so does decoding a manifest; the collector, triggered by allocation
    counts, walked them all again and again (seconds per compile, half a second per
    load). The few cycles left (FX graphs) are collected as usual once it returns."""
    @functools.wraps(fn)
    def paused(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()
    return paused
