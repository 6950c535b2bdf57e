"""model.yaml loading: every mistake is a one-line ConfigError naming the file and key."""
from __future__ import annotations

import textwrap

import pytest
import torch
import yaml

from tilec.compiler.build import build_model, random_inputs
from tilec.compiler.config import (
    InputSpec, ModelConfig, ScheduleSpec, TargetSpec, load_config, parse_config,
)
from tilec.errors import ConfigError

MLP_PY = textwrap.dedent('''
    import torch

    class MLP(torch.nn.Module):
        def __init__(self, d_in, d_hidden):
            super().__init__()
            self.up = torch.nn.Linear(d_in, d_hidden)
            self.down = torch.nn.Linear(d_hidden, d_in)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    def make_mlp(d_in=8, d_hidden=16):
        return MLP(d_in, d_hidden)

    not_a_module = 3
''')

BASE = {
    "model": {"module": "mlp.py:MLP", "kwargs": {"d_in": 8, "d_hidden": 16}},
    "inputs": [{"name": "x", "shape": [2, 8], "dtype": "float32"}],
}


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "mlp.py").write_text(MLP_PY)
    return tmp_path


def write_yaml(folder, data, name="model.yaml"):
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def with_changes(**changes):
    data = {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in BASE.items()}
    data.update(changes)
    return data


def config_error(folder, data) -> str:
    path = write_yaml(folder, data)
    with pytest.raises(ConfigError) as info:
        build_model(load_config(path))
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message, message
    return message


# ----------------------------------------------------------------------------- good configs

def test_defaults(workdir):
    cfg = load_config(write_yaml(workdir, BASE))
    assert isinstance(cfg, ModelConfig)
    assert cfg.model.file == str(workdir / "mlp.py")
    assert cfg.model.factory == "MLP"
    assert cfg.model.kwargs == {"d_in": 8, "d_hidden": 16}
    assert cfg.inputs == (InputSpec("x", (2, 8), "float32"),)
    assert cfg.dtype is None
    assert cfg.seed == 0
    assert cfg.target == TargetSpec("cpu", None)
    assert cfg.schedule == ScheduleSpec("critical_path", None, None, None)


def test_full_form(workdir):
    data = with_changes(
        inputs=[{"name": "x", "shape": [2, 8], "dtype": "float32"},
                {"name": "tok", "shape": [1, 4], "dtype": "int64", "low": 3, "high": 9}],
        dtype="bfloat16", seed=7, target={"name": "h200", "workers": 64},
        schedule={"policy": "round_robin", "tile_m": 16, "tile_n": 64, "tile_k": 1},
    )
    cfg = load_config(write_yaml(workdir, data))
    assert cfg.inputs[1] == InputSpec("tok", (1, 4), "int64", 3, 9)
    assert (cfg.dtype, cfg.seed) == ("bfloat16", 7)
    assert cfg.target == TargetSpec("h200", 64)
    assert cfg.schedule == ScheduleSpec("round_robin", 16, 64, 1)


def test_short_target_form(workdir):
    cfg = load_config(write_yaml(workdir, with_changes(target="h100")))
    assert cfg.target == TargetSpec("h100", None)


def test_module_path_resolves_against_yaml_folder(workdir, monkeypatch):
    sub = workdir / "models"
    sub.mkdir()
    (sub / "net.py").write_text(MLP_PY)
    path = write_yaml(workdir, with_changes(model={"module": "models/net.py:make_mlp"}))
    monkeypatch.chdir(sub)   # the working directory must not matter
    cfg = load_config(path)
    assert cfg.model.file == str(sub / "net.py")
    model, _ = build_model(cfg)
    assert model.up.in_features == 8


def test_parse_config_takes_a_dict(workdir):
    cfg = parse_config(with_changes(), str(workdir / "virtual.yaml"))
    assert cfg.model.file == str(workdir / "mlp.py")


def test_build_model_runs_and_casts(workdir):
    cfg = load_config(write_yaml(workdir, with_changes(dtype="bfloat16")))
    model, inputs = build_model(cfg)
    assert not model.training
    assert model.up.weight.dtype == torch.bfloat16
    assert inputs[0].shape == (2, 8) and inputs[0].dtype == torch.float32
    assert model(inputs[0].to(torch.bfloat16)).shape == (2, 8)


def test_build_model_is_reproducible(workdir):
    cfg = load_config(write_yaml(workdir, with_changes(seed=3)))
    m1, x1 = build_model(cfg)
    torch.manual_seed(1234)   # global state left by others must not matter
    m2, x2 = build_model(cfg)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(x1, x2))

    other = load_config(write_yaml(workdir, with_changes(seed=4), "other.yaml"))
    m3, x3 = build_model(other)
    assert not torch.equal(m1.up.weight, m3.up.weight)
    assert not torch.equal(x1[0], x3[0])


def test_random_inputs_dtypes_and_ranges():
    specs = (InputSpec("x", (3, 5), "bfloat16"), InputSpec("ids", (1000,), "int32", 5, 9),
             InputSpec("h", (4,), "float16"))
    x, ids, h = random_inputs(specs, seed=0)
    assert (x.dtype, ids.dtype, h.dtype) == (torch.bfloat16, torch.int32, torch.float16)
    assert int(ids.min()) >= 5 and int(ids.max()) < 9
    assert torch.equal(random_inputs(specs, 0)[1], ids)
    assert not torch.equal(random_inputs(specs, 1)[1], ids)


# ----------------------------------------------------------------------------- errors

def test_missing_yaml_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml") as info:
        load_config(path)
    assert "not found" in str(info.value)


def test_yaml_syntax_error(workdir):
    message = config_error(workdir, "model: {module: mlp.py:MLP\ninputs: [\n")
    assert "invalid YAML" in message and "line" in message


@pytest.mark.parametrize("text, found", [("", "empty file"), ("- 1\n- 2\n", "list"),
                                         ("42\n", "int")])
def test_top_level_not_a_mapping(workdir, text, found):
    message = config_error(workdir, text)
    assert "top level" in message and "mapping" in message and found in message


def test_unknown_key_suggests_close_match(workdir):
    data = with_changes(shedule={"policy": "round_robin"})
    message = config_error(workdir, data)
    assert message.startswith("unknown key 'shedule' in ")
    assert "(did you mean 'schedule'?)" in message


def test_unknown_nested_key_suggests_close_match(workdir):
    message = config_error(workdir, with_changes(schedule={"tile_mm": 16}))
    assert "'schedule.tile_mm'" in message and "did you mean 'schedule.tile_m'" in message


def test_unknown_key_without_close_match(workdir):
    message = config_error(workdir, with_changes(zzzzzz=1))
    assert "'zzzzzz'" in message and "did you mean" not in message


@pytest.mark.parametrize("key", ["model", "inputs"])
def test_required_keys(workdir, key):
    data = with_changes()
    del data[key]
    message = config_error(workdir, data)
    assert f": {key}: required" in message


@pytest.mark.parametrize("changes, key, expected", [
    ({"model": "mlp.py:MLP"}, "model", "mapping"),
    ({"model": {"kwargs": {}}}, "model.module", "required"),
    ({"model": {"module": "mlp.py"}}, "model.module", "FILE.py:FACTORY"),
    ({"model": {"module": "mlp.py:MLP", "kwargs": [1]}}, "model.kwargs", "mapping"),
    ({"inputs": []}, "inputs", "non-empty list"),
    ({"inputs": {"x": 1}}, "inputs", "non-empty list"),
    ({"inputs": ["x"]}, "inputs[0]", "mapping"),
    ({"inputs": [{"name": "x", "shape": [2]}]}, "inputs[0].dtype", "required"),
    ({"inputs": [{"name": "x y", "shape": [2], "dtype": "float32"}]}, "inputs[0].name",
     "identifier"),
    ({"inputs": [{"name": "x", "shape": [2], "dtype": "float32"},
                 {"name": "x", "shape": [2], "dtype": "float32"}]}, "inputs[1].name",
     "not used"),
    ({"inputs": [{"name": "x", "shape": [2, 0], "dtype": "float32"}]}, "inputs[0].shape",
     "integers >= 1"),
    ({"inputs": [{"name": "x", "shape": 4, "dtype": "float32"}]}, "inputs[0].shape",
     "list"),
    ({"inputs": [{"name": "x", "shape": [2], "dtype": "float64"}]}, "inputs[0].dtype",
     "float32"),
    ({"inputs": [{"name": "x", "shape": [2], "dtype": "int64"}]}, "inputs[0].high",
     "required"),
    ({"inputs": [{"name": "x", "shape": [2], "dtype": "int32", "low": 5, "high": 5}]},
     "inputs[0].high", "> low"),
    ({"inputs": [{"name": "x", "shape": [2], "dtype": "int32", "low": 0.5, "high": 5}]},
     "inputs[0].low", "integer"),
    ({"inputs": [{"name": "x", "shape": [2], "dtype": "float32", "high": 5}]},
     "inputs[0].high", "only integer inputs"),
    ({"dtype": "float16"}, "dtype", "float32 or bfloat16"),
    ({"seed": -1}, "seed", "integer from 0 to 4294967295"),
    ({"seed": "zero"}, "seed", "integer from 0 to 4294967295"),
    ({"seed": True}, "seed", "integer from 0 to 4294967295"),
    ({"seed": 1 << 32}, "seed", "integer from 0 to 4294967295"),
    ({"target": "a100"}, "target.name", "cpu"),
    ({"target": 3}, "target", "mapping"),
    ({"target": {"name": "cpu", "workers": 0}}, "target.workers", "integer from 1 to 64"),
    ({"target": {"name": "cpu", "workers": 65}}, "target.workers", "integer from 1 to 64"),
    ({"schedule": {"policy": "greedy"}}, "schedule.policy", "critical_path"),
    ({"schedule": {"tile_m": 3}}, "schedule.tile_m", "power of two"),
    ({"schedule": {"tile_n": 0}}, "schedule.tile_n", "power of two"),
    ({"schedule": {"tile_k": "64"}}, "schedule.tile_k", "power of two"),
    ({"schedule": [16]}, "schedule", "mapping"),
])
def test_invalid_values(workdir, changes, key, expected):
    message = config_error(workdir, with_changes(**changes))
    assert f": {key}: " in message, message
    assert expected in message, message


def test_bad_value_message_says_what_was_found(workdir):
    message = config_error(workdir, with_changes(schedule={"tile_m": 3}))
    assert message.endswith("schedule.tile_m: expected a power of two >= 1, found int 3")


def test_missing_module_file(workdir):
    message = config_error(workdir, with_changes(model={"module": "missing.py:MLP"}))
    assert "model.module" in message and "missing.py" in message and "not found" in message


def test_missing_factory_suggests_close_match(workdir):
    message = config_error(workdir, with_changes(model={"module": "mlp.py:MPL"}))
    assert "model.module" in message and "'MPL'" in message
    assert "did you mean 'MLP'" in message


def test_factory_not_callable(workdir):
    message = config_error(workdir, with_changes(model={"module": "mlp.py:not_a_module"}))
    assert "model.module" in message and "not_a_module" in message


def test_factory_rejects_kwargs(workdir):
    bad = {"module": "mlp.py:MLP", "kwargs": {"d_in": 8, "d_hiden": 16}}
    message = config_error(workdir, with_changes(model=bad))
    assert "model.kwargs.d_hiden" in message and "did you mean 'model.kwargs.d_hidden'" in message


def test_factory_missing_kwargs(workdir):
    message = config_error(workdir, with_changes(model={"module": "mlp.py:MLP"}))
    assert "model.kwargs" in message and "d_in" in message


def test_factory_must_return_a_module(workdir):
    (workdir / "fn.py").write_text("def make():\n    return 3\n")
    message = config_error(workdir, with_changes(model={"module": "fn.py:make"}))
    assert "model.module" in message and "torch.nn.Module" in message


def test_module_that_fails_to_import(workdir):
    (workdir / "broken.py").write_text("import torch\ndef (:\n")
    message = config_error(workdir, with_changes(model={"module": "broken.py:MLP"}))
    assert "model.module" in message and "SyntaxError" in message


def test_bug_inside_factory_is_not_reported_as_bad_kwargs(workdir):
    """One line that points into the model file (the kwargs bound), not at the kwargs."""
    (workdir / "buggy.py").write_text("def make(n):\n    return len(n)\n")
    message = config_error(workdir, with_changes(model={"module": "buggy.py:make",
                                                        "kwargs": {"n": 3}}))
    assert "make(**model.kwargs) raised TypeError at buggy.py:2: object of type 'int' has " \
           "no len()" in message
    assert "rejects them" not in message
