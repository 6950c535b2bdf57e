"""What to compile for: the target (workers, devices, roles), the tile sizes, the
scheduling policy, the wait cap; and what a model.yaml declares about its inputs.

`target_options` turns the arguments of `tilec.compile` and model.yaml's target and
schedule sections into one checked `CompileOptions`."""
from __future__ import annotations

from dataclasses import dataclass, replace

from tilec.compiler.config import workers_problem
from tilec.errors import ConfigError
from tilec.ir.abi import MAX_WAITS
from tilec.ir.stream import RING_CHUNK_ELEMS, TENSOR_CORE_ROWS
from tilec.ir.target import MAX_DEVICES, TARGETS, Role, Target
from tilec.limits import short_repr
from tilec.passes.roles import target_roles
from tilec.passes.tile import TileOptions



@dataclass(frozen=True)
class CompileOptions:
    target: Target = TARGETS["cpu"]
    policy: str = "critical_path"
    tiles: TileOptions = TileOptions()
    max_waits: int = MAX_WAITS
    aot: bool = True        # GPU targets: compile the kernel to a cubin and store it
    # A plan: the model built on the meta device, pools sized but not filled, no GPU
    # compile (a plan never runs); see tilec compile --plan.
    plan: bool = False


def target_options(name: str, workers: int | None = None, policy: str = "critical_path",
                   tile_m: int | None = None, tile_n: int | None = None,
                   tile_k: int | None = None, roles: tuple[Role, ...] = (),
                   kv_chunk: int | None = None, devices: int = 1,
                   batch: int = 1) -> CompileOptions:
    """`roles` as model.yaml gives them: checked here, once the worker count is final.
    With `devices` > 1 they own devices (Role.devices), not workers. `batch`: the
    sequences a decode step advances (the rows of its matmuls): unless `tile_m` is
    given, a tile holds them all, up to MAX_BATCH_TILE_M, so each weight tile is read
    once per step for the whole batch."""
    if not isinstance(name, str) or name not in TARGETS:
        raise ConfigError(f"unknown target {short_repr(name)} (choose from {', '.join(TARGETS)})")
    target = TARGETS[name]
    if workers is not None:
        if workers_problem(workers, name):
            raise ConfigError(f"workers: expected {workers_problem(workers, name)}, found "
                              f"{short_repr(workers)}")
        target = replace(target, workers=workers)
    if not isinstance(devices, int) or not 1 <= devices <= MAX_DEVICES:
        raise ConfigError(f"devices: expected an integer from 1 to {MAX_DEVICES}, found "
                          f"{short_repr(devices)}")
    target = replace(target, devices=devices)
    worker_roles, device_roles = target_roles(roles, devices, target.workers, "override")
    target = replace(target, roles=worker_roles, device_roles=device_roles)
    base = default_tiles(target)
    rows = min(MAX_BATCH_TILE_M, 1 << (batch - 1).bit_length())
    if batch > 1 and target.backend == "cuda":
        base = replace(base, min_tile_m=TENSOR_CORE_ROWS)
    # an explicit tile_m is every matmul's row tile, a prefill chunk's too (no GEMM rows)
    tiles = replace(base, tile_m=tile_m or max(base.tile_m, rows), tile_n=tile_n or base.tile_n,
                    tile_k=tile_k or base.tile_k, kv_chunk=kv_chunk or base.kv_chunk,
                    gemm_tile_m=0 if tile_m else base.gemm_tile_m,
                    workers=target.workers if target.backend == "cuda" else 1)
    return CompileOptions(target=target, policy=policy, tiles=tiles)


# A batch tile's rows at most: a [64, 128] float32 accumulator is what a tensor-core
# tile holds in registers; larger batches read each weight tile once per 64 sequences.
MAX_BATCH_TILE_M = 64


# Rows of a GEMM tile at most (a matmul of more rows than tile_m: a prefill chunk's),
# so each weight tile a prefill launch streams serves up to this many prompt tokens.
GEMM_TILE_M = 128


def default_tiles(target: Target) -> TileOptions:
    if target.backend == "cpu":
        # The interpreter pays per task and per numpy call, not per element: few, big tiles.
        # Workers take turns in one process, so more tiles never run faster here; and
        # registers are numpy arrays, so tiles need no size bound.
        return TileOptions(tile_m=32, tile_n=128, tile_k=128, row_chunk=4096,
                           max_tile_elems=1 << 22, gemm_tile_m=GEMM_TILE_M)
    # GPU: the tile pass picks each matmul's width between these (balance_widths). A
    # matvec tile's K chunk is then as long as a chunk of RING_CHUNK_ELEMS allows (16 KB
    # of bf16, one stage of the weight ring): 64 for 128 columns (128 contiguous bytes
    # of each [N, K] weight row), 1024 for 8 columns (one 16-byte vector of a row).
    return TileOptions(tile_m=16, tile_n=128, tile_k=2048, row_chunk=1024, min_tile_n=8,
                       max_tile_elems=RING_CHUNK_ELEMS, gemm_tile_m=GEMM_TILE_M)


@dataclass(frozen=True)
class InputInfo:
    name: str
    low: int = 0
    high: int | None = None
