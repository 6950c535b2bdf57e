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


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a `python -m tilec...` child process that imports this tilec,
    however this process found it (a checkout on sys.path, or an installed copy), with
    `extra` variables set: the child must run the same code as its parent."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, path] if path else [root]),
                **extra)


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


def _interpreter_bf16_dot() -> None:
    """Triton's interpreter keeps bfloat16 as raw uint16 bits and its `tl.dot` hands
    them to numpy's matmul as integers (triton-lang/triton#11584, unsupported upstream),
    so a bf16 tensor-core product comes out as garbage on CPU. Widen bf16 operands to
    float32 first: exact (a bf16 is the top half of a float32), and the products and
    float32 accumulation are then what the GPU computes."""
    import numpy as np
    from triton.runtime import interpreter
    import triton.language as tl

    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "widens_bf16", False):
        return

    def widen(x):
        if x.dtype.scalar.is_bf16():
            bits = x.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return x

    def create_dot(self, a, b, *args, **kwargs):
        return original(self, widen(a), widen(b), *args, **kwargs)

    create_dot.widens_bf16 = True
    interpreter.InterpreterBuilder.create_dot = create_dot


def load_kernel(source: str, name: str):
    if interpreting():
        _interpreter_bf16_dot()
    module_name, path = write_source(source)
    if module_name not in _loaded:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        _loaded[module_name] = getattr(module, name)
    return _loaded[module_name]
