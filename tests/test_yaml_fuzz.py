"""model.yaml fuzz (issue 19): documents drawn from the schema (docs/model-yaml.md,
tilec/compiler/config.py), then mutated as a careless user or an attacker would:
values of the wrong type, huge numbers, unknown keys, deep nesting, anchors and
aliases, missing keys, and damaged text (bytes that are not UTF-8, a cut, an integer
of thousands of digits).

Every case runs `tilec compile` in a fresh process (tests/cli_sandbox.py: forked from
a server that imported tilec once) whose address space is limited to 1 GB above its
start, and must end as a success (exit 0, an engine written) or as exactly one
`error:` line, the last one, with exit 2 (no traceback, no internal error), within
10 CPU seconds (not wall seconds: the suite shares its cores) and 1 GB of peak
resident memory, both measured. Mutated documents fail at the
config checks in a fraction of a second; the few valid ones are tiny and compile.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from cli_sandbox import Sandbox

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SECONDS = 10
MEMORY = 1 << 30
# A deeper search, by hand: TILEC_FUZZ_EXAMPLES=2000 TILEC_FUZZ_RANDOM=1 pytest this file
EXAMPLES_RUN = int(os.environ.get("TILEC_FUZZ_EXAMPLES", 40))
DERANDOMIZE = not os.environ.get("TILEC_FUZZ_RANDOM")


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox() as s:
        yield s


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz")
    (path / "mlp.py").write_text((EXAMPLES / "mlp.py").read_text())
    return path


def compile_ok_or_one_error(sandbox, folder: Path, text: bytes) -> str:
    """Compile `text` as model.yaml in the sandbox; check the contract; the outcome."""
    path, engine = folder / "model.yaml", folder / "out.engine"
    path.write_bytes(text)
    engine.unlink(missing_ok=True)
    r = sandbox.run(["compile", str(path), "-o", str(engine), "--no-aot"], SECONDS, MEMORY)
    said = f"exit {r.code} in {r.seconds:.2f} CPU s, peak {r.peak_bytes >> 20} MB:\n{r.stderr}"
    assert r.seconds < SECONDS, said
    assert 0 <= r.peak_bytes < MEMORY, said   # -1: killed before it could say
    lines = r.stderr.strip().splitlines()
    if r.code == 0:
        assert engine.is_file() and not any(line.startswith("error") for line in lines), said
        return "compiled"
    assert r.code == 2, said
    assert lines and lines[-1].startswith("error: "), said
    assert sum(line.startswith("error") for line in lines) == 1, said
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, said
    assert not engine.exists(), said
    return lines[-1]


# ---- documents from the schema -----------------------------------------------------------

small = st.sampled_from([4, 8, 16])

module_model = st.builds(
    lambda d_in, d_hidden, d_out, batch, dtype: {
        "model": {"module": "mlp.py:MLP",
                  "kwargs": {"d_in": d_in, "d_hidden": d_hidden, "d_out": d_out}},
        "inputs": [{"name": "x", "shape": [batch, d_in], "dtype": dtype}]},
    small, small, small, st.sampled_from([1, 2]), st.sampled_from(["float32", "bfloat16"]))

llama_model = st.builds(
    lambda vocab, kv, seq: {"model": {"family": "llama", "max_seq_len": seq, "config": {
        "vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": kv,
        "tie_word_embeddings": True}}},
    st.sampled_from([16, 32]), st.sampled_from([1, 2]), st.sampled_from([8, 16]))

mla_model = st.just({"model": {"family": "glm_moe_dsa", "max_seq_len": 8, "config": {
    "vocab_size": 16, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 8, "kv_lora_rank": 8,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "index_n_heads": 1,
    "index_head_dim": 8, "index_topk": 4}}})   # one dense layer (first_k_dense_replace 3)

hf_model = st.just({"model": {"hf": "no-such-checkpoint", "max_seq_len": 8}})

target = st.one_of(
    st.sampled_from(["cpu", "h100", "h200"]),
    st.fixed_dictionaries({"name": st.sampled_from(["cpu", "h100"])},
                          optional={"workers": st.integers(1, 4),
                                    "devices": st.sampled_from([1, 2])}),
    st.just({"name": "cpu", "workers": 2,
             "roles": {"mm": {"workers": [0], "kinds": ["matmul_epilogue"]}, "rest": {}}}),
    st.just({"name": "cpu", "workers": 2, "devices": 2,   # device roles with worker roles
             "roles": {"first": {"devices": [0], "kinds": ["gather"]},
                       "rest": {"roles": {"mm": {"workers": [0], "ops": ["matmul"]},
                                          "other": {}}}}}))

schedule = st.fixed_dictionaries({}, optional={
    "policy": st.sampled_from(["critical_path", "round_robin"]),
    "tile_m": st.sampled_from([16, 32]), "tile_n": st.sampled_from([16, 64, 128]),
    "tile_k": st.sampled_from([16, 64]), "kv_chunk": st.sampled_from([16, 32])})

extras = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["float32", "bfloat16"]), "seed": st.integers(0, 100),
    "target": target, "schedule": schedule})

documents = st.builds(lambda model, more: {**model, **more},
                      st.one_of(module_model, llama_model, mla_model, hf_model), extras)


# ---- mutations ---------------------------------------------------------------------------

WRONG = [None, True, -1, 0, 3.5, math.inf, math.nan, "text", "", "1e26", [], [1, "a"], {},
         {"k": 1}, "float32 ", "mlp.py"]
HUGE = [2 ** 31, 2 ** 40, 2 ** 63, -(2 ** 63), 10 ** 30, 10 ** 4000]
UNKNOWN = ["surprise", "vocab_sze", "worker", "tile", "model", "Name", "name ", "kwargs"]


def places(doc) -> list[tuple[object, object]]:
    """Every (container, key or index) in `doc`."""
    found, stack = [], [doc]
    while stack:
        x = stack.pop()
        keys = list(x) if isinstance(x, dict) else range(len(x)) if isinstance(x, list) else []
        for k in keys:
            found.append((x, k))
            stack.append(x[k])
    return found


def nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@st.composite
def mutated(draw, doc):
    """A copy of `doc` with 0-3 structural mutations (each recorded with event())."""
    doc = copy.deepcopy(doc)   # st.just hands out one object every time
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3, 0]))):
        spots = places(doc)
        if not spots:
            break
        kind = draw(st.sampled_from(["type", "huge", "unknown", "deep", "alias", "drop"]))
        event(f"mutation: {kind}")
        box, key = spots[draw(st.integers(0, len(spots) - 1))]
        if kind == "type":
            box[key] = copy.deepcopy(draw(st.sampled_from(WRONG)))
        elif kind == "huge":
            box[key] = draw(st.sampled_from(HUGE))
        elif kind == "unknown":
            mapping = box if isinstance(box, dict) else doc
            mapping[draw(st.sampled_from(UNKNOWN))] = draw(st.sampled_from([1, "x", None]))
        elif kind == "deep":
            box[key] = nested(draw(st.sampled_from([3, 20, 40, 200])))
        elif kind == "alias":   # two places share one object: the dump anchors it
            shared = [1, 2]
            other_box, other_key = spots[draw(st.integers(0, len(spots) - 1))]
            box[key] = other_box[other_key] = shared
        elif kind == "drop" and isinstance(box, dict):
            del box[key]
    return doc


def dump(doc) -> bytes:
    return yaml.safe_dump(doc, default_flow_style=None, sort_keys=False,
                          width=100).encode()


@st.composite
def damaged(draw, text: bytes):
    """`text` with at most one text-level mutation."""
    kind = draw(st.sampled_from(["none", "none", "none", "bytes", "cut", "digits", "bomb"]))
    event(f"text: {kind}")
    at = draw(st.integers(0, len(text)))
    if kind == "bytes":
        return text[:at] + b"\xff\xfe" + text[at:]
    if kind == "cut":
        return text[:at]
    if kind == "digits":
        return text + b"seed: " + b"9" * 5000 + b"\n"
    if kind == "bomb":
        lines = [b"bomb: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
        lines += [b"bomb%d: &a%d [" % (i, i) + b", ".join([b"*a%d" % (i - 1)] * 10) + b"]"
                  for i in range(1, 10)]
        return b"\n".join(lines) + b"\n" + text
    return text


@settings(max_examples=EXAMPLES_RUN, deadline=None, derandomize=DERANDOMIZE, database=None,
          phases=(Phase.explicit, Phase.generate, Phase.shrink),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_any_model_yaml_compiles_or_is_one_error_line(sandbox, folder, data):
    doc = data.draw(documents)
    doc = data.draw(mutated(doc))
    text = data.draw(damaged(dump(doc)))
    note(text.decode(errors="replace")[:3000])
    outcome = compile_ok_or_one_error(sandbox, folder, text)
    event("compiled" if outcome == "compiled" else "refused")


HOSTILE = {
    "alias bomb in inputs[0].shape": (
        b"model: {module: mlp.py:MLP}\ninputs:\n  - name: x\n    dtype: float32\n    shape:\n"
        b"      - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + b"".join(
            b"      - &a%d [" % i + b", ".join([b"*a%d" % (i - 1)] * 10) + b"]\n"
            for i in range(1, 10))),
    "40 GB input": b"model: {module: mlp.py:MLP, kwargs: {d_in: 100000}}\n"
                   b"inputs: [{name: x, shape: [100000, 100000], dtype: float32}]\n",
    "a llama of defaults": b"model: {family: llama, config: {vocab_sze: 256}}\n",
    "a billion layers": b"model: {family: llama, config: {num_hidden_layers: 1000000000}}\n",
    "a hundred million workers": b"model: {module: mlp.py:MLP}\n"
                                 b"inputs: [{name: x, shape: [2, 256], dtype: float32}]\n"
                                 b"target: {name: cpu, workers: 100000000}\n",
    "a trillion-position cache": b"model: {family: glm_moe_dsa, max_seq_len: 1000000000000}\n",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_documents_within_bounds(sandbox, folder, name):
    line = compile_ok_or_one_error(sandbox, folder, HOSTILE[name])
    assert line.startswith("error: "), line
