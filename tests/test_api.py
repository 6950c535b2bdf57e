"""The public Python API: `tilec.compile` on an nn.Module and `tilec.load` of the saved
engine give eager PyTorch's outputs; the public names are exactly `tilec.__all__`."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import tilec

REL_TOL = 1e-4
PUBLIC = {"compile", "load", "Engine", "Generation", "TilecError", "ConfigError",
          "UnsupportedOpError", "ScheduleError", "ScheduleHangError", "EngineError",
          "RunError", "__version__"}


class Attention(nn.Module):
    """Two inputs, a dict output: projections, softmax over the last dim, residual."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, memory):
        scores = self.q(x) @ self.k(memory).transpose(-1, -2) / 32 ** 0.5
        mixed = torch.softmax(scores, dim=-1) @ memory
        return {"y": x + self.out(torch.relu(mixed)), "scores": scores}


def fresh_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(8, 32, generator=g), "memory": torch.randn(16, 32, generator=g)}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / max(float(want.abs().max()), 1e-6))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return Attention().eval()


@pytest.fixture(scope="module")
def engine(model) -> tilec.Engine:
    return tilec.compile(model, tuple(fresh_inputs(0).values()), workers=3)


def assert_matches_eager(engine: tilec.Engine, model: nn.Module, backend: str, seed: int):
    inputs = fresh_inputs(seed)
    with torch.no_grad():
        want = model(**inputs)
    got = engine.run(backend=backend, **inputs)
    assert set(got) == set(want) == set(engine.output_names)
    for name in want:
        assert got[name].shape == want[name].shape
        err = rel_err(got[name], want[name])
        assert err <= REL_TOL, f"{backend} {name}: relative error {err:.3g}"
    return got


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_compiled_module_matches_eager(engine, model, backend):
    assert engine.input_names == ("x", "memory")
    for seed in (1, 2):
        assert_matches_eager(engine, model, backend, seed)


def test_saved_and_loaded_engine_matches_eager(engine, model, tmp_path):
    path = tmp_path / "sub" / "attention.engine"
    engine.save(path)
    loaded = tilec.load(path)
    assert isinstance(loaded, tilec.Engine)
    assert loaded.input_names == engine.input_names
    assert loaded.output_names == engine.output_names
    got = assert_matches_eager(loaded, model, "interpret", 3)
    before = engine.run(backend="interpret", **fresh_inputs(3))
    for name in got:   # the same kernel and schedule: bitwise the same
        assert torch.equal(got[name], before[name])
    assert loaded.verify().ok
    assert loaded.summary()["tasks"] == engine.summary()["tasks"]


def test_run_errors_are_run_errors(engine):
    with pytest.raises(tilec.RunError, match="missing"):
        engine.run(backend="reference", x=torch.randn(8, 32))
    with pytest.raises(tilec.RunError, match="shape"):
        engine.run(backend="reference", x=torch.randn(4, 32), memory=torch.randn(16, 32))
    with pytest.raises(tilec.RunError, match="not a decoder"):
        engine.generate([1, 2], 2)


def test_load_errors_are_engine_errors(tmp_path):
    with pytest.raises(tilec.EngineError, match="no such engine file"):
        tilec.load(tmp_path / "missing.engine")
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"not an engine at all")
    with pytest.raises(tilec.EngineError):
        tilec.load(bad)


@pytest.mark.parametrize("options, match", [
    ({"policy": "fastest"}, "policy"),
    ({"tile_m": 24}, "tile_m"),
    ({"dtype": "int8"}, "dtype"),
    ({"target": "a100"}, "a100"),
    ({"workers": 0}, "workers"),
])
def test_bad_options_are_config_errors(options, match):
    with pytest.raises(tilec.ConfigError, match=match):
        tilec.compile(nn.Linear(4, 4), (torch.randn(2, 4),), **options)


def test_bad_model_arguments_are_config_errors():
    with pytest.raises(tilec.ConfigError, match="example_inputs"):
        tilec.compile(nn.Linear(4, 4))
    with pytest.raises(tilec.ConfigError, match="nn.Module"):
        tilec.compile(42)
    with pytest.raises(tilec.ConfigError, match="not found"):
        tilec.compile("no/such/model.yaml")


class _TwoInputs(torch.nn.Module):
    def forward(self, x, y):
        return x - 2 * y


@pytest.mark.parametrize("second", [lambda x: x, lambda x: x.view(4, 8)],
                         ids=["same tensor", "a view of it"])
def test_one_tensor_passed_as_two_example_inputs_stays_two_inputs(second):
    # torch.export traces one tensor passed twice as one input: the engine read x where
    # the model reads y, off by 4.8 for other inputs before the export cloned it
    x = torch.randn(4, 8)
    engine = tilec.compile(_TwoInputs(), (x, second(x)))
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    for backend in ("interpret", "reference"):
        got = engine.run(backend=backend, x=a, y=b)["output0"]
        torch.testing.assert_close(got, a - 2 * b, rtol=1e-5, atol=1e-6)


def test_dtype_leaves_the_callers_module_alone():
    model = nn.Linear(16, 8)
    engine = tilec.compile(model, (torch.randn(2, 16).bfloat16(),), dtype="bfloat16")
    assert model.weight.dtype == torch.float32
    assert engine.summary()["inputs"][0]["dtype"] == "bfloat16"


# ---- the public surface ---------------------------------------------------------------

def test_public_names_are_exactly_all():
    assert set(tilec.__all__) == PUBLIC
    assert len(tilec.__all__) == len(PUBLIC)
    assert set(dir(tilec)) == PUBLIC
    for name in tilec.__all__:
        assert getattr(tilec, name) is not None
    from tilec import Engine, compile, load   # noqa: F401  (the documented import)

    api = importlib.import_module("tilec.api")
    assert compile is api.compile and load is api.load and Engine is api.Engine
    assert isinstance(tilec.__version__, str)
    with pytest.raises(AttributeError):
        tilec.no_such_name  # noqa: B018


def test_errors_form_one_hierarchy():
    for name in ("ConfigError", "UnsupportedOpError", "ScheduleError", "EngineError", "RunError"):
        assert issubclass(getattr(tilec, name), tilec.TilecError)
    assert issubclass(tilec.ScheduleHangError, tilec.ScheduleError)
    assert issubclass(tilec.TilecError, Exception)


def test_public_callables_are_documented():
    for obj in (tilec.compile, tilec.load, tilec.Engine, tilec.Generation):
        assert obj.__doc__ and obj.__doc__.strip(), obj
    for name in ("save", "run", "generate", "summary", "verify", "random_inputs",
                 "tokenizer", "executor"):
        assert getattr(tilec.Engine, name).__doc__, name


def test_import_is_lazy_and_sets_interpreter_mode_first():
    """`import tilec` loads neither the compiler nor Triton; it fixes TRITON_INTERPRET
    (on a machine without a GPU) before anything can import Triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import sys, os, tilec\n"
        "assert 'tilec.api' not in sys.modules and 'triton' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('tilec', 'triton')))\n"
        "import torch\n"
        "assert torch.cuda.is_available() or os.environ.get('TRITON_INTERPRET') == '1'\n"
        "from tilec import compile, Generation\n"
        "assert 'tilec.api' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
