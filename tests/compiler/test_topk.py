"""Top-k selection and what models build from its indices (a mask filled at the selected
positions), compiled and run on both CPU backends against eager PyTorch on fresh random
rows. torch.topk leaves the order of equal values open; tilec puts the lowest index first
(NaN first when largest, last when smallest, as torch ranks NaN), which is what a
stable sort gives, so rows with ties are checked against that."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tilec.api

BACKENDS = ("reference", "interpret")


class TopK(nn.Module):
    def __init__(self, k: int, largest: bool = True):
        super().__init__()
        self.k, self.largest = k, largest

    def forward(self, x):
        # the scale makes the selection read a computed row, fused into the topk's task
        values, indices = torch.topk(x * 2.0, self.k, largest=self.largest)
        return values, indices


def lowest_index_topk(x: torch.Tensor, k: int, largest: bool = True):
    ranked = torch.sort(x, dim=-1, descending=largest, stable=True)
    return ranked.values[..., :k], ranked.indices[..., :k]


def run_all(module, *inputs, workers=2):
    engine = tilec.api.compile(module, inputs, workers=workers)
    names = engine.input_names
    for backend in BACKENDS:
        yield backend, engine.run(backend=backend, **dict(zip(names, inputs)))


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape, k, largest", [
    ((3, 40), 5, True), ((2, 3, 24), 24, True), ((4, 17), 1, True), ((3, 40), 6, False)])
def test_topk_matches_torch(shape, k, largest):
    x = randn(*shape, seed=k)          # distinct values: torch's order is fully defined
    want = torch.topk(x * 2.0, k, largest=largest)
    for backend, out in run_all(TopK(k, largest), x):
        assert torch.equal(out["output0"], want.values), backend
        assert torch.equal(out["output1"], want.indices), backend


def tied_rows(width: int, seed: int) -> torch.Tensor:
    """Rows of few distinct values (many ties), with -inf and NaN among them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 4, (3, width), generator=g).float()
    x[0, width // 3] = float("-inf")
    x[1, [2, width - 1]] = float("nan")
    x[2, :] = float("-inf")            # a row with nothing but ties at -inf
    return x


@pytest.mark.parametrize("width, k, largest", [(24, 8, True), (24, 6, False),
                                               (5000, 4, True)])
def test_ties_go_to_the_lowest_index(width, k, largest):
    """5000 is wider than a cpu row chunk (4096): the picks must hold across chunks."""
    x = tied_rows(width, seed=width + k)
    values, indices = lowest_index_topk(x * 2.0, k, largest)
    torch_values = torch.topk(x * 2.0, k, largest=largest).values
    for backend, out in run_all(TopK(k, largest), x):
        assert torch.equal(out["output1"], indices), backend
        got = out["output0"]
        assert torch.equal(got.isnan(), values.isnan()), backend
        assert torch.equal(got.nan_to_num(), values.nan_to_num()), backend
        # the values are torch.topk's own: only the order of equal ones is open
        assert torch.equal(got.nan_to_num(), torch_values.nan_to_num()), backend


class SelectionMask(nn.Module):
    """As a sparse-attention indexer builds it: 0 at the top-k positions, -inf elsewhere."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, scores):
        top = torch.topk(scores, self.k).indices
        return torch.full_like(scores, float("-inf")).index_fill(0, top, 0.0)


class ScatterValues(nn.Module):
    """index_put of one value per index into a computed [rows, n] value, along dim 1,
    with negative indices (they wrap)."""

    def forward(self, x, idx, values):
        out = x + 1.0
        out[:, idx] = values * 3.0
        return out


def test_a_mask_built_from_the_selected_indices():
    scores = randn(24, seed=3)
    want = SelectionMask(5)(scores)
    for backend, out in run_all(SelectionMask(5), scores):
        assert torch.equal(out["output0"], want), backend


def test_index_put_of_values_at_run_time_positions():
    x = randn(3, 10, seed=4)
    engine = tilec.api.compile(ScatterValues(), (x, torch.tensor([7, 0, -1, 3]), randn(4, seed=5)))
    for backend in BACKENDS:
        for trial in range(2):   # fresh indices each run: positions are data, not constants
            # distinct positions in [-5, 5): the negative ones count from the end
            idx = torch.randperm(10, generator=torch.Generator().manual_seed(trial))[:4] - 5
            values = randn(4, seed=10 + trial)
            want = ScatterValues()(x, idx, values)
            out = engine.run(backend=backend, x=x, idx=idx, values=values)
            assert torch.equal(out["output0"], want), (backend, trial)


class FillThenCat(nn.Module):
    """A fill that is stored (a concat reads it from a buffer), not taken as a number."""

    def forward(self, x):
        return torch.cat([x, torch.full_like(x, 3.5)], dim=-1) * 2.0


def test_a_fill_read_from_a_buffer():
    x = randn(4, 8, seed=6)
    for backend, out in run_all(FillThenCat(), x):
        assert torch.equal(out["output0"], FillThenCat()(x)), backend


class TopKFirstDim(nn.Module):
    def forward(self, x):
        return torch.topk(x, 2, dim=0).values


def test_topk_over_a_leading_dim_is_a_view_that_makes_it_the_last():
    x = randn(4, 8, seed=7)
    for backend, out in run_all(TopKFirstDim(), x):
        assert torch.equal(out["output0"], TopKFirstDim()(x)), backend
