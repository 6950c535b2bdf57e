"""The engine file: one safetensors container, no pickle (DESIGN.md, "Engine file").

Tensors: the task table (`tasks`, one fixed-width int32 record per task, in queue
order), `task_ids` (record -> task id), `queue_start`, the `args` table (pool offsets
per group), and one flat tensor per weight or state pool (`pool.<name>`).
`__metadata__`: format name and version, tilec version, the manifest (JSON), the
kernel source, and a SHA-256 over all of it. GPU-target engines may also hold the
kernel compiled ahead of time: its cubin (tensor `aot.cubin`) and what launching it
needs (metadata `aot`, JSON). `load` checks everything, including every index in the
task table and the cubin against its description, before anything can run.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from tilec.codegen.aot import KERNEL_NAME
from tilec.errors import EngineError
from tilec.gcpause import without_cyclic_gc
from tilec.ir.graph import DTYPE_BYTES
from tilec.ir.record import (FIXED_FIELDS, NO_PREFETCH, prefetch_offset, record_width,
                             weight_pools, weight_prefetch)
from tilec.ir.schedule import Schedule, Wait
from tilec.ir.tasks import TRANSFER
from tilec.ir.serial import from_plain, to_json
from tilec.runtime.atomic_file import TempFile
from tilec.runtime.chat import ChatTemplate
from tilec.runtime.sizes import size_problem
from tilec.version import __version__

FORMAT = "tilec-engine"
FORMAT_VERSION = "3"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
TRANSFER_OPCODE = -1         # task records the host runs: transfers between devices
DEVICES_KEY = "devices"      # metadata of a multi-device engine: the number of devices
POOL_KINDS = ("weight", "state", "arena")
AOT_KEY = "aot"              # metadata: the stored GPU binary's description (JSON)
AOT_CUBIN = "aot.cubin"      # tensor: the binary itself, uint8
SHA_PLACEHOLDER = "0" * 64   # the sha256 entry while the file is written
ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190                # ELF e_machine of NVIDIA cubins


@dataclass(frozen=True)
class IOSpec:
    """A model input or output: a strided view of a buffer."""

    name: str
    buffer: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    dtype: str
    low: int = 0
    high: int | None = None


@dataclass(frozen=True)
class GenerationSpec:
    """How to drive a decode-step engine: which inputs and outputs carry what."""

    vocab_size: int
    max_seq_len: int
    eos_token_ids: tuple[int, ...] = ()
    token_input: str = "token"
    pos_input: str = "pos"
    logits_output: str = "logits"
    next_token_output: str = "next_token"


@dataclass(frozen=True)
class Manifest:
    model: str
    schedule: Schedule          # queues, signal and waits live in the task table
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    opcodes: tuple[int, ...]    # per group
    kinds: tuple[str, ...]      # per opcode
    max_waits: int
    max_args: int
    seed: int
    generation: GenerationSpec | None = None


@dataclass(frozen=True)
class AOTKernel:
    """The kernel compiled ahead of time for the target GPU, and what launching it needs.

    `triton_metadata` is Triton's own description of the compiled kernel (the JSON its
    cache keeps beside the cubin, keys sorted): with it, the same Triton version
    launches the cubin without compiling anything."""

    cubin: bytes
    arch: int                  # compute capability x10 it was compiled for (90: sm_90)
    ptx_target: str            # what the PTX targets, e.g. sm_90a
    num_warps: int
    shared: int                # bytes of shared memory per CTA
    n_regs: int | None         # registers per thread (ptxas -v); None: not reported
    n_spills: int | None       # spill store + load bytes (ptxas -v); None: not reported
    spin_limit: int            # the watchdog's SPIN_LIMIT compiled into this binary
    triton_version: str        # the Triton that compiled it (and must launch it)
    kernel_sha256: str         # SHA-256 of the kernel source it was compiled from
    triton_metadata: str

    @property
    def cubin_sha256(self) -> str:
        return hashlib.sha256(self.cubin).hexdigest()


@dataclass
class Engine:
    manifest: Manifest
    kernel_source: str
    tensors: dict[str, torch.Tensor]
    tokenizer: str | None = None    # tokenizer.json text, for decoder engines
    aot: AOTKernel | None = None    # GPU targets: the kernel compiled ahead of time
    chat: str | None = None         # the checkpoint's chat template (runtime.chat JSON)
    # The kernel source is what this tilec renders from the manifest (set by `load`'s
    # check, or by the compiler that rendered it); only then, or when the user trusts
    # the file's code (`code_trusted`, --trust-engine-code), is it imported or compiled
    # (runtime.kernel.engine_kernel).
    kernel_checked: bool = False
    code_trusted: bool = False
    _encoded: tuple[Manifest, str] | None = field(default=None, init=False, repr=False,
                                                  compare=False)

    def manifest_text(self) -> str:
        """The manifest as the file stores it (JSON). Encoding a large model's takes
        seconds (Llama-1B: 1.4 M objects) and a save needs it before anything can be
        hashed or written, so the compiler encodes it while the GPU compile finishes; it
        is kept for as long as the manifest is this one."""
        if self._encoded is None or self._encoded[0] is not self.manifest:
            self._encoded = (self.manifest, to_json(self.manifest))
        return self._encoded[1]

    @property
    def record_width(self) -> int:
        return record_width(self.manifest.max_waits)

    def schedule(self) -> Schedule:
        """The schedule as stored: queues, signals and waits decoded from the table."""
        return decode_schedule(self.manifest, self.tensors)


@dataclass
class DeviceEngines:
    """A multi-device engine: one Engine per device, each run by its own process (rank),
    exchanging regions through the transfers of its schedule. The weight and state pools
    are the same tensors in every device's Engine, stored once in the file."""

    ranks: tuple[Engine, ...]

    @property
    def devices(self) -> int:
        return len(self.ranks)

    @property
    def tokenizer(self) -> str | None:
        return self.ranks[0].tokenizer

    @property
    def chat(self) -> str | None:
        return self.ranks[0].chat


def encode_tables(schedule: Schedule, opcodes, max_waits: int) -> dict[str, torch.Tensor]:
    """One record per task, in queue order. A transfer's record (multi-device; the host
    runs it, never the kernel) has opcode and group TRANSFER_OPCODE and its sequence
    number as first tile coordinate."""
    groups = {g.name: i for i, g in enumerate(schedule.taskgraph.fused.groups)}
    width = record_width(max_waits)
    tasks = schedule.taskgraph.tasks
    buffers = {b.name: b for b in schedule.buffers}
    slots = {p.name: i for i, p in enumerate(weight_pools(schedule.pools))}
    rows, ids, starts = [], [], [0]
    for queue in schedule.queues:
        for tid in queue:
            t = tasks[tid]
            waits = schedule.waits[tid]
            if t.group == TRANSFER:
                rec = [TRANSFER_OPCODE, TRANSFER_OPCODE, *t.tile, len(waits)]
                prefetch = NO_PREFETCH
            else:
                g = groups[t.group]
                rec = [opcodes[g], g, *t.tile, len(waits)]
                prefetch = weight_prefetch(t, buffers, slots)
            for w in waits:
                rec += [w.event, w.count]
            rec += [0, 0] * (max_waits - len(waits))
            rec += [*prefetch, schedule.signal[tid]]
            rows.append(rec)
            ids.append(tid)
        starts.append(len(rows))
    table = torch.tensor(rows, dtype=torch.int32).reshape(len(rows), width)
    return {"tasks": table, "task_ids": torch.tensor(ids, dtype=torch.int32),
            "queue_start": torch.tensor(starts, dtype=torch.int32)}


def decode_schedule(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> Schedule:
    table = tensors["tasks"].tolist()
    ids = tensors["task_ids"].tolist()
    starts = tensors["queue_start"].tolist()
    n = len(manifest.schedule.taskgraph.tasks)
    signal = [0] * n
    waits: list[tuple[Wait, ...]] = [()] * n
    queues = []
    for w in range(len(starts) - 1):
        q = []
        for row in range(starts[w], starts[w + 1]):
            rec, tid = table[row], ids[row]
            nw = rec[5]
            waits[tid] = tuple(Wait(rec[6 + 2 * i], rec[7 + 2 * i]) for i in range(nw))
            signal[tid] = rec[-1]
            q.append(tid)
        queues.append(tuple(q))
    return replace(manifest.schedule, queues=tuple(queues), signal=tuple(signal),
                   waits=tuple(waits))


# The `aot` entry: AOTKernel's fields but the cubin (Triton's metadata as a JSON object),
# plus the cubin's size and SHA-256, so a binary can be checked against its description.
AOT_FIELDS = {"arch": int, "ptx_target": str, "num_warps": int, "shared": int,
              "n_regs": (int, type(None)), "n_spills": (int, type(None)), "spin_limit": int,
              "triton_version": str, "kernel_sha256": str, "triton_metadata": dict,
              "cubin_size": int, "cubin_sha256": str}


def aot_text(aot: AOTKernel) -> str:
    plain = {f.name: getattr(aot, f.name) for f in fields(aot) if f.name != "cubin"}
    plain["triton_metadata"] = json.loads(aot.triton_metadata)
    plain["cubin_size"] = len(aot.cubin)
    plain["cubin_sha256"] = aot.cubin_sha256
    return json.dumps(plain, sort_keys=True, separators=(",", ":"))


def read_aot(text, cubin: torch.Tensor | None) -> AOTKernel:
    """The stored binary and its description, checked against each other (size,
    SHA-256, field types); a problem is a ValueError with one line."""
    if not isinstance(text, str) or cubin is None:
        raise ValueError(f"tensor {AOT_CUBIN!r} and metadata {AOT_KEY!r} come together; "
                         "one is missing")
    plain = json.loads(text)
    _check_plain(plain)
    if not isinstance(plain, dict) or set(plain) != set(AOT_FIELDS):
        raise ValueError(f"its description does not have the fields {', '.join(AOT_FIELDS)}")
    for key, kind in AOT_FIELDS.items():
        if not isinstance(plain[key], kind) or isinstance(plain[key], bool):
            raise ValueError(f"its description has {key} = {_clip(plain[key])}")
    if cubin.dtype != torch.uint8 or cubin.dim() != 1:
        raise ValueError(f"tensor {AOT_CUBIN!r} is not a flat uint8 tensor")
    data = cubin.numpy().tobytes()
    if len(data) != plain.pop("cubin_size"):
        raise ValueError(f"the cubin has {len(data)} bytes, its description says otherwise")
    if hashlib.sha256(data).hexdigest() != plain.pop("cubin_sha256"):
        raise ValueError("the cubin does not match the SHA-256 in its description")
    plain["triton_metadata"] = json.dumps(plain["triton_metadata"], sort_keys=True)
    return AOTKernel(cubin=data, **plain)


def check_aot(engine: Engine) -> str | None:
    """The stored binary belongs to this engine: a GPU target's, compiled for that
    architecture from this kernel source, and a CUDA ELF file defining the kernel."""
    aot, target = engine.aot, engine.manifest.schedule.target
    if aot is None:
        return None
    if target.backend != "cuda":
        return f"an engine for the {target.name} target carries a GPU binary"
    if aot.arch != target.arch:
        return f"the GPU binary is for sm_{aot.arch}, the target {target.name} is sm_{target.arch}"
    if aot.kernel_sha256 != hashlib.sha256(engine.kernel_source.encode()).hexdigest():
        return "the GPU binary was compiled from another kernel source"
    md = json.loads(aot.triton_metadata)
    want = {"target": {"backend": "cuda", "arch": aot.arch, "warp_size": 32},
            "name": KERNEL_NAME, "num_warps": aot.num_warps, "shared": aot.shared,
            "triton_version": aot.triton_version}
    differ = [k for k, v in want.items() if md.get(k) != v]
    if differ:
        return f"the GPU binary's Triton metadata disagrees on {', '.join(differ)}"
    head = aot.cubin[:20]
    if head[:4] != ELF_MAGIC or len(head) < 20 or int.from_bytes(head[18:20], "little") != EM_CUDA:
        return "the GPU binary is not a CUDA ELF file"
    if KERNEL_NAME.encode() + b"\0" not in aot.cubin:
        return f"the GPU binary does not define the kernel {KERNEL_NAME}"
    return None


def _raw(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without copying them (hashing or writing a
    copy of every weight was a third of the time of a save)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


HASH_SEGMENT = 64 << 20   # bytes of a tensor hashed as one piece (see _digest)


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor],
            known: dict[str, list[bytes]] | None = None) -> str:
    """The file's checksum: SHA-256 over the SHA-256 digests of its pieces, in order:
    each metadata entry but this one (key, value), each tensor's header (name, dtype,
    shape) and its bytes in HASH_SEGMENT pieces, tensors and keys sorted. The pieces
    are hashed on every core: one SHA-256 stream ran at about 1.1 GB/s here, the
    largest part of saving or loading a 2.5 GB engine. `known`: the digests of some
    tensors' byte pieces, hashed before (_tensor_digests)."""
    known = known or {}
    pieces: list[bytes | memoryview] = [f"{key}\0{meta[key]}\0".encode()
                                        for key in sorted(meta) if key != "sha256"]
    where: dict[int, list[bytes]] = {}   # piece index -> digests known for it
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        pieces.append(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if name in known:
            where[len(pieces)] = known[name]
            pieces.append(b"")   # a stand-in, replaced below
        else:
            pieces.extend(_segments(t))
    digests = _hash_all([p for i, p in enumerate(pieces) if i not in where])
    ordered, taken = [], iter(digests)
    for i in range(len(pieces)):
        ordered.extend(where[i] if i in where else [next(taken)])
    return hashlib.sha256(b"".join(ordered)).hexdigest()


def _tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, list[bytes]]:
    """Each tensor's byte pieces' digests, as _digest hashes them."""
    names = sorted(tensors)
    segments = [_segments(tensors[n].contiguous()) for n in names]
    digests = iter(_hash_all([piece for pieces in segments for piece in pieces]))
    return {n: [next(digests) for _ in pieces] for n, pieces in zip(names, segments)}


def _segments(t: torch.Tensor) -> list[memoryview]:
    raw = _raw(t)
    return [raw[i:i + HASH_SEGMENT] for i in range(0, len(raw), HASH_SEGMENT)]


def _hash_all(pieces: list) -> list[bytes]:
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:   # hashlib frees the GIL
        return list(pool.map(lambda piece: hashlib.sha256(piece).digest(), pieces))


def _contents(engine: Engine | DeviceEngines) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The file's metadata and tensors. A multi-device engine stores each device's
    manifest, kernel, tables and own pools (its parts of the weights) under
    `manifest.<d>`, `kernel.<d>` and `device<d>.<name>`, and a pool every device shares
    (the state's initial contents) once, as `pool.<name>`."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "tilec_version": __version__}
    if isinstance(engine, DeviceEngines):
        tensors = {}
        meta[DEVICES_KEY] = str(engine.devices)
        for d, e in enumerate(engine.ranks):
            if e.aot is not None:
                raise EngineError("a multi-device engine cannot store GPU binaries yet")
            meta[f"manifest.{d}"] = e.manifest_text()
            meta[f"kernel.{d}"] = e.kernel_source
            for k, v in e.tensors.items():
                if k.startswith("pool.") and all(_same(r.tensors.get(k), v) for r in engine.ranks):
                    tensors[k] = v.contiguous()   # the same pool on every device: once
                else:
                    tensors[f"device{d}.{k}"] = v.contiguous()
        _add_tokenizer(meta, engine.ranks[0])
        return meta, tensors
    meta["manifest"] = engine.manifest_text()
    meta["kernel"] = engine.kernel_source
    _add_tokenizer(meta, engine)
    tensors = {k: v.contiguous() for k, v in engine.tensors.items()}
    if engine.aot is not None:
        _add_binary(meta, tensors, engine.aot)
    return meta, tensors


def _add_tokenizer(meta: dict[str, str], engine: Engine) -> None:
    if engine.tokenizer is not None:
        meta["tokenizer"] = engine.tokenizer
    if engine.chat is not None:
        meta["chat"] = engine.chat


def _add_binary(meta: dict[str, str], tensors: dict[str, torch.Tensor], aot: AOTKernel) -> None:
    meta[AOT_KEY] = aot_text(aot)
    tensors[AOT_CUBIN] = torch.frombuffer(bytearray(aot.cubin), dtype=torch.uint8)


def _same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is b or (a is not None and a.dtype == b.dtype and a.shape == b.shape and
                      torch.equal(a, b))


def save(engine: Engine | DeviceEngines, path: str | os.PathLike) -> None:
    """Write atomically: a temporary file in the same folder, then a rename, so a failed
    or interrupted save leaves an existing file untouched."""
    meta, tensors = _contents(engine)
    # The checksum is computed in a second thread while the tensors are written (both
    # release the GIL), into a placeholder of its length, filled in at the end.
    meta["sha256"] = SHA_PLACEHOLDER
    header_bytes = _header_size(meta, tensors)
    file = TempFile(path)
    try:
        with ThreadPoolExecutor(1) as hasher:
            digest = hasher.submit(_digest, meta, tensors)
            with _DirectWriter(file.f) as out:
                at = _write_safetensors(out, tensors, meta, header_bytes)
            file.f.seek(at)
            file.f.write(digest.result().encode())
        file.commit()
    finally:
        file.discard()


class PendingSave:
    """`save` of an engine whose GPU binary is still being compiled, in two steps, so
    that writing and hashing gigabytes of weights overlaps the compile: the constructor
    writes every tensor (and hashes it) after the room the header will take, `finish`
    adds the binary, the header and the checksum. The file has the bytes `save` of the
    finished engine writes (the header's room, _header_size, is fixed before the binary
    is known), or, if the binary's entries do not fit the room kept for them, is written
    again by `save`. `cancel` leaves no file behind."""

    def __init__(self, engine: Engine, path: str | os.PathLike):
        if engine.aot is not None:
            raise ValueError("PendingSave is for an engine still without its GPU binary")
        self.engine, self.path = engine, path
        self.meta, self.tensors = _contents(engine)
        self.meta["sha256"] = SHA_PLACEHOLDER
        self.header_bytes = _header_size(self.meta, self.tensors, binary_coming=True)
        self.order = _data_order(self.tensors)
        self.file = TempFile(path)
        try:
            with ThreadPoolExecutor(1) as hasher:
                digests = hasher.submit(_tensor_digests, self.tensors)
                self.file.f.seek(self.header_bytes)
                with _DirectWriter(self.file.f) as out:
                    for name in self.order:
                        out.write(_raw(self.tensors[name]))
                self.known = digests.result()
        except BaseException:
            self.file.discard()
            raise

    def finish(self, aot: AOTKernel) -> None:
        """Add the binary, the header and the checksum; the file is then in place."""
        engine = replace(self.engine, aot=aot)
        meta, tensors = dict(self.meta), dict(self.tensors)
        _add_binary(meta, tensors, aot)
        if _data_order(tensors) != self.order + [AOT_CUBIN] or \
                _header_size(meta, tensors) != self.header_bytes:
            self.cancel()   # the binary's entries did not fit the room kept: write anew
            save(engine, self.path)
            return
        try:
            f = self.file.f
            f.seek(0, os.SEEK_END)
            f.write(_raw(tensors[AOT_CUBIN]))
            f.seek(0)
            at = _write_header(f, tensors, meta, self.header_bytes)
            f.seek(at)
            f.write(_digest(meta, tensors, self.known).encode())
            self.file.commit()
        finally:
            self.file.discard()

    def cancel(self) -> None:
        """Remove the unfinished file (a no-op once finished)."""
        self.file.discard()


def check_writable(path: str | os.PathLike) -> None:
    """An EngineError (one line) unless an engine file can be written at `path`: its
    folder, or the nearest folder above it that exists (save creates the rest), is a
    writable folder. Checked before a compile, so a typo fails in a moment, not after it."""
    path = Path(path).absolute()
    if path.is_dir():
        raise EngineError(f"cannot write {path}: it is a folder")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise EngineError(f"cannot write {path}: {folder} is not a writable folder")


class _DirectWriter:
    """A stream onto the file `f` that writes around the page cache (O_DIRECT) where the
    file system allows it, and through it elsewhere. Copying Llama-1B's 2.5 GB into the
    page cache cost 5-6 s of kernel time on the 2-core machine, more than the disk took
    to write them directly (under 2 s, with almost no CPU). Data is gathered into
    page-aligned chunks that a second thread writes while the next one fills (the write
    releases the GIL); O_DIRECT needs whole blocks, so the last chunk is padded to one
    and the file cut back to its length when the stream closes."""

    CHUNK = 8 << 20
    BLOCK = 4096        # a multiple of every logical block size O_DIRECT may demand
    BUFFERS = 3

    def __init__(self, f):
        f.flush()
        self.fd = f.fileno()
        self.start = os.lseek(self.fd, 0, os.SEEK_CUR)   # a multiple of BLOCK
        self.direct = _direct_io(self.fd, True)
        self.size = 0                    # bytes written to the stream so far
        self.error: BaseException | None = None
        self.free: queue.Queue = queue.Queue()
        self.full: queue.Queue = queue.Queue()
        for _ in range(self.BUFFERS):
            self.free.put(mmap.mmap(-1, self.CHUNK))
        self.buf, self.used = self.free.get(), 0
        self.writer = threading.Thread(target=self._drain, daemon=True,
                                       name="tilec-save")
        self.writer.start()

    def __enter__(self) -> _DirectWriter:
        return self

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = min(self.CHUNK - self.used, len(view) - done)
            self.buf[self.used:self.used + n] = view[done:done + n]
            self.used += n
            done += n
            if self.used == self.CHUNK:
                self._hand_over()
        self.size += len(view)
        return len(view)

    def _hand_over(self) -> None:
        if self.error is not None:
            raise self.error
        self.full.put((self.buf, self.used))
        self.buf, self.used = self.free.get(), 0

    def _drain(self) -> None:
        while (item := self.full.get()) is not None:
            buf, n = item
            try:
                if self.error is None:
                    self._write_all(memoryview(buf)[:n])
            except BaseException as exc:   # raised in the writing thread: _hand_over, close
                self.error = exc
            self.free.put(buf)

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            try:
                view = view[os.write(self.fd, view):]
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                # the file system took the flag but not the write: through the cache
                self.direct = _direct_io(self.fd, False)

    def __exit__(self, kind, *exc) -> None:
        padded = 0
        if kind is None and self.used:
            padded = -self.used % self.BLOCK if self.direct else 0
            self.buf[self.used:self.used + padded] = bytes(padded)
            self.used += padded
            self.full.put((self.buf, self.used))
        self.full.put(None)
        self.writer.join()
        if padded:
            os.ftruncate(self.fd, self.start + self.size)
        _direct_io(self.fd, False)
        if kind is None and self.error is not None:
            raise self.error


def _direct_io(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; whether it is now on."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return on


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL",
                      torch.uint8: "U8", torch.int8: "I8", torch.float64: "F64",
                      torch.int16: "I16"}


HEADER_ALIGN = 4096   # the tensor data starts at a multiple of this (see _header_size)
BINARY_ROOM = 64 << 10   # header bytes kept for a GPU binary's entries (aot: 1-2 kB)


def _data_order(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The order of the tensors' bytes in the file: by alignment, then name (so a GPU
    binary, uint8 and named `aot.cubin`, comes last)."""
    return sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))


def _header_json(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """The safetensors header, written deterministically (the library's writer orders
    the metadata keys differently from run to run), so save(load(file)) gives the same
    bytes: sorted keys; tensors in _data_order, each after the one before."""
    header: dict[str, object] = {"__metadata__": meta}
    offset = 0
    for name in _data_order(tensors):
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise EngineError(f"tensor {name!r}: dtype {t.dtype} cannot be stored")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _header_size(meta: dict[str, str], tensors: dict[str, torch.Tensor],
                 binary_coming: bool = False) -> int:
    """Bytes before the tensor data (the 8-byte length and the header, padded with
    spaces): what the header takes without a GPU binary, plus BINARY_ROOM if the engine
    has one (or will: PendingSave), rounded up to HEADER_ALIGN; more if the header
    needs it. So a save can write the data before the binary exists, and the data
    starts page-aligned."""
    binary = binary_coming or AOT_CUBIN in tensors
    without = _header_json({k: v for k, v in tensors.items() if k != AOT_CUBIN},
                           {k: v for k, v in meta.items() if k != AOT_KEY})
    room = 8 + len(without) + (BINARY_ROOM if binary else 0)
    if AOT_CUBIN in tensors:
        room = max(room, 8 + len(_header_json(tensors, meta)))
    return -(-room // HEADER_ALIGN) * HEADER_ALIGN


def _write_header(f, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                  header_bytes: int) -> int:
    """The 8-byte length and the header, padded to `header_bytes`; returns the file
    offset of meta["sha256"]'s value (in the metadata, every `"` of a value is escaped,
    so the first `"sha256":"` is the key)."""
    text = _header_json(tensors, meta)
    text += b" " * (header_bytes - 8 - len(text))
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    return 8 + text.index(b'"sha256":"') + len(b'"sha256":"')


def _write_safetensors(f, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                       header_bytes: int) -> int:
    """The whole file: header (see _write_header, whose offset it returns), then the
    tensors' bytes in _data_order."""
    at = _write_header(f, tensors, meta, header_bytes)
    for name in _data_order(tensors):
        f.write(_raw(tensors[name].contiguous()))
    return at


def load(path: str | os.PathLike, trust_engine_code: bool = False, *,
         read_only: bool = False) -> Engine | DeviceEngines:
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
        raise EngineError(f"{path}: engine format version {_clip(meta.get('format_version'))}; "
                          f"this tilec reads version {FORMAT_VERSION}")
    if meta.get("sha256") != _digest(meta, tensors):
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
    aot = None
    if AOT_KEY in meta or AOT_CUBIN in tensors:
        try:
            aot = read_aot(meta.get(AOT_KEY), tensors.pop(AOT_CUBIN, None))
        except (ValueError, RecursionError) as e:
            raise EngineError(f"{path}: bad GPU binary: {_short(e)}") from None
    engine = Engine(manifest, kernel, tensors, tokenizer, aot, chat)
    problem = _engine_problem(engine, accept)
    if problem:
        raise EngineError(f"{path}: {problem}")
    if engine.manifest.schedule.taskgraph.devices != 1:
        raise EngineError(f"{path}: a single-device file holds one device's part of a "
                          "multi-device engine")
    return engine


def _engine_problem(engine: Engine, accept: str) -> str | None:
    try:
        problem = check_tables(engine) or size_problem(engine) or \
            check_views(engine) or check_aot(engine)
    except Exception as e:  # a manifest that decodes but contradicts itself
        problem = f"malformed manifest ({type(e).__name__}: {_short(e)})"
    return problem or check_kernel(engine, accept)


def _load_devices(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor],
                  tokenizer: str | None, accept: str) -> DeviceEngines:
    text = meta[DEVICES_KEY]
    if not text.isdigit() or not 2 <= int(text) <= 64:
        raise EngineError(f"{path}: malformed device count {_clip(text)}")
    n = int(text)
    pools = {k: v for k, v in tensors.items() if k.startswith("pool.")}
    prefixes = tuple(f"device{d}." for d in range(n))
    stray = [k for k in tensors if k not in pools and not k.startswith(prefixes)]
    if stray or AOT_KEY in meta:
        raise EngineError(f"{path}: a multi-device engine with a stray entry "
                          f"{_clip(stray[0] if stray else AOT_KEY)}")
    ranks = []
    for d, prefix in enumerate(prefixes):
        manifest = _parse_manifest(path, meta.get(f"manifest.{d}"))
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        engine = Engine(manifest, meta.get(f"kernel.{d}", ""), {**pools, **own}, tokenizer)
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


MAX_HEADER_BYTES = 100_000_000   # safetensors' own limit; a manifest is megabytes at most
MAX_INT = 1 << 53               # no count, size, offset or time in a manifest is larger
MAX_DEPTH = 64                  # the IR nests about a dozen levels deep


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
        raise EngineError(f"{path}: not a readable engine file ({_short(e)})") from None
    return meta, tensors


@without_cyclic_gc
def _parse_manifest(path: Path, text) -> Manifest:
    try:
        if not isinstance(text, str):
            raise ValueError("no manifest")
        plain = json.loads(text)
        _check_plain(plain)
        return from_plain(Manifest, plain)
    except (ValueError, TypeError, KeyError, RecursionError, OverflowError) as e:
        raise EngineError(f"{path}: malformed manifest ({_short(e)})") from None


def _check_plain(plain) -> None:
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


def _clip(x) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def render_manifest(m: Manifest):
    """The kernel (codegen.render.Rendered) this tilec renders from a manifest."""
    from tilec.codegen.render import render

    sched = m.schedule
    return render(sched.taskgraph.fused, sched.taskgraph.tilings, sched.buffers, sched.pools,
                  m.max_waits, sched.target.workers, m.model, __version__)


def check_kernel(engine: Engine, accept: str = "checked") -> str | None:
    """Render the kernel from the manifest and compare it, the opcodes and the args table
    with what the file stores; sets `engine.kernel_checked` and `code_trusted`. `accept`:
    "checked" refuses a differing kernel, "read" accepts it unchecked (it will not run),
    "trust" accepts it to run as it is (--trust-engine-code)."""
    m = engine.manifest
    try:
        rendered = render_manifest(m)
    except Exception as e:  # a manifest that parses but describes nothing renderable
        return f"manifest does not describe a renderable kernel ({_short(e)})"
    if rendered.opcodes != m.opcodes or rendered.kinds != m.kinds:
        return "opcode table differs from what this tilec renders from the manifest"
    if rendered.args != tuple(tuple(r) for r in engine.tensors["args"].tolist()):
        return "args table differs from what this tilec renders from the manifest"
    engine.kernel_checked = rendered.source == engine.kernel_source
    engine.code_trusted = accept == "trust"
    if not engine.kernel_checked and accept == "checked":
        return ("stored kernel source differs from what this tilec renders from the manifest "
                "(written by another tilec version, or edited); refusing to run it "
                "(--trust-engine-code runs it anyway)")
    return None


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def check_tables(engine: Engine) -> str | None:
    """Every index the kernel will follow, checked against the manifest."""
    m, t = engine.manifest, engine.tensors
    sched = m.schedule
    groups = sched.taskgraph.fused.groups
    tasks = sched.taskgraph.tasks
    n_events = len(sched.events)
    width = engine.record_width
    need = {"tasks": (torch.int32, 2), "task_ids": (torch.int32, 1),
            "queue_start": (torch.int32, 1), "args": (torch.int64, 2)}
    for name, (dtype, ndim) in need.items():
        if name not in t or t[name].dtype != dtype or t[name].dim() != ndim:
            return f"tensor {name!r} missing or of the wrong type"
    table, ids, starts, args = t["tasks"], t["task_ids"], t["queue_start"], t["args"]
    if table.shape != (len(tasks), width) or ids.shape != (len(tasks),):
        return f"task table has shape {tuple(table.shape)}, expected {(len(tasks), width)}"
    if args.shape != (len(groups), m.max_args):
        return f"args table has shape {tuple(args.shape)}, expected {(len(groups), m.max_args)}"
    if len(m.opcodes) != len(groups) or any(not 0 <= o < len(m.kinds) for o in m.opcodes):
        return "opcode list does not match the groups"
    s = starts.tolist()
    if len(s) != sched.target.workers + 1 or s[0] != 0 or s[-1] != len(tasks) or \
            any(b < a for a, b in zip(s, s[1:])):
        return "queue_start is not a monotone split of the task table"
    if sorted(ids.tolist()) != list(range(len(tasks))):
        return "task_ids is not a permutation of the tasks"
    tilings = {tl.group: tl for tl in sched.taskgraph.tilings}
    comm = sched.target.comm_worker()
    host_rows = range(s[comm], s[comm + 1]) if comm is not None and comm < len(s) - 1 \
        else range(0)
    transfers = len(sched.taskgraph.transfers)
    # a prefetch may name any 16-byte unit inside a weight pool, no more
    prefetch_units = [p.numel * DTYPE_BYTES.get(p.dtype, 0) // 16
                      for p in weight_pools(sched.pools)]
    for row, (rec, tid) in enumerate(zip(table.tolist(), ids.tolist())):
        op, g, t0, t1, t2, nw = rec[:FIXED_FIELDS]
        task = tasks[tid]
        if (row in host_rows) != (task.group == TRANSFER):
            return f"task record {row}: a transfer off the comm worker or a kernel task on it"
        if task.group == TRANSFER:   # the host runs it: its sequence number must exist
            if (op, g) != (TRANSFER_OPCODE,) * 2 or (t0, t1, t2) != task.tile or \
                    not 0 <= t0 < transfers or (t1, t2) != (0, 0):
                return f"task record {row}: transfer record does not match task {tid}"
        elif not 0 <= g < len(groups) or op != m.opcodes[g]:
            return f"task record {row}: group/opcode out of range"
        elif task.group != groups[g].name or (t0, t1, t2) != task.tile or not all(
                0 <= c < n for c, n in zip((t0, t1, t2), tilings[groups[g].name].grid
                                           if groups[g].name in tilings else (0, 0, 0))):
            return f"task record {row}: tile {(t0, t1, t2)} does not match task {tid}"
        if not 0 <= nw <= m.max_waits:
            return f"task record {row}: {nw} waits (at most {m.max_waits})"
        for i in range(nw):
            ev, cnt = rec[6 + 2 * i], rec[7 + 2 * i]
            if not 0 <= ev < n_events or cnt < 1 or cnt > sched.events[ev].signals:
                return f"task record {row}: wait on event {ev} x{cnt} out of range"
        if not 0 <= rec[-1] < n_events:
            return f"task record {row}: signals event {rec[-1]} out of range"
        slot, first, units = rec[prefetch_offset(m.max_waits):-1]
        if (slot, first, units) != NO_PREFETCH and not (
                0 <= slot < len(prefetch_units) and first >= 0 and
                0 < units and first + units <= prefetch_units[slot]):
            return f"task record {row}: weight prefetch {(slot, first, units)} out of range"
    pools = {p.name: p for p in sched.pools}
    if len(pools) != len(sched.pools) or len({b.name for b in sched.buffers}) != len(sched.buffers):
        return "pool or buffer names are not unique"
    for p in sched.pools:
        if p.kind not in POOL_KINDS or p.dtype not in TORCH_DTYPES or p.numel < 1:
            return f"pool {p.name} has kind {_clip(p.kind)}, dtype {_clip(p.dtype)}, size {p.numel}"
    for b in sched.buffers:
        p = pools.get(b.pool)
        if p is None or b.offset < 0 or b.offset + b.type.numel > p.numel or \
                any(n < 0 for n in b.type.shape):
            return f"buffer {b.name} lies outside its pool"
        if b.type.dtype != p.dtype:
            return f"buffer {b.name} ({_clip(b.type.dtype)}) is in pool {p.name} of {p.dtype}"
        if b.stored and (len(b.stored) != 2 or b.kind not in ("weight", "state") or
                         not 0 <= b.stored[0] <= b.stored[1] <= b.type.numel):
            return f"buffer {b.name} stores a malformed part {_clip(list(b.stored))}"
    for p in sched.pools:
        if p.kind in ("weight", "state"):
            tensor = t.get(f"pool.{p.name}")
            if tensor is None or tensor.dtype != TORCH_DTYPES.get(p.dtype) or \
                    tuple(tensor.shape) != (p.numel,):
                return f"pool {p.name} missing or of the wrong size"
    # Each args entry is an element offset into the pool of the buffer it addresses;
    # which pool is only known by rendering, so check_kernel compares the whole table
    # with the rendered one (before anything runs). Here: inside some pool at least.
    largest = max((p.numel for p in sched.pools), default=0)
    for g, row in enumerate(args.tolist()):
        for a in row:
            if not 0 <= a < largest:
                return f"args row {g}: offset {a} outside every pool"
    return None


def check_views(engine: Engine) -> str | None:
    """Every strided view the runtime or the kernel takes of a buffer (model inputs and
    outputs, operands of graph ops) lies inside that buffer, and the generation spec
    names real inputs and outputs: so a manifest edited and signed again cannot make a
    load or store leave its buffer."""
    m = engine.manifest
    sched = m.schedule
    buffers = {b.name: b for b in sched.buffers}
    for io in m.inputs + m.outputs:
        b = buffers.get(io.buffer)
        if b is None:
            return f"input/output {io.name} names unknown buffer {_clip(io.buffer)}"
        if io.dtype != b.type.dtype:
            return f"input/output {io.name} is {_clip(io.dtype)} in a {b.type.dtype} buffer"
        problem = _view_problem(io.shape, io.strides, io.offset, b)
        if problem:
            return f"input/output {io.name}: {problem}"
        if io.high is not None and io.high <= io.low:
            return f"input {io.name}: empty value range [{io.low}, {io.high})"
    names = [io.name for io in m.inputs + m.outputs]
    if len(set(names)) != len(names):
        return "input/output names are not unique"
    ops = sched.taskgraph.fused.graph.ops
    if len({op.name for op in ops}) != len(ops):
        return "op names are not unique"
    declared = {b.name: b for b in sched.taskgraph.buffers}
    if declared.keys() != buffers.keys():
        return "planned buffers differ from the task graph's buffers"
    for op in ops:
        b = buffers.get(op.name)
        if b is not None and (b.type != op.type or declared[op.name].type != op.type):
            return f"buffer {op.name} does not have the type of the op that computes it"
    problem = _taskgraph_problem(sched, buffers)
    if problem:
        return problem
    for op in ops:
        for operand in op.inputs:
            b = buffers.get(operand.value)
            if b is None:
                continue
            problem = _view_problem(operand.shape, operand.strides, operand.offset, b)
            if problem:
                return f"op {op.name} reads {operand.value}: {problem}"
    gen = m.generation
    if gen is not None:
        ins, outs = {io.name for io in m.inputs}, {io.name for io in m.outputs}
        if gen.vocab_size < 1 or gen.max_seq_len < 1 or gen.token_input not in ins or \
                gen.pos_input not in ins or gen.logits_output not in outs or \
                gen.next_token_output not in outs:
            return "generation spec does not match the engine's inputs and outputs"
    return None


def _taskgraph_problem(sched, buffers) -> str | None:
    """The task graph's own references (what inspect and verify walk): task ids in
    order, known groups, regions of known buffers with one interval per dimension,
    dependencies between existing tasks. Whether regions lie inside their buffers is
    left to verify (regions_in_buffers)."""
    tasks = sched.taskgraph.tasks
    groups = {g.name for g in sched.taskgraph.fused.groups}
    for i, t in enumerate(tasks):
        if t.id != i or (t.group not in groups and t.group != TRANSFER):
            return f"task record {i} has id {t.id} and group {_clip(t.group)}"
        for r in t.reads + t.writes:
            b = buffers.get(r.buffer)
            if b is None or len(r.box) != len(b.type.shape) or \
                    any(len(iv) != 2 for iv in r.box):
                return f"task {i} touches {_clip(r.buffer)} with a malformed region"
    tg = sched.taskgraph
    if not 0 <= tg.device < tg.devices:
        return f"device {tg.device} of {tg.devices}"
    for k, tr in enumerate(tg.transfers):
        if tr.seq != k or not tr.parts:
            return f"transfer {k} is malformed"
        # the host copies these boxes itself (no kernel bounds check): inside the buffer
        for part in tr.parts:
            b = buffers.get(part.region.buffer)
            box = part.region.box
            if b is None or len(box) != len(b.type.shape) or any(
                    not 0 <= lo <= hi <= n for (lo, hi), n in zip(box, b.type.shape)) \
                    or any(not 0 <= d < tg.devices for d in (part.src,) + part.dsts):
                return f"transfer {k} is malformed or leaves its buffer"
    for t in tasks:
        if t.group == TRANSFER and (
                not 0 <= t.tile[0] < len(tg.transfers) or
                (t.reads, t.writes) != (tg.transfers[t.tile[0]].sends(tg.device),
                                        tg.transfers[t.tile[0]].receives(tg.device))):
            return f"task {t.id} does not carry its transfer's regions"
    n = len(tasks)
    for d in sched.taskgraph.deps:
        if not (0 <= d.before < n and 0 <= d.after < n):
            return f"dependency {d.before} -> {d.after} names unknown tasks"
    if len(sched.start_us) != n or len(sched.finish_us) != n:
        return "predicted times do not cover the tasks"
    for e, ev in enumerate(sched.events):
        if ev.id != e or ev.signals < 1:
            return f"event {e} is malformed"
    return None


def _view_problem(shape, strides, offset, buffer) -> str | None:
    if len(shape) != len(strides) or offset < 0 or any(n < 0 for n in shape) or \
            any(s < 0 for s in strides):
        return f"malformed view (shape {list(shape)}, strides {list(strides)}, offset {offset})"
    if 0 in shape:
        return None
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    if last >= max(buffer.type.numel, 1):
        return (f"view (shape {list(shape)}, strides {list(strides)}, offset {offset}) "
                f"reaches element {last} of buffer {buffer.name} ({buffer.type.numel} elements)")
    return None
