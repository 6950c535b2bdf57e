"""Experts in a static schedule: `pool[ids]` followed by a batched matmul is one matmul
whose B operand is the whole expert pool, each batch entry (an expert slot) reading
the matrix its run-time id names. Both CPU backends against eager PyTorch; the
verifier's view of such a read (every expert: sound), the bytes a step moves (the
chosen experts only), and an id out of range (one RunError, nothing read outside the
pool)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tilec.api
from tilec.errors import RunError
from tilec.ir.graph import is_indexed_matmul
from tilec.passes.verify import verify

EXPERTS, SLOTS, D, HIDDEN = 6, 2, 32, 16
BACKENDS = ("interpret", "reference")


class RoutedExperts(nn.Module):
    """A router's top-k experts, each a SwiGLU from stacked pools, weighted and summed
    (tilec/models/deepseek.py's Experts, with a plain softmax router)."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, EXPERTS, bias=False)
        self.gate_proj = nn.Parameter(torch.randn(EXPERTS, HIDDEN, D) * 0.3)
        self.up_proj = nn.Parameter(torch.randn(EXPERTS, HIDDEN, D) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(EXPERTS, D, HIDDEN) * 0.3)

    def forward(self, x):
        top = torch.topk(torch.softmax(self.router(x), dim=-1), SLOTS)
        ids, weights = top.indices.view(-1), top.values.view(SLOTS, 1, 1)
        xs = x.view(1, 1, D).expand(SLOTS, 1, D)
        gate = torch.bmm(xs, self.gate_proj[ids].transpose(1, 2))
        up = torch.bmm(xs, self.up_proj[ids].transpose(1, 2))
        out = torch.bmm(F.silu(gate) * up * weights, self.down_proj[ids].transpose(1, 2))
        return out.permute(1, 2, 0).sum(-1)


class GivenExperts(nn.Module):
    """The ids are an input: a bad one reaches the kernel."""

    def __init__(self):
        super().__init__()
        self.pool = nn.Parameter(torch.randn(EXPERTS, D, HIDDEN))

    def forward(self, x, ids):
        return torch.bmm(x.view(1, 1, D).expand(SLOTS, 1, D), self.pool[ids])


@pytest.fixture(scope="module", params=[1, 3])
def routed(request):
    torch.manual_seed(0)
    model = RoutedExperts().eval()
    return model, tilec.api.compile(model, (torch.randn(1, D),), workers=request.param)


def test_experts_match_eager(routed):
    model, engine = routed
    ops = engine.data.manifest.schedule.taskgraph.fused.graph.ops
    assert sum(is_indexed_matmul(op) for op in ops) == 3
    assert not any(op.kind == "gather" for op in ops)   # no copy of the chosen experts
    for seed in range(3):   # fresh inputs choose other experts
        x = torch.randn(1, D, generator=torch.Generator().manual_seed(seed))
        want = model(x).detach()
        for backend in BACKENDS:
            got = engine.run(backend=backend, x=x)["output0"]
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (seed, backend)


def test_a_slot_reads_the_whole_pool_for_the_verifier(routed):
    """Which expert a slot reads is known only at run time: its region spans every
    expert, and the verifier refuses a schedule whose region claims fewer."""
    _, engine = routed
    schedule = engine.data.schedule()   # the queues and waits of the task table
    tg = schedule.taskgraph
    ops = tg.fused.graph.by_name()
    anchors = {g.name: ops[g.anchor] for g in tg.fused.groups if g.anchor}
    slot_tasks = [t for t in tg.tasks if t.group in anchors and is_indexed_matmul(anchors[t.group])]
    assert slot_tasks and verify(schedule).ok
    task = slot_tasks[0]
    pool = anchors[task.group].inputs[1].value
    narrowed = tuple(replace(r, box=((0, 1),) + r.box[1:]) if r.buffer == pool else r
                     for r in task.reads)
    tasks = tuple(replace(t, reads=narrowed) if t.id == task.id else t for t in tg.tasks)
    broken = verify(replace(schedule, taskgraph=replace(tg, tasks=tasks)))
    assert not broken.ok and not broken.checks["indexed_reads_whole"]
    assert any(f"expert pool {pool}" in v for v in broken.violations)


def test_bytes_moved_are_the_chosen_experts(routed):
    """Cost and inspect count what a step streams: SLOTS experts of each pool, not all."""
    _, engine = routed
    tg = engine.data.manifest.schedule.taskgraph
    pools = ("p_gate_proj", "p_up_proj", "p_down_proj")
    for pool in pools:
        moved = sum(n for t in tg.tasks for name, n in t.moved if name == pool)
        assert moved == SLOTS * HIDDEN * D * 4, pool
    router = D * EXPERTS * 4
    assert engine.summary()["bytes"]["weights"] == 3 * SLOTS * HIDDEN * D * 4 + router


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_id_out_of_range(backend):
    torch.manual_seed(0)
    model = GivenExperts().eval()
    engine = tilec.api.compile(model, (torch.randn(1, D), torch.tensor([0, 1])), workers=2)
    x = torch.randn(1, D)
    good = torch.tensor([5, 2])
    assert torch.allclose(engine.run(backend=backend, x=x, ids=good)["output0"],
                          model(x, good).detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(RunError) as info:
        engine.run(backend=backend, x=x, ids=torch.tensor([1, EXPERTS]))
    assert f"index {EXPERTS} is out of range [0, {EXPERTS}) (the matrices of its pool) in " \
           f"matmul" in str(info.value)
    assert len(str(info.value).splitlines()) == 1


class PickScores(nn.Module):
    """A router's weights read back by id: a gather from a table one value wide."""

    def forward(self, x):
        scores = torch.sigmoid(x)                                  # [1, E]
        ids = torch.topk(x, SLOTS).indices.view(-1)
        return F.embedding(ids, scores.view(EXPERTS, 1)).view(-1) * 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_from_a_one_wide_table(backend):
    """(The kernel once named undefined columns in a gather of width 1.)"""
    model = PickScores()
    engine = tilec.api.compile(model, (torch.randn(1, EXPERTS),), workers=2)
    x = torch.randn(1, EXPERTS)
    assert torch.allclose(engine.run(backend=backend, x=x)["output0"], model(x), atol=1e-6)
