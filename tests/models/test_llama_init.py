"""The llama family's seeded random weights: drawn a chunk at a time (and, when
compiling, in a background thread), yet the same bit for bit as one draw per tensor."""
import dataclasses
import threading

import pytest
import torch

import tilec.models.llama as llama
from tilec.compiler import config as cfgmod

TINY = {"vocab_size": 37, "hidden_size": 48, "intermediate_size": 80,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": False}


def one_call_per_tensor(model, seed, std):
    """The definition: each tensor drawn whole in float32, scaled, rounded into place."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            out[name] = torch.ones_like(p)
        else:
            out[name] = torch.randn(p.shape, generator=gen).mul_(std).to(p.dtype)
    return out


@pytest.mark.parametrize("chunk", [16, 48, 1024, 1 << 22])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_draw_matches_one_draw_per_tensor(monkeypatch, chunk, dtype):
    # 37 x 48 and 80 x 48 values: chunks that divide them and chunks that leave a tail,
    # including a tail under 16 (which joins the chunk before it)
    monkeypatch.setattr(llama, "INIT_CHUNK", chunk)
    cfg = llama.LlamaConfig.from_dict(TINY)
    model = llama.LlamaDecodeStep.empty(cfg, 8, dtype)
    llama.init_random(list(model.named_parameters()), seed=5, std=0.3)
    want = one_call_per_tensor(model, 5, 0.3)
    for name, p in model.named_parameters():
        assert p.dtype == dtype
        assert torch.equal(p.view(-1).view(torch.uint8), want[name].view(-1).view(torch.uint8)), name


def test_chunks_keep_every_tail_at_least_16(monkeypatch):
    monkeypatch.setattr(llama, "INIT_CHUNK", 32)
    for n in range(1, 200):
        spans = llama._chunks(n)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all((b - a) % 16 == 0 for a, b in spans[:-1])
        assert len(spans) == 1 or spans[-1][1] - spans[-1][0] >= 16


def family_config(tmp_path, **changes):
    path = tmp_path / "tiny.yaml"
    path.write_text("model: {family: llama, config: {}, max_seq_len: 8}\n")
    cfg = cfgmod.load_config(str(path))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, config=TINY),
                               **changes)


def test_background_draw_gives_the_same_model(tmp_path):
    cfg = family_config(tmp_path, seed=3, dtype="bfloat16")
    model, inputs = cfgmod.build_model(cfg)
    drawn, drawn_inputs, pending = cfgmod.build_model_async(cfg)
    assert pending is not None
    pending.wait()
    pending.wait()   # waiting again is harmless
    for (name, a), (_, b) in zip(model.state_dict().items(), drawn.state_dict().items()):
        assert a.dtype == b.dtype == (torch.int64 if name == "positions" else torch.bfloat16)
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(inputs, drawn_inputs))


def test_cancelled_draw_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(llama, "INIT_CHUNK", 16)   # many chunks: cancel lands mid-draw
    _, _, pending = cfgmod.build_model_async(family_config(tmp_path))
    pending.cancel()   # returns once the thread has stopped
    assert not any(t.name == "tilec-weights" for t in threading.enumerate())
    pending.cancel()
    pending.wait()


def test_draw_errors_reach_the_waiter(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("no memory left")
    monkeypatch.setattr(llama, "init_random", broken)
    _, _, pending = cfgmod.build_model_async(family_config(tmp_path))
    with pytest.raises(RuntimeError, match="no memory left"):
        pending.wait()


@pytest.mark.parametrize("tied", [True, False])
def test_packing_a_yaml_model_frees_its_weights_and_packs_the_same_pools(tmp_path, tied):
    """A yaml-built model's weights are freed as pack copies them into the pools (the
    compile's peak is then one copy of the weights); the pools are the same bytes as
    those of a compile of the same module that keeps its weights (a caller's module),
    tied embeddings included (two parameters, one storage)."""
    import yaml

    import tilec.api

    path = tmp_path / "tiny.yaml"
    config = dict(TINY, tie_word_embeddings=tied)
    path.write_text(yaml.safe_dump({"model": {"family": "llama", "config": config,
                                              "max_seq_len": 16}, "seed": 3}))
    from_yaml = tilec.api.compile(str(path))
    cfg = cfgmod.load_config(str(path))
    module, inputs = cfgmod.build_model(cfg)
    kept = {name: p.clone() for name, p in module.state_dict().items()}
    from_module = tilec.api.compile(module, inputs)
    pools = [k for k in from_yaml.data.tensors if k.startswith("pool.")]
    assert pools
    for k in pools:
        assert torch.equal(from_yaml.data.tensors[k], from_module.data.tensors[k]), k
    for name, p in module.state_dict().items():    # the caller's module keeps its weights
        assert torch.equal(p, kept[name]), name


def test_a_weight_pack_cannot_free_stays_and_the_compile_succeeds(tmp_path):
    """A module-form model.yaml whose factory hands over numpy-backed weights (torch
    cannot resize that memory): pack copies it and leaves it alone."""
    import numpy as np

    import tilec.api

    (tmp_path / "np_model.py").write_text(
        "import numpy as np\nimport torch\nfrom torch import nn\n\n"
        "WEIGHT = np.arange(64, dtype=np.float32).reshape(8, 8) / 64\n\n"
        "class Scale(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.register_buffer('w', torch.from_numpy(WEIGHT))\n\n"
        "    def forward(self, x):\n"
        "        return x @ self.w\n")
    (tmp_path / "np_model.yaml").write_text(
        "model: {module: np_model.py:Scale}\n"
        "inputs: [{name: x, shape: [2, 8], dtype: float32}]\n")
    engine = tilec.api.compile(str(tmp_path / "np_model.yaml"))
    x = torch.randn(2, 8)
    out = engine.run(backend="reference", x=x)
    expected = x @ torch.from_numpy(np.arange(64, dtype=np.float32).reshape(8, 8) / 64)
    assert torch.allclose(next(iter(out.values())), expected, atol=1e-5)
