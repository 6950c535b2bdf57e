"""The pipeline as data (compiler/pipeline.py): the stage list is the one
docs/architecture.md describes, dumps are written as their stages end, in stage order,
and read as text; hooks hear every stage boundary and are closed when a stage fails."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import tilec
from tilec.compiler import pipeline
from tilec.compiler.hooks import EngineOutput, GpuCompile
from tilec.compiler.pipeline import STAGES, CompileState, Dumps, Progress, run_stages
from tilec.compiler.stage import Hook, Stage

DOCS = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def documented_stages() -> list[str]:
    """The first column of the stage table in docs/architecture.md, in order."""
    text = DOCS.read_text()
    table = text[text.index("| stage | code |"):].split("\n\n")[0].splitlines()[2:]
    return [name.strip() for row in table for name in row.split("|")[1].split(",")]


def test_the_stage_table_is_the_stage_list():
    hook_stages = [s.name for s in GpuCompile(90, 4, "m", 8).stages]
    documented = documented_stages()
    assert documented == [s.name for s in STAGES] + hook_stages + ["save", "seal"]


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))).softmax(-1)


def test_dumps_are_text_written_in_stage_order(tmp_path, monkeypatch):
    written: list[str] = []
    write = Dumps.write

    def recording(self, files):
        written.extend(files)
        write(self, files)

    monkeypatch.setattr(Dumps, "write", recording)
    tilec.compile(Model().eval(), (torch.randn(4, 32),), workers=2, dump_dir=tmp_path)
    assert written == sorted(written, key=lambda n: int(n[:2]))   # 01_ .. 07_, in order
    assert set(written) <= set(pipeline.dump_names(1))
    ir = json.loads((tmp_path / "02_ir.json").read_text())
    ops = [line for line in (tmp_path / "02_ir.txt").read_text().splitlines()
           if line.startswith("%")]
    assert len(ops) == len(ir["ops"])
    assert any(re.search(r"= matmul\(%x, .*\)  f32\[4, 64\]", line) for line in ops), ops
    tasks = json.loads((tmp_path / "04_tasks.json").read_text())
    lines = [line for line in (tmp_path / "04_tasks.txt").read_text().splitlines()
             if re.match(r"  t\d+ ", line)]
    assert len(lines) == len(tasks["tasks"])
    assert sum(line.count("RAW:t") + line.count("WAR:t") + line.count("WAW:t")
               for line in lines) == len(tasks["deps"])
    schedule = (tmp_path / "05_schedule.txt").read_text()
    assert "worker 0:" in schedule and "worker 1:" in schedule and "signal e" in schedule
    assert "%g0_" in (tmp_path / "03_fused.txt").read_text()


class Recorder(Hook):
    def __init__(self):
        self.heard: list[str] = []

    def after(self, stage, state, progress):
        self.heard.append(stage)

    def finish(self, state, progress):
        self.heard.append("finish")

    def close(self, failed):
        self.heard.append(f"close failed={failed}")


def test_hooks_hear_each_stage_and_are_closed_when_one_fails():
    state = CompileState(torch.nn.Identity(), ())
    ok = Stage("one", lambda s: s)
    skipped = Stage("never", lambda s: s, when=lambda s: False)
    hook = Recorder()
    run_stages((ok, skipped, ok), state, Progress(), Dumps(None), (hook,))
    assert hook.heard == ["one", "one", "finish", "close failed=False"]

    def broken(s):
        raise RuntimeError("stage failed")

    hook = Recorder()
    with pytest.raises(RuntimeError, match="stage failed"):
        run_stages((ok, Stage("two", broken), ok), state, Progress(), Dumps(None), (hook,))
    assert hook.heard == ["one", "close failed=True"]


def test_a_failed_compile_leaves_no_engine_file(tmp_path):
    """EngineOutput writes only once every stage has run."""
    out = EngineOutput(str(tmp_path / "m.engine"))
    state = CompileState(torch.nn.Identity(), ())

    def broken(s):
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        run_stages((Stage("pack", broken),), state, Progress(), Dumps(None), (out,))
    assert not (tmp_path / "m.engine").exists()
