"""The `tilec` command line, run in-process: compile, run, inspect, verify, and the
one-line `error: ...` / exit 2 contract for every mistake a user can make."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tilec.api
from tilec.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WORKERS = 3


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def assert_compile_error(code: int, err: str) -> None:
    """compile prints its progress to stderr first; the error is the last line."""
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: "), err


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "block.engine"
    code = main(["compile", str(EXAMPLES / "block.yaml"), "-o", str(path),
                 "--workers", str(WORKERS)])
    assert code == 0
    return path


@pytest.fixture
def engine_copy(engine_path, tmp_path) -> Path:
    path = tmp_path / "copy.engine"
    shutil.copy(engine_path, path)
    return path


# ---- the happy path ----------------------------------------------------------------

def test_compile_reports_stages_and_writes_engine(capsys, tmp_path):
    out_path = tmp_path / "sub" / "mlp.engine"
    code, out, err = run_cli(capsys, "compile", EXAMPLES / "mlp.yaml", "-o", out_path)
    assert code == 0, err
    assert out_path.is_file() and out_path.stat().st_size > 0
    for stage in ("export", "lower", "schedule", "verify", "render"):
        assert stage in err
    assert "wrote" in err and "tasks on" in err


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_compile_to_a_path_it_cannot_write_fails_before_compiling(capsys, tmp_path, where):
    (tmp_path / "a_file").write_text("x")
    out_path = tmp_path if where == "folder" else tmp_path / "a_file" / "sub" / "m.engine"
    code, _, err = run_cli(capsys, "compile", EXAMPLES / "mlp.yaml", "-o", out_path)
    assert_compile_error(code, err)
    assert "cannot write" in err and "export" not in err   # before any stage ran


def test_a_save_that_fails_is_one_error_line_and_leaves_nothing(tmp_path, monkeypatch):
    """When the folder vanishes between the check and the save (here: the check is
    skipped), the save's own failure is still an EngineError with one line."""
    import tilec.api
    from tilec.errors import EngineError
    from tilec.runtime import enginefile as engine_file

    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(engine_file, "check_writable", lambda path: None)
    with pytest.raises(EngineError, match="cannot write") as info:
        tilec.api.compile(str(EXAMPLES / "mlp.yaml"), output=tmp_path / "a_file" / "m.engine")
    assert len(str(info.value).splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_compile_dump_dir(capsys, tmp_path):
    dump = tmp_path / "dump"
    code, _, err = run_cli(capsys, "compile", EXAMPLES / "mlp.yaml", "-o", tmp_path / "m.engine",
                           "--dump-dir", dump)
    assert code == 0, err
    names = {p.name for p in dump.iterdir()}
    assert "01_exported_fx.txt" in names and "02_ir.json" in names
    # what compile checks against its inputs before it writes any (dump_names)
    from tilec.compiler.pipeline import dump_names

    assert names <= set(dump_names(1))


def test_run_prints_outputs(capsys, engine_path):
    code, out, err = run_cli(capsys, "run", engine_path)
    assert code == 0, err
    assert "backend interpret" in out
    assert "output0: shape [1, 16, 128] float32" in out


def test_run_json_matches_api(capsys, engine_path):
    code, out, err = run_cli(capsys, "run", engine_path, "--json", "--seed", "3")
    assert code == 0, err
    data = json.loads(out)
    assert data["backend"] == "interpret"
    engine = tilec.api.load(engine_path)
    want = engine.run(backend="interpret", **engine.random_inputs(3))["output0"]
    o = data["outputs"]["output0"]
    assert o["shape"] == [1, 16, 128] and o["dtype"] == "float32"
    assert o["values"] == want.flatten()[:8].tolist()
    assert o["sum"] == pytest.approx(float(want.double().sum()), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("backend, policy", [("reference", "round_robin"),
                                             ("interpret", "random"),
                                             ("interpret", "reverse")])
def test_run_inputs_and_output_round_trip(capsys, engine_path, tmp_path, backend, policy):
    x = torch.randn(1, 16, 128, generator=torch.Generator().manual_seed(5))
    save_file({"x": x}, tmp_path / "in.safetensors")
    code, _, err = run_cli(capsys, "run", engine_path, "--inputs", tmp_path / "in.safetensors",
                           "--output", tmp_path / "out.safetensors", "--backend", backend,
                           "--policy", policy, "--seed", "2")
    assert code == 0, err
    got = load_file(tmp_path / "out.safetensors")
    assert list(got) == ["output0"]
    want = tilec.api.load(engine_path).run(backend="interpret", x=x)["output0"]
    if backend == "interpret":
        assert torch.equal(got["output0"], want)
    else:
        torch.testing.assert_close(got["output0"], want, rtol=1e-4, atol=1e-5)


def test_inspect_json(capsys, engine_path):
    code, out, err = run_cli(capsys, "inspect", engine_path, "--json")
    assert code == 0, err
    s = json.loads(out)
    for key in ("model", "target", "workers", "tasks", "events", "task_kinds"):
        assert key in s
    assert s["model"] == "block" and s["target"] == "cpu" and s["workers"] == WORKERS
    assert s["tasks"] == sum(s["task_kinds"].values()) > 0
    assert s["events"] > 0


def test_inspect_table(capsys, engine_path):
    code, out, err = run_cli(capsys, "inspect", engine_path)
    assert code == 0, err
    assert out.startswith(f"block: target cpu (cpu), {WORKERS} workers")
    assert "task kinds" in out and "workers" in out


def test_verify(capsys, engine_path):
    code, out, err = run_cli(capsys, "verify", engine_path, "--interleavings", "3")
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert lines and all(line.startswith("ok ") for line in lines), out
    assert any("interleavings" in line for line in lines)
    code, out, _ = run_cli(capsys, "verify", engine_path, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["violations"] == []


# ---- damaged engines -----------------------------------------------------------------

def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_in_kernel_text(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = data.index(b"tilec_engine")
    data[i] = ord("T")
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def truncate_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5])


def append(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0garbage" * 4)


def foreign(path: Path) -> None:
    save_file({"weight": torch.randn(4, 4)}, path, metadata={"format": "pt"})


def empty(path: Path) -> None:
    path.write_bytes(b"")


def missing(path: Path) -> None:
    path.unlink()


DAMAGE = [flip_middle, flip_in_kernel_text, truncate, truncate_header, append, foreign, empty,
          missing]


@pytest.mark.parametrize("command", ["run", "inspect", "verify"])
@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_engine_is_a_one_line_error(capsys, engine_copy, damage, command):
    damage(engine_copy)
    code, out, err = run_cli(capsys, command, engine_copy)
    assert_one_line_error(code, err)
    assert out == ""


def test_a_directory_is_not_an_engine(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "run", tmp_path)[::2])


def test_debug_shows_the_traceback(tmp_path):
    from tilec.errors import EngineError

    with pytest.raises(EngineError):
        main(["--debug", "run", str(tmp_path / "nothing.engine")])


# ---- bad inputs to run -----------------------------------------------------------------

@pytest.mark.parametrize("tensors", [
    {"x": torch.randn(1, 16, 64)},                      # wrong shape
    {"x": torch.randn(1, 16, 128).double()},            # wrong dtype
    {"y": torch.randn(1, 16, 128)},                     # wrong name
], ids=["shape", "dtype", "name"])
def test_run_with_bad_inputs(capsys, engine_path, tmp_path, tensors):
    save_file(tensors, tmp_path / "in.safetensors")
    code, _, err = run_cli(capsys, "run", engine_path, "--inputs", tmp_path / "in.safetensors")
    assert_one_line_error(code, err)


def test_run_with_unreadable_inputs_file(capsys, engine_path, tmp_path):
    (tmp_path / "in.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run_cli(capsys, "run", engine_path, "--inputs", tmp_path / "in.safetensors")
    assert_one_line_error(code, err)
    code, _, err = run_cli(capsys, "run", engine_path, "--inputs", tmp_path / "absent.safetensors")
    assert_one_line_error(code, err)


@pytest.mark.parametrize("flag", ["--profile", "--output"])
def test_run_to_a_missing_folder_fails_before_running(capsys, engine_path, tmp_path, flag):
    code, out, err = run_cli(capsys, "run", engine_path, flag, tmp_path / "absent" / "f")
    assert_one_line_error(code, err)
    assert "cannot write" in err and "ran " not in out


# ---- bad model.yaml ----------------------------------------------------------------------

MLP_PY = textwrap.dedent('''
    import torch

    class MLP(torch.nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.fc = torch.nn.Linear(d, d)

        def forward(self, x):
            return torch.relu(self.fc(x))

    class Sort(torch.nn.Module):   # (no tilec handler for aten.sort)
        def forward(self, x):
            return torch.sort(x, dim=-1).values
''')

GOOD_YAML = textwrap.dedent('''
    model: {module: m.py:MLP, kwargs: {d: 16}}
    inputs:
      - {name: x, shape: [2, 16], dtype: float32}
''')

BAD_YAMLS = {
    "unknown_key": GOOD_YAML + "sched: {policy: critical_path}\n",
    "unknown_nested_key": GOOD_YAML + "target: {name: cpu, wrokers: 2}\n",
    "wrong_type": GOOD_YAML + "seed: zero\n",
    "wrong_shape_type": GOOD_YAML.replace("[2, 16]", "'2x16'"),
    "unknown_target": GOOD_YAML + "target: tpu\n",
    "missing_module_file": GOOD_YAML.replace("m.py:MLP", "nope.py:MLP"),
    "missing_factory": GOOD_YAML.replace("m.py:MLP", "m.py:Nope"),
    "missing_inputs": "model: {module: m.py:MLP}\n",
    "invalid_yaml": GOOD_YAML + "inputs: [\n",
    "not_a_mapping": "- just\n- a list\n",
    "empty": "",
    "unsupported_op": GOOD_YAML.replace("m.py:MLP, kwargs: {d: 16}", "m.py:Sort"),
}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    (tmp_path / "m.py").write_text(MLP_PY)
    (tmp_path / "good.yaml").write_text(GOOD_YAML)
    return tmp_path


def test_good_yaml_compiles(capsys, model_dir):
    code, _, err = run_cli(capsys, "compile", model_dir / "good.yaml", "-o", model_dir / "g.engine")
    assert code == 0, err


@pytest.mark.parametrize("name", list(BAD_YAMLS))
def test_bad_yaml_is_a_one_line_error_and_keeps_the_old_output(capsys, model_dir, name):
    (model_dir / "bad.yaml").write_text(BAD_YAMLS[name])
    out_path = model_dir / "existing.engine"
    out_path.write_bytes(b"an existing file that a failed compile must not touch\n" * 100)
    before = out_path.read_bytes()
    code, _, err = run_cli(capsys, "compile", model_dir / "bad.yaml", "-o", out_path)
    assert_compile_error(code, err)
    assert out_path.read_bytes() == before
    left = sorted(p.name for p in model_dir.iterdir() if p.name != "__pycache__")
    assert left == ["bad.yaml", "existing.engine", "good.yaml", "m.py"]   # no temp files


def test_missing_yaml(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compile", tmp_path / "none.yaml", "-o", tmp_path / "e.engine")
    assert_compile_error(code, err)
    assert not (tmp_path / "e.engine").exists()


def test_bad_workers_option(capsys, model_dir):
    code, _, err = run_cli(capsys, "compile", model_dir / "good.yaml", "-o",
                           model_dir / "e.engine", "--workers", "0")
    assert_compile_error(code, err)
    assert "workers" in err


# ---- no output overwrites an input -----------------------------------------------------

def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` (links as they are): its bytes and mtime."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"",
                                         p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if "__pycache__" not in p.parts}


def compile_outputs(d: Path) -> dict[str, list[str]]:
    """compile's -o and --dump-dir, each naming an input (the yaml, the module file)
    however it is spelt, or another output."""
    (d / "h").mkdir()
    (d / "h" / "m.py").write_text(MLP_PY)
    (d / "h" / "good.yaml").write_text(GOOD_YAML)
    (d / "link.yaml").symlink_to(d / "h" / "good.yaml")
    (d / "hard.yaml").hardlink_to(d / "h" / "good.yaml")
    (d / "dump").mkdir()
    (d / "dump" / "02_ir.json").symlink_to(d / "h" / "good.yaml")
    return {
        "dotdot": ["-o", d / "h" / ".." / "h" / "good.yaml"],
        "relative": ["-o", Path("..") / d.name / "h" / "good.yaml"],
        "symlink": ["-o", d / "link.yaml"],
        "hard_link": ["-o", d / "hard.yaml"],
        "module_file": ["-o", d / "h" / "m.py"],
        "dump_dir_is_the_yaml": ["-o", d / "e.engine", "--dump-dir", d / "h" / "good.yaml"],
        "a_dump_links_to_the_yaml": ["-o", d / "e.engine", "--dump-dir", d / "dump"],
        "output_is_a_dump": ["-o", d / "d2" / "03_fused.json", "--dump-dir", d / "d2"],
    }


@pytest.mark.parametrize("case", ["dotdot", "relative", "symlink", "hard_link", "module_file",
                                  "dump_dir_is_the_yaml", "a_dump_links_to_the_yaml",
                                  "output_is_a_dump"])
def test_compile_refuses_an_output_that_is_an_input(capsys, tmp_path, monkeypatch, case):
    argv = compile_outputs(tmp_path)[case]
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "compile", tmp_path / "h" / "good.yaml", *argv)
    assert_compile_error(code, err)
    assert "export" not in err, "refused before anything ran"
    assert "must not overwrite an input" in err or "the same file" in err, err
    assert snapshot(tmp_path) == before, "nothing written"


def test_compile_refuses_an_output_in_place_of_a_checkpoint_file(capsys, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "m.yaml").write_text("model: {hf: ckpt}\n")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "compile", tmp_path / "m.yaml", "-o",
                           tmp_path / "ckpt" / "model.safetensors")
    assert_compile_error(code, err)
    assert "the checkpoint file" in err and snapshot(tmp_path) == before


RUN_OUTPUTS = {
    "output_is_the_engine": ["run", "{engine}", "--output", "{engine}"],
    "output_links_to_the_engine": ["run", "{engine}", "--output", "{link}"],
    "logits_is_the_engine": ["run", "{engine}", "--logits-out", "{engine}"],
    "profile_is_the_engine": ["run", "{engine}", "--profile", "{dotdot}"],
    "output_is_the_inputs": ["run", "{engine}", "--inputs", "{inputs}", "--output", "{inputs}"],
    "two_outputs": ["run", "{engine}", "--output", "{o}", "--profile", "{o}"],
    "dot_is_the_engine": ["inspect", "{engine}", "--dot", "{hard}"],
    "trace_is_the_engine": ["inspect", "{engine}", "--trace", "{engine}"],
    "html_is_the_engine": ["inspect", "{engine}", "--html", "{engine}"],
    "trace_is_the_dot": ["inspect", "{engine}", "--trace", "{o}", "--dot", "{o}"],
}


@pytest.mark.parametrize("case", list(RUN_OUTPUTS))
def test_run_and_inspect_refuse_an_output_that_is_an_input(capsys, engine_copy, tmp_path, case):
    save_file({"x": torch.randn(1, 16, 128)}, tmp_path / "in.safetensors")
    (tmp_path / "link").symlink_to(engine_copy)
    (tmp_path / "hard").hardlink_to(engine_copy)
    names = {"engine": engine_copy, "link": tmp_path / "link", "hard": tmp_path / "hard",
             "dotdot": tmp_path / ".." / tmp_path.name / engine_copy.name,
             "inputs": tmp_path / "in.safetensors", "o": tmp_path / "o"}
    argv = [a.format(**names) for a in RUN_OUTPUTS[case]]
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err)
    assert "the same file" in err and out == ""
    assert snapshot(tmp_path) == before
