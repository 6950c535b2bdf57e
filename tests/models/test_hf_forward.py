"""transformers' own forward through the API (issue 15, item 3): `tilec.compile(model,
(input_ids,))` on a *ForCausalLM of each architecture `hf:` reads, with its default
attention implementation (sdpa) and no cache, and nothing else from the user (no
position_ids, no 4-d mask, no attn_implementation): its logits match eager within 1e-3
(float32) on both CPU executors, for input ids other than the example's. What makes it
work is general: values computed from shapes and constant buffers only (the causal and
sliding-window masks, position ids, RoPE's cos and sin) fold to constants at compile
time (compiler/frontend.py: _Lowering.fold), and a ModelOutput's keys name the outputs."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import tilec.api as tilec_api
from tilec.errors import ConfigError

from test_decoders_hf import CASES, build

# One case per architecture (test_decoders_hf's configurations); 10 positions, so every
# sliding window there (6 to 8 keys) hides some.
FORWARD_CASES = {"llama": ("Llama", {}), **{name: CASES[name] for name in (
    "qwen2_window", "qwen3", "mistral_window", "gemma2", "gemma3", "phi3", "gpt2",
    "gpt_neox", "opt", "opt_post_norm")}}
SEQ = 10


@pytest.mark.parametrize("name", sorted(FORWARD_CASES))
def test_forward_matches_eager(name):
    prefix, fields = FORWARD_CASES[name]
    model = build(prefix, **{**fields, "use_cache": False})
    # transformers' default: sdpa, but eager where it soft-caps the scores (Gemma 2)
    assert model.config._attn_implementation == ("eager" if prefix == "Gemma2" else "sdpa")
    gen = torch.Generator().manual_seed(1)
    example, fresh = (torch.randint(0, 96, (1, SEQ), generator=gen) for _ in range(2))
    engine = tilec_api.compile(model, (example,), workers=2)
    assert engine.input_names == ("input_ids",) and engine.output_names == ("logits",)
    with torch.no_grad():
        want = model(fresh).logits
    for backend in ("reference", "interpret"):
        got = engine.run(backend=backend, input_ids=fresh)["logits"]
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-3, backend


def test_a_returned_cache_is_refused_by_its_path():
    """With use_cache, transformers returns a cache object beside the logits: one line
    naming where it is, not torch.export's traceback."""
    model = build("Llama", num_hidden_layers=1)
    assert model.config.use_cache
    with pytest.raises(ConfigError, match=r"forward\(\) returns a DynamicCache at "
                                          r"output\['\w+'\], which is not a tensor"):
        tilec_api.compile(model, (torch.zeros(1, 4, dtype=torch.int64),))
