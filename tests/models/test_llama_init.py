"""The llama family's seeded random weights: drawn a chunk at a time (and, when
compiling, in a background thread), yet the same bit for bit as one draw per tensor."""
import math
import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

import tilec.models.llama as llama
from tilec.compiler import build
from tilec.compiler import config as cfgmod

TINY = {"vocab_size": 37, "hidden_size": 48, "intermediate_size": 80,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": False}


def one_call_per_tensor(model, seed, std):
    """The definition: tensor i's bytes, from the PCG64 stream seeded by (seed, i), all
    drawn at once; byte b (int8) is (2b + 1) * std / sqrt((256**2 - 1) / 3)."""
    out = {}
    for index, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("layernorm.weight") or name == "norm.weight":
            out[name] = torch.ones_like(p)
            continue
        stream = np.random.PCG64(np.random.SeedSequence((seed, index)))
        raw = stream.random_raw((p.numel() + 7) // 8).view(np.int8)[:p.numel()]
        odd = torch.from_numpy(raw).to(torch.float32) * 2 + 1
        out[name] = (odd * (std / math.sqrt((256 ** 2 - 1) / 3))).reshape(p.shape).to(p.dtype)
    return out


@pytest.mark.parametrize("chunk", [8, 48, 1024, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_draw_matches_one_draw_per_tensor(monkeypatch, chunk, dtype):
    # 37 x 48 and 80 x 48 values: chunks that divide them and chunks that leave a tail
    monkeypatch.setattr(llama, "INIT_CHUNK", chunk)
    cfg = llama.LlamaConfig.from_dict(TINY)
    model = llama.LlamaDecodeStep.empty(cfg, 8, dtype)
    llama.init_random(list(model.named_parameters()), seed=5, std=0.3)
    want = one_call_per_tensor(model, 5, 0.3)
    for name, p in model.named_parameters():
        assert p.dtype == dtype
        assert torch.equal(p.view(-1).view(torch.uint8), want[name].view(-1).view(torch.uint8)), name


def test_draws_have_the_std_asked_for_and_differ_by_seed():
    cfg = llama.LlamaConfig.from_dict(dict(TINY, vocab_size=4096))
    model = llama.LlamaDecodeStep.empty(cfg, 8, torch.float32)
    llama.init_random(list(model.named_parameters()), seed=1, std=0.3)
    embed = model.embed_tokens.weight.detach().clone()
    assert abs(embed.std().item() - 0.3) < 0.01 and abs(embed.mean().item()) < 0.01
    assert embed.unique().numel() == 256
    llama.init_random(list(model.named_parameters()), seed=2, std=0.3)
    assert (model.embed_tokens.weight != embed).float().mean() > 0.99


def family_config(tmp_path, **changes):
    path = tmp_path / "tiny.yaml"
    path.write_text("model: {family: llama, config: {}, max_seq_len: 8}\n")
    cfg = cfgmod.load_config(str(path))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, config=TINY),
                               **changes)


def test_background_draw_gives_the_definition(tmp_path):
    """What build_model_async leaves once its thread is done: every parameter as one
    draw per tensor (the definition above) makes it, and the same example inputs as
    the blocking build_model."""
    cfg = family_config(tmp_path, seed=3, dtype="bfloat16")
    _, inputs = build.build_model(cfg)
    drawn, drawn_inputs, pending = build.build_model_async(cfg)
    assert pending is not None
    pending.wait()
    pending.wait()   # waiting again is harmless
    expected = one_call_per_tensor(drawn, seed=3, std=0.02)
    for name, p in drawn.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, expected[name]), name
    assert all(torch.equal(a, b) for a, b in zip(inputs, drawn_inputs))


def test_cancelled_draw_stops(tmp_path, monkeypatch):
    """A draw cancelled before its first chunk draws nothing more: the thread is held
    at its first chunk until the stop is set, then must leave every weight alone."""
    gate, stream = threading.Event(), llama._stream

    def gated(seed, index):
        gate.wait()
        return stream(seed, index)

    monkeypatch.setattr(llama, "_stream", gated)
    model, _, pending = build.build_model_async(family_config(tmp_path))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)    # a value no draw gives
    canceller = threading.Thread(target=pending.cancel)   # sets the stop, then joins
    canceller.start()
    while not pending._stop.is_set():
        time.sleep(0.001)
    gate.set()
    canceller.join()
    assert not any(t.name == "tilec-weights" for t in threading.enumerate())
    assert all((p == 7.0).all() for name, p in model.named_parameters()
               if "norm" not in name)
    pending.cancel()
    pending.wait()


def test_draw_errors_reach_the_waiter(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("no memory left")
    monkeypatch.setattr(llama, "init_random", broken)
    _, _, pending = build.build_model_async(family_config(tmp_path))
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
                                              "max_seq_len": 16, "prefill": False},
                                    "seed": 3}))
    from_yaml = tilec.api.compile(str(path))
    cfg = cfgmod.load_config(str(path))
    module, inputs = build.build_model(cfg)
    kept = {name: p.clone() for name, p in module.state_dict().items()}
    from_module = tilec.api.compile(module, inputs)
    pools = [k for k in from_yaml.data.tensors if k.startswith("pool.")]
    assert pools
    for k in pools:
        assert torch.equal(from_yaml.data.tensors[k], from_module.data.tensors[k]), k
    for name, p in module.state_dict().items():    # the caller's module keeps its weights
        assert torch.equal(p, kept[name]), name


def test_pack_takes_or_frees_the_weights_it_may_and_only_those(tmp_path):
    """compile_module(release_constants=True): weights laid out as the pool wants them
    (a family model's: DecoderStep.empty) become the pool, others are freed once
    copied into it; without it (a caller's module), they are untouched and share no
    memory with the engine."""
    import copy

    from tilec.compiler.pipeline import compile_module

    cfg = family_config(tmp_path, seed=1)
    for release, laid_out in ((False, True), (True, True), (True, False)):
        module, inputs = build.build_model(cfg)
        if not laid_out:
            module = copy.deepcopy(module)   # each weight in memory of its own
        before = {n: p.clone() for n, p in module.named_parameters()}
        engine = compile_module(module, inputs, release_constants=release)
        pool = engine.tensors["pool.w_float32"].untyped_storage().data_ptr()
        for name, p in module.named_parameters():
            if release and not laid_out:
                assert p.untyped_storage().size() == 0, name
                continue
            assert torch.equal(p, before[name]), name
            assert (p.untyped_storage().data_ptr() == pool) == release, name


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
