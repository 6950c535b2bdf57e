"""The generated persistent kernel compiles for sm_90 (H100/H200) on a machine without a
GPU: `triton.compile(..., target=GPUTarget("cuda", 90, 32))`, in a child process with
TRITON_INTERPRET=0 because this process runs Triton in interpreter mode."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import tilec.api
from tilec.codegen import aot
from tilec.codegen.loader import load_kernel
from tilec.compiler.build import build_model
from tilec.compiler.config import NO_PREFILL, load_config
from tilec.ir.abi import POOL_POINTER_TYPES
from tilec.models.llama import LlamaPrefillStep

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
H100_SMEM = 228 * 1024


class EmbedMix(nn.Module):
    """Gather, matmul, softmax and concat in one engine, with an int64 input pool."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.fc = nn.Linear(32, 32)

    def forward(self, idx, x):
        h = self.fc(self.emb(idx))
        return torch.cat([torch.softmax(h, dim=-1), x], dim=-1)


class ZeroDAndEmpty(nn.Module):
    """0-d tensors (a buffer, a constant) and empty ones (a cat piece, a product over no
    columns, a sum of none)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(8.0))
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        h = self.fc(x) * self.scale * torch.tensor(0.5)
        h = torch.cat([h + 1, (h * 2)[..., 16:]], -1)
        return h + x[:, :0] @ torch.ones(0, 16) + x[:, :0].sum(-1, keepdim=True)


class ChosenExperts(nn.Module):
    """Expert slots: each batch entry's B matrix is the pool's at a run-time id."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(64, 8, bias=False)
        self.pool = nn.Parameter(torch.randn(8, 128, 64))

    def forward(self, x):
        ids = torch.topk(self.router(x), 2).indices.view(-1)
        return torch.bmm(x.view(1, 1, 64).expand(2, 1, 64), self.pool[ids].transpose(1, 2))


def batched(path: Path, batch: int):
    """The decoder model.yaml at `path` with `model.batch` set, decode-only (a batch
    engine's prefill entry is compiled below on its own)."""
    cfg = load_config(path)
    return replace(cfg, model=replace(cfg.model, batch=batch, prefill=NO_PREFILL))


def prefill_model(path: Path, chunk: int, batch: int = 1):
    """The prefill step of chunk `chunk` of the decoder model.yaml at `path`."""
    step, _ = build_model(load_config(path))
    return LlamaPrefillStep(step.cfg, step.max_seq_len, chunk, batch)


def block_engine(**options):
    return tilec.api.compile(str(EXAMPLES / "block.yaml"), **options)


def embed_mix_engine():
    return tilec.api.compile(EmbedMix(), (torch.randint(0, 64, (4,)), torch.randn(4, 8)))


ENGINES = {
    "block-cpu-fp32": lambda: block_engine(),
    "block-h200-bf16": lambda: block_engine(target="h200", workers=8, dtype="bfloat16",
                                            aot=False),
    "embed_mix": embed_mix_engine,
    "chosen_experts-h200-bf16": lambda: tilec.api.compile(
        ChosenExperts(), (torch.randn(1, 64, dtype=torch.bfloat16),), target="h200", workers=8, dtype="bfloat16",
        aot=False),
    "zero_d_and_empty": lambda: tilec.api.compile(ZeroDAndEmpty(), (torch.randn(4, 16),),
                                                  workers=2),
    # attention: one chunk per head (cpu), and split into partials + merge with a
    # skip test for chunks past the position (bf16)
    "llama_tiny-cpu-fp32": lambda: tilec.api.compile(str(EXAMPLES / "llama_tiny.yaml")),
    "llama_tiny-split-bf16": lambda: tilec.api.compile(
        str(EXAMPLES / "llama_tiny.yaml"), target="h200", workers=8, dtype="bfloat16",
        kv_chunk=16, aot=False),
    # batched decode: 4 sequences per step (matmuls of 4 rows, per-slot KV appends in a
    # matmul epilogue and a row group, attention per slot and kv head)
    "llama_tiny-batch4-split-bf16": lambda: tilec.api.compile(
        batched(EXAMPLES / "llama_tiny.yaml", 4), target="h200", workers=8,
        dtype="bfloat16", kv_chunk=16, aot=False),
    # chunked prefill: 16 rows per matmul (tensor-core tiles), a KV append of 16
    # positions (a row group), attention of 16 x groups query rows per kv head, causal
    "llama_tiny-prefill16-split-bf16": lambda: tilec.api.compile(
        prefill_model(EXAMPLES / "llama_tiny.yaml", 16),
        (torch.zeros(16, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)),
        target="h200", workers=8, dtype="bfloat16", kv_chunk=16, aot=False),
    # a prefill chunk into one run-time slot of a batch-4 cache (a gather of the slot's
    # keys and values, an append at slot-and-position rows) and the `last` row alone
    # through the lm_head
    "llama_tiny-prefill16-batch4-bf16": lambda: tilec.api.compile(
        prefill_model(EXAMPLES / "llama_tiny.yaml", 16, batch=4),
        (torch.zeros(16, dtype=torch.int64),) + (torch.zeros(1, dtype=torch.int64),) * 3,
        target="h200", workers=8, dtype="bfloat16", kv_chunk=16, aot=False),
    # top-k rounds, and a split attention whose values (the 32-wide latent) are wider
    # than its key chunks (16)
    "glm_dsa_tiny-split-bf16": lambda: tilec.api.compile(
        str(EXAMPLES / "glm_dsa_tiny.yaml"), target="h200", workers=8, dtype="bfloat16",
        kv_chunk=16, aot=False),
}


def test_signature_matches_the_rendered_kernel():
    engine = embed_mix_engine()
    pools = engine.data.manifest.schedule.pools
    fn = load_kernel(engine.data.kernel_source, aot.KERNEL_NAME)
    sig = aot.signature(pools)
    assert list(sig) == list(fn.arg_names)
    assert sig["tasks"] == "*i32" and sig["args"] == "*i64" and sig["step"] == "i32"
    assert {p.dtype for p in pools} >= {"float32", "int64"}
    for p in pools:
        assert sig[p.name] == POOL_POINTER_TYPES[p.dtype]


@pytest.mark.parametrize("name", list(ENGINES))
def test_compiles_for_sm90(name):
    engine = ENGINES[name]()
    info = aot.compile_for_gpu(engine.data.kernel_source, engine.data.manifest.schedule.pools,
                               arch=90)
    assert info["name"] == "tilec_engine"
    assert info["cubin"][:4] == b"\x7fELF"
    assert info["cubin_size"] == len(info["cubin"]) > 0
    assert re.fullmatch(r"sm_90a?", info["ptx_target"])
    assert 0 <= info["shared"] <= H100_SMEM, info["shared"]
    if info["n_regs"] is not None:
        assert 0 < info["n_regs"] <= 255
    if info["n_spills"] is not None:
        assert info["n_spills"] >= 0


def test_profiling_variant_compiles_and_reads_the_global_timer():
    """`run --profile` on a GPU launches with PROFILE=True: each task stamps %globaltimer."""
    engine = block_engine(target="h200", workers=8, dtype="bfloat16", aot=False)
    pools = engine.data.manifest.schedule.pools
    plain = aot.compile_for_gpu(engine.data.kernel_source, pools, arch=90)
    stamped = aot.compile_for_gpu(engine.data.kernel_source, pools, arch=90, profile=True)
    assert stamped["cubin"][:4] == b"\x7fELF" and stamped["cubin"] != plain["cubin"]
    assert stamped["reads_global_timer"] and not plain["reads_global_timer"]


def test_a_bad_kernel_is_a_one_line_aot_error():
    engine = embed_mix_engine()
    broken = engine.data.kernel_source.replace("tl.load(queue_start + worker + 1)",
                                               "tl.load(queue_start + worker + undefined_name)")
    assert broken != engine.data.kernel_source
    with pytest.raises(aot.AOTError) as info:
        aot.compile_for_gpu(broken, engine.data.manifest.schedule.pools)
    assert "sm_90" in str(info.value) and len(str(info.value).splitlines()) == 1
