"""Every entry of a GPU-target engine carries its own kernel compiled ahead of time: a
decoder's prefill entry as its decode step does (`aot.prefill`, `prefill.aot.cubin`),
compiled at `tilec compile` beside the decode kernel (from the start of the compile:
the prefill is placed before it begins), written, read and checked exactly as the
decode step's binary. A binary is never launched for another entry's kernel: a file
whose binaries are swapped is refused in one line (as the decode step's binary of
another source is), and the gpu executor of an entry made in memory with another's
binary warns and compiles its own source. `tilec inspect` shows both kernels'
registers, spills and shared memory. One compile of tests/../llama_tiny.yaml for h200
(two sm_90 kernels) serves the file."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

import tilec.api
from engines import EXAMPLES, compiled, read_raw, resign
from test_hostile import assert_refused, run_cli
from tilec.codegen import aot
from tilec.compiler import hooks
from tilec.runtime import enginefile as engine_file
from tilec.runtime import executors
from tilec.runtime.enginefile import write
from tilec.runtime.enginefile.format import AOT_CUBIN, AOT_KEY
from tilec.runtime.executors import GPUExecutor

PREFILL_KEY, PREFILL_CUBIN = "aot.prefill", "prefill.aot.cubin"


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """llama_tiny.yaml for h200 (decode and prefill entries), compiled once straight into
    a file (the save begun before the binaries, then sealed) with its dumps and stage
    names, and the sources of every GPU compile started."""
    folder = tmp_path_factory.mktemp("aot_entries")
    started: list[str] = []
    pending = hooks.PendingKernel

    def recording(source, pools, arch, *args, **kwargs):
        started.append(source)
        return pending(source, pools, arch, *args, **kwargs)

    stages: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hooks, "PendingKernel", recording)
        engine = tilec.api.compile(str(EXAMPLES / "llama_tiny.yaml"), target="h200", workers=8,
                                   dtype="bfloat16", output=folder / "tiny.engine",
                                   dump_dir=folder / "dump", on_stage=lambda n, s: stages.append(n))
    return folder / "tiny.engine", engine.data, stages, started


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_each_entry_stores_its_own_binary(decoder):
    path, data, stages, started = decoder
    prefill = data.entries["prefill"]
    assert data.aot is not None and prefill.aot is not None
    for entry in (data, prefill):   # each compiled for sm_90 from its own source
        assert entry.aot.kernel_sha256 == sha(entry.kernel_source)
        assert entry.aot.arch == 90 and entry.aot.cubin[:4] == b"\x7fELF"
        assert entry.aot.spin_limit == executors.SPIN_LIMIT
    assert data.kernel_source != prefill.kernel_source
    # the prefill's kernel, foreseen before the compile began, was compiled once
    assert started.count(prefill.kernel_source) == 1 and data.kernel_source in started
    assert stages.index("entries") < stages.index("aot") < stages.index("seal")
    meta, tensors = read_raw(path)
    assert json.loads(meta[PREFILL_KEY])["cubin_sha256"] == prefill.aot.cubin_sha256
    assert tensors[PREFILL_CUBIN].numpy().tobytes() == prefill.aot.cubin
    assert meta["format_version"] == engine_file.FORMAT_VERSION == "8"
    dump = path.parent / "dump"
    assert (dump / "08_aot.prefill.json").read_text() == meta[PREFILL_KEY]
    assert ".target sm_90a" in (dump / "08_kernel.prefill.ptx").read_text()


def test_the_binaries_come_last_and_round_trip(decoder, tmp_path, monkeypatch):
    """The binaries are the file's last bytes (decode's, then the prefill's), so the
    weights are written before they exist; load gives each entry its binary back, and
    save(load(file)), and a PendingSave whose header room was too small, give the
    compiled file's bytes."""
    path, data, _, _ = decoder
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    ends = sorted((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    assert [k for _, k in ends[-2:]] == [AOT_CUBIN, PREFILL_CUBIN]
    loaded = engine_file.load(path)
    assert loaded.binaries() == data.binaries() and set(data.binaries()) == {"decode", "prefill"}
    assert AOT_CUBIN not in loaded.entries["prefill"].tensors
    engine_file.save(loaded, tmp_path / "again")
    assert (tmp_path / "again").read_bytes() == path.read_bytes()
    monkeypatch.setattr(write, "BINARY_ROOM", 0)   # too small: finish writes anew
    pending = engine_file.PendingSave(data.with_binaries({}), tmp_path / "late")
    monkeypatch.setattr(write, "BINARY_ROOM", 64 << 10)
    pending.finish(data.binaries())
    assert (tmp_path / "late").read_bytes() == path.read_bytes()


def swap_binaries(meta=None, tensors=None):
    """Edits that give each entry the other's binary (description and cubin)."""
    if meta is not None:
        meta[AOT_KEY], meta[PREFILL_KEY] = meta[PREFILL_KEY], meta[AOT_KEY]
    if tensors is not None:
        tensors[AOT_CUBIN], tensors[PREFILL_CUBIN] = tensors[PREFILL_CUBIN], tensors[AOT_CUBIN]


def decode_binary_for_prefill(meta=None, tensors=None):
    if meta is not None:
        meta[PREFILL_KEY] = meta[AOT_KEY]
    if tensors is not None:
        tensors[PREFILL_CUBIN] = tensors[AOT_CUBIN].clone()


def drop_prefill_cubin(meta=None, tensors=None):
    if tensors is not None:
        tensors.pop(PREFILL_CUBIN)


def flip_prefill_cubin(meta=None, tensors=None):
    if tensors is not None:
        t = tensors[PREFILL_CUBIN].clone()
        t[100] ^= 1
        tensors[PREFILL_CUBIN] = t


EDITS = {   # the edit, what the one error line says
    "swapped": (swap_binaries, "the GPU binary was compiled from another kernel source"),
    "the decode binary for the prefill": (
        decode_binary_for_prefill,
        "prefill entry: the GPU binary was compiled from another kernel source"),
    "a description without its cubin": (
        drop_prefill_cubin, "prefill entry: bad GPU binary: tensor 'prefill.aot.cubin' and "
                            "metadata 'aot.prefill' come together"),
    "a flipped byte": (flip_prefill_cubin, "prefill entry: bad GPU binary: the cubin does not "
                                           "match the SHA-256"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_a_binary_of_another_entry_or_damaged_is_refused(capsys, decoder, tmp_path, case):
    path, _, _, _ = decoder
    edit, match = EDITS[case]
    bad = resign(path, tmp_path / "e", meta=lambda m: edit(meta=m),
                 tensors=lambda t: edit(tensors=t))
    assert_refused(capsys, bad, match=match)


def test_an_entry_binary_without_the_entry_is_refused(capsys, decoder, tmp_path):
    """A decode-only engine (and a cpu one) holding a prefill binary: refused."""
    path, _, _, _ = decoder
    meta, tensors = read_raw(path)
    bad = resign(compiled("block"), tmp_path / "e",
                 meta=lambda m: m.__setitem__(PREFILL_KEY, meta[PREFILL_KEY]))
    assert_refused(capsys, bad, match="the prefill entry is not listed but 'aot.prefill' is there")


def test_an_older_format_is_refused(capsys, tmp_path):
    bad = resign(compiled("block"), tmp_path / "e",
                 meta=lambda m: m.__setitem__("format_version", "7"))
    assert_refused(capsys, bad, match="engine format version '7'; this tilec reads version 8")


def stored_binary_of(entry, monkeypatch, capability=(9, 0)):
    """GPUExecutor._stored_binary for an entry without a GPU: a fake capability, and
    load_binary stubbed (it needs a driver) to give back what it was asked to load."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(aot, "load_binary", lambda binary, fn, pools: binary)
    ex = GPUExecutor.__new__(GPUExecutor)
    ex.__dict__.update(kernel=None, schedule=entry.manifest.schedule)
    return ex._stored_binary(entry)


def test_each_entry_executor_launches_its_own_binary(decoder, monkeypatch, caplog):
    """The gpu executor of each entry loads that entry's binary (this user's tilec
    compiled both); an entry made in memory with the other entry's binary is never
    launched with it: one warning, then its own source through the JIT."""
    path, _, _, _ = decoder
    data = engine_file.load(path)
    prefill = data.entries["prefill"]
    with caplog.at_level(logging.WARNING, logger="tilec.runtime.executors"):
        assert stored_binary_of(data, monkeypatch) is data.aot
        assert stored_binary_of(prefill, monkeypatch) is prefill.aot
        assert caplog.records == []
        crossed = dataclasses.replace(prefill, aot=data.aot)
        assert stored_binary_of(crossed, monkeypatch) is None
    [record] = caplog.records
    assert record.getMessage() == (
        "warning: the stored GPU binary was compiled from another kernel source than this "
        "one; compiling the kernel from its source instead")


def test_inspect_shows_both_kernels(capsys, decoder, monkeypatch):
    """From the stored binaries, never compiling: registers, spills and shared memory
    of each entry in `entries`, and `--entry prefill` reads the prefill's kernel."""
    path, data, _, _ = decoder

    def no_compile(*args, **kwargs):
        raise AssertionError("inspect compiled a kernel although the engine stores it")

    monkeypatch.setattr(aot, "compile_for_gpu", no_compile)
    code, out, err = run_cli(capsys, "inspect", path, "--json")
    assert code == 0, err
    rows = {e["entry"]: e["aot"] for e in json.loads(out)["entries"]}
    for name, binary in data.binaries().items():
        assert (rows[name]["n_regs"], rows[name]["n_spills"], rows[name]["shared"]) == \
            (binary.n_regs, binary.n_spills, binary.shared)
        assert rows[name]["stored"] is True
    code, out, err = run_cli(capsys, "inspect", path, "--json", "--entry", "prefill")
    assert code == 0, err
    assert json.loads(out)["kernel"]["aot"]["cubin_size"] == len(data.entries["prefill"].aot.cubin)
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 0 and "registers" in out and "shared" in out, err


# ---- on a GPU: the prefill entry runs its stored binary, on decode's pools --------------

@pytest.mark.gpu
def test_the_prefill_entry_runs_its_stored_binary_on_decode_pools(decoder):
    """On an sm_90 GPU (TRITON_INTERPRET=0 pytest -m gpu): the prefill executor loads its
    stored binary (no JIT: its JIT function is taken away), runs on the decode
    executor's weight and state pools, and computes what the JIT-compiled kernel
    computes."""
    path, _, _, _ = decoder
    engine = tilec.api.load(path)
    decode = executors.make_executor(engine.data, "gpu")
    prefill = executors.entry_executor(decode, "prefill")
    assert prefill.binary is not None
    assert all(prefill.pools[p.name] is decode.pools[p.name]
               for p in prefill.schedule.pools if p.kind != "arena")
    prefill.kernel = None
    chunk = prefill.engine.manifest.inputs[0].shape[0]
    inputs = {"token": torch.arange(1, chunk + 1), "pos": torch.tensor([0]),
              "last": torch.tensor([chunk - 1])}
    got = prefill.run(inputs)
    jit_decode = executors.make_executor(engine.data, "gpu")
    jit = executors.entry_executor(jit_decode, "prefill")
    jit.binary = None
    want = jit.run(inputs)
    for name in want:
        assert torch.equal(got[name], want[name]), name
