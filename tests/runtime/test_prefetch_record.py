"""The weight prefetch in the task record (format 3): each matvec task names the span of
weight memory it streams, exactly its tile of the weight, so a GPU worker can ask L2 for
it before waiting; a stored span outside its weight pool is refused at load."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tilec.api
from engines import compiled, resign
from tilec.errors import EngineError
from tilec.ir.graph import DTYPE_BYTES
from tilec.ir.abi import NO_PREFETCH, PREFETCH_MAX_BYTES, PREFETCH_UNIT, prefetch_offset
from tilec.ir.record import PREFETCH_MIN_BYTES, weight_pools
from tilec.runtime import enginefile as engine_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_matvec_records_name_their_weight_tile():
    engine = tilec.api.compile(str(EXAMPLES / "llama_tiny.yaml"), target="h200", workers=8,
                               aot=False).data
    sched = engine.manifest.schedule
    at = prefetch_offset(engine.manifest.max_waits)
    slots = {i: p for i, p in enumerate(weight_pools(sched.pools))}
    buffers = {b.name: b for b in sched.buffers}
    tasks = sched.taskgraph.tasks
    checked = 0
    for rec, tid in zip(engine.tensors["tasks"].tolist(), engine.tensors["task_ids"].tolist()):
        slot, first, units = rec[at:at + 3]
        task = tasks[tid]
        # whole rows of a weight (a matmul's tile of W), big enough to be worth it
        spans = []
        for r in task.reads:
            b = buffers[r.buffer]
            item = DTYPE_BYTES[b.type.dtype]
            if b.kind != "weight" or r.numel * item < PREFETCH_MIN_BYTES or \
                    any(box != (0, n) for box, n in zip(r.box[1:], b.type.shape[1:])):
                continue
            if "gather" in task.group:
                continue   # reads rows of its region only
            lo = (b.offset + r.box[0][0] * (r.numel // (r.box[0][1] - r.box[0][0]))) * item
            spans.append((b.pool, lo, min(r.numel * item, PREFETCH_MAX_BYTES)))
        if not spans:
            assert (slot, first, units) == NO_PREFETCH, task.group
            continue
        # the whole units inside the largest span
        pool, lo, nbytes = max(spans, key=lambda x: x[2])
        want = -(-lo // PREFETCH_UNIT)
        assert (slots[slot].name, first, units) == \
            (pool, want, (lo + nbytes) // PREFETCH_UNIT - want)
        checked += 1
    assert checked >= 8   # the LM head's tiles at least


def test_load_refuses_a_prefetch_outside_its_pool(tmp_path):
    src = compiled("block")
    engine = engine_file.load(src)
    at = prefetch_offset(engine.manifest.max_waits)
    units = sum(p.numel * DTYPE_BYTES[p.dtype] // PREFETCH_UNIT
                for p in weight_pools(engine.manifest.schedule.pools))

    def out_of_pool(tensors):
        tensors["tasks"][0, at:at + 3] = tensors["tasks"].new_tensor([0, units - 1, 2])
    path = resign(src, tmp_path / "e", tensors=out_of_pool)
    with pytest.raises(EngineError, match="weight prefetch"):
        engine_file.load(path)

    def no_such_pool(tensors):
        tensors["tasks"][0, at:at + 3] = tensors["tasks"].new_tensor([7, 0, 1])
    with pytest.raises(EngineError, match="weight prefetch"):
        engine_file.load(resign(src, tmp_path / "f", tensors=no_such_pool))


def test_a_prefetch_beyond_32_gb_of_one_pool():
    """A device with more than 32 GB of weights (Llama-3-70B on two H200s, GLM-5 on
    eight) names spans past the 2^31st 16-byte unit: the record's int32 fields count
    PREFETCH_UNIT bytes, so a plan of a 34 GB weight packs (it overflowed the table)."""
    n = 1 << 17
    model = torch.nn.Linear(n, n + 4096, bias=False, device="meta", dtype=torch.bfloat16)
    engine = tilec.api.compile(model, (torch.empty(1, n, device="meta", dtype=torch.bfloat16),),
                               plan=True, target="h200", workers=8).data
    at = prefetch_offset(engine.manifest.max_waits)
    pool = weight_pools(engine.manifest.schedule.pools)[0]
    assert pool.numel * 2 > 16 << 31
    last = max(engine.tensors["tasks"][:, at + 1].tolist()) * PREFETCH_UNIT
    assert 16 << 31 < last < pool.numel * 2


def test_no_prefetch_past_what_the_record_addresses():
    """A pool over 512 GB (2^31 units: more than any GPU holds, so only a plan that does
    not fit, as GLM-5's on 8 h200s with its expert pools on every device) still packs:
    its spans past 512 GB name no prefetch (they overflowed the table)."""
    model = torch.nn.Linear(1 << 22, (1 << 16) + 256, bias=False, device="meta",
                            dtype=torch.bfloat16)
    engine = tilec.api.compile(model, (torch.empty(1, 1 << 22, device="meta",
                                                   dtype=torch.bfloat16),),
                               plan=True, target="h200", workers=8).data
    pool = weight_pools(engine.manifest.schedule.pools)[0]
    assert pool.numel * 2 > PREFETCH_UNIT << 31
    at = prefetch_offset(engine.manifest.max_waits)
    fields = [tuple(r) for r in engine.tensors["tasks"][:, at:at + 3].tolist()]
    assert NO_PREFETCH in fields
    assert all(first + units < 1 << 31 for _, first, units in fields)
