"""benchmarks/gpu_decode.py, the prepared GPU run, checked where no GPU is: its
arguments, that it stops at once with one error line without a GPU, the planted hang
(a real deadlock, as the interpreter shows), the profile summary (from an interpreter
profile, the same records a GPU profile gives) and the report."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import tilec.api
from tilec.errors import ScheduleHangError
from tilec.runtime.executors import make_executor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_decode", ROOT / "benchmarks/gpu_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(bench):
    args = bench.parse_args([])
    assert (args.prompt_len, args.new_tokens, args.max_seq_len) == (32, 128, 256)
    assert args.budget_s <= 360       # the run must fit in 6 minutes
    for bad in (["--prompt-len", "200", "--new-tokens", "100"], ["--new-tokens", "1"]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(bad)
        assert e.value.code == 2


def test_without_a_gpu_it_stops_at_once(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "CUDA GPU" in err[0]
    assert not list(tmp_path.iterdir())      # nothing was run, nothing written


def test_the_planted_hang_is_a_real_deadlock(bench):
    """The same plant the GPU watchdog must catch: on the interpreter it deadlocks, and
    the report names the planted worker and event."""
    engine = tilec.api.compile(str(ROOT / "examples/block.yaml"), workers=3)
    ex = make_executor(engine.data, "interpret")
    worker, row, ev = bench.plant_hang(ex.tables["tasks"], ex.schedule.events,
                                       ex.tables["queue_start"].tolist())
    assert int(ex.tables["tasks"][row, 7]) == ex.schedule.events[ev].signals + 1
    with pytest.raises(ScheduleHangError) as e:
        ex.run(engine.random_inputs(0))
    assert f"worker {worker} " in str(e.value) and f"event {ev} " in str(e.value)


def test_profile_summary_and_report(bench):
    engine = tilec.api.compile(str(ROOT / "examples/llama_tiny.yaml"))
    ex = engine.new_executor("interpret")
    ex.start_profile()
    ex.run({"token": torch.tensor([5]), "pos": torch.tensor([0])})
    s = bench.summarize_profile(engine, ex.trace)
    sched = engine.data.schedule()
    assert sum(k["tasks"] for k in s["kinds"]) == len(sched.taskgraph.tasks) == len(ex.trace)
    assert all(k["measured_us"] > 0 and k["predicted_us"] > 0 for k in s["kinds"])
    assert s["predicted_step_us"] == pytest.approx(max(sched.finish_us))
    assert any(k["weight_bytes_per_task"] > 0 for k in s["kinds"])

    results = {"gpu": "test", "copy_gbps": 4000.0, "floor_ms_per_token": 0.6,
               "tilec_predicted_step_us": 700.0, "checks_passed": True,
               "rows": [{"system": "tilec kernel (device time)", "ms_per_token": 0.75,
                         "tokens_per_s": 1333.3, "achieved_gbps": 3300.0,
                         "fraction_of_copy_bw": 0.825, "tokens_match_tilec": 128},
                        {"system": "torch.compile reduce-overhead (HF static cache)",
                         "ms_per_token": 1.5, "tokens_per_s": 666.7, "achieved_gbps": 1650.0,
                         "fraction_of_copy_bw": 0.41, "tokens_match_tilec": 30}]}
    g = bench.goals(results)
    assert g["figures"]["speedup_vs_torch_compile"] == pytest.approx(2.0)
    assert g["figures"]["prediction_error"] == pytest.approx(50 / 750)
    assert g["met"] == {"fraction_of_copy_bw": True, "speedup_vs_torch_compile": True,
                        "prediction_error": True}
    results["goals"] = g
    text = bench.report(results)
    assert "tilec kernel (device time)" in text and "goal speedup_vs_torch_compile: 2.000" in text
