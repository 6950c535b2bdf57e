"""How a matvec or GEMM task streams its weights: the depth of the kernel's weight ring.

Shared by codegen (the `num_stages` of the K loop), the tile pass and the cost model
(what a worker keeps in flight), so that all three describe the same kernel. What the
compiled code really keeps in flight is read back from it (`codegen/sass.py`,
`tilec inspect --json`: kernel.streaming).
"""
from __future__ import annotations

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
# Triton's `num_stages` for a GEMM tile's K loop (a tensor-core tile of more than
# TENSOR_CORE_ROWS rows, a prefill chunk's): each stage holds a [BM, BK] chunk of A and
# a [BK, BN] chunk of B in shared memory, at most 16 KB + 16 KB of bf16 for a
# [128, 64] x [64, 128] tile, so 3 stages keep 2 chunks of B in flight in 96 KB.
GEMM_STAGES = 3


def is_matvec(tiling: GroupTiling) -> bool:
    return tiling.block_m < TENSOR_CORE_ROWS


def is_gemm_rows(block_m: int) -> bool:
    """A tile of `block_m` rows is a GEMM tile: a tensor-core tile with a pipelined K
    loop, whose chunks pass through shared memory rather than registers."""
    return block_m > TENSOR_CORE_ROWS


def is_gemm(tiling: GroupTiling) -> bool:
    return is_gemm_rows(tiling.block_m)


def ring_bytes(tiling: GroupTiling, k: int, itemsize: int) -> int:
    """Bytes of B a worker keeps in flight in a matvec or GEMM tile's ring when a chunk is
    awaited (RING_STAGES - 1 chunks, Triton's pipeliner), 0 without a ring."""
    stages = ring_stages(tiling, k)
    return (stages - 1) * tiling.block_n * tiling.block_k * itemsize if stages > 1 else 0


def ring_stages(tiling: GroupTiling, k: int) -> int:
    """The K loop's pipeline depth when it takes more than one trip: RING_STAGES for a
    matvec tile, GEMM_STAGES for a GEMM tile; 1 (no ring: nothing to overlap) for a
    loop of one trip and for a 16-row tensor-core tile (it loads the next chunk into
    registers instead)."""
    if -(-k // max(1, tiling.block_k)) <= 1:
        return 1
    if is_matvec(tiling):
        return RING_STAGES
    return GEMM_STAGES if is_gemm(tiling) else 1
