"""What an engine file holds: the format's names and the classes a loaded file becomes.

One safetensors container, no pickle (DESIGN.md, "Engine file"; docs/engine-format.md).
Tensors: the task table (`tasks`, one fixed-width int32 record per task, in queue
order, laid out as ir/abi.py says), `task_ids` (record -> task id), `queue_start`, the
`args` table (pool offsets per group), and one flat tensor per weight or state pool
(`pool.<name>`). `__metadata__`: format name and version, tilec version, the manifest
(JSON), the kernel source, and a SHA-256 over all of it (digest.py). GPU-target engines
may also hold each entry's kernel compiled ahead of time: its cubin (tensor
`aot.cubin`, an entry's `<entry>.aot.cubin`) and what launching it needs (metadata
`aot`, an entry's `aot.<entry>`, JSON: AOT_FIELDS).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from tilec.errors import RunError
from tilec.ir.abi import AOTKernel, record_width
from tilec.ir.schedule import Schedule
from tilec.ir.serial import to_json
from tilec.runtime.enginefile.tables import decode_schedule

FORMAT = "tilec-engine"
FORMAT_VERSION = "8"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
DEVICES_KEY = "devices"      # metadata of a multi-device engine: the number of devices
POOL_KINDS = ("weight", "state", "arena")
# An engine's entries: `decode` (the step every engine has; its manifest lists the
# entries) and, for a decoder, `prefill` (a chunk of a prompt per launch). A further
# entry is stored as `manifest.<entry>`, `kernel.<entry>` and tensors `<entry>.<name>`;
# the weight and state pools it shares with the decode step are stored once.
ENTRIES = ("decode", "prefill")
AOT_KEY = "aot"              # metadata: the decode step's GPU binary's description (JSON)
AOT_CUBIN = "aot.cubin"      # tensor: the binary itself, uint8
SHA_PLACEHOLDER = "0" * 64   # the sha256 entry while the file is written
PLAN_REFUSAL = ("this engine is a plan (compiled with --plan): it holds no weights and "
                "cannot run; compile the model without --plan to run it")
# The `aot` entry: AOTKernel's fields but the cubin (Triton's metadata as a JSON object),
# plus the cubin's size and SHA-256, so a binary can be checked against its description.
AOT_FIELDS = {"arch": int, "ptx_target": str, "num_warps": int, "shared": int,
              "n_regs": (int, type(None)), "n_spills": (int, type(None)), "spin_limit": int,
              "triton_version": str, "kernel_sha256": str, "triton_metadata": dict,
              "cubin_size": int, "cubin_sha256": str}


def aot_key(entry: str) -> str:
    """The metadata entry describing entry `entry`'s stored GPU binary: `aot` for the
    decode step, `aot.<entry>` for another (as its `manifest.<entry>`)."""
    return AOT_KEY if entry == "decode" else f"{AOT_KEY}.{entry}"


def aot_cubin(entry: str) -> str:
    """The tensor holding entry `entry`'s GPU binary: `aot.cubin` for the decode step,
    `<entry>.aot.cubin` for another (beside its `<entry>.tasks`)."""
    return AOT_CUBIN if entry == "decode" else f"{entry}.{AOT_CUBIN}"


BINARY_TENSORS = tuple(aot_cubin(e) for e in ENTRIES)   # stored last, in this order
BINARY_KEYS = tuple(aot_key(e) for e in ENTRIES)


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
    # A plan (`tilec compile --plan`): the whole schedule at full size, its pools sized
    # but without data (no `pool.*` tensors), so it can be inspected and verified but
    # never run. The checks hold a plan to having no pool data and any other engine to
    # having all of it, so clearing this flag without the weights is refused too.
    plan: bool = False
    entry: str = "decode"                  # which of ENTRIES this schedule is
    entries: tuple[str, ...] = ("decode",)  # the decode manifest: the file's entries


@dataclass
class EngineFile:
    """The contents of one engine file (or one device's part of a multi-device one), as
    the compiler packs it and `load` reads and checks it; `tilec.Engine` wraps it."""

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
    # The further entries (ENTRIES but `decode`), each over the same weight and state
    # pool tensors as this one.
    entries: dict[str, "EngineFile"] = field(default_factory=dict)
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
    def is_plan(self) -> bool:
        return self.manifest.plan

    def require_weights(self) -> None:
        """A RunError unless the engine holds its weights (a plan holds none)."""
        if self.manifest.plan:
            raise RunError(PLAN_REFUSAL)

    @property
    def record_width(self) -> int:
        return record_width(self.manifest.max_waits)

    def schedule(self) -> Schedule:
        """The schedule as stored: queues, signals and waits decoded from the table."""
        return decode_schedule(self.manifest.schedule, self.tensors)

    def entry_schedules(self) -> tuple[tuple[str, Schedule], ...]:
        """(entry name, its schedule as stored) for every entry, the decode step first."""
        return (("decode", self.schedule()),) + tuple(
            (name, e.schedule()) for name, e in self.entries.items())

    def binaries(self) -> dict[str, AOTKernel]:
        """Each entry's stored GPU binary (its own `aot`), by entry name, the decode
        step first; entries without one are left out."""
        every = {"decode": self.aot, **{n: e.aot for n, e in self.entries.items()}}
        return {n: b for n, b in every.items() if b is not None}

    def with_binaries(self, binaries: dict[str, AOTKernel]) -> "EngineFile":
        """This engine with each entry's binary set from `binaries` (by entry name), the
        entries not named without one; the rest shared with this engine."""
        entries = {n: replace(e, aot=binaries.get(n)) for n, e in self.entries.items()}
        return replace(self, aot=binaries.get("decode"), entries=entries)

    def entry(self, name: str) -> "EngineFile":
        """The entry `name` of this engine (`decode`: itself); a RunError if it has none."""
        if name == "decode":
            return self
        if name not in self.entries:
            raise RunError(f"this engine has no {name} entry (its entries: "
                           f"{', '.join(self.manifest.entries)})")
        return self.entries[name]


@dataclass
class DeviceEngines:
    """A multi-device engine: one EngineFile per device, each run by its own process
    (rank), exchanging regions through the transfers of its schedule. The weight and
    state pools are the same tensors in every device's EngineFile, stored once in the
    file."""

    ranks: tuple[EngineFile, ...]

    @property
    def devices(self) -> int:
        return len(self.ranks)

    @property
    def is_plan(self) -> bool:
        return self.ranks[0].is_plan

    @property
    def tokenizer(self) -> str | None:
        return self.ranks[0].tokenizer

    @property
    def chat(self) -> str | None:
        return self.ranks[0].chat


def clip(x) -> str:
    """`x` for a one-line message: its repr, cut to 40 characters."""
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def first_line(e: Exception) -> str:
    """An exception for a one-line message: its first line, cut to 200 characters."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]
