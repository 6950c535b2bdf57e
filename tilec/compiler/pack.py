"""The `pack` stage: a schedule, its rendered kernel and the lowered model's constants
-> one `runtime.enginefile.EngineFile` per device (the task table, the pools with the weights
and the state, the input and output views, the manifest)."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch

from tilec.codegen.render import Rendered
from tilec.compiler import frontend
from tilec.compiler.options import InputInfo
from tilec.errors import ScheduleError
from tilec.ir.abi import AOTKernel
from tilec.ir.graph import contiguous_strides
from tilec.ir.schedule import Schedule
from tilec.runtime.enginefile import EngineFile, IOSpec, Manifest, TORCH_DTYPES, encode_tables


def pack_devices(scheds, rendered, lowered, max_waits, name, input_info, seed, binary,
                 release_constants, plan: bool = False) -> list[EngineFile]:
    """One EngineFile per device, each pool holding the device's own parts of the weights
    and the state (memplan). Constants are released (see pack) only by the last
    device's pack, after every device has copied its parts."""
    return [pack(s, r, lowered, max_waits, name, input_info, seed,
                 binary if i == 0 else None, release_constants and i == len(scheds) - 1,
                 plan)
            for i, (s, r) in enumerate(zip(scheds, rendered))]


def pack(sched: Schedule, rendered: Rendered, lowered: frontend.Lowered, max_waits: int,
         name: str, input_info: tuple[InputInfo, ...], seed: int,
         binary: AOTKernel | None = None, release_constants: bool = False,
         plan: bool = False) -> EngineFile:
    """`release_constants`: the module is tilec's own (built from a model.yaml), so each
    weight's memory is freed once it is copied into its pool: the peak is then one copy
    of the weights, not two. Never for a caller's module. `plan`: the pools keep their
    sizes in the manifest but get no data (a plan's constants are meta tensors)."""
    tensors = encode_tables(sched, rendered.opcodes, max_waits)
    tensors["args"] = torch.tensor(rendered.args, dtype=torch.int64).reshape(
        len(rendered.args), rendered.max_args)
    placed = {b.name: b for b in sched.buffers}
    users = Counter(_storage(t) for t in lowered.constants.values()) \
        if release_constants and not plan else None
    for pool in sched.pools:
        if pool.kind in ("weight", "state") and not plan:
            tensors[f"pool.{pool.name}"] = fill_pool(pool, sched.buffers, lowered.constants,
                                                     users)
    info = {i.name: i for i in input_info}
    inputs = []
    for user_name, value in zip(lowered.input_names, lowered.graph.inputs):
        t = lowered.graph.op(value).type
        extra = info.get(user_name, InputInfo(user_name))
        inputs.append(IOSpec(user_name, value, t.shape, contiguous_strides(t.shape), 0,
                             t.dtype, extra.low, extra.high))
    outputs = []
    ops = lowered.graph.by_name()
    for out_name, operand in lowered.graph.outputs:
        buf = placed[operand.value]
        outputs.append(IOSpec(out_name, buf.name, operand.shape, operand.strides,
                              operand.offset, ops[operand.value].type.dtype))
    # The task table holds queues, signals and waits; conflicts are recomputed from the
    # regions by whoever needs them (verify), so the edges are not stored either.
    stored = replace(sched, queues=(), signal=(), waits=(),
                     taskgraph=replace(sched.taskgraph, deps=()))
    manifest = Manifest(name, stored, tuple(inputs), tuple(outputs), rendered.opcodes,
                        rendered.kinds, max_waits, rendered.max_args, seed, plan=plan)
    return EngineFile(manifest, rendered.source, tensors, aot=binary, kernel_checked=True)


def pack_entry(sched: Schedule, rendered: Rendered, lowered: frontend.Lowered,
               max_waits: int, name: str, input_info: tuple[InputInfo, ...], seed: int,
               shared: dict[str, torch.Tensor], shared_names: set[str],
               plan: bool = False) -> EngineFile:
    """A further entry of an engine (a decoder's prefill): its own tables, and for pools
    the engine's (`shared`, its tensors: the same tensor objects, stored once), its
    weight and state buffers where memplan.share_fixed put them. A constant only this
    entry has (its chunk's row offsets) is written into the shared pool, in the bytes
    share_fixed gave it after the first entry's; a pool only this entry has is made.
    `shared_names`: the buffers the first entry has, which must hold the same values."""
    entry = pack(sched, rendered, lowered, max_waits, name, input_info, seed, plan=True)
    entry.manifest = replace(entry.manifest, plan=plan)
    if plan:
        return entry
    for pool in sched.pools:
        if pool.kind not in ("weight", "state"):
            continue
        key = f"pool.{pool.name}"
        data = shared.get(key)
        if data is None:
            entry.tensors[key] = fill_pool(pool, sched.buffers, lowered.constants)
            continue
        for b in sched.buffers:
            if b.pool != pool.name or b.name not in lowered.constants:
                continue
            constant = lowered.constants[b.name]
            if b.name not in shared_names:
                data[b.offset:b.offset + b.type.numel] = constant.to(data.dtype).reshape(-1)
            elif not _same_bytes(data, b, constant):
                raise ScheduleError(f"the engine's entries hold different values for "
                                    f"{b.name}: they cannot share it")
        entry.tensors[key] = data
    return entry


def _same_bytes(pool: torch.Tensor, b, constant: torch.Tensor) -> bool:
    """Whether the pool holds `constant` at `b`'s place already: a weight the first
    entry packed (whose module's copy pack may have released: then it is taken as
    packed), or a constant of equal value."""
    if constant.untyped_storage().nbytes() == 0:
        return True
    return torch.equal(pool[b.offset:b.offset + b.type.numel].view(constant.shape),
                       constant.to(pool.dtype))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def fill_pool(pool, buffers, constants: dict[str, torch.Tensor],
              users: Counter | None = None) -> torch.Tensor:
    """One flat pool: each constant at its buffer's offset, zeros elsewhere. Only the
    gaps are zeroed (zeroing a pool of weights, then writing every byte again, cost a
    second pass over gigabytes). With `users` (constants per storage, counted over all
    pools), a constant's storage is freed after the last constant in it is copied; and
    if the constants already lie as the pool wants them, their memory becomes the pool
    (only then: a caller's module must not share memory with the engine)."""
    data = _laid_out(pool, buffers, constants) if users is not None else None
    if data is not None:   # the weights lie where the pool wants them: take them as is
        spans = [(b.offset, b.offset + b.type.numel) for b in buffers
                 if b.pool == pool.name and b.name in constants]
        _zero_gaps(data, spans)
        return data
    data = torch.empty(pool.numel, dtype=TORCH_DTYPES[pool.dtype])
    spans = []
    for b in buffers:
        if b.pool == pool.name and b.name in constants:
            constant = constants[b.name]
            if b.shard:   # a device's box of a weight, compact (passes/shard.py)
                box = tuple(slice(a, z) for a, z in b.shard)
                value = constant.reshape(b.type.shape)[box].to(data.dtype)
                lo, hi = b.stored
                data[b.offset + lo:b.offset + hi] = value.reshape(-1)
            else:
                value = constant.to(data.dtype).contiguous().reshape(-1)
                lo, hi = b.stored or (0, value.numel())   # a device's part of a weight
                data[b.offset + lo:b.offset + hi] = value[lo:hi]
            spans.append((b.offset + lo, b.offset + hi))
            if users is not None:
                users[_storage(constant)] -= 1
                if users[_storage(constant)] == 0:
                    del value
                    try:
                        constant.untyped_storage().resize_(0)
                    except RuntimeError:
                        pass   # not ours to free (numpy or mmap memory): it stays
    _zero_gaps(data, spans)
    return data


def _zero_gaps(data: torch.Tensor, spans: list[tuple[int, int]]) -> None:
    end = 0
    for start, stop in sorted(spans) + [(len(data), len(data))]:
        if start > end:
            data[end:start] = 0
        end = max(end, stop)


def _laid_out(pool, buffers, constants: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The pool as a view of the memory its constants already share, if each lies there
    at its buffer's offset, whole and contiguous (a family model's parameters are laid
    out so: models/llama.py, DecoderStep.empty); None otherwise."""
    dtype = TORCH_DTYPES[pool.dtype]
    storage = None
    for b in buffers:
        if b.pool != pool.name or b.name not in constants:
            continue
        c = constants[b.name]
        if b.stored or c.dtype != dtype or not c.is_contiguous() or \
                c.storage_offset() != b.offset:
            return None
        if storage is None:
            storage = c.untyped_storage()
        elif c.untyped_storage().data_ptr() != storage.data_ptr():
            return None
    if storage is None or storage.nbytes() < pool.numel * dtype.itemsize:
        return None
    return torch.empty(0, dtype=dtype).set_(storage)[:pool.numel]
