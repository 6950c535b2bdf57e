"""tilec against torch's own operator samples (OpInfo, `op_db`), for every op it supports.

For each OpInfo whose ATen op tilec has a handler for (`supported_ops()`), its first
float32 CPU samples (at most SAMPLES, small ones) become one module that returns every
sample's result; tilec compiles it and both CPU backends must match eager PyTorch on
the samples' own values. A sample that uses a variant tilec refuses is skipped only
when compiling it alone raises UnsupportedOpError (counted, and the count checked);
anything else, a wrong value or another error, fails.
"""
from __future__ import annotations

import os
import sys
import types
import unittest

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import tilec.api
from tilec.compiler.frontend import supported_ops
from tilec.errors import UnsupportedOpError

SAMPLES = int(os.environ.get("TILEC_OPINFO_SAMPLES", "3"))   # per op
MAX_NUMEL = 2048       # elements per tensor: larger samples add time, not coverage
REL_TOL = 1e-4         # of the largest value, as tests/compiler/test_ops.py


def _op_db():
    # torch.testing's common_utils imports `expecttest` (a test-only package of torch's
    # own suite) for its TestCase base class; op_db needs none of it
    if "expecttest" not in sys.modules:
        try:
            import expecttest  # noqa: F401
        except ImportError:
            sys.modules["expecttest"] = types.SimpleNamespace(TestCase=unittest.TestCase)
    from torch.testing._internal.common_methods_invocations import op_db
    return op_db


# OpInfos named after the Python function rather than the ATen op tilec sees
ALIASES = {
    "_softmax": ["softmax"], "_log_softmax": ["log_softmax"],
    "silu": ["nn.functional.silu"], "embedding": ["nn.functional.embedding"],
    "native_layer_norm": ["nn.functional.layer_norm"],
    "native_group_norm": ["nn.functional.group_norm"],
    "logical_not": ["nn.functional.scaled_dot_product_attention"],
}
# supported ops with no OpInfo of their own: export-internal ops, in-place forms of
# covered ops, views that every other op's samples go through, and `index` (x[ids]:
# its samples are __getitem__'s, which mix slices and masks; tests/compiler/
# test_experts.py checks it)
NO_OPINFO = {"_assert_tensor_metadata", "_to_copy", "_unsafe_view", "alias", "detach",
             "lift_fresh_copy", "index_copy_", "index_put_", "index"}

BOOL_ONLY = {"bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not"}

# samples (of the first SAMPLES) that use variants tilec refuses with UnsupportedOpError,
# by OpInfo: the test checks these counts, so coverage that changes shows
REFUSED = {
    "softmax.with_dtype": 3, "log_softmax.with_dtype": 3,   # float64 results
    "index_copy": 1,     # values that vary along a dim other than the indexed one
    "index_put": 3,      # that, a bool index, indices along several dims
    "nn.functional.scaled_dot_product_attention": 1,   # dropout_p > 0 (native_dropout)
    "scalar_tensor": 3,  # a model that returns a number, not a tensor made of its inputs
}


def _base(overload: str) -> str:
    return overload.split(".")[1]


def _dtype(op) -> torch.dtype | None:
    """float32, or bool for the ops tilec takes only bools for (bitwise ops)."""
    dtypes = op.supported_dtypes("cpu")
    if torch.float32 in dtypes:
        return torch.float32
    return torch.bool if op.aten_name in BOOL_ONLY and torch.bool in dtypes else None


def selected_opinfos() -> dict[str, object]:
    """OpInfo id -> OpInfo, for every supported op's OpInfos that run float32 on CPU
    (bool for BOOL_ONLY)."""
    wanted = {_base(name) for name in supported_ops()}
    by_id = {}
    for op in _op_db():
        names = {op.aten_name, op.name}
        aliases = {a for base, opnames in ALIASES.items() if base in wanted for a in opnames}
        if not (names & wanted or op.name in aliases):
            continue
        if _dtype(op) is None:
            continue
        by_id[op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")] = op
    return by_id


OPINFOS = selected_opinfos()


def test_every_supported_op_has_opinfo_samples_or_is_listed():
    covered = set()
    for op in OPINFOS.values():
        covered |= {op.aten_name, op.name}
    covered |= {base for base, names in ALIASES.items() if set(names) & set(OPINFOS)}
    missing = sorted({_base(n) for n in supported_ops()} - covered - NO_OPINFO)
    assert not missing, f"supported ops without OpInfo samples: {missing}"


class Samples(nn.Module):
    """forward(*tensors): every sample's result, its tensors replaced by the inputs."""

    def __init__(self, fn, samples):
        super().__init__()
        self.fn = fn
        self.flat = [pytree.tree_flatten((s.input, s.args, s.kwargs)) for s in samples]

    def forward(self, *tensors):
        it, results = iter(tensors), []
        for leaves, spec in self.flat:
            leaves = [next(it) if isinstance(x, torch.Tensor) else x for x in leaves]
            inp, args, kwargs = pytree.tree_unflatten(leaves, spec)
            results.append(self.fn(inp, *args, **kwargs))
        return tuple(pytree.tree_leaves(results))


def _tensors(samples) -> list[torch.Tensor]:
    # fresh copies: a tensor passed twice would be one input to torch.export
    return [x.detach().clone() for s in samples
            for x in pytree.tree_leaves((s.input, s.args, s.kwargs)) if isinstance(x, torch.Tensor)]


def _small(sample) -> bool:
    leaves = pytree.tree_leaves((sample.input, sample.args, sample.kwargs))
    return all(x.numel() <= MAX_NUMEL for x in leaves if isinstance(x, torch.Tensor))


def _check(op, samples) -> None:
    """Compile the samples into one engine and compare both backends with eager."""
    module = Samples(op.op, samples)
    inputs = _tensors(samples)
    with torch.no_grad():
        want = module(*inputs)
    engine = tilec.api.compile(module, tuple(inputs), workers=1)
    feed = dict(zip(engine.input_names, inputs))
    for backend in ("interpret", "reference"):
        got = list(engine.run(backend=backend, **feed).values())
        assert len(got) == len(want), backend
        for i, (g, w) in enumerate(zip(got, want)):
            where = f"{backend}, result {i}"
            assert g.shape == w.shape and g.dtype == w.dtype, (where, g.shape, w.shape, g.dtype)
            if not w.dtype.is_floating_point:
                assert torch.equal(g, w), where
                continue
            nan = w.isnan()
            assert torch.equal(g.isnan(), nan), f"{where}: NaN where eager has none, or missing"
            scale = max(float(w[~nan].abs().max()), 1e-6) if (~nan).any() else 1.0
            err = float((g[~nan] - w[~nan]).abs().max()) / scale if (~nan).any() else 0.0
            assert err <= REL_TOL, f"{where}: relative error {err:.3g}"


@pytest.mark.parametrize("name", sorted(OPINFOS))
def test_opinfo_samples(name):
    op = OPINFOS[name]
    samples = [s for s in op.sample_inputs("cpu", _dtype(op), requires_grad=False)
               if _small(s)][:SAMPLES]
    if not samples:
        pytest.skip("no float32 sample small enough")
    try:
        _check(op, samples)
        return
    except UnsupportedOpError:
        pass
    # some sample uses a variant tilec refuses: each alone, so only those are skipped
    refused = 0
    for sample in samples:
        try:
            _check(op, [sample])
        except UnsupportedOpError:
            refused += 1
    assert refused, "refused together, but no sample alone"
    assert refused == REFUSED.get(name, 0), f"{refused} of {len(samples)} samples refused"
