"""Matmul widths chosen per stage (tile.balance_widths), the stage estimate they are
chosen by (cost.list_makespan), and a kernel with the chosen widths, 8 and 16 columns
side by side, still computing the model."""
from pathlib import Path

import pytest
import torch

import tilec.api as tilec_api
from tilec.compiler import build
from tilec.compiler import config as cfgmod
from tilec.compiler.options import target_options
from tilec.passes.cost import list_makespan, task_times
from tilec.passes.tile import _descend, group_depths, tile
from tilec.runtime.executors import make_executor

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "llama_tiny.yaml")


def test_list_makespan_counts_partly_filled_rounds():
    assert list_makespan([(10.0, 128)], 132) == 10.0
    assert list_makespan([(10.0, 192)], 132) == 20.0        # a second, partial round
    # the 4 spare workers take two short tiles each meanwhile, the other 120 short
    # tiles fill half a round
    assert list_makespan([(10.0, 128), (5.0, 128)], 132) == 15.0
    assert list_makespan([(5.0, 128), (10.0, 128)], 132) == 15.0   # longest first
    assert list_makespan([], 4) == 0.0


@pytest.fixture(scope="module")
def tiny_engine():
    """llama_tiny for h200 on 12 workers, float32 so it can be compared with eager."""
    return tilec_api.compile(EXAMPLE, target="h200", workers=12, dtype="float32", aot=False)


def _stage_spans(taskgraph, options) -> dict[int, float]:
    """Each stage's (groups of one depth) LPT span, from every task's own predicted time."""
    fused = taskgraph.fused
    depth = dict(zip((g.name for g in fused.groups), group_depths(fused)))
    times = task_times(taskgraph, options.target)
    jobs: dict[int, list] = {}
    for task, t in zip(taskgraph.tasks, times):
        jobs.setdefault(depth[task.group], []).append((t, 1))
    return {d: list_makespan(j, options.target.workers) for d, j in jobs.items()}


@pytest.mark.parametrize("workers,shorter", [(4, True), (12, True), (32, False)])
def test_balanced_widths_never_lengthen_a_stage(tiny_engine, workers, shorter):
    """Against the rule without a cost model (narrow each matmul until it has a tile per
    worker), whose widths are among those tried: no stage is longer, some are shorter,
    except on 32 workers, where both cut every matmul into its narrowest tiles."""
    fused = tiny_engine.data.manifest.schedule.taskgraph.fused
    options = target_options("h200", workers)
    balanced = _stage_spans(tile(fused, options.tiles, options.target), options)
    narrowed = _stage_spans(tile(fused, options.tiles), options)
    assert balanced.keys() == narrowed.keys()
    for d in balanced:
        assert balanced[d] <= narrowed[d] + 1e-9, (d, balanced[d], narrowed[d])
    assert (sum(balanced.values()) < sum(narrowed.values())) == shorter


def test_stage_mixes_widths(tiny_engine):
    """On 12 workers the q, k and v projections (64, 32 and 32 columns) read the same
    input: the cheapest stage cuts them into tiles of different widths."""
    tg = tiny_engine.data.manifest.schedule.taskgraph
    ops = tg.fused.graph.by_name()
    widths = {t.block_n for t, g in zip(tg.tilings, tg.fused.groups)
              if g.kind == "matmul" and ops[g.anchor].inputs[0].shape[-1] == 64}
    assert {8, 16} <= widths


def test_balanced_kernel_matches_eager(tiny_engine):
    cfg = cfgmod.load_config(EXAMPLE)
    eager, _ = build.build_model(cfg)
    ex = make_executor(tiny_engine.data, "interpret")
    for pos, token in enumerate([5, 9, 2]):
        out = ex.run({"token": torch.tensor([token]), "pos": torch.tensor([pos])})
        ref = eager(torch.tensor([token]), torch.tensor([pos]))
        assert (out["logits"] - ref["logits"]).abs().max().item() <= 1e-4, f"pos {pos}"


def test_descent_ends_where_no_single_width_change_helps():
    """Stages with more than MAX_COMBINATIONS width combinations are improved one group
    at a time; here Llama-3.2-1B's q, k and v tiles on h200 (us, tiles per width)."""
    jobs = [[(20.95, 64), (12.32, 128)],
            [(12.32, 32), (8.01, 64), (5.5, 128)],
            [(12.32, 32), (8.01, 64), (5.5, 128)]]

    def cost(members, pick):
        return (round(list_makespan([jobs[i][pick[i]] for i in members], 132), 6),
                sum(jobs[i][pick[i]][1] for i in members))
    choices = [[None] * len(j) for j in jobs]       # only their number matters here
    pick = _descend([0, 1, 2], [0, 1, 2], {}, choices, cost)
    alone = {i: min(range(len(jobs[i])), key=lambda c: cost([i], {i: c})) for i in range(3)}
    assert cost([0, 1, 2], pick) < cost([0, 1, 2], alone)     # 20.95 us against 23.32
    for i in range(3):
        for c in range(len(jobs[i])):
            assert cost([0, 1, 2], {**pick, i: c}) >= cost([0, 1, 2], pick)
