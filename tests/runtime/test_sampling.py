"""The sampling `tilec run`, `Engine.generate` and `tilec serve` share
(runtime.generate.Sampling): top-k, then top-p, at a temperature, seeded."""
from __future__ import annotations

import json

import pytest
import torch

from engines import compiled, run_cli
from tilec.runtime.generate import Sampling, sample


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits, -1)
    for p in (0.3, 0.6, 0.8, 0.95):
        # brute force: the most likely tokens, in order, until their mass reaches p
        order = torch.argsort(probs, descending=True).tolist()
        nucleus, mass = set(), 0.0
        for t in order:
            nucleus.add(t)
            mass += float(probs[t])
            if mass >= p:
                break
        g = torch.Generator().manual_seed(0)
        drawn = {sample(logits, Sampling(1.0, 0, p, 0), g) for _ in range(400)}
        assert drawn == nucleus, p


def test_sampling_without_top_p_draws_as_before():
    """top_p = 1 leaves the draw as `tilec run` made it before top_p existed."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    for temperature, top_k in [(0.7, 0), (1.3, 5)]:
        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        scaled = logits / temperature
        if top_k:
            scaled = scaled.masked_fill(scaled < torch.topk(scaled, top_k).values[-1],
                                        float("-inf"))
        before = [int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=g1))
                  for _ in range(20)]
        assert [sample(logits, Sampling(temperature, top_k, 1.0, 9), g2)
                for _ in range(20)] == before


@pytest.mark.parametrize("sampling, word", [
    (Sampling(temperature=-0.5), "temperature"),
    (Sampling(temperature=float("nan")), "temperature"),
    (Sampling(1.0, top_k=-1), "top_k"), (Sampling(1.0, top_p=0.0), "top_p"),
    (Sampling(1.0, top_p=1.01), "top_p"), (Sampling(1.0, seed=-3), "seed")])
def test_sampling_settings_out_of_range(sampling, word):
    assert sampling.problem().startswith(word)
    assert Sampling(0.8, 3, 0.5, 7).problem() is None


def test_tilec_run_top_p_tiny_is_greedy(capsys):
    """A nucleus of probability 1e-6 is the most likely token alone: greedy's choice."""
    engine = compiled("llama_tiny")

    def tokens(*args):
        code, out, _ = run_cli(capsys, "run", engine, "--backend", "reference", "--json",
                               "--prompt-ids", "1,2", "--max-new-tokens", 5, *args)
        assert code == 0
        return json.loads(out)["new_tokens"]

    greedy = tokens()
    assert tokens("--temperature", 2.0, "--top-p", 1e-6, "--seed", 4) == greedy
    assert tokens("--temperature", 2.0, "--seed", 4) != greedy
