"""The kernel of a loaded engine, when it may be imported: the runtime's side of
`codegen/loader.py` (which imports and checks generated source).

An engine whose stored kernel is not what this tilec renders from its manifest is
refused here (`engine_kernel`), unless the user trusts the engine's code.
"""
from __future__ import annotations

from tilec.codegen.loader import interpreting, load_kernel
from tilec.errors import RunError
from tilec.ir.abi import KERNEL_NAME


def require_mode(interpret: bool) -> None:
    if interpreting() != interpret:
        want = "TRITON_INTERPRET=1" if interpret else "TRITON_INTERPRET unset (or 0)"
        raise RunError(f"the {'interpret' if interpret else 'gpu'} backend needs this "
                       f"process started with {want}; Triton fixes the mode at import")


def engine_source(engine) -> str:
    """An `EngineFile`'s stored kernel source, when it may be imported or compiled:
    it is what this tilec renders from the manifest (`kernel_checked`), or the user
    trusts the file's code. Otherwise a RunError, whoever asks (run, inspect --aot)."""
    if not (engine.kernel_checked or engine.code_trusted):
        raise RunError("the engine's stored kernel differs from what this tilec renders from "
                       "its manifest; refusing to import or compile it "
                       "(--trust-engine-code runs it anyway)")
    return engine.kernel_source


def engine_kernel(engine):
    """The JIT function of an `EngineFile`'s kernel (see `engine_source`)."""
    return load_kernel(engine_source(engine), KERNEL_NAME, trusted=engine.code_trusted)
