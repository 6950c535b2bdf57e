"""Values known at compile time fold to constants (compiler/frontend.py:
_Lowering.fold): what a forward computes from shapes and constant buffers only (a causal
mask from arange and comparisons, positions, RoPE tables) becomes a weight, or a fill
where it is one number; values that read an input, a parameter or state stay ops. And a
forward's outputs are tensors, named by a returned dict's (or dict subclass's) keys."""
from collections import OrderedDict

import pytest
import torch

import tilec.api as tilec_api
from tilec.compiler.frontend import export, lower
from tilec.errors import ConfigError


class MaskedAttention(torch.nn.Module):
    """Causal attention over a sequence, its mask built in forward() from shapes."""

    def __init__(self, dim=16):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, dim, 2) / dim))

    def forward(self, x):
        n = x.shape[0]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        angles = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        q = q * torch.cat([angles, angles], dim=-1).cos()
        keep = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
        scores = (q @ k.t()).masked_fill(torch.logical_not(keep), float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def test_shape_only_values_fold_and_match_eager():
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    x, fresh = torch.randn(8, 16), torch.randn(8, 16)
    lowered = lower(export(model, (x,)))
    computed = {op.name.rstrip("_0123456789") for op in lowered.graph.ops
                if op.kind not in ("input", "weight")}
    # neither the mask nor the RoPE angles are computed by the engine: both are weights
    assert not computed & {"arange", "le", "logical_not", "cos", "cat"}, computed
    assert {op.kind for op in lowered.graph.ops if op.name.startswith(("logical_not", "cos"))} \
        == {"weight"}
    engine = tilec_api.compile(model, (x,), workers=2)
    want = model(fresh)
    for backend in ("reference", "interpret"):
        got = engine.run(backend=backend, x=fresh)["output0"]
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), backend


def test_parameters_and_inputs_are_not_folded():
    """A parameter's view stays a view of the one weight (folding it would copy it), and
    a value that reads the input is computed at run time."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return x @ self.w.t() + torch.ones(4)

    lowered = lower(export(Model(), (torch.randn(2, 8),)))
    weights = [op for op in lowered.graph.ops if op.kind == "weight"]
    assert [op.name for op in weights] == ["p_w"]   # the ones are a fill the add reads
    assert [op.kind for op in lowered.graph.ops if op.kind not in ("input", "weight")] \
        in (["matmul", "elementwise"], ["matmul"])


class Named(torch.nn.Module):
    def forward(self, x):
        return OrderedDict(double=x * 2, negated=-x)


def test_a_dict_subclass_names_the_outputs():
    engine = tilec_api.compile(Named(), (torch.randn(4, 8),), workers=1)
    assert engine.output_names == ("double", "negated")


class ReturnsObject(torch.nn.Module):
    def forward(self, x):
        return {"y": x + 1, "state": object()}


def test_an_output_that_is_no_tensor_is_refused_by_its_path():
    with pytest.raises(ConfigError, match=r"forward\(\) returns a object at output\['state'\]"):
        tilec_api.compile(ReturnsObject(), (torch.randn(4, 8),), workers=1)
