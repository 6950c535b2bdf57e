"""Inputs that asked for more than the machine has (issue 19, item 3): a YAML alias bomb,
a misspelt family key whose default builds a 27 GB model, a 40 GB example input, a
hundred million workers, an engine whose arena declares 12 GB. Each is refused before
anything of that size is allocated, with one short `error:` line naming the key and the
size, in well under the seconds the old behaviour took."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import tilec.api
from engines import compiled, resign, run_cli
from tilec import limits
from tilec.compiler import yaml_file
from tilec.compiler.config import load_config
from tilec.errors import ConfigError, EngineError, RunError
from tilec.ir.target import TARGETS
from tilec.runtime import enginefile as engine_file
from tilec.runtime import sizes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SECONDS = 5   # every refusal here; the old behaviour took 64 to 106 s, or never ended
MLP = {"module": "mlp.py:MLP", "kwargs": {"d_in": 8, "d_hidden": 16, "d_out": 8}}
TINY_LLAMA = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2}
# GLM-5's family takes config.json's fields: its heads and key-value heads agree
TINY_GLM = dict(TINY_LLAMA, num_key_value_heads=2, q_lora_rank=8, kv_lora_rank=8,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, index_head_dim=8)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "mlp.py").write_text((EXAMPLES / "mlp.py").read_text())
    return tmp_path


def refused(capsys, folder: Path, text: str, *argv: str) -> str:
    """`tilec compile` of the yaml `text`: one short error line, exit 2, in SECONDS."""
    path = folder / "model.yaml"
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(text))
    t0 = time.perf_counter()
    code, out, err = run_cli(capsys, "compile", path, "-o", folder / "e.engine", *argv)
    assert time.perf_counter() - t0 < SECONDS
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and "internal error" not in last, err
    assert len(last) <= limits.MAX_ERROR_CHARS + len("error: "), len(last)
    assert not (folder / "e.engine").exists()
    return last


def module_yaml(**changes) -> dict:
    return {"model": MLP, "inputs": [{"name": "x", "shape": [2, 8], "dtype": "float32"}],
            **changes}


# ---- the yaml file itself ----------------------------------------------------------------

def alias_bomb(levels: int) -> str:
    """inputs[0].shape nesting `levels` lists of ten aliases: 10**levels values."""
    lines = ["model: {module: mlp.py:MLP}", "inputs:", "  - name: x", "    dtype: float32",
             "    shape:", "      - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"      - &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]"
              for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_at_once(capsys, folder):
    line = refused(capsys, folder, alias_bomb(9))   # 10**9 values once expanded
    assert "line 6" in line and "anchors and aliases" in line


@pytest.mark.parametrize("text,problem", [
    ("model: &m {module: mlp.py:MLP}\ninputs: []\n", "anchors and aliases"),
    ("model: {module: mlp.py:MLP}\ninputs: [{name: x, shape: [2, 8], dtype: &d float32}]\n",
     "anchors and aliases"),
    ("model: {module: mlp.py:MLP, kwargs: {a: " + "[" * 40 + "]" * 40 + "}}\n",
     "nested more than 32 levels"),
    ("model: {module: mlp.py:MLP, kwargs: {a: " + "[" * 100_000 + "]" * 100_000 + "}}\n",
     "nest"),
    ("seed: " + "7" * 5000 + "\n", "invalid YAML value"),
    ("model: !!python/object:os.system {}\n", "invalid YAML"),
    ("# " + "x" * (yaml_file.MAX_BYTES + 1) + "\n", f"larger than {yaml_file.MAX_BYTES} bytes"),
])
def test_yaml_loader_bounds(folder, text, problem):
    path = folder / "model.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


def test_values_in_errors_are_bounded(capsys, folder):
    """A value is shown cut short, however long or deep (it was repr'd whole)."""
    data = module_yaml(seed=[[list(range(1000)) for _ in range(20)]])
    assert "..." in refused(capsys, folder, data)
    data = module_yaml(surprise="x" * 10_000)
    line = refused(capsys, folder, data)
    assert "unknown key" in line and len(line) < 300


def test_error_lines_are_capped(capsys, monkeypatch):
    def long_error(args):
        raise RunError("x" * 100_000)
    monkeypatch.setitem(__import__("tilec.cli").cli.COMMANDS, "verify", long_error)
    code, _, err = run_cli(capsys, "verify", "anything")
    assert code == 2 and err.endswith("...\n")
    assert len(err) == len("error: ") + limits.MAX_ERROR_CHARS + 1


# ---- model sizes -------------------------------------------------------------------------

def test_misspelt_family_key_is_an_error_with_a_close_match(capsys, folder):
    config = dict(TINY_LLAMA, vocab_sze=32)
    del config["vocab_size"]
    line = refused(capsys, folder, {"model": {"family": "llama", "config": config}})
    assert "unknown llama config key 'vocab_sze' (did you mean 'vocab_size'?)" in line


@pytest.mark.parametrize("family,key,value,problem", [
    ("llama", "rope_scaling", 5, "model.config: rope_scaling: expected a mapping or null"),
    ("llama", "rope_scaling", {"rope_type": "llama3", "factor": "x"},
     "model.config: rope_scaling.factor: expected a positive number"),
    ("llama", "rope_scaling", {"rope_type": "llama3", "factor": 8.0},
     "model.config: rope_scaling.low_freq_factor: required for rope_type llama3"),
    ("llama", "rope_parameters", {"rope_theta": -1}, "model.config: rope_parameters.rope_theta: expected a positive number"),
    ("llama", "rope_theta", "big", "model.config: rope_theta: expected a positive number"),
    ("llama", "tie_word_embeddings", "yes", "expected true or false"),
    ("llama", "num_key_value_heads", 1.5, "expected a positive integer or null"),
    ("llama", "hidden_size", True, "expected a positive integer"),
    ("glm_moe_dsa", "index_topk", [8], "model.config: index_topk: expected a positive integer"),
    ("glm_moe_dsa", "rms_norm_eps", float("nan"), "expected a positive number"),
    ("glm_moe_dsa", "indexer_types", "full", "model.config: indexer_types: expected a list"),
])
def test_family_config_values_have_their_types(folder, family, key, value, problem):
    config = dict(TINY_LLAMA if family == "llama" else TINY_GLM, **{key: value})
    path = folder / "model.yaml"
    path.write_text(yaml.safe_dump({"model": {"family": family, "config": config}}))
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(")):
        load_config(path)


@pytest.mark.parametrize("data,key", [
    (module_yaml(inputs=[{"name": "x", "shape": [100_000, 100_000], "dtype": "float32"}]),
     "inputs[0].shape: 40.0 GB for the example input 'x'"),
    ({"model": dict(MLP, kwargs={"d_in": 8, "d_hidden": 10 ** 10, "d_out": 8})},
     "model.kwargs: "),
    ({"model": {"family": "llama", "config": dict(TINY_LLAMA, num_hidden_layers=10 ** 9)}},
     "of 1000000000 layers"),
    ({"model": {"family": "llama", "config": {}}, "dtype": "float32"}, "model.config: 27."),
    ({"model": {"family": "glm_moe_dsa", "config": TINY_GLM, "max_seq_len": 10 ** 12}},
     "model.max_seq_len: "),
    ({"model": {"family": "llama", "config": dict(TINY_LLAMA, hidden_size=2 ** 70)}},
     "model.config: "),
])
def test_sizes_beyond_the_machine_are_refused_before_building(capsys, folder, data, key):
    if "inputs" not in data and "module" not in data["model"]:
        data.pop("inputs", None)
    elif "inputs" not in data:
        data["inputs"] = [{"name": "x", "shape": [2, 8], "dtype": "float32"}]
    line = refused(capsys, folder, data)
    assert key in line, line
    assert "memory available" in line or "cannot be built" in line, line


def test_the_estimate_respects_the_address_space_limit(monkeypatch):
    monkeypatch.setattr(limits.resource, "getrlimit", lambda which: (3 << 30, -1))
    monkeypatch.setattr(limits, "_status_kb", lambda key: 1 << 20)   # 1 GiB mapped
    assert limits.available_memory() <= 2 << 30


# ---- workers -----------------------------------------------------------------------------

def test_worker_counts_are_bounded_by_the_target(capsys, folder):
    line = refused(capsys, folder, module_yaml(target={"name": "cpu", "workers": 10 ** 8}))
    assert "target.workers: expected an integer from 1 to 64" in line
    line = refused(capsys, folder, module_yaml(), "--workers", "1000000")
    assert "workers: expected an integer from 1 to 64" in line
    line = refused(capsys, folder, module_yaml(target={"name": "h100", "workers": 2113}))
    assert "from 1 to 2112" in line
    with pytest.raises(ConfigError, match="workers: expected an integer from 1 to 64"):
        tilec.api.compile(torch.nn.Linear(4, 4), (torch.randn(1, 4),), workers=65)


def test_an_engine_with_more_workers_than_its_target_holds_is_refused(capsys, tmp_path):
    def more_workers(plain):
        plain["schedule"]["target"]["workers"] = 65

    def queues(tensors):
        starts = tensors["queue_start"]
        tensors["queue_start"] = torch.cat([starts, starts[-1:].repeat(65 + 1 - len(starts))])
    path = resign(compiled("block"), tmp_path / "e", manifest=more_workers, tensors=queues)
    with pytest.raises(EngineError, match="65 workers, more than target cpu holds"):
        engine_file.load(path, trust_engine_code=True)


# ---- engine pools ------------------------------------------------------------------------

def bigger_arena(plain, numel=3 * 10 ** 9):
    arena = next(p for p in plain["schedule"]["pools"] if p["kind"] == "arena")
    arena["numel"] = numel


def test_an_arena_larger_than_its_buffers_is_refused_on_load(capsys, tmp_path):
    path = resign(compiled("block"), tmp_path / "e", manifest=bigger_arena)
    with pytest.raises(EngineError, match="declares 3000000000 elements, more than the"):
        engine_file.load(path, trust_engine_code=True)
    for command in ("verify", "run"):
        t0 = time.perf_counter()
        code, out, err = run_cli(capsys, command, path)
        assert code == 2 and err.startswith("error: ") and "declares" in err, err
        assert time.perf_counter() - t0 < SECONDS


def test_executors_check_memory_before_allocating(monkeypatch):
    engine = tilec.api.load(compiled("block"))
    monkeypatch.setattr(limits, "available_memory", lambda: 1000)
    allocated = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: allocated.append(a) or real_zeros(*a, **k))
    for backend in ("interpret", "reference"):
        with pytest.raises(RunError, match=r"running this engine takes [\d.]+ kB, more than "
                                           r"the 1\.0 kB of memory available"):
            engine.new_executor(backend)
    assert allocated == []


def test_gpu_workers_must_all_be_resident_with_the_compiled_kernel():
    """A persistent kernel needs every worker resident: the compiled binary's registers
    and shared memory say how many CTAs an SM holds (checked on compile and on load)."""
    assert sizes.resident_ctas(4, None, 0) == 16            # threads: 2048 / 128
    assert sizes.resident_ctas(4, 128, 0) == 4              # registers: 65536 / (128 * 128)
    assert sizes.resident_ctas(4, 32, 150_000) == 1         # shared memory: 228 kB
    engine = engine_file.load(compiled("block"))
    h200 = replace(TARGETS["h200"], workers=200)
    engine = replace(engine, manifest=replace(engine.manifest, schedule=replace(
        engine.manifest.schedule, target=h200)), aot=SimpleNamespace(
        num_warps=4, n_regs=64, shared=150_000))
    assert sizes.size_problem(engine) == (
        "200 workers cannot all be resident on h200: the kernel takes 64 registers per "
        "thread, 4 warps and 150000 bytes of shared memory per CTA, so an SM holds 1 and "
        "the target 132")
    engine.aot.shared = 0
    assert sizes.size_problem(engine) is None
