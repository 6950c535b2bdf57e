"""The kernel compiled ahead of time (issue 6): GPU-target engines store the cubin and
what launching it needs (`aot`); the file round-trips them exactly, `load` refuses a
damaged, truncated, foreign or mis-described binary with one line, `cpu` engines carry
none, `inspect` reads the stored figures without compiling, and the gpu executor's
choice between the stored binary and the JIT is a pure function tested here with fake
device capabilities. The launch itself needs a GPU (`pytest -m gpu`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import engines
import tilec.api
from engines import EXAMPLES, compiled, read_raw, resign
from test_hostile import assert_refused, run_cli
from tilec.codegen import aot
from tilec.compiler.pack import fill_pool
from tilec.errors import EngineError
from tilec.runtime import enginefile as engine_file
from tilec.codegen import loader
from tilec.ir.abi import AOTKernel
from tilec.runtime import executors
from tilec.runtime.enginefile import write
from tilec.runtime.enginefile.format import AOT_CUBIN, AOT_KEY
from tilec.runtime.executors import GPUExecutor, stored_binary_problem

GPU_OPTIONS = {"target": "h200", "workers": 8, "dtype": "bfloat16"}


@pytest.fixture(scope="module")
def gpu_engine(tmp_path_factory) -> tuple[Path, dict[str, float], tilec.api.Engine]:
    """examples/block.yaml for h200: compiled once, with its stage times, and saved."""
    stages: dict[str, float] = {}
    folder = tmp_path_factory.mktemp("aot")
    engine = tilec.api.compile(str(EXAMPLES / "block.yaml"), **GPU_OPTIONS,
                               on_stage=lambda name, s: stages.setdefault(name, s),
                               dump_dir=folder / "dump")
    path = folder / "block_h200.engine"
    engine.save(path)
    return path, stages, engine


def test_gpu_compile_has_an_aot_stage_and_stores_the_binary(gpu_engine):
    path, stages, engine = gpu_engine
    names = list(stages)
    assert names.index("render") < names.index("pack") < names.index("aot")
    dumped = (path.parent / "dump" / "08_aot.json").read_text()
    assert dumped == engine_file.aot_text(engine.data.aot) == read_raw(path)[0][AOT_KEY]
    binary = engine.data.aot
    assert binary is not None and binary.cubin[:4] == b"\x7fELF"
    assert binary.arch == 90 and binary.ptx_target in ("sm_90", "sm_90a")
    assert binary.kernel_sha256 == hashlib.sha256(engine.data.kernel_source.encode()).hexdigest()
    assert binary.spin_limit == executors.SPIN_LIMIT == aot.SPIN_LIMIT
    import triton

    assert binary.triton_version == triton.__version__
    meta = json.loads(binary.triton_metadata)
    assert meta["name"] == aot.KERNEL_NAME and meta["target"]["arch"] == 90
    assert (meta["num_warps"], meta["shared"]) == (binary.num_warps, binary.shared)
    assert binary.n_regs is None or 0 < binary.n_regs <= 255


def test_the_file_round_trips_the_binary_exactly(gpu_engine, tmp_path):
    path, _, engine = gpu_engine
    meta, tensors = read_raw(path)
    assert tensors[AOT_CUBIN].dtype == torch.uint8
    assert tensors[AOT_CUBIN].numpy().tobytes() == engine.data.aot.cubin
    described = json.loads(meta[AOT_KEY])
    assert described["cubin_size"] == len(engine.data.aot.cubin)
    assert described["cubin_sha256"] == hashlib.sha256(engine.data.aot.cubin).hexdigest()
    loaded = engine_file.load(path)
    assert loaded.aot == engine.data.aot           # every field, the cubin's bytes too
    assert AOT_CUBIN not in loaded.tensors         # held as `aot`, not as a table
    engine_file.save(loaded, tmp_path / "again.engine")
    assert (tmp_path / "again.engine").read_bytes() == path.read_bytes()


def test_the_checksum_is_the_documented_one(gpu_engine):
    """SHA-256 over the SHA-256 digests of the pieces, in order: every other metadata
    entry (key, value), then every tensor's header (name, dtype, shape) and its bytes in
    64 MiB pieces, keys and tensors sorted (docs/engine-format.md): written here from
    the page, one piece after another, so the threads in engine.py cannot have changed
    what is hashed."""
    path, _, _ = gpu_engine
    meta, tensors = read_raw(path)
    digests = [hashlib.sha256(f"{key}\0{meta[key]}\0".encode()).digest()
               for key in sorted(k for k in meta if k != "sha256")]
    piece = 64 * 1024 * 1024
    for name in sorted(tensors):
        t = tensors[name]
        digests.append(hashlib.sha256(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode()).digest())
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        digests += [hashlib.sha256(data[i:i + piece]).digest() for i in range(0, len(data), piece)]
    assert hashlib.sha256(b"".join(digests)).hexdigest() == meta["sha256"]


def test_a_save_begun_before_the_binary_writes_the_same_bytes(gpu_engine, tmp_path,
                                                              monkeypatch):
    """compile(output=...) writes the tensors while the GPU compile runs (PendingSave),
    then the binary and the header: the file is byte for byte what `save` of the finished
    engine writes; if the binary's entries do not fit the room kept for them, the file
    is written again, still the same bytes; a cancelled one leaves nothing."""
    path, _, engine = gpu_engine
    data = engine._data
    stages = []
    tilec.api.compile(str(EXAMPLES / "block.yaml"), **GPU_OPTIONS, output=tmp_path / "a",
                      on_stage=lambda name, s: stages.append(name))
    assert stages.index("manifest") < stages.index("save") < stages.index("aot") \
        < stages.index("seal")
    assert (tmp_path / "a").read_bytes() == path.read_bytes()
    without = dataclasses.replace(data, aot=None)
    pending = engine_file.PendingSave(without, tmp_path / "b")
    pending.finish({"decode": data.aot})
    assert (tmp_path / "b").read_bytes() == path.read_bytes()
    monkeypatch.setattr(write, "BINARY_ROOM", 0)   # the header's room is too small
    pending = engine_file.PendingSave(without, tmp_path / "c")
    monkeypatch.setattr(write, "BINARY_ROOM", 64 << 10)
    pending.finish({"decode": data.aot})
    assert (tmp_path / "c").read_bytes() == path.read_bytes()
    pending = engine_file.PendingSave(without, tmp_path / "d")
    pending.cancel()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_no_aot_and_cpu_engines_carry_no_binary(capsys, tmp_path):
    """--no-aot: no entry of a decoder (decode, prefill) has a binary."""
    out = tmp_path / "no_aot.engine"   # (a compile: longer than the hostile tests' limit)
    code, _, err = engines.run_cli(capsys, "compile", EXAMPLES / "llama_tiny.yaml", "-o", out,
                           "--target", "h200", "--workers", "8", "--no-aot")
    assert code == 0, err
    assert "  render" in err and "  aot " not in err
    for path in (out, compiled("block")):
        meta, tensors = read_raw(path)
        assert not [k for k in list(meta) + list(tensors) if k.startswith("aot") or ".aot" in k]
        loaded = engine_file.load(path)
        assert loaded.binaries() == {} and loaded.entries.keys() == (
            {"prefill"} if path == out else set())


def test_inspect_reads_the_stored_binary_without_compiling(capsys, gpu_engine, monkeypatch):
    path, _, engine = gpu_engine

    def no_compile(*args, **kwargs):
        raise AssertionError("inspect compiled the kernel although the engine stores it")

    monkeypatch.setattr(aot, "compile_for_gpu", no_compile)
    for argv in (["inspect", path, "--json"], ["inspect", path, "--json", "--aot"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        a = json.loads(out)["kernel"]["aot"]
        binary = engine.data.aot
        assert a == {"arch": 90, "ptx_target": binary.ptx_target, "n_regs": binary.n_regs,
                     "n_spills": binary.n_spills, "shared": binary.shared,
                     "cubin_size": len(binary.cubin), "num_warps": binary.num_warps,
                     "triton_version": binary.triton_version, "stored": True}
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 0 and "stored in the engine" in out and f"{len(binary.cubin)} bytes" in out


# ---- hostile binaries: one `error:` line, exit status 2 ----------------------------------

def edit_aot(field: str, value):
    def edit(meta):
        plain = json.loads(meta[AOT_KEY])
        plain[field] = value
        meta[AOT_KEY] = json.dumps(plain)
    return edit


def edit_triton_metadata(field: str, value):
    def edit(meta):
        plain = json.loads(meta[AOT_KEY])
        plain["triton_metadata"][field] = value
        meta[AOT_KEY] = json.dumps(plain)
    return edit


def set_cubin(make):
    """Replace the cubin with make(old bytes)."""
    def edit_tensors(tensors):
        data = make(tensors[AOT_CUBIN].numpy().tobytes())
        tensors[AOT_CUBIN] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return edit_tensors


def describe_cubin(data: bytes):
    """Make `aot` give data's size and SHA-256, so only the checks behind those can
    refuse a swapped cubin."""
    return lambda meta: (edit_aot("cubin_size", len(data))(meta),
                         edit_aot("cubin_sha256", hashlib.sha256(data).hexdigest())(meta))


def flip(data: bytes) -> bytes:
    return data[:100] + bytes([data[100] ^ 1]) + data[101:]


def other_machine(data: bytes) -> bytes:
    return data[:18] + struct.pack("<H", 62) + data[20:]       # EM_X86_64


def renamed_kernel(data: bytes) -> bytes:
    return data.replace(b"tilec_engine\0", b"other_kernel\0")


HOSTILE = {   # case: (what resign edits, what the error says)
    "flipped byte": ({"tensors": set_cubin(flip)}, "does not match the SHA-256"),
    "truncated": ({"tensors": set_cubin(lambda d: d[: len(d) // 2])}, "the cubin has"),
    "wrong dtype": ({"tensors": lambda t: t.__setitem__(AOT_CUBIN, t[AOT_CUBIN].to(torch.int32))},
                    "not a flat uint8 tensor"),
    "cubin without its description": ({"meta": lambda m: m.pop(AOT_KEY)}, "come together"),
    "description without its cubin": ({"tensors": lambda t: t.pop(AOT_CUBIN)}, "come together"),
    "not JSON": ({"meta": lambda m: m.__setitem__(AOT_KEY, "{not json")}, "bad GPU binary"),
    "missing key": ({"meta": lambda m: m.__setitem__(AOT_KEY, json.dumps(
        {k: v for k, v in json.loads(m[AOT_KEY]).items() if k != "spin_limit"}))},
        "does not have the fields"),
    "wrong type": ({"meta": edit_aot("n_regs", "many")}, "n_regs"),
    "other arch": ({"meta": edit_aot("arch", 80)}, "is for sm_80"),
    "other kernel source": ({"meta": edit_aot("kernel_sha256", "0" * 64)},
                            "another kernel source"),
    "metadata target": ({"meta": edit_triton_metadata(
        "target", {"backend": "cuda", "arch": 80, "warp_size": 32})}, "disagrees on target"),
    "metadata warps": ({"meta": edit_triton_metadata("num_warps", 8)}, "disagrees on num_warps"),
    "metadata triton": ({"meta": edit_triton_metadata("triton_version", "3.6.0")},
                        "disagrees on triton_version"),
}
DESCRIBED_EDITS = {
    "random bytes": (lambda d: bytes(range(256)) * 4, "not a CUDA ELF file"),
    "an ELF for another machine": (other_machine, "not a CUDA ELF file"),
    "a cubin without the kernel": (renamed_kernel, "does not define the kernel tilec_engine"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_damaged_or_mismatched_binary_is_refused(capsys, gpu_engine, tmp_path, case):
    path, _, _ = gpu_engine
    edits, match = HOSTILE[case]
    assert_refused(capsys, resign(path, tmp_path / "e", **edits), match=match)


@pytest.mark.parametrize("case", list(DESCRIBED_EDITS))
def test_a_foreign_cubin_is_refused_even_when_described(capsys, gpu_engine, tmp_path, case):
    path, _, engine = gpu_engine
    make, match = DESCRIBED_EDITS[case]
    data = make(engine.data.aot.cubin)
    bad = resign(path, tmp_path / "e", tensors=set_cubin(lambda _: data),
                 meta=describe_cubin(data))
    assert_refused(capsys, bad, match=match)


def test_a_cpu_engine_with_a_binary_is_refused(capsys, gpu_engine, tmp_path):
    path, _, _ = gpu_engine
    meta, tensors = read_raw(path)
    bad = resign(compiled("block"), tmp_path / "e",
                 meta=lambda m: m.__setitem__(AOT_KEY, meta[AOT_KEY]),
                 tensors=lambda t: t.__setitem__(AOT_CUBIN, tensors[AOT_CUBIN]))
    assert_refused(capsys, bad, match="cpu target carries a GPU binary")
    with pytest.raises(EngineError, match="cpu target carries a GPU binary"):
        engine_file.load(bad)


# ---- the gpu executor's choice: stored binary or JIT -------------------------------------

SOURCE = "# the kernel source the fake binaries were compiled from\n"


def fake_binary(**changes) -> AOTKernel:
    fields = dict(cubin=b"\x7fELF", arch=90, ptx_target="sm_90a", num_warps=4, shared=0,
                  n_regs=None, n_spills=None, spin_limit=executors.SPIN_LIMIT,
                  triton_version="3.9.0",
                  kernel_sha256=hashlib.sha256(SOURCE.encode()).hexdigest(),
                  triton_metadata="{}")
    fields.update(changes)
    return AOTKernel(**fields)


def test_stored_binary_problem(tmp_path, monkeypatch):
    spins = executors.SPIN_LIMIT
    assert stored_binary_problem(fake_binary(), SOURCE, 90, "3.9.0", spins, trusted=True) is None
    assert stored_binary_problem(None, SOURCE, 90, "3.9.0", spins) == (
        "the engine stores no GPU binary")
    assert stored_binary_problem(fake_binary(), SOURCE, 80, "3.9.0", spins) == (
        "the stored GPU binary is for sm_90, this GPU is sm_80")
    assert stored_binary_problem(fake_binary(), SOURCE, 100, "3.9.0", spins) == (
        "the stored GPU binary is for sm_90, this GPU is sm_100")
    assert stored_binary_problem(fake_binary(), SOURCE, 90, "3.6.0", spins) == (
        "the stored GPU binary was compiled by Triton 3.9.0, this is Triton 3.6.0")
    assert "4096" in stored_binary_problem(fake_binary(), SOURCE, 90, "3.9.0", 4096)


def test_only_own_or_trusted_binaries_are_launched(tmp_path, monkeypatch):
    """A cubin is machine code: launched when this user's tilec compiled it (noted in the
    cache folder when it did) or the user trusts the engine's code, else compiled anew
    from the checked source."""
    monkeypatch.setenv("TILEC_CACHE", str(tmp_path / "cache"))
    spins = executors.SPIN_LIMIT
    foreign = fake_binary(cubin=b"\x7fELF foreign")
    problem = stored_binary_problem(foreign, SOURCE, 90, "3.9.0", spins)
    assert "not compiled by this user's tilec" in problem and "--trust-engine-code" in problem
    assert stored_binary_problem(foreign, SOURCE, 90, "3.9.0", spins, trusted=True) is None
    loader.remember_binary(foreign.cubin_sha256)
    assert stored_binary_problem(foreign, SOURCE, 90, "3.9.0", spins) is None
    assert not loader.own_binary(fake_binary(cubin=b"\x7fELF other").cubin_sha256)


def test_a_compile_notes_its_binary_as_own(gpu_engine):
    _, _, engine = gpu_engine
    assert loader.own_binary(engine.data.aot.cubin_sha256)


def executor_on(binary: AOTKernel | None, capability: tuple[int, int], monkeypatch):
    """GPUExecutor._stored_binary without a GPU: a fake capability, and load_binary
    stubbed (it needs a driver) to record what it was asked to load."""
    loaded = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(aot, "load_binary", lambda b, fn, pools: loaded.append(b) or "kernel")
    ex = GPUExecutor.__new__(GPUExecutor)
    ex.__dict__.update(kernel=None, schedule=SimpleNamespace(pools=()))
    engine = SimpleNamespace(aot=binary, code_trusted=True, kernel_source=SOURCE)
    return ex._stored_binary(engine), loaded


def test_the_executor_launches_a_matching_binary_silently(monkeypatch, caplog):
    import triton

    binary = fake_binary(triton_version=triton.__version__)
    with caplog.at_level(logging.WARNING, logger="tilec.runtime.executors"):
        chosen, loaded = executor_on(binary, (9, 0), monkeypatch)
    assert chosen == "kernel" and loaded == [binary] and caplog.records == []


@pytest.mark.parametrize("capability, version, why", [
    ((8, 0), None, "the stored GPU binary is for sm_90, this GPU is sm_80"),
    ((9, 0), "3.6.0", "the stored GPU binary was compiled by Triton 3.6.0, this is Triton "),
])
def test_the_executor_recompiles_with_one_warning(monkeypatch, caplog, capability, version, why):
    import triton

    binary = fake_binary(triton_version=version or triton.__version__)
    with caplog.at_level(logging.WARNING, logger="tilec.runtime.executors"):
        chosen, loaded = executor_on(binary, capability, monkeypatch)
    assert chosen is None and loaded == []
    [record] = caplog.records
    text = record.getMessage()
    assert text.startswith(f"warning: {why}") and len(text.splitlines()) == 1
    assert text.endswith("; compiling the kernel from its source instead")


def test_the_executor_recompiles_when_the_driver_refuses(monkeypatch, caplog):
    import triton

    def refuse(*args):
        raise RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU\nmore lines")

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(aot, "load_binary", refuse)
    ex = GPUExecutor.__new__(GPUExecutor)
    ex.__dict__.update(kernel=None, schedule=SimpleNamespace(pools=()))
    with caplog.at_level(logging.WARNING, logger="tilec.runtime.executors"):
        chosen = ex._stored_binary(SimpleNamespace(aot=fake_binary(
            triton_version=triton.__version__), code_trusted=True, kernel_source=SOURCE))
    assert chosen is None
    assert caplog.records[0].getMessage() == (
        "warning: the driver could not load the stored GPU binary "
        "(CUDA_ERROR_NO_BINARY_FOR_GPU); compiling the kernel from its source instead")


def test_an_engine_without_a_binary_is_compiled_without_a_warning(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="tilec.runtime.executors"):
        chosen, loaded = executor_on(None, (9, 0), monkeypatch)
    assert chosen is None and loaded == [] and caplog.records == []


# ---- packing pools -----------------------------------------------------------------------

def test_fill_pool_zeroes_exactly_the_gaps(monkeypatch):
    """Constants at their offsets (overlaps: the later buffer wins, as before), a
    device's part of a constant (Buffer.stored) at its place, zeros in every gap;
    torch.empty is made to return NaNs so an unfilled gap shows."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda n, dtype: empty(n, dtype=dtype).fill_(float("nan")))
    pool = SimpleNamespace(name="w_float32", numel=24, dtype="float32")
    buffers = [SimpleNamespace(pool="w_float32", name=n, offset=o, stored=part, shard=())
               for n, o, part in [("a", 2, ()), ("b", 9, ()), ("c", 11, ()), ("other", 0, ()),
                                  ("d", 16, ()), ("e", 18, (2, 4))]]
    constants = {"a": torch.ones(3), "b": torch.full((4,), 2.0), "c": torch.full((2,), 3.0),
                 "d": torch.full((2,), 4.0), "e": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    got = fill_pool(pool, buffers, constants)
    want = torch.zeros(24)
    want[2:5], want[9:13], want[11:13], want[16:18] = 1.0, 2.0, 3.0, 4.0
    want[20:22] = torch.tensor([7.0, 8.0])
    assert torch.equal(got, want)


# ---- the launchable kernel, as far as it goes without a GPU ------------------------------

REBUILD = """
import json, sys
import triton
from triton.compiler import ASTSource
from tilec.codegen import aot
from tilec.runtime import enginefile as engine_file
from tilec.codegen.loader import load_kernel

engine = engine_file.load(sys.argv[1])
binary, pools = engine.aot, engine.manifest.schedule.pools
fn = load_kernel(engine.kernel_source, aot.KERNEL_NAME)
rebuilt = aot.compiled_kernel(binary, fn, pools)
fresh = triton.compile(ASTSource(fn, aot.signature(pools), aot.constexprs(), aot.pointer_attrs(pools)),
                       target=triton.backends.compiler.GPUTarget("cuda", 90, 32),
                       options={"num_warps": aot.NUM_WARPS})
n = len(fn.arg_names)
print(json.dumps({
    "metadata": rebuilt.metadata == fresh.metadata,
    "packed": rebuilt.packed_metadata == fresh.packed_metadata,
    "cubin": rebuilt.kernel == fresh.asm["cubin"] == binary.cubin,
    "name": rebuilt.name,
    "signature": list(rebuilt.src.signature) == list(fn.arg_names),
    "constants": rebuilt.src.constants == {(n - 3,): True, (n - 2,): binary.spin_limit,
                                           (n - 1,): False},
}))
"""


def test_the_stored_binary_rebuilds_the_kernel_triton_compiles(gpu_engine):
    """Without a GPU: the CompiledKernel rebuilt from the engine (what the gpu executor
    loads and launches) equals the one triton.compile returns for the kernel source, in
    a process without the interpreter (its cubin, metadata, launch constants)."""
    import os
    import subprocess
    import sys

    path, _, _ = gpu_engine
    proc = subprocess.run([sys.executable, "-c", REBUILD, str(path)], capture_output=True,
                          text=True, env=dict(os.environ, TRITON_INTERPRET="0"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "metadata": True, "packed": True, "cubin": True, "name": aot.KERNEL_NAME,
        "signature": True, "constants": True}


# ---- on a GPU: the stored binary runs, and agrees with the JIT --------------------------

@pytest.mark.gpu
def test_the_stored_binary_runs_without_compiling(gpu_engine, monkeypatch, caplog):
    """On an sm_90 GPU (TRITON_INTERPRET=0 pytest -m gpu): the stored binary is launched,
    never the JIT, and computes what the JIT-compiled kernel computes."""
    path, _, _ = gpu_engine
    engine = tilec.api.load(path)
    inputs = engine.random_inputs(0)
    stored = executors.make_executor(engine.data, "gpu")
    assert stored.binary is not None
    stored.kernel = None            # the JIT path would fail on this
    got = stored.run(inputs)
    monkeypatch.setattr(executors, "SPIN_LIMIT", executors.SPIN_LIMIT // 2)   # forces the JIT
    with caplog.at_level(logging.WARNING, logger="tilec.runtime.executors"):
        jit = executors.make_executor(engine.data, "gpu")
    assert jit.binary is None and "waits at most" in caplog.text
    want = jit.run(inputs)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_inspect_aot_never_compiles_an_edited_kernel(capsys, gpu_engine, tmp_path):
    """`inspect --aot` compiles the stored kernel (importing it, in a child process): an
    edited kernel, signed again and without the binary it no longer matches, is refused
    before anything imports it. The schedule is still shown without --aot."""
    path, _, _ = gpu_engine
    marker = tmp_path / "executed"

    def edit(meta):
        meta["kernel"] += f"open({str(marker)!r}, 'w').close()\n"
        del meta[AOT_KEY]
    bad = resign(path, tmp_path / "e", meta=edit, tensors=lambda t: t.pop(AOT_CUBIN))
    code, out, err = run_cli(capsys, "inspect", bad, "--aot", "--json")
    assert code == 2 and out == "" and "refusing to import or compile" in err, err
    assert not marker.exists()
    code, out, err = run_cli(capsys, "inspect", bad, "--json")
    assert code == 0 and json.loads(out)["tasks"] > 0, err
    assert not marker.exists()
