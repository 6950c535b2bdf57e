"""Repeated layers (compiler/layers.py): a module whose layers repeat is traced with two
of them, and the lowering built from those is the lowering of the whole trace."""
import dataclasses

import pytest
import torch
from torch import nn

from tilec.compiler import frontend
from tilec.compiler.build import build_model
from tilec.compiler.config import load_config
from tilec.compiler.layers import declared_layers


def canonical(lowered):
    """A lowering with its value names replaced by positions; constants by content."""
    index = {op.name: i for i, op in enumerate(lowered.graph.ops)}
    ops = [(op.kind, op.type, op.attrs, op.source, op.scope,
            tuple((index[x.value], x.shape, x.strides, x.offset) for x in op.inputs))
           for op in lowered.graph.ops]
    outputs = [(name, index[o.value], o.shape, o.strides, o.offset)
               for name, o in lowered.graph.outputs]
    constants = sorted((index[k], v.dtype, tuple(v.shape), v.flatten().tolist())
                       for k, v in lowered.constants.items())
    states = sorted((index[k], v) for k, v in lowered.state_names.items())
    return (ops, outputs, constants, states, [index[i] for i in lowered.graph.inputs],
            lowered.input_names, lowered.output_names)


def whole_trace(module, inputs):
    return frontend._Lowering(frontend._export(module, inputs)).run()


@pytest.mark.parametrize("example,layers,changes,first", [
    ("llama_tiny", 5, {}, 0),
    # GLM-5 with layers of one kind (MoE, each with its indexer): repeated
    ("glm_dsa_tiny", 3, {"first_k_dense_replace": 0, "indexer_types": ["full"] * 3}, 0),
    # GLM-5 as it is: dense layers, then MoE ones (and a shared indexer among the first)
    # repeat from the first MoE layer: layers 0..3 traced, 4 and 5 built from 3
    ("glm_dsa_tiny", 6, {"first_k_dense_replace": 2,
                         "indexer_types": ["full", "shared"] + ["full"] * 4}, 2)])
def test_two_traced_layers_lower_as_the_whole_trace(example, layers, changes, first):
    cfg = load_config(f"examples/{example}.yaml")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, config={**cfg.model.config, "num_hidden_layers": layers, **changes}))
    module, inputs = build_model(cfg)
    exported = frontend.export(module, inputs)
    assert exported.layers is not None and exported.layers.count == layers
    assert exported.layers.first == first
    traced = {n.meta.get("nn_module_stack", {}).get(f"L__self___layers_{first + 2}")
              for n in exported.program.graph.nodes}
    assert traced == {None}   # layer first + 2 was not traced
    built = frontend.lower(exported)
    whole = whole_trace(module, inputs)
    assert canonical(built) == canonical(whole)
    for k in range(layers):   # every layer's weights are the module's own tensors
        for weight in module.layers[k].parameters():
            assert any(c.data_ptr() == weight.data_ptr() for c in built.constants.values())
    scopes = {s for op in built.graph.ops for s in op.scope}
    assert f"layers.{layers - 1}" in scopes and f"layers.{layers}" not in scopes


class Step(nn.Module):
    def __init__(self, double=False):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.double = double

    def forward(self, x):
        x = self.linear(x)
        return x * 2 if self.double else x


class Stack(nn.Module):
    """Three layers; `odd` makes layer 1 do more than layer 0, `tap` returns layer 0's
    output besides the last."""

    repeated_layers = "layers"

    def __init__(self, odd=False, tap=False):
        super().__init__()
        self.layers = nn.ModuleList(Step(double=odd and i == 1) for i in range(3))
        self.tap = tap

    def forward(self, x):
        first = None
        for layer in self.layers:
            x = layer(x)
            first = x if first is None else first
        return (x, first) if self.tap else x


@pytest.mark.parametrize("odd,tap", [(False, False), (True, False), (False, True)])
def test_layers_that_differ_are_traced_whole(odd, tap):
    module = Stack(odd, tap).eval()
    inputs = (torch.randn(1, 8),)
    exported = frontend.export(module, inputs)
    assert exported.layers is not None
    assert canonical(frontend.lower(exported)) == canonical(whole_trace(module, inputs))


def test_only_modules_that_declare_three_or_more_layers_repeat():
    assert declared_layers(Stack()) is not None
    two = Stack()
    two.layers = nn.ModuleList(list(two.layers)[:2])
    assert declared_layers(two) is None
    undeclared = Stack()
    undeclared.repeated_layers = None
    assert declared_layers(undeclared) is None
