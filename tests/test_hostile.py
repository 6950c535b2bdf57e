"""Hostile engine files: damaged, truncated, padded, foreign, or edited and signed again
so that the checksum passes. `tilec run/inspect/verify` must answer each with one
`error:` line and exit 2 within seconds: never a traceback, a crash, a hang or an
out-of-bounds access. A seeded fuzz tries >= 500 mutations (load() for most, the CLI
for a sample); the stored kernel source never runs unless it is exactly what this tilec
renders from the manifest."""
from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engines import compiled, read_raw, resign, write_signed
from tilec.cli import main
from tilec.errors import EngineError, TilecError
from tilec.runtime import enginefile as engine_file
from tilec.runtime.enginefile import write
from tilec.runtime.enginefile.read import check_plain
from tilec.verify_engine import verify_engine

COMMANDS = ["run", "inspect", "verify"]
SECONDS = 10     # per CLI call on a bad file; a good load is milliseconds


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    t0 = time.perf_counter()
    code = main([str(a) for a in argv])
    assert time.perf_counter() - t0 < SECONDS
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, path: Path, commands=COMMANDS, match: str = "") -> None:
    for command in commands:
        code, out, err = run_cli(capsys, command, path)
        assert code == 2, (command, out, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err and out == ""
        assert match in err, err


@pytest.fixture(scope="module")
def block() -> Path:
    return compiled("block")


@pytest.fixture(scope="module")
def raw(block):
    return read_raw(block)


# ---- the container ---------------------------------------------------------------------------

def header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("where", ["length", "header", "data", "last"])
def test_bit_flips(capsys, block, tmp_path, where):
    data = bytearray(block.read_bytes())
    end = header_end(bytes(data))
    rng = random.Random(where)
    pos = {"length": rng.randrange(8), "header": rng.randrange(8, end),
           "data": rng.randrange(end, len(data)), "last": len(data) - 1}[where]
    data[pos] ^= 1 << rng.randrange(8)
    (tmp_path / "e").write_bytes(bytes(data))
    assert_refused(capsys, tmp_path / "e")


def test_truncations_and_appends(capsys, block, tmp_path):
    data = block.read_bytes()
    rng = random.Random(1)
    for n in [0, 1, 7, 8, 9, header_end(data) - 1, header_end(data), len(data) - 1,
              rng.randrange(len(data))]:
        (tmp_path / "e").write_bytes(data[:n])
        assert_refused(capsys, tmp_path / "e", ["run"])
    for extra in [b"\0", b"x" * 4096, data[:100]]:
        (tmp_path / "e").write_bytes(data + extra)
        assert_refused(capsys, tmp_path / "e", ["verify"])


def test_not_engines(capsys, tmp_path):
    rng = random.Random(2)
    (tmp_path / "random").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "dir").mkdir()
    save_file({"weight": torch.randn(4, 4)}, tmp_path / "foreign", metadata={"format": "pt"})
    save_file({"weight": torch.randn(4, 4)}, tmp_path / "bare")
    # a header that claims more bytes than the file has, and a huge one
    (tmp_path / "short").write_bytes((10_000).to_bytes(8, "little") + b"{}")
    (tmp_path / "huge").write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    (tmp_path / "notjson").write_bytes((4).to_bytes(8, "little") + b"\xff\xfe{[")
    for name in ["random", "empty", "dir", "foreign", "bare", "short", "huge", "notjson",
                 "absent"]:
        assert_refused(capsys, tmp_path / name)


def test_header_json_edited_without_signing(capsys, block, raw, tmp_path):
    """Valid JSON with changed values: the checksum no longer matches."""
    meta, tensors = raw
    plain = json.loads(meta["manifest"])
    plain["schedule"]["target"]["workers"] += 1
    save_file(tensors, tmp_path / "e", metadata={**meta, "manifest": json.dumps(plain)})
    assert_refused(capsys, tmp_path / "e", match="checksum")
    save_file(tensors, tmp_path / "e", metadata={**meta, "tilec_version": "9.9"})
    assert_refused(capsys, tmp_path / "e", ["run"], match="checksum")


# ---- edited and signed again ------------------------------------------------------------------

def edit_table(col, value, row=0):
    def edit(t):
        t["tasks"][row, col] = value
    return edit


TABLE_EDITS = {
    "opcode": edit_table(0, 999),
    "args_row_negative": edit_table(1, -1),
    "args_row_past_end": edit_table(1, 10 ** 6),
    "tile": edit_table(3, 1 << 30),
    "nwaits_negative": edit_table(5, -1),
    "nwaits_too_many": edit_table(5, 99),
    "wait_event_past_end": edit_table(6, 10 ** 6, row=-1),
    "signal_negative": edit_table(-1, -1),
    "signal_past_end": edit_table(-1, 2 ** 31 - 1),
    "task_ids_duplicate": lambda t: t["task_ids"].__setitem__(1, int(t["task_ids"][0])),
    "task_ids_past_end": lambda t: t["task_ids"].__setitem__(0, 10 ** 6),
    "queue_start_decreasing": lambda t: t["queue_start"].__setitem__(1, -5),
    "queue_start_past_end": lambda t: t["queue_start"].__setitem__(-1, 10 ** 6),
    "args_offset_past_pools": lambda t: t["args"].__setitem__((0, 0), 1 << 40),
    "args_offset_moved": lambda t: t["args"].__setitem__((0, 0), int(t["args"][0, 0]) + 1),
    "pool_shrunk": lambda t: t.__setitem__("pool.w_float32", t["pool.w_float32"][:-1]),
    "pool_dtype": lambda t: t.__setitem__("pool.w_float32", t["pool.w_float32"].double()),
    "table_dtype": lambda t: t.__setitem__("tasks", t["tasks"].long()),
    "table_missing": lambda t: t.pop("task_ids"),
}


@pytest.mark.parametrize("name", list(TABLE_EDITS))
def test_signed_table_edits(capsys, block, tmp_path, name):
    """The checksum passes; the table checks must refuse the indices."""
    path = resign(block, tmp_path / "e", tensors=TABLE_EDITS[name])
    with pytest.raises(EngineError):
        engine_file.load(path, trust_engine_code=True)
    assert_refused(capsys, path, ["run", "verify"] if name.startswith("args") else COMMANDS)


def test_signed_edit_through_save(capsys, block, tmp_path):
    """The same kind of edit made on an Engine object and written by engine.save."""
    engine = engine_file.load(block)
    engine.tensors["tasks"][2, 6] = 10 ** 6
    engine.tensors["tasks"][2, 5] = max(int(engine.tensors["tasks"][2, 5]), 1)
    engine_file.save(engine, tmp_path / "e")
    assert_refused(capsys, tmp_path / "e", match="out of range")


def nested(depth: int, leaf):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize("plain,problem", [
    (nested(64, 1), None), (nested(65, 1), "nested"), (nested(64, []), None),
    ({"a": nested(62, {"b": 1})}, None), ({"a": nested(63, {"b": 1})}, "nested"),
    ([2 ** 53, -2 ** 53, True, 1.5e300, "9" * 30], None), ([[2 ** 53 + 1]], "out of range"),
    ({"k": -2 ** 53 - 1}, "out of range"), (2 ** 60, "out of range"), ("text", None)])
def test_manifest_nesting_and_integers_are_bounded(plain, problem):
    """What a decoded manifest may hold: nothing deeper than MAX_DEPTH (64) below the
    root, no integer beyond +-2**53."""
    if problem is None:
        check_plain(plain)
    else:
        with pytest.raises(ValueError, match=problem):
            check_plain(plain)


def edit_manifest(fn):
    return lambda plain: fn(plain)


def _set(path, value):
    def edit(plain):
        x = plain
        for p in path[:-1]:
            x = x[p]
        x[path[-1]] = value
    return edit


MANIFEST_EDITS = {
    "workers": _set(["schedule", "target", "workers"], 7),
    "buffer_offset": _set(["schedule", "buffers", 0, "offset"], 10 ** 9),
    "buffer_dtype": _set(["schedule", "buffers", 0, "type", "dtype"], "float64"),
    "pool_size": _set(["schedule", "pools", 0, "numel"], 1),
    "pool_kind": _set(["schedule", "pools", 0, "kind"], "shared"),
    "event_signals": _set(["schedule", "events", 0, "signals"], 0),
    "input_strides": _set(["inputs", 0, "strides"], [2048, 1000, 1]),
    "input_offset": _set(["inputs", 0, "offset"], -1),
    "input_buffer": _set(["inputs", 0, "buffer"], "nothing"),
    "opcode": _set(["opcodes", 0], 99),
    "max_waits": _set(["max_waits"], 1),
    "huge_int": _set(["seed"], 1 << 80),
    "unknown_field": _set(["surprise"], 1),
    "wrong_type": _set(["model"], ["block"]),
    "deep_nesting": _set(["model"], json.loads("[" * 200 + "]" * 200)),
    "not_an_object": lambda plain: plain.clear(),
}


@pytest.mark.parametrize("name", list(MANIFEST_EDITS))
def test_signed_manifest_edits(capsys, block, tmp_path, name):
    path = resign(block, tmp_path / "e", manifest=MANIFEST_EDITS[name])
    with pytest.raises(EngineError):
        engine_file.load(path, trust_engine_code=True)
    assert_refused(capsys, path, ["inspect"])


@pytest.mark.parametrize("text", ["[" * 100_000, "{}", "null", "", "1e999"])
def test_signed_raw_manifest_text(capsys, block, tmp_path, text):
    path = resign(block, tmp_path / "e", meta=lambda m: m.__setitem__("manifest", text))
    assert_refused(capsys, path, ["verify"], match="manifest")


def test_signed_format_version(capsys, block, tmp_path):
    path = resign(block, tmp_path / "e", meta=lambda m: m.__setitem__("format_version", "1"))
    assert_refused(capsys, path, ["run"], match="format version")


# ---- the stored kernel source -------------------------------------------------------------

def test_edited_kernel_source_never_runs(capsys, block, tmp_path):
    """A signed engine whose kernel has extra code: refused by run and verify (which would
    execute it), shown by inspect (which never executes it), run only when trusted."""
    marker = tmp_path / "executed"
    payload = f"open({str(marker)!r}, 'w').close()\n"
    path = resign(block, tmp_path / "e",
                  meta=lambda m: m.__setitem__("kernel", m["kernel"] + payload))
    for command in ["run", "verify"]:
        code, _, err = run_cli(capsys, command, path)
        assert code == 2 and "stored kernel source differs" in err, err
    code, _, err = run_cli(capsys, "inspect", path, "--json")
    assert code == 0, err
    assert not marker.exists()
    code, _, err = run_cli(capsys, "run", path, "--trust-engine-code", "--backend", "interpret")
    assert code == 0, err
    assert marker.exists()   # the flag says what it does


def test_kernel_of_another_manifest_is_refused(block, tmp_path):
    """A manifest edit that changes what renders (a tile size) leaves the stored kernel
    stale: refused, even though the file is signed."""
    def edit(plain):
        tiling = plain["schedule"]["taskgraph"]["tilings"][0]
        tiling["block_n"] *= 2
    path = resign(block, tmp_path / "e", manifest=edit)
    with pytest.raises(EngineError, match="differs from what this tilec renders"):
        engine_file.load(path)


# ---- the seeded fuzz ---------------------------------------------------------------------

def _leaves(x, path=()):
    yield path, x
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, path + (i,))


def _other(rng, v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return rng.choice([-1, 0, 1, v + 1, v - 1, 2 ** 31, 2 ** 63, v * 1000, None, "1"])
    if isinstance(v, float):
        return rng.choice([-1.0, 0.0, 1e308, None])
    if isinstance(v, str):
        return rng.choice(["", "x", v + "x", "float64", "state", "weight", "arena", 0])
    if isinstance(v, list):
        return rng.choice([[], v[:-1], v + v[-1:], v[::-1], None, {}])
    return rng.choice([{}, [], None, 0])


def mutate_manifest(rng, plain) -> None:
    path, value = rng.choice(list(_leaves(plain))[1:])
    parent = plain
    for p in path[:-1]:
        parent = parent[p]
    if isinstance(parent, dict) and rng.random() < 0.15:
        del parent[path[-1]]
    else:
        parent[path[-1]] = _other(rng, value)


def mutate_tensors(rng, tensors) -> None:
    name = rng.choice(sorted(tensors))
    x = tensors[name]
    r = rng.random()
    if r < 0.7 and x.numel():
        flat = x.reshape(-1).clone()
        i = rng.randrange(flat.numel())
        if x.dtype.is_floating_point:
            flat[i] = rng.choice([float("nan"), float("inf"), 1e30])
        else:
            info = torch.iinfo(x.dtype)
            old = int(flat[i])
            flat[i] = rng.choice([-1, 0, old + 1, old - 1, info.max, info.min])
        tensors[name] = flat.reshape(x.shape)
    elif r < 0.8:
        del tensors[name]
    elif r < 0.9:
        tensors[name] = x.reshape(-1)[:-1] if x.numel() else x.reshape(-1)
    else:
        tensors[name] = x.to(torch.int64 if x.dtype != torch.int64 else torch.int32)


def mutate_bytes(rng, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(4)
    end = min(header_end(bytes(data)), len(data))
    if kind == 0:      # bit flips, mostly in the header where parsing happens
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(end) if rng.random() < 0.6 else rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[rng.randrange(len(data)):]
    elif kind == 2:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:              # a run of random bytes somewhere
        pos = rng.randrange(len(data))
        data[pos:pos + 16] = bytes(rng.randrange(256) for _ in range(16))
    return bytes(data)


@pytest.mark.parametrize("example", ["block", "llama_tiny"])
def test_fuzz(capsys, tmp_path, example):
    """Seeded mutations of the bytes (checksum first), and of the tensors and manifest
    signed again (every check behind the checksum): load() raises EngineError or gives
    an engine whose static verify runs; a sample goes through the CLI."""
    source = compiled(example)
    data = source.read_bytes()
    meta0, tensors0 = read_raw(source)
    plain0 = json.loads(meta0["manifest"])
    rng = random.Random(example)
    n_bytes, n_signed = (250, 90) if example == "block" else (120, 60)
    outcomes = {"refused": 0, "accepted": 0}
    path = tmp_path / "fuzz.engine"
    sample = []
    for i in range(n_bytes + n_signed):
        if i < n_bytes:
            path.write_bytes(mutate_bytes(rng, data))
        else:
            meta, tensors = dict(meta0), dict(tensors0)
            if rng.random() < 0.5:
                plain = copy.deepcopy(plain0)
                mutate_manifest(rng, plain)
                meta["manifest"] = json.dumps(plain)
            else:
                mutate_tensors(rng, tensors)
            write_signed(path, meta, tensors)
        try:
            engine = engine_file.load(path, trust_engine_code=True)
        except EngineError:
            outcomes["refused"] += 1
            if i % 25 == 0:
                sample.append(path.read_bytes())
            continue
        outcomes["accepted"] += 1
        try:
            verify_engine(engine)
        except TilecError:
            pass
    assert outcomes["refused"] > (n_bytes + n_signed) // 2, outcomes
    for j, blob in enumerate(sample):
        path.write_bytes(blob)
        assert_refused(capsys, path, [COMMANDS[j % 3]])


# ---- atomic save -------------------------------------------------------------------------

def test_interrupted_save_keeps_the_old_file(block, tmp_path, monkeypatch):
    out = tmp_path / "out.engine"
    out.write_bytes(b"the previous engine\n")
    engine = engine_file.load(block)
    real = write._write_safetensors

    def interrupted(f, tensors, meta, header_bytes):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "_write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine_file.save(engine, out)
    assert out.read_bytes() == b"the previous engine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.engine"]
    monkeypatch.setattr(write, "_write_safetensors", real)
    engine_file.save(replace(engine), out)
    assert out.read_bytes() == block.read_bytes()
