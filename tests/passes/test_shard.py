"""passes/shard.py: a device of a multi-device engine holds only the box of a weight its
tasks touch (a slice on a non-leading dim: a dense weight cut on its columns, an expert
pool cut on its output columns), its views rewritten to the shard's strides; results
equal eager PyTorch, the memory plan counts the shard, and the verifier and the load
checks refuse an address outside the box."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml

import tilec.api
from engines import EXAMPLES, read_raw, resign
from tilec.errors import EngineError
from tilec.ir.graph import DTYPE_BYTES, Operand
from tilec.ir.tasks import Region
from tilec.passes.shard import shard_view
from tilec.passes.verify import verify
from tilec.runtime import enginefile as engine_file

K, N = 64, 64


class ColumnSplit(torch.nn.Module):
    """x @ w with w [K, N]: tiles split the output columns, w's dim 1 (not leading)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(K, N) * 0.1)

    def forward(self, x):
        return torch.relu(x @ self.w)


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    model = ColumnSplit()
    x = torch.randn(2, K)
    return model, x, tilec.api.compile(model, (x,), devices=2, workers=2, tile_n=16)


def _buffer(part, name):
    return next(b for b in part.manifest.schedule.buffers if b.name == name)


def _weight_name(part):
    return next(b.name for b in part.manifest.schedule.buffers
                if b.kind == "weight" and b.type.shape == (K, N))


def test_shard_view_keeps_linear_views_and_refuses_the_rest():
    shape, strides = (8, 32, 64), (16 * 64, 64, 1)          # [E, 32, H] cut to [E, 16, H]
    pool = Operand("p", shape, (32 * 64, 64, 1), 0)
    assert shard_view(pool, shape, strides) == Operand("p", shape, strides, 0)
    t = Operand("p", (8, 64, 32), (32 * 64, 1, 64), 0)      # each expert transposed
    assert shard_view(t, shape, strides) == Operand("p", (8, 64, 32), (16 * 64, 1, 64), 0)
    one = Operand("p", (16, 64), (64, 1), 3 * 32 * 64 + 5 * 64)   # expert 3, rows 5-20
    assert shard_view(one, shape, strides).offset == 3 * 16 * 64 + 5 * 64
    flat = Operand("p", (8 * 32, 64), (64, 1), 0)           # rows of all experts: carries
    assert shard_view(flat, shape, strides) is None


def test_dense_weight_cut_on_columns_is_held_half_per_device(dense):
    model, x, engine = dense
    name = _weight_name(engine.parts[0])
    itemsize = DTYPE_BYTES[_buffer(engine.parts[0], name).type.dtype]
    boxes = []
    for part in engine.parts:
        b = _buffer(part, name)
        boxes.append(b.shard)
        assert b.stored[1] - b.stored[0] == K * N // 2      # half of it, compact
        weights = sum(p.numel for p in part.manifest.schedule.pools if p.kind == "weight")
        assert weights * itemsize < K * N * itemsize * 0.6 + 4096
    assert boxes == [((0, K), (0, N // 2)), ((0, K), (N // 2, N))]
    assert engine.verify().ok
    want = model(x).detach()
    for backend in ("interpret", "reference"):
        got = engine.run(backend=backend, x=x)["output0"]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), backend


def test_region_outside_the_shard_is_a_violation(dense):
    _, _, engine = dense
    sched = engine.parts[1].manifest.schedule
    name = _weight_name(engine.parts[1])
    (a, z) = _buffer(engine.parts[1], name).shard[1]
    tg = sched.taskgraph
    t = next(t for t in tg.tasks if any(r.buffer == name for r in t.reads))
    reads = tuple(Region(r.buffer, (r.box[0], (0, z - a))) if r.buffer == name else r
                  for r in t.reads)   # columns the other device holds
    tasks = tuple(replace(x, reads=reads) if x.id == t.id else x for x in tg.tasks)
    report = verify(replace(sched, taskgraph=replace(tg, tasks=tasks)))
    assert any("regions_in_buffers" in v and "its shard" in v for v in report.violations)


def _edit_device(d, fn):
    def edit(meta):
        plain = json.loads(meta[f"manifest.{d}"])
        fn(plain)
        meta[f"manifest.{d}"] = json.dumps(plain, separators=(",", ":"), sort_keys=True)
    return edit


def _sharded(plain):
    return next(b for b in plain["schedule"]["buffers"] if b["shard"])


def _widen_shard(plain):
    _sharded(plain)["shard"][1] = [0, N]          # claims all columns; stores half


def _stretch_view(plain):
    name = _sharded(plain)["name"]
    for op in plain["schedule"]["taskgraph"]["fused"]["graph"]["ops"]:
        for x in op["inputs"]:
            if x["value"] == name:
                x["strides"] = [s * 2 for s in x["strides"]]   # the unsharded reach


@pytest.mark.parametrize("edit, words", [(_widen_shard, "not its shard"),
                                         (_stretch_view, "reaches element")])
def test_load_refuses_addresses_outside_the_shard(dense, tmp_path, edit, words):
    _, _, engine = dense
    path = tmp_path / "dense.engine"
    engine.save(path)
    assert "manifest.1" in read_raw(path)[0]
    bad = resign(path, tmp_path / "bad.engine", meta=_edit_device(1, edit))
    with pytest.raises(EngineError, match=words):
        engine_file.load(bad, trust_engine_code=True)


def test_expert_pools_held_per_device_in_glm_tiny():
    """examples/glm_dsa_tiny_4dev.yaml: each MLA device holds its own columns of every
    expert of a pool it works on, a compact [E, cols, H] shard, no more."""
    engine = tilec.api.compile(str(EXAMPLES / "glm_dsa_tiny_4dev.yaml"))
    seen = 0
    for part in engine.parts[1:]:
        for b in part.manifest.schedule.buffers:
            if "mlp_experts" not in b.name or b.kind != "weight" or b.stored == (0, 0):
                continue
            assert b.shard, b.name        # a column slice of every expert: sharded
            assert b.shard[0] == (0, b.type.shape[0])   # every expert (indexed reads)
            held = b.stored[1] - b.stored[0]
            cols = b.shard[1][1] - b.shard[1][0]
            assert held == b.type.numel * cols // b.type.shape[1] < b.type.numel
            seen += 1
    assert seen >= 4
