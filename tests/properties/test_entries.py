"""Property test: a decoder engine's two entries over one KV cache. Random small Llama
configs (heads, KV heads, widths, layers), prefill chunks, prompt lengths, worker
counts, policies and batches (1 or 2 sequence slots), compiled from a model.yaml into
one engine with a decode and a prefill entry. Every engine must verify (each entry alone and both together), and a
prompt fed in chunks through the prefill entry, then decoded, must give eager
PyTorch's greedy tokens and logits (the decode step fed one token at a time), with the
interpreter's workers interleaved at random."""
import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tilec.api as tilec_api
from engines import eager_greedy
from tilec.compiler.build import build_model
from tilec.compiler.config import load_config
from tilec.models.llama import LlamaDecodeStep

NEW_TOKENS = 3


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(heads=st.sampled_from([2, 4]), kv_split=st.booleans(), head_dim=st.sampled_from([8, 16]),
       layers=st.integers(1, 2), max_seq=st.sampled_from([16, 24]), chunk=st.integers(2, 8),
       prompt_len=st.integers(1, 10), workers=st.integers(1, 3),
       policy=st.sampled_from(["critical_path", "round_robin"]), seed=st.integers(0, 1000),
       batch=st.sampled_from([1, 2]))
def test_entries_over_one_cache_match_eager(tmp_path, heads, kv_split, head_dim, layers,
                                            max_seq, chunk, prompt_len, workers, policy,
                                            seed, batch):
    kv_heads = heads // 2 if kv_split else heads
    config = {"vocab_size": 40, "hidden_size": heads * head_dim, "intermediate_size": 48,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "initializer_range": 0.3}
    path = tmp_path / f"m{seed}.yaml"
    path.write_text(json.dumps({
        "model": {"family": "llama", "config": config, "max_seq_len": max_seq,
                  "batch": batch, "prefill": {"chunk": chunk}},
        "seed": seed, "target": {"name": "cpu", "workers": workers},
        "schedule": {"policy": policy}}))
    engine = tilec_api.compile(str(path))
    report = engine.verify()
    assert report.ok, report.violations[:1]
    assert "prefill: conflicts_ordered" in report.checks and "entries_share_state" in report.checks
    g = torch.Generator().manual_seed(seed)
    # at batch 2 a second, shorter prompt, prefilled into the other slot meanwhile
    prompts = [torch.randint(0, 40, (n,), generator=g).tolist()
               for n in (prompt_len, max(1, prompt_len // 2))[:batch]]
    gens = engine.generate(prompts, NEW_TOKENS, backend="interpret", policy="random",
                           seed=seed, logits=True, stop_at_eos=False)
    module, _ = build_model(load_config(str(path)))
    if batch > 1:   # eager_greedy feeds one sequence: the same weights at batch 1
        one = LlamaDecodeStep(module.cfg, max_seq).eval()
        one.load_state_dict({k: v for k, v in module.state_dict().items() if "cache" not in k},
                            strict=False)
        module = one
    for prompt, got in zip(prompts, gens):
        # whole chunks of the prompt through the prefill, its last token too if alone
        n = len(prompt)
        assert got.prefill_steps == -(-n // chunk) - (n % chunk == 1) or n + chunk > max_seq
        tokens, logits = eager_greedy(module, prompt, NEW_TOKENS)
        err = (got.logits - logits).abs().max().item()
        assert err <= 1e-3, f"error {err:.2e}"
        assert got.tokens == tokens
