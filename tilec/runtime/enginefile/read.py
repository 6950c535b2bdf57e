"""Reading an engine file: `load` reads the container, checks the checksum, parses the
manifest and runs every check (checks.py) before anything of the file can be used."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from tilec.errors import EngineError
from tilec.gcpause import without_cyclic_gc
from tilec.ir.abi import AOTKernel
from tilec.ir.serial import from_plain
from tilec.runtime.chat import ChatTemplate
from tilec.runtime.enginefile.checks import (check_aot, check_kernel, check_tables,
                                             check_views, entry_problem)
from tilec.runtime.enginefile.digest import file_digest
from tilec.runtime.enginefile.format import (AOT_CUBIN, AOT_FIELDS, AOT_KEY, BINARY_KEYS,
                                             DEVICES_KEY, ENTRIES, FORMAT, FORMAT_VERSION,
                                             DeviceEngines, EngineFile, Manifest, aot_cubin,
                                             aot_key, clip, first_line)
from tilec.runtime.sizes import size_problem

MAX_HEADER_BYTES = 100_000_000   # safetensors' own limit; a manifest is megabytes at most
MAX_INT = 1 << 53               # no count, size, offset or time in a manifest is larger
MAX_DEPTH = 64                  # the IR nests about a dozen levels deep



def load(path: str | os.PathLike, trust_engine_code: bool = False, *,
         read_only: bool = False) -> EngineFile | DeviceEngines:
    """Read and check an engine file; any problem is an EngineError with one line.

    The stored kernel source is only accepted when it is byte-identical to what this
    tilec renders from the manifest (and the args table likewise), unless
    `trust_engine_code` says to run it anyway, or `read_only` says the caller only reads
    the schedule (`tilec inspect`): then an engine whose kernel differs loads with
    `kernel_checked` False, and nothing will import or compile that kernel. Nothing of
    the file is used before the check that covers it has passed: header, checksum,
    manifest, tables, views, kernel. A multi-device engine gives DeviceEngines, each
    device's part checked alike."""
    path = Path(path)
    if path.is_dir():
        raise EngineError(f"{path}: a folder, not an engine file")
    if not path.is_file():
        raise EngineError(f"{path}: no such engine file")
    try:
        meta, tensors = _read_container(path)
    except OSError as e:
        raise EngineError(f"{path}: cannot read the engine file ({e.strerror or e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{path}: engine format version {clip(meta.get('format_version'))}; "
                          f"this tilec reads version {FORMAT_VERSION}")
    if meta.get("sha256") != file_digest(meta, tensors):
        raise EngineError(f"{path}: checksum mismatch: the file is corrupted or was edited")
    tokenizer = meta.get("tokenizer")
    chat = meta.get("chat")
    if chat is not None:
        try:
            ChatTemplate.from_json(chat)
        except EngineError as e:
            raise EngineError(f"{path}: {e}") from None
    accept = "trust" if trust_engine_code else "read" if read_only else "checked"
    if DEVICES_KEY in meta:
        devices = _load_devices(path, meta, tensors, tokenizer, accept)
        for part in devices.ranks:
            part.chat = chat
        return devices
    manifest = _parse_manifest(path, meta.get("manifest"))
    kernel = meta.get("kernel", "")
    entry_tensors = _entry_tensors(path, manifest, meta, tensors)
    aot = _binary(path, meta, tensors, "decode")
    engine = EngineFile(manifest, kernel, tensors, tokenizer, aot, chat)
    entries = {name: _parse_manifest(path, meta.get(f"manifest.{name}")) for name in entry_tensors}
    problem = _engine_problem(engine, accept, [m.schedule for m in entries.values()])
    if problem:
        raise EngineError(f"{path}: {problem}")
    if engine.manifest.schedule.taskgraph.devices != 1:
        raise EngineError(f"{path}: a single-device file holds one device's part of a "
                          "multi-device engine")
    for name, own in entry_tensors.items():
        binary = _binary(path, meta, own, name)
        engine.entries[name] = _load_entry(path, engine, name, entries,
                                           meta.get(f"kernel.{name}", ""), own, binary, accept)
    return engine


def _binary(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor],
            entry: str) -> AOTKernel | None:
    """Entry `entry`'s stored GPU binary (its cubin taken out of `tensors`, the decode
    step's or, named without the entry's prefix, the entry's own), or None if it has
    none."""
    key = aot_key(entry)
    if key not in meta and AOT_CUBIN not in tensors:
        return None
    try:
        return read_aot(meta.get(key), tensors.pop(AOT_CUBIN, None), key, aot_cubin(entry))
    except (ValueError, RecursionError) as e:
        where = "" if entry == "decode" else f"{entry} entry: "
        raise EngineError(f"{path}: {where}bad GPU binary: {first_line(e)}") from None


def _entry_tensors(path: Path, manifest: Manifest, meta: dict[str, str],
                   tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The further entries' own tensors (taken out of `tensors`), by entry, for the
    entries the decode manifest lists: each a known entry name, listed once, with its
    manifest and kernel; no tensor or metadata of another entry may be in the file."""
    names = manifest.entries
    if manifest.entry != "decode" or not names or names[0] != "decode" or \
            len(set(names)) != len(names) or not set(names) <= set(ENTRIES):
        raise EngineError(f"{path}: malformed entry list {clip(list(names))} "
                          f"(expected decode first, then any of {', '.join(ENTRIES[1:])})")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in ENTRIES[1:]:
        prefix = f"{name}."
        own = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        listed = name in names
        stray = [k for k in (f"manifest.{name}", f"kernel.{name}") if (k in meta) != listed]
        if not listed and aot_key(name) in meta:
            stray.append(aot_key(name))
        if stray or (own and not listed):
            raise EngineError(f"{path}: the {name} entry is {'listed' if listed else 'not listed'} "
                              f"but {clip(stray[0] if stray else prefix + next(iter(own)))} "
                              f"{'is missing' if stray and listed else 'is there'}")
        if listed:
            out[name] = own
    return out


def _load_entry(path: Path, engine: EngineFile, name: str, manifests: dict[str, Manifest],
                kernel: str, own: dict[str, torch.Tensor], binary: AOTKernel | None,
                accept: str) -> EngineFile:
    """Entry `name`: its manifest, kernel, tables and GPU binary, over the decode step's
    pools (the same tensors), checked as the decode step is (its binary against its own
    kernel source), then against it (entry_problem)."""
    pools = {k: v for k, v in engine.tensors.items() if k.startswith("pool.")}
    entry = EngineFile(manifests[name], kernel, {**pools, **own}, engine.tokenizer, binary,
                       engine.chat)
    others = [engine.manifest.schedule] + [m.schedule for n, m in manifests.items() if n != name]
    problem = _engine_problem(entry, accept, others) or entry_problem(engine, entry, name)
    if problem:
        raise EngineError(f"{path}: {name} entry: {problem}")
    return entry


def _engine_problem(engine: EngineFile, accept: str, shared_with=()) -> str | None:
    """`shared_with`: the schedules of the engine's other entries (sizes.size_problem)."""
    try:
        problem = check_tables(engine) or size_problem(engine, shared_with) or \
            check_views(engine) or check_aot(engine)
    except Exception as e:  # a manifest that decodes but contradicts itself
        problem = f"malformed manifest ({type(e).__name__}: {first_line(e)})"
    return problem or check_kernel(engine, accept)


def _load_devices(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor],
                  tokenizer: str | None, accept: str) -> DeviceEngines:
    text = meta[DEVICES_KEY]
    if not text.isdigit() or not 2 <= int(text) <= 64:
        raise EngineError(f"{path}: malformed device count {clip(text)}")
    n = int(text)
    pools = {k: v for k, v in tensors.items() if k.startswith("pool.")}
    prefixes = tuple(f"device{d}." for d in range(n))
    stray = [k for k in tensors if k not in pools and not k.startswith(prefixes)] + \
        [k for k in BINARY_KEYS if k in meta]
    if stray:
        raise EngineError(f"{path}: a multi-device engine with a stray entry {clip(stray[0])}")
    ranks = []
    for d, prefix in enumerate(prefixes):
        manifest = _parse_manifest(path, meta.get(f"manifest.{d}"))
        if manifest.entries != ("decode",) or manifest.entry != "decode":
            raise EngineError(f"{path}: device {d}: a multi-device engine has one entry")
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        engine = EngineFile(manifest, meta.get(f"kernel.{d}", ""), {**pools, **own}, tokenizer)
        problem = _engine_problem(engine, accept)
        tg = manifest.schedule.taskgraph
        if problem is None and (tg.device, tg.devices) != (d, n):
            problem = f"its manifest says device {tg.device} of {tg.devices}"
        if problem:
            raise EngineError(f"{path}: device {d}: {problem}")
        ranks.append(engine)
    if any(r.manifest.schedule.taskgraph.transfers != ranks[0].manifest.schedule.taskgraph.transfers
           for r in ranks):
        raise EngineError(f"{path}: the devices list different transfers")
    return DeviceEngines(tuple(ranks))


def read_aot(text, cubin: torch.Tensor | None, key: str = AOT_KEY,
             tensor: str = AOT_CUBIN) -> AOTKernel:
    """A stored binary and its description (metadata `key`, tensor `tensor`), checked
    against each other (size, SHA-256, field types); a problem is a ValueError with one
    line."""
    if not isinstance(text, str) or cubin is None:
        raise ValueError(f"tensor {tensor!r} and metadata {key!r} come together; "
                         "one is missing")
    plain = json.loads(text)
    check_plain(plain)
    if not isinstance(plain, dict) or set(plain) != set(AOT_FIELDS):
        raise ValueError(f"its description does not have the fields {', '.join(AOT_FIELDS)}")
    for key, kind in AOT_FIELDS.items():
        if not isinstance(plain[key], kind) or isinstance(plain[key], bool):
            raise ValueError(f"its description has {key} = {clip(plain[key])}")
    if cubin.dtype != torch.uint8 or cubin.dim() != 1:
        raise ValueError(f"tensor {tensor!r} is not a flat uint8 tensor")
    data = cubin.numpy().tobytes()
    if len(data) != plain.pop("cubin_size"):
        raise ValueError(f"the cubin has {len(data)} bytes, its description says otherwise")
    if hashlib.sha256(data).hexdigest() != plain.pop("cubin_sha256"):
        raise ValueError("the cubin does not match the SHA-256 in its description")
    plain["triton_metadata"] = json.dumps(plain["triton_metadata"], sort_keys=True)
    return AOTKernel(cubin=data, **plain)


def _read_container(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise EngineError(f"{path}: not a readable engine file ({size} bytes, too short "
                          "for a safetensors header)")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise EngineError(f"{path}: not a readable engine file (header of {n} bytes in a "
                          f"file of {size})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise EngineError(f"{path}: not a tilec engine (a safetensors file without "
                                  "the tilec format marker)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except EngineError:
        raise
    except Exception as e:  # the container itself is damaged
        raise EngineError(f"{path}: not a readable engine file ({first_line(e)})") from None
    return meta, tensors


@without_cyclic_gc
def _parse_manifest(path: Path, text) -> Manifest:
    try:
        if not isinstance(text, str):
            raise ValueError("no manifest")
        plain = json.loads(text)
        check_plain(plain)
        return from_plain(Manifest, plain)
    except (ValueError, TypeError, KeyError, RecursionError, OverflowError) as e:
        raise EngineError(f"{path}: malformed manifest ({first_line(e)})") from None


def check_plain(plain) -> None:
    """Bounded nesting and integers, so nothing downstream overflows or recurses. Walked
    a level at a time with only the containers kept: a manifest holds over a million
    values, and a stack entry for each of them took most of a second."""
    level, depth = [[plain]], -1   # the root, as the child of a stand-in at depth -1
    while level:
        depth += 1                 # the depth of the children of this level
        nested = []
        for x in level:
            if depth > MAX_DEPTH and x:
                raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
            for v in (x.values() if type(x) is dict else x):
                kind = type(v)
                if kind is int:
                    if not -MAX_INT <= v <= MAX_INT:
                        raise ValueError(f"integer {v} out of range")
                elif kind is list or kind is dict:
                    nested.append(v)
        level = nested
