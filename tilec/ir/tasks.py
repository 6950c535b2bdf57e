"""Tile-level IR: buffers, regions and the micro-tasks that read and write them."""
from __future__ import annotations

from dataclasses import dataclass

from tilec.ir.graph import FusedGraph, TensorType, contiguous_strides

# Where a buffer's bytes live. Weights are constants in the engine; inputs are filled by
# the host before a launch; state persists across launches; the rest is scratch.
BUFFER_KINDS = ("weight", "input", "output", "activation", "state")


@dataclass(frozen=True)
class Buffer:
    name: str
    type: TensorType
    kind: str
    pool: str = ""      # filled by memplan: the typed pool the buffer lives in
    offset: int = -1    # filled by memplan: element offset inside that pool
    # Multi-device weights and state (memplan): the flat element range [lo, hi) of the
    # buffer this device's pool holds, the part its tasks touch; () for all of it. The buffer still
    # spans [offset, offset + extent()) of the pool, so any in-grid tile addresses memory
    # inside the pool, but only [offset + lo, offset + hi) holds the buffer's values.
    stored: tuple[int, ...] = ()
    # Multi-device weights (passes/shard.py): the box (per-dim [start, stop)) of the
    # buffer this device holds as a compact shard, laid out row-major as a tensor of the
    # box's shape; () for the buffer's own row-major layout. Element i of the buffer
    # (per-dim indices) lies at offset + sum(i[k] * layout_strides()[k]), so the shard's
    # first element is at offset + stored[0]; indices outside the box address bytes
    # that are not the buffer's (no task touches them: verify's regions_in_buffers).
    shard: tuple[tuple[int, int], ...] = ()

    def layout_strides(self) -> tuple[int, ...]:
        """Element strides of the buffer's layout in its pool (its shard's, if sharded)."""
        if self.shard:
            return contiguous_strides(tuple(b - a for a, b in self.shard))
        return contiguous_strides(self.type.shape)

    def extent(self) -> int:
        """Pool elements from `offset` that a view of the whole buffer may address, at
        least 1: its numel, or for a shard the reach of its strides over the whole shape
        (never more than numel: a shard's strides are at most the buffer's own)."""
        if not self.shard:
            return max(self.type.numel, 1)
        if self.type.numel == 0:
            return 1
        return 1 + sum((n - 1) * s for n, s in zip(self.type.shape, self.layout_strides()))


@dataclass(frozen=True)
class Region:
    """A box (per-dim [start, stop)) in a buffer's own shape."""

    buffer: str
    box: tuple[tuple[int, int], ...]

    def overlaps(self, other: "Region") -> bool:
        if self.buffer != other.buffer:
            return False
        return all(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(self.box, other.box))

    @property
    def numel(self) -> int:
        n = 1
        for a, b in self.box:
            n *= max(b - a, 0)
        return n


@dataclass(frozen=True)
class GroupTiling:
    """How one fused group is cut into tiles: block sizes and the tile grid
    (batch, row blocks, col blocks)."""

    group: str
    block_m: int
    block_n: int
    block_k: int
    grid: tuple[int, int, int]


@dataclass(frozen=True)
class Task:
    id: int
    group: str
    tile: tuple[int, int, int]   # (batch, row block, col block)
    reads: tuple[Region, ...]
    writes: tuple[Region, ...]
    flops: int
    bytes: int
    # `bytes` by buffer: (buffer, bytes) pairs. A region bounds what a task may touch;
    # this is what it moves (a gather reads its rows, not the table its region spans).
    moved: tuple[tuple[str, int], ...] = ()


# `Task.group` of a communication task. It runs on its device's host-driven comm worker
# (the last worker of a multi-device schedule), never in the kernel; its tile is
# (sequence number of its Transfer, 0, 0).
TRANSFER = "transfer"


@dataclass(frozen=True)
class TransferPart:
    """A region computed on device `src`, sent to the devices `dsts` that read it."""

    src: int
    region: Region
    dsts: tuple[int, ...]


@dataclass(frozen=True)
class Transfer:
    """One collective exchange between devices: its parts, sent in order (one part: a
    send; a part from each device of a split group: an all-gather). Every device taking
    part holds one transfer task for it, which reads the regions it sends and writes
    the regions it receives. Transfers run in sequence order on every device, and the
    parts of one in their order, so blocking point-to-point messages always find their
    partner; `seq` is also the transfer's index in `TaskGraph.transfers`."""

    seq: int
    parts: tuple[TransferPart, ...]

    @property
    def members(self) -> tuple[int, ...]:
        """The devices taking part, ascending."""
        return tuple(sorted({d for p in self.parts for d in (p.src,) + p.dsts}))

    def sends(self, device: int) -> tuple[Region, ...]:
        return tuple(p.region for p in self.parts if p.src == device)

    def receives(self, device: int) -> tuple[Region, ...]:
        return tuple(p.region for p in self.parts if device in p.dsts)


@dataclass(frozen=True, slots=True)   # slots: a decode step has millions of deps
class Dep:
    """`after` must not start before `before` is complete (RAW, WAR or WAW)."""

    before: int
    after: int
    kind: str
    buffer: str


@dataclass(frozen=True)
class TaskGraph:
    fused: FusedGraph
    buffers: tuple[Buffer, ...]
    tilings: tuple[GroupTiling, ...]
    tasks: tuple[Task, ...]          # in program order (a topological order)
    deps: tuple[Dep, ...] = ()
    # The role of each task, by task id (the roles pass); () when the target has no
    # roles: every task then belongs to the one implicit role.
    roles: tuple[str, ...] = ()
    # Multi-device engines (passes/partition.py): this graph is device `device`'s part
    # of `devices`, and `transfers` are every device's transfers, by sequence number.
    device: int = 0
    devices: int = 1
    transfers: tuple[Transfer, ...] = ()

    def buffer(self, name: str) -> Buffer:
        for b in self.buffers:
            if b.name == name:
                return b
        raise KeyError(name)

    def tiling(self, group: str) -> GroupTiling:
        for t in self.tilings:
            if t.group == group:
                return t
        raise KeyError(group)
