"""Load rendered kernel source as a Triton JIT function.

Triton reads the source of a jitted function from its file, so the text is written to
a content-addressed file under the cache folder and imported from there. Whether the
kernel runs in Triton's interpreter is fixed per process (see `tilec/__init__.py`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from tilec.errors import RunError

_loaded: dict[str, object] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_mode(interpret: bool) -> None:
    if interpreting() != interpret:
        want = "TRITON_INTERPRET=1" if interpret else "TRITON_INTERPRET unset (or 0)"
        raise RunError(f"the {'interpret' if interpret else 'gpu'} backend needs this "
                       f"process started with {want}; Triton fixes the mode at import")


def cache_dir() -> Path:
    root = os.environ.get("TILEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tilec")
    path = Path(root) / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_source(source: str) -> tuple[str, Path]:
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    module_name = f"tilec_kernel_{digest}"
    path = cache_dir() / f"{module_name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    return module_name, path


def load_kernel(source: str, name: str):
    module_name, path = write_source(source)
    if module_name not in _loaded:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        _loaded[module_name] = getattr(module, name)
    return _loaded[module_name]
