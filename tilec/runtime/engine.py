"""The engine file: one safetensors container, no pickle (DESIGN.md, "Engine file").

Tensors: the task table (`tasks`, one fixed-width int32 record per task, in queue
order), `task_ids` (record -> task id), `queue_start`, the `args` table (pool offsets
per group), and one flat tensor per weight or state pool (`pool.<name>`).
`__metadata__`: format name and version, tilec version, the manifest (JSON), the
kernel source, and a SHA-256 over all of it. `load` checks everything, including
every index in the task table, before anything can run.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tilec.errors import EngineError
from tilec.ir.schedule import Schedule, Wait
from tilec.ir.serial import from_plain, to_plain
from tilec.version import __version__

FORMAT = "tilec-engine"
FORMAT_VERSION = "1"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
FIXED_FIELDS = 6


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


@dataclass
class Engine:
    manifest: Manifest
    kernel_source: str
    tensors: dict[str, torch.Tensor]
    tokenizer: str | None = None    # tokenizer.json text, for decoder engines

    @property
    def record_width(self) -> int:
        return FIXED_FIELDS + 2 * self.manifest.max_waits + 1

    def schedule(self) -> Schedule:
        """The schedule as stored: queues, signals and waits decoded from the table."""
        return decode_schedule(self.manifest, self.tensors)


def encode_tables(schedule: Schedule, opcodes, max_waits: int) -> dict[str, torch.Tensor]:
    groups = {g.name: i for i, g in enumerate(schedule.taskgraph.fused.groups)}
    width = FIXED_FIELDS + 2 * max_waits + 1
    tasks = schedule.taskgraph.tasks
    rows, ids, starts = [], [], [0]
    for queue in schedule.queues:
        for tid in queue:
            t = tasks[tid]
            g = groups[t.group]
            waits = schedule.waits[tid]
            rec = [opcodes[g], g, *t.tile, len(waits)]
            for w in waits:
                rec += [w.event, w.count]
            rec += [0, 0] * (max_waits - len(waits))
            rec.append(schedule.signal[tid])
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


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(meta):
        if key != "sha256":
            h.update(f"{key}\0{meta[key]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(engine: Engine, path: str | os.PathLike) -> None:
    """Write atomically: a temporary file in the same folder, then a rename, so a failed
    or interrupted save leaves an existing file untouched."""
    from safetensors.torch import save_file

    manifest = json.dumps(to_plain(engine.manifest), separators=(",", ":"), sort_keys=True)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "tilec_version": __version__,
            "manifest": manifest, "kernel": engine.kernel_source}
    if engine.tokenizer is not None:
        meta["tokenizer"] = engine.tokenizer
    tensors = {k: v.contiguous() for k, v in engine.tensors.items()}
    meta["sha256"] = _digest(meta, tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike, trust_engine_code: bool = False) -> Engine:
    """Read and check an engine file; any problem is an EngineError with one line.

    The stored kernel source is only accepted when it is byte-identical to what this
    tilec renders from the manifest (and the args table likewise), unless
    `trust_engine_code` says to run it anyway."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: no such engine file")
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
    if meta.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{path}: engine format version {meta.get('format_version')!r}; "
                          f"this tilec reads version {FORMAT_VERSION}")
    if meta.get("sha256") != _digest(meta, tensors):
        raise EngineError(f"{path}: checksum mismatch: the file is corrupted or was edited")
    try:
        manifest = from_plain(Manifest, json.loads(meta["manifest"]))
    except (KeyError, ValueError, TypeError) as e:
        raise EngineError(f"{path}: malformed manifest ({_short(e)})") from None
    engine = Engine(manifest, meta.get("kernel", ""), tensors, meta.get("tokenizer"))
    problem = check_tables(engine)
    if problem:
        raise EngineError(f"{path}: {problem}")
    problem = check_kernel(engine, trust_engine_code)
    if problem:
        raise EngineError(f"{path}: {problem}")
    return engine


def check_kernel(engine: Engine, trust_engine_code: bool = False) -> str | None:
    from tilec.codegen.render import render

    m = engine.manifest
    sched = m.schedule
    try:
        rendered = render(sched.taskgraph.fused, sched.taskgraph.tilings, sched.buffers,
                          sched.pools, m.max_waits, sched.target.workers, m.model, __version__)
    except Exception as e:  # a manifest that parses but describes nothing renderable
        return f"manifest does not describe a renderable kernel ({_short(e)})"
    if rendered.opcodes != m.opcodes or rendered.kinds != m.kinds:
        return "opcode table differs from what this tilec renders from the manifest"
    if rendered.args != tuple(tuple(r) for r in engine.tensors["args"].tolist()):
        return "args table differs from what this tilec renders from the manifest"
    if rendered.source != engine.kernel_source and not trust_engine_code:
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
    for row, (rec, tid) in enumerate(zip(table.tolist(), ids.tolist())):
        op, g, t0, t1, t2, nw = rec[:FIXED_FIELDS]
        if not 0 <= g < len(groups) or op != m.opcodes[g]:
            return f"task record {row}: group/opcode out of range"
        task = tasks[tid]
        grid = tilings[groups[g].name].grid if groups[g].name in tilings else (0, 0, 0)
        if task.group != groups[g].name or (t0, t1, t2) != task.tile or not all(
                0 <= c < n for c, n in zip((t0, t1, t2), grid)):
            return f"task record {row}: tile {(t0, t1, t2)} does not match task {tid}"
        if not 0 <= nw <= m.max_waits:
            return f"task record {row}: {nw} waits (at most {m.max_waits})"
        for i in range(nw):
            ev, cnt = rec[6 + 2 * i], rec[7 + 2 * i]
            if not 0 <= ev < n_events or cnt < 1 or cnt > sched.events[ev].signals:
                return f"task record {row}: wait on event {ev} x{cnt} out of range"
        if not 0 <= rec[-1] < n_events:
            return f"task record {row}: signals event {rec[-1]} out of range"
    pools = {p.name: p for p in sched.pools}
    for b in sched.buffers:
        p = pools.get(b.pool)
        if p is None or b.offset < 0 or b.offset + b.type.numel > p.numel:
            return f"buffer {b.name} lies outside its pool"
    for p in sched.pools:
        if p.kind in ("weight", "state"):
            tensor = t.get(f"pool.{p.name}")
            if tensor is None or tensor.dtype != TORCH_DTYPES.get(p.dtype) or \
                    tuple(tensor.shape) != (p.numel,):
                return f"pool {p.name} missing or of the wrong size"
    sizes = {p.name: p.numel for p in sched.pools}
    order = [p.name for p in sched.pools]
    for g, group in enumerate(groups):
        for a in args[g].tolist():
            if a < 0 or a >= max(sizes.values(), default=0) + 1:
                return f"args row {g}: offset {a} outside every pool"
    for io in m.inputs + m.outputs:
        if io.buffer not in {b.name for b in sched.buffers}:
            return f"input/output {io.name} names unknown buffer {io.buffer}"
    del order
    return None
