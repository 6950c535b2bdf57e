"""Writing an engine file: atomically (a temporary file, then a rename), in the order and
with the header that make the bytes a function of the engine alone (save(load(file))
gives the same bytes), the checksum hashed while the tensors are written."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import torch

from tilec.errors import EngineError
from tilec.ir.abi import AOTKernel
from tilec.runtime.atomic_file import TempFile
from tilec.runtime.enginefile.digest import file_digest, raw_bytes, tensor_digests
from tilec.runtime.enginefile.direct import DirectWriter
from tilec.runtime.enginefile.format import (BINARY_KEYS, BINARY_TENSORS, DEVICES_KEY,
                                             FORMAT, FORMAT_VERSION, SHA_PLACEHOLDER,
                                             DeviceEngines, EngineFile, aot_cubin, aot_key)
from tilec.version import __version__

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL",
                      torch.uint8: "U8", torch.int8: "I8", torch.float64: "F64",
                      torch.int16: "I16"}
HEADER_ALIGN = 4096   # the tensor data starts at a multiple of this (see _header_size)
BINARY_ROOM = 64 << 10   # header bytes kept for the GPU binaries' entries (1-2 kB each)


def aot_text(aot: AOTKernel) -> str:
    """The `aot` metadata entry of a stored binary (format.AOT_FIELDS)."""
    plain = {f.name: getattr(aot, f.name) for f in fields(aot) if f.name != "cubin"}
    plain["triton_metadata"] = json.loads(aot.triton_metadata)
    plain["cubin_size"] = len(aot.cubin)
    plain["cubin_sha256"] = aot.cubin_sha256
    return json.dumps(plain, sort_keys=True, separators=(",", ":"))


def _contents(engine: EngineFile | DeviceEngines
              ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The file's metadata and tensors. A multi-device engine stores each device's
    manifest, kernel, tables and own pools (its parts of the weights) under
    `manifest.<d>`, `kernel.<d>` and `device<d>.<name>`, and a pool every device shares
    (the state's initial contents) once, as `pool.<name>`."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "tilec_version": __version__}
    if isinstance(engine, DeviceEngines):
        tensors = {}
        meta[DEVICES_KEY] = str(engine.devices)
        for d, e in enumerate(engine.ranks):
            if e.entries:
                raise EngineError("a multi-device engine has one entry (its decode step)")
            if e.binaries():
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
    for name, entry in engine.entries.items():   # its tables; pools it shares, once
        meta[f"manifest.{name}"] = entry.manifest_text()
        meta[f"kernel.{name}"] = entry.kernel_source
        for k, v in entry.tensors.items():
            if not (k.startswith("pool.") and _same(engine.tensors.get(k), v)):
                tensors[f"{name}.{k}"] = v.contiguous()
    _add_binaries(meta, tensors, engine.binaries())
    return meta, tensors


def _add_tokenizer(meta: dict[str, str], engine: EngineFile) -> None:
    if engine.tokenizer is not None:
        meta["tokenizer"] = engine.tokenizer
    if engine.chat is not None:
        meta["chat"] = engine.chat


def _add_binaries(meta: dict[str, str], tensors: dict[str, torch.Tensor],
                  binaries: dict[str, AOTKernel]) -> None:
    """Each entry's GPU binary: its description (`aot`, `aot.<entry>`) and its cubin
    (`aot.cubin`, `<entry>.aot.cubin`)."""
    for entry, aot in binaries.items():
        meta[aot_key(entry)] = aot_text(aot)
        tensors[aot_cubin(entry)] = torch.frombuffer(bytearray(aot.cubin), dtype=torch.uint8)


def _same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is b or (a is not None and a.dtype == b.dtype and a.shape == b.shape and
                      torch.equal(a, b))


def save(engine: EngineFile | DeviceEngines, path: str | os.PathLike) -> None:
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
            digest = hasher.submit(file_digest, meta, tensors)
            with DirectWriter(file.f) as out:
                at = _write_safetensors(out, tensors, meta, header_bytes)
            file.f.seek(at)
            file.f.write(digest.result().encode())
        file.commit()
    finally:
        file.discard()


class PendingSave:
    """`save` of an engine whose GPU binaries are still being compiled, in two steps, so
    that writing and hashing gigabytes of weights overlaps the compile: the constructor
    writes every tensor (and hashes it) after the room the header will take, `finish`
    adds the binaries, the header and the checksum. The file has the bytes `save` of the
    finished engine writes (the header's room, _header_size, is fixed before the
    binaries are known), or, if their entries do not fit the room kept for them, is
    written again by `save`. `cancel` leaves no file behind."""

    def __init__(self, engine: EngineFile, path: str | os.PathLike):
        if engine.binaries():
            raise ValueError("PendingSave is for an engine still without its GPU binaries")
        self.engine, self.path = engine, path
        self.meta, self.tensors = _contents(engine)
        self.meta["sha256"] = SHA_PLACEHOLDER
        self.header_bytes = _header_size(self.meta, self.tensors, binary_coming=True)
        self.order = _data_order(self.tensors)
        self.file = TempFile(path)
        try:
            with ThreadPoolExecutor(1) as hasher:
                digests = hasher.submit(tensor_digests, self.tensors)
                self.file.f.seek(self.header_bytes)
                with DirectWriter(self.file.f) as out:
                    for name in self.order:
                        out.write(raw_bytes(self.tensors[name]))
                self.known = digests.result()
        except BaseException:
            self.file.discard()
            raise

    def finish(self, binaries: dict[str, AOTKernel]) -> None:
        """Add the binaries (by entry: `decode`, `prefill`), the header and the
        checksum; the file is then in place."""
        meta, tensors = dict(self.meta), dict(self.tensors)
        _add_binaries(meta, tensors, binaries)
        order = _data_order(tensors)
        if order[:len(self.order)] != self.order or \
                _header_size(meta, tensors) != self.header_bytes:
            self.cancel()   # the binaries' entries did not fit the room kept: write anew
            save(self.engine.with_binaries(binaries), self.path)
            return
        try:
            f = self.file.f
            f.seek(0, os.SEEK_END)
            for name in order[len(self.order):]:   # the binaries: after every other tensor
                f.write(raw_bytes(tensors[name]))
            f.seek(0)
            at = _write_header(f, tensors, meta, self.header_bytes)
            f.seek(at)
            f.write(file_digest(meta, tensors, self.known).encode())
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


def _data_order(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The order of the tensors' bytes in the file: by alignment, then name, and the GPU
    binaries last (decode's, then the prefill's), so a save can write every other
    tensor before they exist (PendingSave)."""
    last = {name: i for i, name in enumerate(BINARY_TENSORS)}
    return sorted(tensors, key=lambda k: (last.get(k, -1), -tensors[k].element_size(), k))


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
    spaces): what the header takes without the GPU binaries, plus BINARY_ROOM if the
    engine has any (or will: PendingSave), rounded up to HEADER_ALIGN; more if the
    header needs it. So a save can write the data before the binaries exist, and the
    data starts page-aligned."""
    binaries = any(k in BINARY_TENSORS for k in tensors)
    without = _header_json({k: v for k, v in tensors.items() if k not in BINARY_TENSORS},
                           {k: v for k, v in meta.items() if k not in BINARY_KEYS})
    room = 8 + len(without) + (BINARY_ROOM if binary_coming or binaries else 0)
    if binaries:
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
        f.write(raw_bytes(tensors[name].contiguous()))
    return at
