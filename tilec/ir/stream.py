"""How a matvec or GEMM task streams its weights: the depth of the kernel's weight ring.

Shared by codegen (the `num_stages` of the K loop), the tile pass and the cost model
(what a worker keeps in flight), so that all three describe the same kernel. What the
compiled code really keeps in flight is read back from it (`codegen/sass.py`,
`tilec inspect --json`: kernel.streaming).
"""
from __future__ import annotations

from dataclasses import dataclass

from tilec.ir.graph import DTYPE_BYTES, Group, Op, Operand
from tilec.ir.tasks import GroupTiling

# Triton's `num_stages` for a matvec K loop. Its software pipeliner keeps
# RING_STAGES - 1 chunks in shared memory and waits until at most RING_STAGES - 2 copies
# are pending: with 16 KB chunks, 48 KB requested when a chunk is awaited and 32 KB
# while it is consumed. Little's law asks ~22-29 KB per SM on an H200 (4.2-4.8 TB/s
# over 132 SMs at 0.6-0.8 us), so 4 stages of 16 KB keep it fed with room to spare;
# ring memory is (RING_STAGES - 1) chunks, 48 KB of the 227 KB an SM has.
RING_STAGES = 4
# Elements of one weight chunk (BN x BK): 16 KB of bf16. The tile pass bounds a matvec
# tile's BK so a chunk holds at most this many (TileOptions.max_tile_elems).
RING_CHUNK_ELEMS = 8192
# The shortest K span of a matvec chunk the tile pass gives (fewer columns instead). A
# [1, BK] activation chunk's layout spreads 4-element vectors over a 4-warp worker's 128
# threads; the [BN, BK] product takes that layout, so below 128 its elements repeat on
# several threads: [128, 64] chunks made 8 copies of each FMA and spilled 4 KB per thread
# (sm_90, Triton 3.9, the Llama-1B LM head), [64, 128] and [16, 512] chunks did not.
MIN_MATVEC_BK = 128
# Elements of a row one pass of a matvec tile's prologue reduction reads (16 KB of
# float32: 32 registers per thread of a 4-warp worker)
PROLOGUE_CHUNK = 4096
# Bytes a loop of plain loads (no ring) keeps in flight per worker: the matvec body
# before the ring peaked at 16.6-17.4 KB per CTA (sm_90 SASS, the gpu-kit study)
PLAIN_IN_FLIGHT = 16 * 1024
# Dependent round trips to L2 every task pays outside its stream, by the kernel's
# protocol (templates/kernel.py.j2): its waits, all polled at once; the release add that
# signals it; its record and its args row, one more at most (both fields of the record
# load at once, and on a GPU the record was asked into L1 during the task before, the
# args row before the waits)
PROTOCOL_ROUND_TRIPS = 3
# A tile with fewer rows than this is a matvec (a broadcast product and FMAs); from
# it on, a tensor-core tile (`tl.dot` needs 16 rows).
TENSOR_CORE_ROWS = 16
# Ops that reduce a row: a matmul's prologue computes them in passes before its K loop
REDUCTION_KINDS = ("reduce", "argmax", "topk")
# The fewest `num_stages` of a GEMM tile's K loop (a tensor-core tile of TENSOR_CORE_ROWS
# rows or more: a batched decode step's or a prefill chunk's), whose trips each copy a
# [BM, BK] chunk of A (or the prologue's inputs A is computed from) and a [BK, BN] chunk
# of B through shared memory; Triton's pipeliner keeps num_stages - 1 trips' copies in
# flight when a chunk is awaited, in as many shared-memory buffers.
GEMM_STAGES = 3
# Weight bytes a GEMM tile's ring should keep in flight per worker when a chunk is awaited:
# the matvec ring's goal (Little's law asks ~22-29 KB per SM on an H200), so a GEMM tile
# of narrow B chunks takes more stages (gemm_stages).
GEMM_IN_FLIGHT = 32 * 1024
# Shared memory a GEMM tile's ring may take (its num_stages - 1 buffers of A and B
# chunks): sm_90 gives one CTA 227 KB; the rest is room for the dot's operand layouts and
# the epilogue's scratch. Where A's chunks are much larger than B's (128 rows of float32
# against 16 columns of bf16), this, not GEMM_IN_FLIGHT, sets the depth.
GEMM_RING_SMEM = 160 * 1024


@dataclass(frozen=True)
class Ring:
    """A K loop's ring as the compiled code holds it: Triton's `num_stages` (1: no ring)
    and the bytes one trip copies, of B (the weights, for a weight matmul) and of the rest
    (A's chunk and the prologue's inputs)."""

    stages: int
    b_chunk: int
    other_chunk: int = 0

    @property
    def b_in_flight(self) -> int:
        """B's bytes outstanding when a chunk is awaited: num_stages - 1 chunks."""
        return (self.stages - 1) * self.b_chunk if self.stages > 1 else 0

    @property
    def shared_bytes(self) -> int:
        """The ring's buffers in shared memory: num_stages - 1 trips' chunks."""
        return (self.stages - 1) * (self.b_chunk + self.other_chunk) if self.stages > 1 else 0


def is_matvec(tiling: GroupTiling) -> bool:
    return tiling.block_m < TENSOR_CORE_ROWS


def is_gemm_rows(block_m: int) -> bool:
    """A matmul tile of `block_m` rows is a GEMM tile: a tensor-core tile with a pipelined
    K loop, whose chunks pass through shared memory rather than registers."""
    return block_m >= TENSOR_CORE_ROWS


def is_gemm(tiling: GroupTiling) -> bool:
    return is_gemm_rows(tiling.block_m)


def takes_gemm_loop(tiling: GroupTiling) -> bool:
    """A matmul tile runs the GEMM K loop: GEMM rows, and K and N chunks `tl.dot` takes
    (16 or more)."""
    return is_gemm(tiling) and tiling.block_k >= 16 and tiling.block_n >= 16


def ring_stages(tiling: GroupTiling, k: int) -> int:
    """A matvec K loop's pipeline depth when it takes more than one trip: RING_STAGES; 1
    (no ring: nothing to overlap) for a loop of one trip and for any other tile."""
    if -(-k // max(1, tiling.block_k)) <= 1 or not is_matvec(tiling):
        return 1
    return RING_STAGES


def gemm_stages(trips: int, b_chunk: int, other_chunk: int) -> int:
    """`num_stages` of a GEMM tile's K loop of `trips` trips, each copying `b_chunk` bytes
    of B and `other_chunk` of the rest: enough trips ahead for GEMM_IN_FLIGHT bytes of B,
    as many as GEMM_RING_SMEM holds, never more than the loop has, at least
    GEMM_STAGES; 1 for a loop of one trip (nothing to overlap)."""
    if trips <= 1:
        return 1
    ahead = min(-(-GEMM_IN_FLIGHT // max(1, b_chunk)),
                GEMM_RING_SMEM // max(1, b_chunk + other_chunk), trips)
    return max(GEMM_STAGES - 1, ahead) + 1


def matmul_ring(group: Group, ops: dict[str, Op], tiling: GroupTiling) -> Ring:
    """The ring of a matmul group's K loop cut by `tiling`, as codegen emits it (the
    matvec ring, or a GEMM tile's by gemm_stages) and the cost model prices it."""
    a, b = ops[group.anchor].inputs[:2]
    k = a.shape[-1]
    b_chunk = tiling.block_k * tiling.block_n * DTYPE_BYTES[ops[b.value].type.dtype]
    if not takes_gemm_loop(tiling):
        return Ring(ring_stages(tiling, k), b_chunk)
    other = sum(_chunk_bytes(operand, ops, tiling) for operand in a_loop_reads(group, ops))
    return Ring(gemm_stages(-(-k // max(1, tiling.block_k)), b_chunk, other), b_chunk, other)


def a_loop_reads(group: Group, ops: dict[str, Op]) -> list[Operand]:
    """What a matmul group's K loop loads each trip besides B: the A operand, or, where the
    prologue computes A, the prologue's inputs from outside the group that A needs. Per-row
    values (a norm's statistics: reductions and [rows, 1] results, computed before the loop)
    and operands constant along K are not loaded per trip."""
    prologue = set(group.prologue)
    out: list[Operand] = []
    seen: set[str] = set()
    stack = [ops[group.anchor].inputs[0]]
    while stack:
        operand = stack.pop()
        if operand.value in prologue:
            op = ops[operand.value]
            if operand.value not in seen and op.kind not in REDUCTION_KINDS and op.type.cols != 1:
                seen.add(operand.value)
                stack.extend(op.inputs)
        elif operand.shape and operand.shape[-1] > 1 and operand.strides[-1] != 0 and \
                operand not in out:
            out.append(operand)
    return out


def _chunk_bytes(operand: Operand, ops: dict[str, Op], tiling: GroupTiling) -> int:
    """Bytes of `operand` one trip loads: [BM, BK], or [1, BK] when its rows are one."""
    rows = any(n > 1 and s != 0 for n, s in zip(operand.shape[:-1], operand.strides[:-1]))
    return (tiling.block_m if rows else 1) * tiling.block_k * \
        DTYPE_BYTES[ops[operand.value].type.dtype]

