"""Ahead-of-time compile of the rendered persistent kernel for a GPU, without a GPU.

    info = compile_for_gpu(engine.data.kernel_source, engine.data.manifest.schedule.pools)
    info["cubin_size"], info["n_regs"], info["n_spills"], info["shared"]
    binary = aot_kernel(source, pools, arch=90)       # what `tilec compile` stores
    kernel = load_binary(binary, jit_fn, pools)       # on the GPU: launch it, no JIT

Triton fixes interpreter mode per process at import (see `tilec/__init__.py`), and an
interpreting process cannot compile for a GPU, so in that case the compile runs in a
child process (`python -m tilec.codegen.aot`) started with TRITON_INTERPRET=0.
Registers and spills come from the `ptxas -v` log of Triton's own ptxas run (or, when
Triton's cache already held the kernel, from running ptxas on its PTX again): the
figures the driver would report, available on a machine with no driver.

The stored binary is launched through Triton's own runtime: `load_binary` rebuilds
the `CompiledKernel` a JIT launch ends with from the two files Triton's cache keeps
(the metadata JSON and the cubin). That object and its constructor are the same in
Triton 3.6 to 3.9; the metadata layout is not stable across versions, so a binary is
only launched by the Triton version that compiled it (the executor checks).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterable

from tilec.childenv import child_env
from tilec.codegen.loader import load_kernel, remember_binary
from tilec.errors import TilecError
from tilec.ir.abi import (KERNEL_NAME, NUM_WARPS, POOL_POINTER_TYPES, SPIN_LIMIT, AOTKernel,
                          launch_signature)


class AOTError(TilecError):
    """Triton could not compile the kernel for the requested GPU."""


def _pool_pairs(pools: Iterable[Any]) -> list[tuple[str, str]]:
    """Pools as (name, dtype): `ir.schedule.Pool` objects or plain pairs."""
    out = []
    for p in pools:
        name, dtype = (p.name, p.dtype) if hasattr(p, "dtype") else tuple(p)
        if dtype not in POOL_POINTER_TYPES:
            raise AOTError(f"pool {name}: no kernel pointer type for dtype {dtype}")
        out.append((name, dtype))
    return out


def signature(pools: Iterable[Any]) -> dict[str, str]:
    """The kernel's Triton signature (ir/abi.py launch_signature): the fixed arguments,
    one pointer per pool (in the schedule's pool order), then the constexprs."""
    return launch_signature(_pool_pairs(pools))


def pointer_attrs(pools: Iterable[Any]) -> dict[tuple[int], list]:
    """Every pointer argument is 16-byte aligned: what Triton's JIT assumes of a torch
    tensor whose address is (all of the kernel's are whole tensors from torch's
    allocator), so the stored binary is the code the JIT would have made."""
    return {(i,): [["tt.divisibility", 16]]
            for i, kind in enumerate(signature(pools).values()) if kind.startswith("*")}


def constexprs(spin_limit: int = SPIN_LIMIT, profile: bool = False) -> dict[str, Any]:
    """The constexprs of a blocking (GPU) launch."""
    return {"BLOCKING": True, "SPIN_LIMIT": spin_limit, "PROFILE": profile}


def aot_kernel(source: str, pools: Iterable[Any], arch: int) -> AOTKernel:
    """Compile `source` for sm_`arch` and keep what launching it needs (the engine's
    stored binary)."""
    return _binary(compile_for_gpu(source, pools, arch=arch), source, arch)


def _binary(info: dict[str, Any], source: str, arch: int) -> AOTKernel:
    """The AOTKernel of a compile this process ran, noted as this user's own (see
    codegen.loader.OWN_BINARIES: only such a binary is launched without being trusted)."""
    binary = AOTKernel(cubin=info["cubin"], arch=arch, ptx_target=info["ptx_target"],
                       num_warps=info["num_warps"], shared=info["shared"],
                       n_regs=info["n_regs"], n_spills=info["n_spills"],
                       spin_limit=SPIN_LIMIT, triton_version=info["triton_version"],
                       kernel_sha256=hashlib.sha256(source.encode()).hexdigest(),
                       triton_metadata=info["metadata"])
    remember_binary(binary.cubin_sha256)
    return binary


class PendingKernel:
    """`aot_kernel(source, pools, arch)`, running in a child process (`python -m
    tilec.codegen.aot`, as for an interpreting process) from the moment it is made, so
    the compile, seconds of one core, overlaps what the caller does meanwhile; `result()`
    waits for it. The compiler starts one as soon as it can predict the kernel's source
    (hooks.SpeculativeAOT) and uses it only if the source turns out to be that."""

    def __init__(self, source: str, pools: Iterable[Any], arch: int,
                 timeout: float = 600.0):
        self.source, self.pools, self.arch = source, _pool_pairs(pools), arch
        self._timeout = timeout
        self._outcome: tuple[int, str, str] | BaseException | None = None
        self.ptx = ""   # the compiled PTX, once `result()` has returned
        self._proc, self._lifeline = _start_child()
        # communicate() in a thread: the child's output (the cubin) can be larger than a
        # pipe holds, so it is read while the caller goes on
        request = _request(self.source, self.pools, arch, NUM_WARPS, False)
        self._reader = threading.Thread(target=self._communicate, args=(request,),
                                        daemon=True, name="tilec-aot")
        self._reader.start()

    def _communicate(self, request: str) -> None:
        try:
            out, err = self._proc.communicate(request)
            self._outcome = (self._proc.returncode, out, err)
        except BaseException as exc:   # raised again by result()
            self._outcome = exc
        finally:
            os.close(self._lifeline)

    def is_for(self, source: str, pools: Iterable[Any], arch: int) -> bool:
        return (source, _pool_pairs(pools), arch) == (self.source, self.pools, self.arch)

    def result(self) -> AOTKernel:
        self._reader.join(self._timeout)
        if self._reader.is_alive():
            self.cancel()
            raise AOTError(f"compiling for sm_{self.arch} took more than "
                           f"{self._timeout:.0f} s")
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        info = _child_info(*self._outcome, self.arch)
        self.ptx = info["ptx"]
        return _binary(info, self.source, self.arch)

    def cancel(self) -> None:
        """Stop the compile (its result is not wanted); a no-op once it has finished."""
        if self._proc.poll() is None:
            _kill_group(self._proc)
        self._reader.join()


def load_binary(binary: AOTKernel, fn, pools: Iterable[Any]):
    """The stored cubin as a launchable `triton.compiler.CompiledKernel`, loaded into the
    current GPU's context, with no compile. Needs a GPU and the Triton version that
    compiled the binary. Launch it with every argument in signature order, constexprs
    included: `kernel[(grid, 1, 1)](*args)`."""
    kernel = compiled_kernel(binary, fn, pools)
    kernel._init_handles()   # load the module now, so a driver that refuses it says so here
    return kernel


def compiled_kernel(binary: AOTKernel, fn, pools: Iterable[Any]):
    """The `CompiledKernel` of the stored binary, not yet loaded (needs no GPU): `fn` is
    the kernel's JIT function, from which the launcher takes the argument names."""
    import tempfile

    from triton.compiler import ASTSource, CompiledKernel

    src = ASTSource(fn=fn, signature=signature(pools), constexprs=constexprs(binary.spin_limit),
                    attrs=pointer_attrs(pools))
    # CompiledKernel reads a kernel from Triton's cache files, here written from the
    # engine; it reads them at once, so the folder can go when it returns.
    with tempfile.TemporaryDirectory(prefix="tilec-aot-") as tmp:
        meta, cubin = Path(tmp, f"{KERNEL_NAME}.json"), Path(tmp, f"{KERNEL_NAME}.cubin")
        meta.write_text(binary.triton_metadata)
        cubin.write_bytes(binary.cubin)
        return CompiledKernel(src, {meta.name: str(meta), cubin.name: str(cubin)},
                              binary.cubin_sha256)


def compile_for_gpu(source: str, pools: Iterable[Any], arch: int = 90,
                    num_warps: int = NUM_WARPS, timeout: float = 600.0,
                    profile: bool = False, trusted: bool = False) -> dict[str, Any]:
    """Compile kernel `source` for CUDA compute capability `arch` (90: sm_90).

    `profile` compiles the variant whose tasks stamp their start and end times. The
    source is imported to be compiled, so unless `trusted` it must pass
    `safety.check_kernel_source` (codegen.loader.load_kernel checks it).
    Returns {"arch", "name", "ptx_target", "cubin" (bytes), "cubin_size", "shared",
    "num_warps", "n_regs", "n_spills", "triton_version", "metadata" (Triton's JSON
    description of the kernel), "global_loads" (load instructions by width in bytes),
    "async_copies" (see there), "ptx" (the PTX text), "reads_global_timer"}; n_regs and
    n_spills are None when ptxas cannot report them."""
    pairs = _pool_pairs(pools)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return _compile_here(source, pairs, arch, num_warps, profile, trusted)
    proc, lifeline = _start_child()
    try:
        out, err = proc.communicate(_request(source, pairs, arch, num_warps, profile, trusted),
                                    timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AOTError(f"compiling for sm_{arch} took more than {timeout:.0f} s") from None
    finally:
        if proc.poll() is None:   # timed out, or interrupted
            _kill_group(proc)
            proc.wait()
        os.close(lifeline)
    return _child_info(proc.returncode, out, err, arch)


def _start_child() -> tuple[subprocess.Popen, int]:
    """`python -m tilec.codegen.aot`, in a process group of its own, that ends (and
    ptxas with it) when this process does, however this one ends (SIGKILL included):
    it watches the read end of a pipe whose write end, returned here, only this
    process holds; close that when the child has finished."""
    read, write = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tilec.codegen.aot", str(read)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(),
            pass_fds=(read,), start_new_session=True)
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    return proc, write


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child and whatever it started (ptxas): its process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _die_with_parent(lifeline: int) -> None:
    """In the child: when the parent's end of the pipe closes (the parent is gone),
    kill this process group, this process and its ptxas, at once."""
    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(lifeline, 1):
                pass
        if os.getpgid(0) == os.getpid():   # our own group (_start_child): never another's
            os.killpg(0, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="tilec-aot-lifeline").start()


def _child_env() -> dict[str, str]:
    """The environment of a compiling child process: not interpreting, and importing
    this tilec (the compiler starts one on every machine: PendingKernel)."""
    return child_env(TRITON_INTERPRET="0")


def _request(source: str, pools: list[tuple[str, str]], arch: int, num_warps: int,
             profile: bool, trusted: bool = False) -> str:
    """What the child process (`_main`) reads on stdin."""
    return json.dumps({"source": source, "pools": pools, "arch": arch,
                       "num_warps": num_warps, "profile": profile, "trusted": trusted})


def _child_info(returncode: int, stdout: str, stderr: str, arch: int) -> dict[str, Any]:
    """compile_for_gpu's answer from the child process's exit status and output."""
    if returncode != 0:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {returncode}, no message"
        raise AOTError(last.removeprefix("error: ") if last.startswith("error: ")
                       else f"compiling for sm_{arch} failed: {last}")
    info = json.loads(stdout.strip().splitlines()[-1])
    info["cubin"] = base64.b64decode(info["cubin"])
    return info


def _compile_here(source: str, pools: list[tuple[str, str]], arch: int,
                  num_warps: int, profile: bool = False, trusted: bool = False) -> dict[str, Any]:
    import triton
    from triton.compiler import ASTSource

    fn = load_kernel(source, KERNEL_NAME, trusted=trusted)
    src = ASTSource(fn=fn, signature=signature(pools), constexprs=constexprs(profile=profile),
                    attrs=pointer_attrs(pools))
    try:
        kernel, ptxas_log = _compile_keeping_ptxas_log(src, arch, num_warps)
    except Exception as e:  # Triton's errors span many lines: keep where, and what
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        what = " ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else type(e).__name__
        raise AOTError(f"triton.compile for sm_{arch}: {what}"[:500]) from e
    cubin = kernel.asm["cubin"]
    ptx = kernel.asm.get("ptx", "")
    md = kernel.metadata
    get = md.get if isinstance(md, dict) else (lambda k, d=None: getattr(md, k, d))
    m = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    ptx_target = m.group(1) if m else f"sm_{arch}"
    # Triton's own description, as its cache stores it: what a launch rebuilds from
    metadata = json.loads(Path(kernel.metadata_group[f"{kernel.name}.json"]).read_text())
    info = {"arch": arch, "name": get("name", KERNEL_NAME), "ptx_target": ptx_target,
            "cubin": cubin, "cubin_size": len(cubin), "shared": int(get("shared", 0) or 0),
            "num_warps": int(get("num_warps", num_warps) or num_warps),
            "n_regs": None, "n_spills": None, "triton_version": triton.__version__,
            "metadata": json.dumps(metadata, sort_keys=True)}
    info.update(_usage(ptxas_log) or _ptxas_usage(ptx, ptx_target))
    info["global_loads"] = global_loads(ptx)
    info["async_copies"] = async_copies(ptx)
    info["ptx"] = ptx
    info["reads_global_timer"] = "%globaltimer" in ptx   # the PROFILE variant's stamps
    return info


def global_loads(ptx: str) -> dict[str, int]:
    """How many global-memory load instructions of each width (bytes, as a string key)
    the PTX holds: weight streaming wants 16-byte vector loads, not 2-byte scalars."""
    counts: dict[str, int] = {}
    for vec, bits in re.findall(r"\bld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bsuf](\d+)\b", ptx):
        width = str(int(vec or 1) * int(bits) // 8)
        counts[width] = counts.get(width, 0) + 1
    return counts


def async_copies(ptx: str) -> dict[str, int]:
    """Asynchronous copies from global to shared memory in the PTX: cp.async by copy size
    in bytes (a string key), `cache_hint` (those carrying an L2 cache policy),
    `evict_first_policies` (L2 policies made evict-first: what a weight ring's hint is)
    and `tensor` (TMA copies: cp.async.bulk.tensor)."""
    counts: dict[str, int] = {}
    for hint, size in re.findall(r"\bcp\.async\.c[ag]\.shared\.global(\.L2::cache_hint)?"
                                 r"\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)", ptx):
        width = str(int(size, 0))
        counts[width] = counts.get(width, 0) + 1
        counts["cache_hint"] = counts.get("cache_hint", 0) + bool(hint)
    counts["evict_first_policies"] = len(re.findall(r"\bcreatepolicy\.[a-z.]*L2::evict_first", ptx))
    counts["tensor"] = len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx))
    return counts


def _compile_keeping_ptxas_log(src, arch: int, num_warps: int):
    """triton.compile, and the `ptxas -v` log of its ptxas run: Triton prints it when
    asked, which saves running ptxas again (a second or more for a large kernel). The
    log is empty when Triton's cache already held the kernel."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": num_warps})
    return kernel, log.getvalue()


def _usage(log: str) -> dict[str, int]:
    """Registers and spill bytes from a `ptxas -v` log ({} if it reports none)."""
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    out = {}
    if regs:
        out["n_regs"] = int(regs.group(1))
    if stores and loads:
        out["n_spills"] = int(stores.group(1)) + int(loads.group(1))
    return out


def _ptxas_usage(ptx: str, gpu_name: str) -> dict[str, int]:
    """Registers and spill bytes as `ptxas -v` reports them ({} if it cannot run)."""
    import tempfile

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(int(re.sub(r"\D", "", gpu_name) or 90)).path
    except Exception:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        try:
            proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu_name}", path, "-o",
                                   os.path.join(tmp, "k.o")],
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            return {}
    return _usage(proc.stderr + proc.stdout)


def _main() -> int:
    """Child-process entry: a JSON request on stdin, one JSON line on stdout; the
    argument, if any, is the pipe to watch (_start_child)."""
    if len(sys.argv) > 1:
        _die_with_parent(int(sys.argv[1]))
    req = json.loads(sys.stdin.read())
    try:
        info = _compile_here(req["source"], [tuple(p) for p in req["pools"]], req["arch"],
                             req["num_warps"], req.get("profile", False),
                             req.get("trusted", False))
    except TilecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    info["cubin"] = base64.b64encode(info["cubin"]).decode()
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
