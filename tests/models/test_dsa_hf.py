"""DeepseekV32ForCausalLM and GlmMoeDsaForCausalLM (GLM-5) from Hugging Face checkpoints
against transformers: DeepSeek-V3's MLA and experts plus DSA's lightning indexer. Tiny
random checkpoints written by transformers' own save_pretrained, compiled through `hf:`,
16 greedy tokens equal to generate(do_sample=False) and logits within 1e-3 (float32); a
prompt longer than index_topk, so from position index_topk on attention really drops
cached tokens; the config fields honoured or refused by name.

Top-k ties: torch.topk (transformers' indexer and router) breaks exact ties in no fixed
order, and the indexer's scores tie often (a position whose every head's ReLU is zero
scores exactly 0), so each checkpoint's seed was chosen so that every indexer and
router selection transformers makes while generating is decided by a margin
(`MARGIN`; `selection_margins` checks it on the run itself, not assumed)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tilec.errors import ConfigError
from tilec.models.hf import load_checkpoint

from test_deepseek_hf import edit, engine_matches, router_margins, save
from test_llama_hf import NEW_TOKENS, hf_greedy
from test_llama_hf_fields import eager_logits

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]       # longer than index_topk
MARGIN = 1e-4
MAX_SEQ = 32
SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
             num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24,
             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8,
             num_experts_per_tok=2, n_shared_experts=1, max_position_embeddings=64,
             index_n_heads=8, index_head_dim=16, index_topk=5, num_hidden_layers=2)
# name: (transformers architecture, config fields beyond SIZES, seed)
CASES = {
    # a dense layer, then a MoE layer routing to the best 2 of 4 groups; the indexer
    # rotates halves (V3.2)
    "v32": ("DeepseekV32", dict(first_k_dense_replace=1, n_group=4, topk_group=2), 0),
    # GLM-5: layer 1 shares layer 0's selection; the indexer rotates pairs; the layer
    # kinds from mlp_layer_types
    "glm": ("GlmMoeDsa", dict(mlp_layer_types=["dense", "sparse"],
                              indexer_types=["full", "shared"], n_group=2, topk_group=1), 0),
}


def case_model(folder, name, **changes):
    arch, fields, seed = CASES[name]
    return save(folder, seed, arch, SIZES, **{**fields, **changes})


def indexer_margins(model, prompt):
    """Greedy generation with transformers, recording for each indexer call the smallest
    gap between the k-th and the (k+1)-th index score of a row, where the latter is a
    visible position (causally masked ones score about finfo.min or -inf)."""
    gaps = []
    real_topk = torch.Tensor.topk

    def recording(self, k, *args, **kwargs):
        ranked = self.sort(dim=-1, descending=True).values
        if ranked.shape[-1] > k:
            rival = ranked[..., k]
            gap = (ranked[..., k - 1] - rival)[rival > -1e30]
            if gap.numel():
                gaps.append(gap.min())
        return real_topk(self, k, *args, **kwargs)

    def enter(*_):
        torch.Tensor.topk = recording

    def leave(*_):
        torch.Tensor.topk = real_topk

    indexers = [m for m in model.modules() if type(m).__name__.endswith("Indexer")]
    handles = [m.register_forward_pre_hook(enter) for m in indexers] + \
        [m.register_forward_hook(leave) for m in indexers]
    try:
        hf_greedy(model, prompt)
    finally:
        torch.Tensor.topk = real_topk
        for h in handles:
            h.remove()
    assert gaps, "the indexer never chose among more than index_topk positions"
    return min(float(g) for g in gaps)


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / request.param
    model = case_model(folder, request.param)
    yaml_path = folder.parent / f"{request.param}.yaml"
    yaml_path.write_text(json.dumps({"model": {"hf": request.param, "max_seq_len": MAX_SEQ},
                                     "dtype": "float32", "target": "cpu"}))
    return request.param, model, yaml_path


def test_selections_are_decided_by_a_margin(checkpoint):
    _, model, _ = checkpoint
    assert indexer_margins(model, PROMPT) > MARGIN
    assert router_margins(model, PROMPT) > MARGIN


def test_engine_matches_transformers(checkpoint):
    """Compiled (2 workers, keys in chunks of 16); the interpreter on the GLM case, the
    reference executor on both."""
    name, model, yaml_path = checkpoint
    engine_matches(yaml_path, model, PROMPT,
                   ("reference", "interpret") if name == "glm" else ("reference",))


def test_four_devices_with_the_sparse_role_on_device_0(checkpoint):
    """The indexers and the routers on device 0 (`target.roles` claiming the `indexer`
    and `mlp.gate` modules, as the seed's engine runs GLM-5), the rest over devices 1-3:
    transformers' tokens and logits (the reference executor: the interpreter runs the
    four-device example in tests/runtime/test_multi_device.py)."""
    name, model, yaml_path = checkpoint
    four = yaml_path.parent / f"{name}_4dev.yaml"
    four.write_text(json.dumps({
        "model": {"hf": name, "max_seq_len": MAX_SEQ}, "dtype": "float32",
        "target": {"name": "cpu", "workers": 2, "devices": 4, "roles": {
            "sparse": {"devices": [0], "modules": ["indexer", "mlp.gate"]},
            "mla": {"devices": "1-3"}}}}))
    engine_matches(four, model, PROMPT, ("reference",))


@pytest.mark.parametrize("case, without", [
    ("v32", dict(index_topk=MAX_SEQ)),                 # the indexer keeps everything
    ("glm", dict(indexer_types=["full", "full"])),     # layer 1 runs its own indexer
])
def test_what_each_field_does_matters(tmp_path, case, without):
    """tilec's module follows transformers, and the field moves the logits (the same
    weights with it changed answer differently), so the test above can fail on it."""
    hf = case_model(tmp_path / case, case)
    ours = load_checkpoint(tmp_path / case, max_seq_len=MAX_SEQ)
    want = hf_greedy(hf, PROMPT)[1]
    assert (eager_logits(ours, PROMPT, NEW_TOKENS) - want).abs().max().item() < 1e-4
    other = hf_greedy(case_model(tmp_path / "other", case, **without), PROMPT)[1]
    assert (other - want).abs().max().item() > 1e-2


def test_the_indexer_rotates_as_its_architecture_does(tmp_path):
    """V3.2's indexer turns halves, GLM-5's pairs: the same weights read as the other
    architecture answer differently (and tilec follows each)."""
    arch, fields, seed = CASES["glm"]
    fields = {k: v for k, v in fields.items() if k != "indexer_types"}   # all full
    glm = save(tmp_path / "glm", seed, "GlmMoeDsa", SIZES, **fields)
    v32 = save(tmp_path / "v32", seed, "DeepseekV32", SIZES, **fields)
    for model, folder in ((glm, "glm"), (v32, "v32")):
        ours = load_checkpoint(tmp_path / folder, max_seq_len=MAX_SEQ)
        want = hf_greedy(model, PROMPT)[1]
        assert (eager_logits(ours, PROMPT, NEW_TOKENS) - want).abs().max().item() < 1e-4
    assert (hf_greedy(glm, PROMPT)[1] - hf_greedy(v32, PROMPT)[1]).abs().max().item() > 1e-2


@pytest.mark.parametrize("case, changes, message", [
    ("v32", dict(q_lora_rank=None), "q_lora_rank: required with the DSA indexer"),
    ("v32", dict(layer_types=["full_attention"] * 2), "layer_types: .* is not supported"),
    ("v32", dict(mlp_bias=True), "mlp_bias: True is not supported"),
    ("v32", dict(rope_interleave=False), "rope_interleave: False is not supported by "
                                         "tilec's DeepseekV32ForCausalLM"),
    ("v32", dict(indexer_types=["full", "full"]), "indexer_types: .* is not supported"),
    ("v32", dict(mlp_layer_types=["dense", "moe"]), "mlp_layer_types: \\['moe'\\]: "
                                                   "expected dense or sparse"),
    ("v32", dict(index_head_dim=4), "index_head_dim: smaller than qk_rope_head_dim"),
    ("glm", dict(indexer_types=["shared", "full"]), "indexer_types: layer 0 is 'shared'"),
    ("glm", dict(indexer_types=["full"]), "indexer_types: 1 entries for 2 layers"),
    ("glm", dict(index_topk=0), "index_topk: expected a positive integer"),
])
def test_refused_fields_are_named(tmp_path, case, changes, message):
    case_model(tmp_path / "c", case)
    edit(tmp_path / "c", **changes)
    with pytest.raises(ConfigError, match="config.json: " + message):
        load_checkpoint(tmp_path / "c", max_seq_len=MAX_SEQ)


def test_glm_indexer_pattern_fields(tmp_path):
    """GlmMoeDsaConfig's index_topk_pattern / index_topk_freq, read as transformers reads
    them when indexer_types is absent."""
    from tilec.models.hf import read_config

    case_model(tmp_path / "c", "glm")
    data = json.loads((tmp_path / "c" / "config.json").read_text())
    del data["indexer_types"]
    for extra, want in ((dict(index_topk_pattern="FS"), ("full", "shared")),
                        (dict(index_topk_freq=2, index_skip_topk_offset=1), ("full", "shared")),
                        ({}, ("full", "full"))):
        (tmp_path / "c" / "config.json").write_text(json.dumps({**data, **extra}))
        assert read_config(tmp_path / "c").indexer_types == want
        cfg = transformers.GlmMoeDsaConfig(**{k: v for k, v in {**data, **extra}.items()
                                              if k not in ("architectures",)})
        assert tuple(cfg.indexer_types) == want
