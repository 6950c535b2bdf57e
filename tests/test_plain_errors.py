"""Ordinary mistakes give one plain `error:` line that says what to change, exit 2 (issue
19, item 6): each of these was an "internal error" (or a torch traceback, or a silent
default) before. The repro of each is its test."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import tilec.api
from engines import compiled, run_cli
from tilec.errors import RunError
from tilec.codegen import loader

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODEL_PY = '''
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 8, d_out: int = 8):
        super().__init__()
        self.up = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.up(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def broken():
    raise ValueError("no weights here")
'''


def line_of(code: str) -> int:
    """The line number of `code` in MODEL_PY (as written to model.py)."""
    return next(i for i, line in enumerate(MODEL_PY.splitlines(), 1) if code in line)


def one_line(code: int, err: str, *wanted: str) -> str:
    """The last stderr line is the only `error:` line, exit 2, no traceback, and it says
    each of `wanted`."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    for w in wanted:
        assert w in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_PY)
    return tmp_path


def compile_yaml(capsys, folder: Path, text: str | bytes, *argv) -> tuple[int, str]:
    path = folder / "model.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, _, err = run_cli(capsys, "compile", path, "-o", folder / "m.engine", *argv)
    return code, err


MLP_YAML = "model: {module: model.py:MLP}\ninputs: [{name: x, shape: [2, 8], dtype: float32}]\n"


# ---- compile -----------------------------------------------------------------------------

def test_wrong_input_shape(capfd, folder):
    """Also no torch traceback: torch logged the failed trace (20 lines) and printed the
    partial graph to stderr before raising."""
    path = folder / "model.yaml"
    path.write_text(MLP_YAML.replace("[2, 8]", "[2, 9]"))
    capfd.readouterr()
    code = tilec.cli.main(["compile", str(path), "-o", str(folder / "m.engine")])
    err = capfd.readouterr().err
    one_line(code, err, "model.yaml: inputs: forward() fails on example inputs [2, 9] float32",
             f"model.py:{line_of('return self.up(x)')}: `return self.up(x)`",
             "check the inputs' shapes")
    assert "fake_tensor" not in err and "def forward" not in err


def test_data_dependent_if(capsys, folder):
    code, err = compile_yaml(capsys, folder, MLP_YAML.replace("MLP", "Branchy"))
    one_line(code, err, "data-dependent control flow at",
             f"model.py:{line_of('if x.sum()')}: `if x.sum() > 0:`",
             "torch.where")


def test_a_factory_that_raises(capsys, folder):
    code, err = compile_yaml(capsys, folder, MLP_YAML.replace("MLP", "broken"))
    one_line(code, err, "model.module: broken(**model.kwargs) raised ValueError at "
             f"model.py:{line_of('no weights here')}: no weights here")


def test_a_wrongly_typed_kwarg(capsys, folder):
    code, err = compile_yaml(capsys, folder, MLP_YAML.replace("MLP}", "MLP, kwargs: {d_in: '8'}}"))
    one_line(code, err, "model.kwargs.d_in: expected int (as MLP declares d_in: int), found str '8'")


@pytest.mark.parametrize("text,wanted", [
    (MLP_YAML + "dtype: [float32]\n", "dtype: expected float32 or bfloat16, found list"),
    (MLP_YAML.replace("dtype: float32", "dtype: [float32]"), "inputs[0].dtype: expected"),
    (MLP_YAML + "target: {name: [cpu]}\n", "target.name: expected"),
    (MLP_YAML + "seed: 100000000000000000000000000\n", "seed: expected an integer from 0 to"),
    (MLP_YAML + "seed: 1e26\n", "seed: expected an integer from 0 to"),
    (MLP_YAML.encode() + b"# caf\xe9\n", "line 3, column 6: byte 0xe9 is not UTF-8 text"),
])
def test_yaml_values(capsys, folder, text, wanted):
    one_line(*compile_yaml(capsys, folder, text), wanted)


def test_dump_dir_that_is_a_file(capsys, folder):
    (folder / "dumps").write_text("")
    code, err = compile_yaml(capsys, folder, MLP_YAML, "--dump-dir", folder / "dumps")
    one_line(code, err, "dumps: a file, not a folder")
    code, err = compile_yaml(capsys, folder, MLP_YAML, "--dump-dir", folder / "dumps" / "sub")
    one_line(code, err, "dumps is not a writable folder")


# ---- engines -----------------------------------------------------------------------------

def test_a_folder_given_as_an_engine(capsys, tmp_path):
    for command in ("run", "inspect", "verify"):
        one_line(*run_cli(capsys, command, tmp_path)[::2], "a folder, not an engine file")


def test_an_unreadable_engine(capsys, tmp_path, monkeypatch):
    path = tmp_path / "e.engine"
    shutil.copy(compiled("block"), path)
    path.chmod(0)
    if os.access(path, os.R_OK):   # root reads anything: make the read fail as it would
        real_open = open

        def denied(file, *args, **kwargs):
            if str(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)
        monkeypatch.setattr("builtins.open", denied)
    one_line(*run_cli(capsys, "run", path)[::2], "cannot read the engine file (Permission denied)")


def test_a_cache_folder_that_cannot_be_written(capsys, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TILEC_CACHE", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(loader, "_loaded", {})
    one_line(*run_cli(capsys, "run", compiled("block"), "--backend", "interpret")[::2],
             "cannot write the kernel to the cache folder", "set TILEC_CACHE")


def test_run_output_that_is_a_folder(capsys, tmp_path):
    one_line(*run_cli(capsys, "run", compiled("block"), "--output", tmp_path)[::2],
             "it is a folder")


@pytest.mark.parametrize("argv,wanted", [
    (["--seed", str(2 ** 70)], "seed: expected an integer from 0 to"),
    (["--seed", "-1"], "seed: expected"),
])
def test_run_options(capsys, argv, wanted):
    one_line(*run_cli(capsys, "run", compiled("block"), *argv)[::2], wanted)


@pytest.mark.parametrize("argv,wanted", [
    (["--temperature", "-1"], "temperature: expected a number >= 0"),
    (["--temperature", "nan"], "temperature: expected a number >= 0"),
    (["--top-k", "-3", "--temperature", "1"], "top_k: expected an integer >= 0"),
    (["--prompt-ids="], "--prompt-ids: no token ids"),
    (["--prompt-ids", " , "], "--prompt-ids: no token ids"),
])
def test_generation_options(capsys, argv, wanted):
    one_line(*run_cli(capsys, "run", compiled("llama_tiny"), "--max-new-tokens", "1",
                      *argv)[::2], wanted)


def test_negative_interleavings(capsys):
    one_line(*run_cli(capsys, "verify", compiled("block"), "--interleavings", "-2")[::2],
             "interleavings: expected an integer >= 0")


@pytest.mark.parametrize("argv,wanted", [
    (["run"], "tilec run: the following arguments are required: engine"),
    (["run", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "x", "--seed", "two"], "argument --seed: invalid int value: 'two'"),
    (["launch"], "invalid choice: 'launch'"),
])
def test_argument_mistakes_are_one_line(capsys, argv, wanted):
    code, out, err = run_cli(capsys, *argv)
    assert out == "" and len(err.splitlines()) == 1, err
    one_line(code, err, wanted, "--help)")


def test_help_still_exits_0(capsys):
    code, out, _ = run_cli(capsys, "run", "--help")
    assert code == 0 and "usage: tilec run" in out


# ---- generation --------------------------------------------------------------------------

@pytest.mark.parametrize("poison", ["all", "one"])
def test_nan_logits_stop_generation_alike_on_both_cpu_backends(poison):
    """NaN weights: the interpreter's argmax raised (numpy's nanargmax refuses a row of
    NaN) and the reference backend generated token 0; now both refuse at the same step.
    The prompt [1, 2] goes through one launch of the engine's prefill entry, whose last
    row (position 1) gives the first logits: that launch must run on the poisoned
    weights too (it ran on the file's own, and the refusal came a step late)."""
    engine = tilec.api.load(compiled("llama_tiny"))
    pool = "pool.w_float32"
    weights = engine.data.tensors[pool].clone()
    if poison == "all":
        weights.fill_(float("nan"))
    else:   # one weight of the final norm: every logit is NaN
        weights[weights.numel() // 2] = float("nan")
    engine.data.tensors[pool] = weights
    messages = []
    for backend in ("interpret", "reference"):
        with pytest.raises(RunError) as info:
            engine.generate([1, 2], 2, backend=backend)
        messages.append(str(info.value))
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("step 1 (position 1): the logits are NaN"), messages[0]
