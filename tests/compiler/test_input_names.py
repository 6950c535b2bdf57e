"""model.yaml's `inputs[].name` is the engine's input name (docs/model-yaml.md), whatever
the forward calls its parameters: nn.Sequential's `input` included."""
import json
import textwrap

import pytest
import torch

import tilec.api as tilec_api
from tilec.errors import ConfigError

MODEL_PY = textwrap.dedent('''
    import torch

    def sequential():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())

    class Lookup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(10, 4)

        def forward(self, idx, scale):
            return self.table(idx) * scale

    def lookup():
        torch.manual_seed(0)
        return Lookup()
''')


def write(tmp_path, factory, inputs):
    (tmp_path / "model.py").write_text(MODEL_PY)
    path = tmp_path / f"{factory}.yaml"
    path.write_text(json.dumps({"model": {"module": f"model.py:{factory}"}, "inputs": inputs,
                                "target": "cpu"}))
    return str(path)


def test_sequential_input_takes_the_yaml_name(tmp_path):
    engine = tilec_api.compile(write(tmp_path, "sequential",
                                     [{"name": "x", "shape": [2, 8], "dtype": "float32"}]))
    x = torch.randn(2, 8)
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    for backend in ("reference", "interpret"):
        got = engine.run(x=x, backend=backend)["output0"]
        assert torch.allclose(got, eager(x), atol=1e-5)


def test_yaml_ranges_apply_under_the_yaml_names(tmp_path):
    """An integer input's [low, high) is checked under the yaml's name: here `tokens`
    indexes a table of 10 rows, so high 20 is refused (before, the range was looked up
    under the forward's name `idx`, found nowhere, and silently not checked)."""
    inputs = [{"name": "tokens", "shape": [3], "dtype": "int64", "high": 20},
              {"name": "gain", "shape": [1], "dtype": "float32"}]
    with pytest.raises(ConfigError, match=r"inputs: tokens: values from \[0, 20\)"):
        tilec_api.compile(write(tmp_path, "lookup", inputs))


def test_inputs_in_call_order(tmp_path):
    inputs = [{"name": "tokens", "shape": [3], "dtype": "int64", "high": 10},
              {"name": "gain", "shape": [1], "dtype": "float32"}]
    engine = tilec_api.compile(write(tmp_path, "lookup", inputs))
    tokens, gain = torch.tensor([1, 7, 3]), torch.tensor([2.5])
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 4)
    got = engine.run(tokens=tokens, gain=gain, backend="reference")["output0"]
    assert torch.allclose(got, table(tokens) * gain, atol=1e-6)
