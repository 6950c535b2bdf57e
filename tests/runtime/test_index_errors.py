"""A run-time index outside its table (an embedding id, a KV-cache position) stops the
step with one RunError naming the op, its source line and the index, on both CPU
backends, where PyTorch raises; the kernel records it in the error buffer (as the hang
watchdog does) and never reads outside the table. The engine then runs on."""
from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tilec.api
from tilec.cli import main
from tilec.errors import RunError
from tilec.ir import abi
from tilec.runtime.error_buffer import index_error_message
from tilec.runtime.executors import GPUExecutor, make_executor

BACKENDS = ["interpret", "reference"]


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 32)

    def forward(self, idx):
        return self.emb(idx)


class EmbedComputed(nn.Module):
    """The ids are computed in the graph, not given: no host check can see them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 32)

    def forward(self, x):
        return self.emb((x * 60.0).to(torch.int64))


class CacheWrite(nn.Module):
    """A state written in place at a run-time position (a KV-cache append)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(8, 16))

    def forward(self, x, pos):
        self.cache.index_copy_(0, pos, x)
        return self.cache * 2.0


class RowsWrite(nn.Module):
    """Three rows written at three run-time positions of a [heads, positions, dim] state
    (a prefill chunk's KV append: row j of the values at positions[j])."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(2, 8, 16))

    def forward(self, x, positions):
        self.cache.index_copy_(1, positions, x.view(3, 2, 16).transpose(0, 1))
        return self.cache * 2.0


def line_of(cls, text: str) -> int:
    lines, first = inspect.getsourcelines(cls.forward)
    return first + next(i for i, line in enumerate(lines) if text in line)


@pytest.fixture(scope="module", params=[1, 3])
def embed(request):
    torch.manual_seed(0)
    model = Embed().eval()
    return model, tilec.api.compile(model, (torch.randint(0, 100, (4,)),),
                                    workers=request.param)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, shown", [(100, "100"), (-1, "-1"), (5000, "5000"),
                                        (2 ** 40, "at least 2147483647")])
def test_embedding_index_out_of_range(embed, backend, bad, shown):
    model, engine = embed
    with pytest.raises(IndexError):
        model(torch.tensor([1, bad, 2, 3]))           # eager PyTorch refuses it too
    with pytest.raises(RunError) as info:
        engine.run(backend=backend, idx=torch.tensor([1, bad, 2, 3]))
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert f"index {shown} is out of range [0, 100) (the rows of its table) in gather " \
           f"'embedding' (emb) at {__file__}:{line_of(Embed, 'self.emb(idx)')}" in message, message


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_runs_on_after_an_index_error(embed, backend):
    """The error buffer is cleared and the step counted: the next good step is exact."""
    model, engine = embed
    ex = make_executor(engine.data, backend)
    good = torch.tensor([0, 99, 7, 7])
    with pytest.raises(RunError, match="^step 0: index 100 "):
        ex.run({"idx": torch.tensor([100, 1, 2, 3])})
    for step in (1, 2):
        assert torch.equal(ex.run({"idx": good})["output0"], model(good).detach()), step
    with pytest.raises(RunError, match="^step 3: index -1 "):
        ex.run({"idx": torch.tensor([0, -1, 2, 3])})


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_devices_in_one_process(backend):
    """Every device gathers: each records the error; all buffers are cleared."""
    torch.manual_seed(0)
    model = Embed().eval()
    engine = tilec.api.compile(model, (torch.randint(0, 100, (4,)),), workers=3, devices=2)
    with pytest.raises(RunError, match=r"^step 0: index 300 is out of range \[0, 100\)"):
        engine.run(backend=backend, idx=torch.tensor([1, 2, 300, 4]))
    good = torch.tensor([1, 2, 3, 4])
    assert torch.equal(engine.run(backend=backend, idx=good)["output0"], model(good).detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_computed_index_out_of_range(backend):
    model = EmbedComputed().eval()
    engine = tilec.api.compile(model, (torch.rand(6) * 1.6,), workers=2)
    x = torch.tensor([0.1, 0.5, 1.0, 1.2, 1.5, 0.0])   # ids 6, 30, 60, 72, 90, 0
    assert torch.equal(engine.run(backend=backend, x=x)["output0"], model(x).detach())
    x[3] = 2.0                                           # id 120
    with pytest.raises(IndexError):
        model(x)
    with pytest.raises(RunError, match=r"index 120 is out of range \[0, 100\)"):
        engine.run(backend=backend, x=x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_position_out_of_range(backend):
    model = CacheWrite().eval()
    engine = tilec.api.compile(model, (torch.randn(1, 16), torch.tensor([3])), workers=2)
    x = torch.randn(1, 16)
    out = engine.run(backend=backend, x=x, pos=torch.tensor([7]))["output0"]
    assert torch.equal(out[7], 2 * x[0]) and not out[:7].any()
    for pos in (8, -1):
        with pytest.raises(RunError) as info:
            engine.run(backend=backend, x=x, pos=torch.tensor([pos]))
        assert f"index {pos} is out of range [0, 8) (the positions of its state) in " \
               f"state_update" in str(info.value)
        assert f"{__file__}:{line_of(CacheWrite, 'index_copy_')}" in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_rows_at_their_positions(backend):
    """Each row at its own position, the others untouched; one position out of range is
    reported and its row alone not written."""
    model = RowsWrite().eval()
    engine = tilec.api.compile(model, (torch.randn(3, 32), torch.tensor([0, 1, 2])), workers=2)
    x = torch.randn(3, 32)
    for positions in ([5, 6, 7], [2, 0, 6]):
        model.cache.zero_()
        want = model(x, torch.tensor(positions)).detach()
        ex = make_executor(engine.data, backend)   # (Engine.run keeps its state)
        got = ex.run({"x": x, "positions": torch.tensor(positions)})["output0"]
        assert torch.equal(got, want) and got.any()
    with pytest.raises(RunError) as info:
        engine.run(backend=backend, x=x, positions=torch.tensor([1, 8, 2]))
    assert "index 8 is out of range [0, 8) (the positions of its state) in state_update" \
        in str(info.value)


def test_kernel_checks_before_it_reads(embed):
    """The generated gather records a bad id, then reads row 0 in its place."""
    source = embed[1].data.kernel_source
    check = source.index("index_error(error, arow, t0, t1, t2, 0, gi1, gi1_bad, 100)")
    replace = source.index("gi1 = tl.where(gi1_bad, 0, gi1)", check)
    assert source.index("* 32 + cols", replace) > replace   # the table load comes after


def test_cli_run_reports_the_index(embed, tmp_path, capsys):
    path = tmp_path / "e.engine"
    embed[1].save(str(path))
    save_file({"idx": torch.tensor([1, 2, 3, 5000])}, str(tmp_path / "in.safetensors"))
    code = main(["run", str(path), "--inputs", str(tmp_path / "in.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: step 0: index 5000 is out of range")
    assert len(err.strip().splitlines()) == 1


def test_message_of_a_handmade_record(embed):
    fused = embed[1].data.manifest.schedule.taskgraph.fused
    words = [abi.INDEX_ERROR, 0, 0, 0, 0, 0, -2 ** 31, 100]
    assert "index at most -2147483648 is out of range [0, 100)" in \
        index_error_message(words, 4, fused)
    # a record the kernel never writes (no such check) still formats
    words = [abi.INDEX_ERROR, 0, 1, 2, 3, 9, 7, 100]
    assert index_error_message(words, 4, fused) == \
        "step 4: index 7 out of range [0, 100) in the task of group 0 at tile (1, 2, 3)"


def test_gpu_executor_check_raises_on_an_index_record(embed, monkeypatch):
    """GPUExecutor.check on a hand-made error buffer, on CPU (no kernel launched)."""
    engine = embed[1].data
    gpu = GPUExecutor.__new__(GPUExecutor)
    ref = make_executor(engine, "reference")
    gpu.__dict__.update(engine=engine, tables=ref.tables, schedule=ref.schedule,
                        step_index=2, error=torch.zeros(abi.ERROR_WORDS, dtype=torch.int32))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    gpu.check()
    gpu.error[:] = torch.tensor([abi.INDEX_ERROR, 0, 0, 0, 0, 0, 5000, 100])
    with pytest.raises(RunError, match=r"^step 2: index 5000 is out of range \[0, 100\)"):
        gpu.check()
    gpu.check()   # cleared: the next step starts clean


EMBED_PY = '''
import torch

class Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 32)

    def forward(self, idx):
        return self.emb(idx) * 2.0
'''


@pytest.mark.parametrize("low, high, refused", [(0, 100, False), (0, 150, True),
                                                (-1, 50, True)])
def test_yaml_input_range_must_fit_the_table(tmp_path, capsys, low, high, refused):
    """model.yaml's `high` for an input that indexes a table: at most its rows, else the
    random inputs of `tilec run` would index outside it (they were clamped silently)."""
    (tmp_path / "embed.py").write_text(EMBED_PY)
    (tmp_path / "m.yaml").write_text(
        "model: {module: embed.py:Embed}\n"
        f"inputs: [{{name: idx, shape: [6], dtype: int64, low: {low}, high: {high}}}]\n")
    out = tmp_path / "m.engine"
    code = main(["compile", str(tmp_path / "m.yaml"), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    if not refused:
        assert code == 0 and main(["run", str(out)]) == 0
        return
    assert code == 2 and not out.exists()
    assert err[-1] == (
        f"error: {tmp_path / 'm.yaml'}: inputs: idx: values from [{low}, {high}) index "
        f"gather 'embedding', whose bound is 100 at {tmp_path / 'embed.py'}:10: "
        f"return self.emb(idx) * 2.0: low must be >= 0 and high <= 100"), err
