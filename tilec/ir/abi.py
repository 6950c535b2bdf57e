"""The kernel interface: what the generated kernel and everything around it agree on.

The persistent kernel (codegen/templates/kernel.py.j2, filled in by codegen/render.py),
the engine file that stores its tables (runtime/enginefile/), the executors that launch
it (runtime/executors.py, the reference executor beside them) and the passes that size
its records (passes/sync.py) all read these names, so the layout is written once. It
imports nothing outside `tilec.ir`: the ahead-of-time compile's child process and the
runtime read it without the compiler. docs/engine-format.md describes the same layout
for readers of the file; tests/test_docs.py checks that page against this module.

Changing anything here changes the kernel or the file: FORMAT_VERSION
(runtime/enginefile/format.py) goes up with it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

# ---- the kernel ----------------------------------------------------------------------
KERNEL_NAME = "tilec_engine"   # the persistent kernel's function
NUM_WARPS = 4                  # warps per worker (CTA), for the JIT and the stored binary
SPIN_LIMIT = 1 << 26           # the watchdog's bound on one wait, in spins (gpu executor)
MAX_WAITS = 8                  # the wait cap: waits a task record holds (passes/sync.py)

# ---- the task record -----------------------------------------------------------------
# One fixed-width int32 row of the task table per task (ir/record.py fills the prefetch
# fields), in this order:
#   opcode, args row, t0, t1, t2, number of waits,
#   max_waits x (event, count per step),
#   weight prefetch: weight pool slot (-1: none), first unit, units (PREFETCH_UNIT bytes),
#   signal event
OPCODE = 0           # the task kind's function (TRANSFER_OPCODE: the host runs it)
ARGS_ROW = 1         # the group's row of the args table
TILE = 2             # t0, t1, t2: fields TILE, TILE + 1, TILE + 2
NUM_WAITS = 5
WAITS = 6            # wait i: event at WAITS + 2 i, count per step at WAITS + 2 i + 1
FIXED_FIELDS = 6     # the fields before the waits
PREFETCH_FIELDS = 3  # weight pool slot, first unit, units (of PREFETCH_UNIT bytes)
NO_PREFETCH = (-1, 0, 0)
SIGNAL = -1          # the last field: the event the task signals when it is done
TRANSFER_OPCODE = -1  # opcode and args row of a transfer's record (multi-device)

# How many tasks ahead a GPU worker asks L2 for weights: when it starts a task, for the
# one after the next (the launch: for its first two). A task's weights then stream while
# the task before it waits and runs, and while it waits itself.
PREFETCH_DEPTH = 2
# The most of a task's weights a record's prefetch names (the ring streams the rest):
# 132 workers x PREFETCH_DEPTH x 128 KB = 34 MB of an H200's 50 MB L2
PREFETCH_MAX_BYTES = 128 * 1024
# The bytes of one unit of a record's prefetch first and length fields. An int32 field
# of 16-byte units addresses only the first 32 GB of a pool: a device holding more
# (Llama-3-70B on two H200s, GLM-5 on eight) overflowed the table. 2^31 units of 256
# bytes address 512 GB; the span loses at most 255 bytes at either end (a hint).
PREFETCH_UNIT = 256
# Pieces the kernel asks for a task's weight prefetch in (each up to PREFETCH_MAX_BYTES
# / this, 16 KB): the prefetch instruction takes its operands from uniform registers, so
# ptxas issues one per distinct piece in a loop over the worker's threads
PREFETCH_PIECES = 8


def record_width(max_waits: int) -> int:
    return FIXED_FIELDS + 2 * max_waits + PREFETCH_FIELDS + 1


def prefetch_offset(max_waits: int) -> int:
    """Index of the first prefetch field (the signal event is the last field)."""
    return FIXED_FIELDS + 2 * max_waits


def encode_record(opcode: int, args_row: int, tile: tuple[int, int, int],
                  waits: Iterable[tuple[int, int]], max_waits: int,
                  prefetch: tuple[int, int, int], signal: int) -> list[int]:
    """One task record; `waits` as (event, count per step) pairs, at most `max_waits`."""
    waits = list(waits)
    rec = [opcode, args_row, *tile, len(waits)]
    for event, count in waits:
        rec += [event, count]
    rec += [0, 0] * (max_waits - len(waits))
    return rec + [*prefetch, signal]


def record_waits(rec: list[int]) -> list[tuple[int, int]]:
    """A record's waits as (event, count per step) pairs."""
    return [(rec[WAITS + 2 * i], rec[WAITS + 2 * i + 1]) for i in range(rec[NUM_WAITS])]


def record_prefetch(rec: list[int], max_waits: int) -> tuple[int, int, int]:
    at = prefetch_offset(max_waits)
    return tuple(rec[at:at + PREFETCH_FIELDS])


# ---- the error buffer ----------------------------------------------------------------
# ERROR_WORDS int32 words; the first says what the kernel (or the reference executor)
# recorded, the rest are that error's fields:
#   HANG (the watchdog): worker, task row, event, seen, wanted
#   INDEX_ERROR (a run-time index out of range): group, t0, t1, t2, check, index, bound
ERROR_WORDS = 8
HANG = 1
INDEX_ERROR = 2

# ---- the launch ----------------------------------------------------------------------
# The kernel's arguments in order: these, one pointer per pool (the schedule's pool
# order), then the constexprs. Triton types, as its signature wants them.
LAUNCH_ARGS = (
    ("tasks", "*i32"), ("queue_start", "*i32"), ("args", "*i64"), ("events", "*i32"),
    ("cursor", "*i32"), ("error", "*i32"), ("stamps", "*i64"), ("step", "i32"),
    ("worker_base", "i32"),
    ("budget", "i32"),
)
LAUNCH_CONSTEXPRS = ("BLOCKING", "SPIN_LIMIT", "PROFILE")
POOL_POINTER_TYPES = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16",
                      "int64": "*i64", "int32": "*i32", "bool": "*i1"}


def launch_signature(pools: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The kernel's Triton signature for pools given as (name, dtype) pairs, every dtype
    one of POOL_POINTER_TYPES."""
    sig = dict(LAUNCH_ARGS)
    for name, dtype in pools:
        sig[name] = POOL_POINTER_TYPES[dtype]
    for name in LAUNCH_CONSTEXPRS:
        sig[name] = "constexpr"
    return sig


def launch_arguments(values: dict[str, object], pools: Iterable[object]) -> tuple:
    """The positional arguments of a launch, constexprs aside: `values` by LAUNCH_ARGS
    name, then the pools' tensors in the schedule's pool order."""
    return tuple(values[name] for name, _ in LAUNCH_ARGS) + tuple(pools)


# ---- the binary compiled ahead of time -------------------------------------------------
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
