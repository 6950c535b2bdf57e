"""Plans (`tilec compile --plan`, `tilec.compile(..., plan=True)`): the whole engine but
the weights, built on the meta device. A plan is the engine a compile would make, less
its pool data; inspect and verify accept it, run refuses it with one line; an `hf:`
folder with only config.json plans; a device whose weights and cache do not fit is
said so plainly; a plan edited to look runnable is refused.

The big shapes are Llama-3-70B's layers (hidden 8192, 64 heads, 8 KV heads, MLP 28672)
with two or three layers and few workers, so each plan takes seconds."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import tilec
from engines import compiled, resign, run_cli
from tilec.errors import ConfigError, RunError
from tilec.inspect import fit_lines, fit_report

LLAMA_70B_LAYER = {"hidden_size": 8192, "intermediate_size": 28672,
                   "num_attention_heads": 64, "num_key_value_heads": 8,
                   "rope_theta": 500000.0}


def one_line_error(err: str, *words: str) -> None:
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


def compile_error(err: str, *words: str) -> None:
    """`tilec compile` names the model on a line of its own, then the one error line."""
    header, *rest = err.strip().splitlines()
    assert header.startswith("tilec compile") and len(rest) == 1, err
    assert rest[0].startswith("error: "), err
    for w in words:
        assert w in err, err


@pytest.fixture(scope="module")
def hf_plan(tmp_path_factory) -> Path:
    """`tilec compile --plan` of an hf folder that holds only config.json: a 70B-shaped
    Llama of two layers with a 32000-token vocabulary, on an h200 with 8 workers."""
    tmp = tmp_path_factory.mktemp("hfplan")
    folder = tmp / "llama70b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
        "num_hidden_layers": 2, "max_position_embeddings": 8192, **LLAMA_70B_LAYER}))
    yaml = tmp / "plan.yaml"
    yaml.write_text(f"model: {{hf: {folder}, max_seq_len: 1024}}\n"
                    "target: {name: h200, workers: 8}\n")
    return yaml


@pytest.fixture(scope="module")
def hf_plan_file(hf_plan) -> Path:
    from tilec.cli import main

    out = hf_plan.parent / "plan.engine"
    assert main(["compile", str(hf_plan), "-o", str(out), "--plan"]) == 0
    return out


def test_cli_plan_of_a_config_only_hf_folder(capsys, hf_plan, hf_plan_file):
    """The plan is written; the same folder cannot compile for real (no weights)."""
    assert sorted(p.name for p in (hf_plan.parent / "llama70b").iterdir()) == ["config.json"]
    engine = tilec.load(hf_plan_file)
    assert engine.is_plan and engine.devices == 1
    assert not any(k.startswith("pool.") for k in engine.data.tensors)
    weights = next(p for p in engine.data.manifest.schedule.pools if p.kind == "weight")
    # embeddings + lm_head (2 x 32000 x 8192) and two layers of 70B, in bf16
    assert weights.numel * 2 > 2 * (2 * 32000 * 8192 + 2 * 8192 * (8192 + 2 * 1024 + 8192
                                                                    + 3 * 28672))
    code, out, err = run_cli(capsys, "compile", hf_plan, "-o", hf_plan.parent / "real.engine")
    assert code == 2
    compile_error(err, "no model.safetensors")


def test_inspect_and_verify_accept_a_plan_and_run_refuses_it(capsys, hf_plan_file, tmp_path):
    code, out, err = run_cli(capsys, "inspect", hf_plan_file, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["plan"] is True and s["memory"]["fits"] is True
    assert s["memory"]["capacity"] == tilec.ir.target.TARGETS["h200"].memory_bytes
    assert s["memory"]["weights"] > 3e9 and s["memory"]["kv"] == 2 * 2 * 1024 * 8 * 128 * 2
    trace = tmp_path / "trace.json"
    code, out, err = run_cli(capsys, "inspect", hf_plan_file, "--trace", trace)
    assert code == 0, err
    assert "a plan" in out and "fits" in out
    assert json.loads(trace.read_text())["traceEvents"]
    code, out, err = run_cli(capsys, "verify", hf_plan_file)
    assert code == 0 and "FAIL" not in out, out + err
    for argv in (["run", hf_plan_file], ["run", hf_plan_file, "--prompt-ids", "1,2"],
                 ["verify", hf_plan_file, "--interleavings", "2"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == "", (argv, out)
        one_line_error(err, "is a plan", "no weights")


def test_a_plan_is_the_engine_less_its_weights():
    """Same manifest (tied embeddings, three layers: two traced, one built) and kernel as
    the real compile, without any pool tensor; run and generate refuse it."""
    from tilec.compiler.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "examples" / "llama_tiny.yaml")
    cfg = replace(cfg, model=replace(cfg.model, config={**cfg.model.config,
                                                        "num_hidden_layers": 3}))
    real = tilec.compile(cfg, workers=3)
    plan = tilec.compile(cfg, workers=3, plan=True)
    assert plan.is_plan and not real.is_plan
    assert plan.data.manifest == replace(real.data.manifest, plan=True)
    assert plan.data.kernel_source == real.data.kernel_source
    assert sorted(plan.data.tensors) == sorted(k for k in real.data.tensors
                                               if not k.startswith("pool."))
    assert plan.verify().ok
    with pytest.raises(RunError, match="is a plan"):
        plan.run(**plan.random_inputs())
    with pytest.raises(RunError, match="is a plan"):
        plan.generate([1, 2], 2)


def test_a_plan_that_does_not_fit_says_so(capsys, tmp_path, monkeypatch):
    """Two 70B-shaped layers on two devices hold 2-3 GB of weights each: more than an
    h100 made to hold 2 GB (the capacity is the target's data, stored in the plan)."""
    from tilec.ir import target

    assert target.TARGETS["h100"].memory_bytes == 81559 << 20
    assert target.TARGETS["h200"].memory_bytes == 143771 << 20
    monkeypatch.setitem(target.TARGETS, "h100",
                        replace(target.TARGETS["h100"], memory_bytes=2 << 30))
    yaml = tmp_path / "big.yaml"
    config = {**LLAMA_70B_LAYER, "vocab_size": 32000, "num_hidden_layers": 2}
    yaml.write_text(json.dumps({"model": {"family": "llama", "config": config,
                                          "max_seq_len": 256},
                                "target": {"name": "h100", "workers": 8, "devices": 2}}))
    out = tmp_path / "big.engine"
    code, stdout, err = run_cli(capsys, "compile", yaml, "-o", out, "--plan")
    assert code == 0, err
    assert "DOES NOT FIT" in err and "does NOT fit: devices 0, 1" in err, err
    assert "tokens/s" in err
    engine = tilec.load(out)
    assert engine.is_plan and engine.devices == 2
    report = fit_report(engine.parts)
    assert report["fits"] is False and report["predicted_step_us"] > 0
    for m in report["memory"]:
        assert m["capacity"] == 2 << 30 and m["fits"] is False
        assert m["total"] == m["weights"] + m["kv"] + m["scratch"] > 2 << 30
        assert m["kv"] > 0
    assert any("DOES NOT FIT" in line for line in fit_lines(report, "h100"))
    code, stdout, err = run_cli(capsys, "inspect", out, "--json")
    assert code == 0 and [d["memory"]["fits"] for d in json.loads(stdout)["devices"]] == \
        [False, False]
    code, stdout, err = run_cli(capsys, "run", out)
    assert code == 2
    one_line_error(err, "is a plan")


def test_a_plan_of_a_module():
    """A caller's module: its weights exist already; the plan copies none of them."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU())
    engine = tilec.compile(model, (torch.randn(2, 32),), plan=True)
    assert engine.is_plan and not any(k.startswith("pool.") for k in engine.data.tensors)
    assert engine.summary()["memory"]["weights"] >= (32 * 64 + 64) * 4
    with pytest.raises(RunError, match="is a plan"):
        engine.run(input=torch.randn(2, 32))


# ---- hostile plans ----------------------------------------------------------------------

def test_a_plan_edited_to_look_runnable_is_refused(capsys, hf_plan_file, tmp_path):
    """Clearing the flag leaves the pools without data: refused, as a missing pool."""
    path = resign(hf_plan_file, tmp_path / "e",
                  manifest=lambda m: m.__setitem__("plan", False))
    for command in ("run", "inspect", "verify"):
        code, out, err = run_cli(capsys, command, path)
        assert code == 2 and out == "", (command, out)
        one_line_error(err, "missing")


def test_a_plan_with_pool_data_or_an_engine_marked_plan_is_refused(capsys, hf_plan_file,
                                                                   tmp_path):
    """A plan stores no pool; an engine with pools is no plan."""
    def add_pool(t):
        t["pool.w_bfloat16"] = torch.zeros(16, dtype=torch.bfloat16)

    stored = resign(hf_plan_file, tmp_path / "stored", tensors=add_pool)
    marked = resign(compiled("block"), tmp_path / "marked",
                    manifest=lambda m: m.__setitem__("plan", True))
    for path in (stored, marked):
        for command in ("run", "inspect", "verify"):
            code, out, err = run_cli(capsys, command, path)
            assert code == 2 and out == "", (command, out)
            one_line_error(err, "a plan (no weights) stores 'pool.")


def test_plan_needs_no_weights_but_a_config(tmp_path):
    """A folder without config.json is still refused, with the same line as before."""
    (tmp_path / "empty").mkdir()
    yaml = tmp_path / "m.yaml"
    yaml.write_text(f"model: {{hf: {tmp_path / 'empty'}}}\n")
    with pytest.raises(ConfigError, match="config.json"):
        tilec.compile(str(yaml), plan=True)


# ---- GLM-5 at its own widths -------------------------------------------------------------

GLM5_ROLES = {"indexer": {"devices": [0], "modules": ["indexer", "gate"]},
              "mla": {"devices": "1-7"}}


def test_glm5_at_its_own_widths_plans_on_eight_h200s(tmp_path):
    """benchmarks/plan_full.py's GLM-5 plan in its cheapest form: transformers'
    GlmMoeDsaConfig defaults (hidden 6144, 64 heads, MLA ranks 2048 and 512, the
    indexer's 32 heads and top-2048, 256 routed experts of which 8 per token, a 154880
    vocabulary) with two of its 78 layers, one dense and one MoE, on 8 h200 devices, the
    sparse-index and routing role on device 0 as the seed runs it. It verifies; device 0
    holds the indexer and the router, no expert; the routed experts are all held."""
    transformers = pytest.importorskip("transformers")
    config = json.loads(transformers.GlmMoeDsaConfig().to_json_string())
    assert (config["hidden_size"], config["n_routed_experts"], config["num_experts_per_tok"],
            config["num_hidden_layers"]) == (6144, 256, 8, 78)
    config.update(architectures=["GlmMoeDsaForCausalLM"], num_hidden_layers=2,
                  first_k_dense_replace=1, mlp_layer_types=["dense", "sparse"],
                  layer_types=config["layer_types"][:2],
                  indexer_types=config["indexer_types"][:2])
    folder = tmp_path / "glm5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    yaml = tmp_path / "glm5.yaml"
    yaml.write_text(json.dumps({"model": {"hf": str(folder), "max_seq_len": 4096},
                                "target": {"name": "h200", "devices": 8,
                                           "roles": GLM5_ROLES}}))
    engine = tilec.compile(str(yaml), plan=True)
    assert engine.is_plan and engine.devices == 8
    assert engine.verify().ok
    report = fit_report(engine.parts)
    weights = [m["weights"] for m in report["memory"]]
    experts = 256 * 3 * 6144 * 2048 * 2          # one MoE layer's routed experts, bf16
    # device 0: the embeddings and the indexer's and router's weights, no expert
    assert weights[0] < experts / 2 and weights[0] < min(weights[1:])
    assert sum(weights[1:]) >= experts
    assert report["fits"] and report["predicted_step_us"] > 0
    assert any("tokens/s" in line for line in fit_lines(report, "h200"))
