"""Import rendered kernel source as a Triton JIT function, and the list of GPU binaries
this user's tilec compiled: the tilec cache folder (TILEC_CACHE).

Triton reads the source of a jitted function from its file, so the text is written to
a content-addressed file under the cache folder and imported from there. Whether the
kernel runs in Triton's interpreter is fixed per process (see `tilec/__init__.py`).

This is the one place tilec imports generated source, so it is where the source is
checked (`codegen/safety.py`) unless the caller trusts it: the compiler imports what it
rendered (codegen/aot.py), the runtime an engine's kernel once the engine file says it
may (runtime/kernel.py engine_kernel refuses one that is not what this tilec renders).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from tilec.codegen.safety import check_kernel_source
from tilec.errors import RunError
from tilec.ir.abi import KERNEL_NAME

_loaded: dict[str, object] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cache_root() -> Path:
    return Path(os.environ.get("TILEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tilec"))


def cache_dir() -> Path:
    return cache_root() / "kernels"   # made by write_source, which reports a failure


# GPU binaries this user's tilec compiled (SHA-256 of each cubin, one per line). A
# stored cubin is machine code that cannot be checked against its source without
# compiling that source again, so the gpu backend launches one only if it is listed
# here (the engine was compiled on this machine) or the user trusts the file's code;
# any other is compiled anew from the checked source (Triton caches that compile).
OWN_BINARIES = "own-binaries.txt"


def remember_binary(cubin_sha256: str) -> None:
    """Note a cubin this process compiled; a cache folder that cannot be written only
    means the binary will not be trusted later (it is compiled again instead)."""
    try:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        with open(root / OWN_BINARIES, "a") as f:
            f.write(cubin_sha256 + "\n")
    except OSError:
        pass


def own_binary(cubin_sha256: str) -> bool:
    """Whether this user's tilec compiled the cubin with this digest."""
    try:
        text = (cache_root() / OWN_BINARIES).read_text()
    except OSError:
        return False
    return cubin_sha256 in text.split()


def write_source(source: str) -> tuple[str, Path]:
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    module_name = f"tilec_kernel_{digest}"
    folder = cache_dir()
    path = folder / f"{module_name}.py"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != source.encode():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(source.encode())
            os.replace(tmp, path)
    except OSError as e:   # Triton imports a kernel from a file: it must be written first
        raise RunError(f"cannot write the kernel to the cache folder {folder} "
                       f"({e.strerror or e}): set TILEC_CACHE to a writable folder") from None
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


def load_kernel(source: str, name: str = KERNEL_NAME, trusted: bool = False):
    """Import `source` and return its function `name`. Unless `trusted`, the source must
    pass `check_kernel_source` first (UnsafeKernelError otherwise)."""
    if not trusted:
        check_kernel_source(source, name)
    if interpreting():
        _interpreter_bf16_dot()
    module_name, path = write_source(source)
    if module_name not in _loaded:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        if interpreting():   # the kernel rounds bf16 itself (templates/kernel.py.j2 round_bf16)
            import triton.language as tl

            module.INTERPRETED = tl.constexpr(1)
        _loaded[module_name] = getattr(module, name)
    return _loaded[module_name]
