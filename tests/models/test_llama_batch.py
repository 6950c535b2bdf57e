"""Batched decode (`model: {batch: B}`): one step advances B sequences, each in its own
KV-cache slot. Against transformers (a tiny random Llama through hf:, float32): a batch
of prompts of different lengths yields for each sequence exactly what it yields alone
and what transformers' generate yields, on both CPU executors; an idle slot disturbs
no other; sequences stop on their own and free their slot for the next prompt."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

import tilec.api as tilec_api  # noqa: E402
from tilec.cli import main  # noqa: E402
from tilec.compiler.build import build_model  # noqa: E402
from tilec.compiler.config import load_config  # noqa: E402
from tilec.errors import ConfigError  # noqa: E402
import tiny_llama  # noqa: E402
from tiny_llama import save_tiny_llama  # noqa: E402
from tilec.runtime.generate import generate_batch  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VOCAB = 96
PROMPTS = [[5, 7, 9], [1, 2, 3, 4, 5, 6], [40, 41]]
NEW_TOKENS = 4


def _yaml(folder, name, **model):
    path = folder / f"{name}.yaml"
    # (decode-only: the batched decode step is what these test; test_llama_prefill_slots
    # tests a batch engine's prefill entry)
    path.write_text(json.dumps({"model": {"hf": "ckpt", "max_seq_len": 32, "prefill": False,
                                          **model},
                                "dtype": "float32", "target": {"name": "cpu", "workers": 2}}))
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A GQA Llama of two layers with a sliding window (a mask per slot on both
    sides), its engine alone (batch 1) and batched (batch 3, split attention)."""
    root = tmp_path_factory.mktemp("batch")
    model = save_tiny_llama(transformers, root / "ckpt", VOCAB)
    alone = tilec_api.compile(str(_yaml(root, "alone")))
    batched = tilec_api.compile(str(_yaml(root, "batched", batch=3)), kv_chunk=16)
    return model, alone, batched, root


def hf_greedy(model, prompt):
    return tiny_llama.hf_greedy(model, prompt, NEW_TOKENS)


def test_batched_engine_shape(hf):
    _, alone, batched, _ = hf
    assert [io.shape for io in batched.data.manifest.inputs] == [(3,), (3,)]
    assert [io.shape for io in alone.data.manifest.inputs] == [(1,), (1,)]
    assert batched.verify().ok
    # attention per (slot, kv head): 3 x 2 of them in each of 2 layers, each split into
    # 2 chunks of 16 keys and a merge
    tasks = batched.data.schedule().taskgraph.tasks
    assert sum(t.group.endswith("_attention") for t in tasks) == 2 * 3 * 2 * 3


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_batch_yields_what_each_prompt_yields_alone(hf, backend):
    model, alone, batched, _ = hf
    gens = batched.generate(PROMPTS, NEW_TOKENS, backend=backend, logits=True,
                            stop_at_eos=False)
    assert [g.prompt for g in gens] == PROMPTS
    for prompt, g in zip(PROMPTS, gens):
        ref_tokens, ref_logits = hf_greedy(model, prompt)
        assert g.tokens == ref_tokens
        assert (g.logits - ref_logits).abs().max().item() <= 1e-3
        if backend == "reference":   # (the interpreter is slow: one backend alone)
            one = alone.generate(prompt, NEW_TOKENS, backend=backend, logits=True,
                                 stop_at_eos=False)
            assert one.tokens == g.tokens and torch.allclose(one.logits, g.logits, atol=1e-5)


def test_idle_slot_disturbs_no_other(hf):
    """Slot 1 idle (token 0 at position 0) or busy with anything: slots 0 and 2 give
    bitwise the same outputs, step after step."""
    _, _, batched, _ = hf
    quiet = batched.new_executor("reference")
    busy = batched.new_executor("reference")
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        token = torch.randint(0, VOCAB, (3,), generator=g)
        pos = torch.tensor([step, 0, 2 * step])
        noisy_token, noisy_pos = token.clone(), pos.clone()
        noisy_token[1] = int(torch.randint(0, VOCAB, (1,), generator=g))
        noisy_pos[1] = int(torch.randint(0, 32, (1,), generator=g))
        token[1] = 0
        a = quiet.run({"token": token, "pos": pos})
        b = busy.run({"token": noisy_token, "pos": noisy_pos})
        for slot in (0, 2):
            assert torch.equal(a["logits"][slot], b["logits"][slot]), (step, slot)


def test_sequences_stop_alone_and_free_their_slot(hf):
    """Four prompts on three slots, one stopping early at an EOS id: the fourth takes
    the freed slot and each sequence makes what it makes alone, up to its EOS."""
    _, alone, batched, _ = hf
    prompts = PROMPTS + [[9, 8]]
    solo = [alone.generate(p, NEW_TOKENS, backend="reference", stop_at_eos=False).tokens
            for p in prompts]
    eos = solo[2][1]   # the third sequence's second token ends it
    want = [tokens[:tokens.index(eos) + 1] if eos in tokens else tokens for tokens in solo]
    spec = dataclasses.replace(batched.generation_spec, eos_token_ids=(eos,))
    gens = generate_batch(batched.new_executor("reference"), spec, prompts, NEW_TOKENS)
    assert [g.tokens for g in gens] == want
    assert len(gens[2].tokens) <= 2


def test_run_prompt_ids_repeated(hf, capsys):
    _, _, batched, root = hf
    path = root / "batched.engine"
    batched.save(path)
    capsys.readouterr()
    args = ["run", str(path), "--backend", "reference", "--max-new-tokens", str(NEW_TOKENS),
            "--json"]
    for p in PROMPTS:
        args += ["--prompt-ids", ",".join(map(str, p))]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    want = batched.generate(PROMPTS, NEW_TOKENS, backend="reference")
    assert [s["new_tokens"] for s in out["sequences"]] == [g.tokens for g in want]
    assert [s["prompt"] for s in out["sequences"]] == PROMPTS


def test_batch_one_is_the_default(hf):
    """`batch: 1` is today's engine, byte for byte."""
    _, alone, _, root = hf
    again = tilec_api.compile(str(_yaml(root, "alone_b1", batch=1)))
    assert again.data.manifest == dataclasses.replace(alone.data.manifest,
                                                      model="alone_b1")
    assert all(torch.equal(again.data.tensors[k], v) for k, v in alone.data.tensors.items())


@pytest.mark.parametrize("batch", [0, -2, "4", True, 4096])
def test_bad_batch_is_one_line(tmp_path, batch):
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps({"model": {"family": "llama", "batch": batch}}))
    with pytest.raises(ConfigError, match=r"model\.batch: expected an integer from 1 to 1024"):
        tilec_api.compile(str(path))


def test_batch_refused_where_it_does_not_apply(tmp_path):
    path = tmp_path / "m.yaml"
    glm = yaml.safe_load((EXAMPLES / "glm_dsa_tiny.yaml").read_text())
    path.write_text(json.dumps({**glm, "model": {**glm["model"], "batch": 2}}))
    with pytest.raises(ConfigError, match=r"model\.batch: the glm_moe_dsa family decodes one "
                                          r"sequence per step \(batch 1\), found 2"):
        tilec_api.compile(str(path))
    path.write_text(json.dumps({"model": {"module": "m.py:M", "batch": 2},
                                "inputs": [{"name": "x", "shape": [1], "dtype": "float32"}]}))
    with pytest.raises(ConfigError, match=r"model\.batch: only for `family` or `hf` models"):
        tilec_api.compile(str(path))


def test_gpu_target_tiles_run_batch_rows_on_tensor_cores():
    """On a GPU target a batch of 2..15 rows gets 16-row (tensor-core) matmul tiles,
    the rows past the batch masked: each weight tile read once, in few tasks. The same
    engine on the interpreter matches eager PyTorch."""
    cfg = load_config(EXAMPLES / "llama_tiny.yaml")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, batch=4))
    engine = tilec_api.compile(cfg, target="h200", workers=8, dtype="float32", kv_chunk=16,
                               aot=False)
    tilings = engine.data.schedule().taskgraph.tilings
    assert {tl.block_m for tl in tilings if "matmul" in tl.group} == {16}
    model, _ = build_model(cfg)
    ex = engine.new_executor("interpret")
    token = torch.randint(0, 256, (4,), generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([0, 3, 9, 1])
    with torch.no_grad():
        want = model.eval()(token, pos)
    got = ex.run({"token": token, "pos": pos})
    assert (got["logits"] - want["logits"]).abs().max().item() <= 1e-4
    assert torch.equal(got["next_token"].reshape(-1), want["next_token"].reshape(-1))
