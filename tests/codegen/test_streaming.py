"""The weight stream, read from the compiled sm_90 code (no GPU needed): matvec tasks
copy their weights through a cp.async ring deep enough to keep >= 32 KB in flight per
worker (issue 20's goal for every weight-streaming kind), with evict-first 16-byte
copies, and `tilec inspect --json` reports it as kernel.streaming; GEMM tasks (batched
decode, prefill) through rings of the depth the cost model prices them by."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import tilec.api
from tilec.codegen import sass

GOAL_BYTES = 32 * 1024

# One Llama-3.2-1B layer: the same matmul shapes as the 16-layer model (K = 2048 and
# 8192), a small vocabulary so that the compile stays short
# (decode-only: the decode step's weight streaming is what these measure)
LAYER = {"model": {"family": "llama", "max_seq_len": 128, "prefill": False, "config": {
    "vocab_size": 2048, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "tie_word_embeddings": True}}, "target": "h200"}


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """(engine, dump dir) of the layer, compiled for sm_90 with every stage dumped."""
    folder = tmp_path_factory.mktemp("layer")
    path = folder / "layer.yaml"
    path.write_text(yaml.safe_dump(LAYER))
    engine = tilec.api.compile(str(path), dump_dir=str(folder / "dump"))
    return engine, folder / "dump"


def test_every_weight_stream_keeps_32_kb_in_flight_with_cp_async(layer):
    engine, _ = layer
    kernel = engine.summary()["kernel"]
    assert kernel["aot"]["n_spills"] == 0, kernel["aot"]
    rows = kernel["streaming"]
    streams = [r for r in rows if r["streams_weights"]]
    # q, k, v, o, gate, up, down and the LM head all stream
    assert len(streams) >= 6, rows
    for r in streams:
        assert r["async_copy"] == "cp.async", r
        assert r["stages"] == 4, r
        assert r["weight_bytes_in_flight_per_worker"] >= GOAL_BYTES, r
        assert r["bytes_in_flight_per_worker"] >= r["weight_bytes_in_flight_per_worker"], r
    # an embedding row gather reads a few KB of the table: not a stream
    gathers = [r for r in rows if r["kind"] == "gather"]
    assert gathers and not any(r["streams_weights"] for r in gathers)


def test_dump_holds_the_compiled_ptx_and_sass(layer):
    _, dump = layer
    ptx = (dump / "08_kernel.ptx").read_text()
    assert ".target sm_90a" in ptx
    copies = tilec.codegen.aot.async_copies(ptx)
    # the weight copies: 16-byte vectors carrying an L2 evict-first policy
    assert copies.get("16", 0) >= 32 and copies.get("cache_hint", 0) >= 32, copies
    assert copies["evict_first_policies"] >= 1, copies
    # the dispatcher asks L2 for the next task's weights, L1 for the next record
    assert "cp.async.bulk.prefetch.L2.global" in ptx and "prefetch.global.L1" in ptx
    if sass.nvidia_tool("nvdisasm"):
        listing = (dump / "08_kernel.sass").read_text()
        assert "LDGSTS" in listing and "task_" in listing


RING_SOURCE = '''
import triton
import triton.language as tl


@triton.jit(noinline=True)
def task_0(w, x, y, t, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
           STAGES: tl.constexpr):
    rows = t * BN + tl.arange(0, BN)
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        cols = k0 + tl.arange(0, BK)
        acc += tl.load(w + rows[:, None] * K + cols[None, :],
                       eviction_policy="evict_first").to(tl.float32) * \\
            tl.load(x + cols[None, :]).to(tl.float32)
    tl.store(y + rows, tl.sum(acc, axis=1))


@triton.jit
def kernel(w, x, y, n, STAGES: tl.constexpr):
    for t in range(tl.program_id(0), n, tl.num_programs(0)):
        task_0(w, x, y, t, 8192, 16, 512, STAGES)
'''


def _compile_ring(tmp_path: Path, stages: int) -> bytes:
    """The kernel above compiled for sm_90 in a child process (this one interprets)."""
    src = tmp_path / "ring.py"
    src.write_text(RING_SOURCE)
    out = tmp_path / f"ring{stages}.cubin"
    script = textwrap.dedent(f"""
        import importlib.util, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        spec = importlib.util.spec_from_file_location("ring", {str(src)!r})
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        sig = {{"w": "*bf16", "x": "*bf16", "y": "*fp32", "n": "i32", "STAGES": "constexpr"}}
        attrs = {{(i,): [["tt.divisibility", 16]] for i in range(4)}}
        k = triton.compile(ASTSource(mod.kernel, sig, {{"STAGES": {stages}}}, attrs),
                           target=GPUTarget("cuda", 90, 32), options={{"num_warps": 4}})
        open({str(out)!r}, "wb").write(k.asm["cubin"])
        """)
    subprocess.run([sys.executable, "-c", script], check=True,
                   env=dict(os.environ, TRITON_INTERPRET="0"))
    return out.read_bytes()


@pytest.mark.skipif(not sass.nvidia_tool("nvdisasm"), reason="Triton ships no nvdisasm here")
def test_the_reader_measures_a_known_ring(tmp_path):
    """A 4-stage ring of [16, 512] bf16 chunks (16 KB, 17 KB with x) reads as cp.async
    with 3 chunks in flight at a wait, of which the weights' (w, loaded evict-first: a
    copy with an L2 cache policy) 3 x 16 KB; without num_stages the loop holds plain
    loads."""
    ring = sass.kernel_stream_facts(_compile_ring(tmp_path, 4), threads=128)[0]
    assert ring["async_copy"] == "cp.async" and ring["stages"] == 4, ring
    assert ring["bytes_in_flight"] == 3 * (16 * 512 * 2 + 512 * 2), ring
    assert ring["weight_bytes_in_flight"] == 3 * 16 * 512 * 2, ring
    assert ring["copy_op"] == "LDGSTS.E.BYPASS.128", ring
    plain = sass.kernel_stream_facts(_compile_ring(tmp_path, 1), threads=128)[0]
    assert plain["async_copy"] == "none" and plain["stages"] == 1, plain
    assert plain["weight_bytes_in_flight"] is None, plain
    assert 0 < plain["bytes_in_flight"] <= 16 * 512 * 2 + 512 * 2, plain


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_ring_runs_in_the_interpreter(rows, dtype):
    """The interpreter runs the same ring (tl.range with num_stages): matvec tiles of
    one row (a [BN, BK] accumulator) and of four (a reduction per chunk), K in 8 chunks,
    match eager PyTorch on fresh inputs."""
    torch.manual_seed(rows)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.SiLU(),
                                torch.nn.Linear(64, 48, bias=False))
    x = torch.randn(rows, 256)
    engine = tilec.api.compile(model, (x,), workers=2, tile_k=32, dtype=dtype)
    assert "num_stages=4" in engine.data.kernel_source
    assert 'eviction_policy="evict_first"' in engine.data.kernel_source
    low = dtype == "bfloat16"
    eager = model.to(torch.bfloat16) if low else model
    for seed in (1, 2):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = eager(x.to(torch.bfloat16)).float() if low else eager(x)
        got = next(iter(engine.run(backend="interpret", input=x).values())).float()
        err = float((got - want).abs().max() / want.abs().max())
        assert err <= (2e-2 if low else 1e-5), err


def test_only_the_templates_own_inline_assembly_passes_the_kernel_check():
    """The prefetch hints are the kernel's only machine code: the source check accepts
    exactly the template's instructions, nothing pasted in their place."""
    from tilec.codegen.safety import UnsafeKernelError, check_kernel_source
    from tilec.ir.abi import KERNEL_NAME

    source = tilec.api.compile(str(Path(__file__).resolve().parents[2] / "examples/block.yaml"),
                               target="h200", workers=4, aot=False).data.kernel_source
    check_kernel_source(source, KERNEL_NAME)
    for edit in ('"prefetch.global.L1 [$1]; mov.u32 $0, 0;"', '"trap; mov.u32 $0, 0;"'), \
                ('asm="prefetch', 'asm=EVIL or "prefetch'):
        assert edit[0] in source
        with pytest.raises(UnsafeKernelError, match="inline assembly"):
            check_kernel_source(source.replace(edit[0], edit[1]), KERNEL_NAME)


class TwoChunks(nn.Module):
    """Llama's MLP block (an RMSNorm in float32, the residual stream's dtype, in the up
    projection's prologue; bfloat16 products) over 16 rows (a batched decode step's) and,
    with other weights, over 128 rows (a prefill chunk's)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(2048, 1024, bias=False, dtype=torch.bfloat16),
                           "down": nn.Linear(1024, 512, bias=False, dtype=torch.bfloat16)})
            for _ in range(2))
        self.norm = nn.Parameter(torch.ones(2048, dtype=torch.bfloat16))

    def forward(self, x16, x128):
        out = []
        for x, block in zip((x16, x128), self.blocks):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            out.append(block["down"](block["up"](h.to(torch.bfloat16) * self.norm)))
        return tuple(out)


@pytest.fixture(scope="module")
def gemm_engine():
    """Narrow GEMM tiles (16 columns) of 16 and of 128 rows, compiled for sm_90."""
    return tilec.api.compile(TwoChunks(), (torch.randn(16, 2048), torch.randn(128, 2048)),
                             target="h200", dtype="bfloat16", workers=16, tile_n=16)


def test_gemm_rings_in_the_compiled_code_are_the_cost_models(gemm_engine):
    """Every GEMM kind copies its weights with 16-byte evict-first cp.async through a ring
    of exactly the stages ir/stream.matmul_ring gives it, and keeps exactly the weight
    bytes in flight the cost model prices it with: >= 32 KB for 16-row tiles (a [512, 16]
    B chunk, two ahead); for 128 rows of A (float32 before the norm: 32 KB a trip; bf16
    after it: 16 KB) against 2 KB chunks of B, as many as 160 KB of shared memory holds
    (4 and 8 ahead)."""
    from tilec.ir.stream import matmul_ring
    from tilec.passes.cost import Streams

    summary = gemm_engine.summary()["kernel"]
    assert summary["aot"]["n_spills"] == 0 and summary["aot"]["shared"] <= 227 * 1024
    m = gemm_engine.data.manifest
    tg = m.schedule.taskgraph
    ops = tg.fused.graph.by_name()
    streams = Streams(tg.fused, tg.tilings, tg.buffers)
    rows = {r["opcode"]: r for r in summary["streaming"]}
    seen = set()
    for g, tl, opcode in zip(tg.fused.groups, tg.tilings, m.opcodes):
        if g.kind != "matmul":
            continue
        ring, r = matmul_ring(g, ops, tl), rows[opcode]
        task = next(t for t in tg.tasks if t.group == g.name)
        assert (r["async_copy"], r["copy_op"]) == ("cp.async", "LDGSTS.E.BYPASS.128"), r
        assert r["stages"] == ring.stages, (r, ring)
        assert r["weight_bytes_in_flight_per_worker"] == ring.b_in_flight == \
            streams.of(task).in_flight, (r, ring)
        seen.add((tl.block_m, ring.stages, ring.b_in_flight))
    assert seen == {(16, 3, 2 * 16384), (128, 5, 4 * 2048), (128, 9, 8 * 2048)}, seen
