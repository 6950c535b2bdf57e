"""DeepseekV3ForCausalLM from a Hugging Face checkpoint against transformers: tiny random
checkpoints written by transformers' own save_pretrained, compiled through `hf:`, 16
greedy tokens equal to generate(do_sample=False) and logits within 1e-3 (float32), on
both CPU executors; the config fields honoured or refused by name.

Top-k ties: torch.topk (transformers' router) breaks exact ties in no fixed order, so
each test checkpoint's seed was chosen so that every router selection transformers
makes while generating is decided by a margin (`ROUTER_MARGIN`, checked by
`router_margins` on the run itself, not assumed)."""
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tilec.api as tilec_api
from tilec.errors import ConfigError
from tilec.models.hf import load_checkpoint

from test_llama_hf import NEW_TOKENS, compare, hf_greedy
from test_llama_hf_fields import eager_logits

PROMPT = [3, 1, 4, 1, 5]
ROUTER_MARGIN = 1e-4
SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
             num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8,
             num_experts_per_tok=2, n_shared_experts=1, max_position_embeddings=64)
# name: config fields beyond SIZES
CASES = {
    # a dense layer, then a MoE layer whose router keeps the best 2 of 4 groups;
    # q through its low-rank path; interleaved RoPE (transformers' default)
    "lora_groups": dict(num_hidden_layers=2, first_k_dense_replace=1, q_lora_rank=24,
                        n_group=4, topk_group=2, routed_scaling_factor=2.5),
    # three MoE layers (the compiler traces two and builds the third from them), q
    # projected directly, RoPE over halves, no normalisation of the routing weights
    "plain_q": dict(num_hidden_layers=3, first_k_dense_replace=0, q_lora_rank=None,
                    n_group=1, topk_group=1, rope_interleave=False, norm_topk_prob=False,
                    routed_scaling_factor=1.5, n_shared_experts=2),
    # YaRN as DeepSeek-V3 uses it: frequencies, cos/sin and the scores' scale all change
    "yarn": dict(num_hidden_layers=2, first_k_dense_replace=1, q_lora_rank=24, n_group=2,
                 topk_group=1, rope_parameters=dict(
                     rope_type="yarn", factor=4.0, rope_theta=1e4, mscale=0.707,
                     mscale_all_dim=0.707, original_max_position_embeddings=16)),
}


def save(folder, seed=0, arch="DeepseekV3", sizes=SIZES, **fields):
    """A tiny checkpoint of transformers' `arch`ForCausalLM with weights larger than
    transformers' init (norms near one) and a random e_score_correction_bias, so every
    part moves the logits."""
    cfg = getattr(transformers, f"{arch}Config")(**{**sizes, **fields})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = name.endswith("norm.weight")
            p.copy_((1.0 if norm else 0.0) + (0.1 if norm else 0.3) *
                    torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    model.save_pretrained(folder)
    return model


def router_margins(model, prompt):
    """Greedy generation with transformers, recording for each router call the smallest
    gap at a top-k boundary it decides (the topk_group-th against the next group, the
    k-th against the next expert among the kept groups)."""
    gaps = []

    def hook(router, args, _):
        x = args[0].reshape(-1, router.hidden_dim).float()
        choice = torch.sigmoid(x @ router.weight.float().T) + router.e_score_correction_bias
        g = router.num_group
        if router.topk_group < g:
            groups = choice.view(-1, g, router.num_experts // g).topk(2).values.sum(-1)
            ranked = groups.sort(descending=True).values
            gaps.append((ranked[:, router.topk_group - 1] - ranked[:, router.topk_group]).min())
            kth = ranked[:, router.topk_group - 1:router.topk_group]
            hidden = (groups < kth).repeat_interleave(router.num_experts // g, dim=1)
            choice = choice.masked_fill(hidden, float("-inf"))
        ranked = choice.sort(descending=True).values
        gaps.append((ranked[:, router.top_k - 1] - ranked[:, router.top_k]).min())

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if type(m).__name__.endswith("TopkRouter")]
    try:
        hf_greedy(model, prompt)
    finally:
        for h in handles:
            h.remove()
    return min(float(gap) for gap in gaps)


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / request.param
    model = save(folder, **CASES[request.param])
    yaml_path = folder.parent / f"{request.param}.yaml"
    yaml_path.write_text(json.dumps({"model": {"hf": request.param, "max_seq_len": 32},
                                     "dtype": "float32", "target": "cpu"}))
    return request.param, model, yaml_path


def test_engine_matches_transformers(checkpoint):
    """Compiled (2 workers, keys in chunks of 16); the interpreter on one two-layer case
    (about 4 s a token here), the reference executor on every case."""
    name, model, yaml_path = checkpoint
    assert router_margins(model, PROMPT) > ROUTER_MARGIN
    backends = ("reference", "interpret") if name == "lora_groups" else ("reference",)
    engine_matches(yaml_path, model, PROMPT, backends)


@pytest.mark.parametrize("checkpoint", ["lora_groups"], indirect=True)
def test_four_devices_with_the_routing_role_on_device_0(checkpoint):
    """The routers on device 0 (`target.roles` claiming the `mlp.gate` modules: V3 has no
    indexer), the rest over devices 1-3: transformers' tokens and logits on the reference
    executor (the interpreter runs four devices in tests/runtime/test_multi_device.py).
    One case: a dense layer and a group-limited MoE layer."""
    name, model, yaml_path = checkpoint
    four = yaml_path.parent / f"{name}_4dev.yaml"
    four.write_text(json.dumps({
        "model": {"hf": name, "max_seq_len": 32}, "dtype": "float32",
        "target": {"name": "cpu", "workers": 2, "devices": 4, "roles": {
            "routing": {"devices": [0], "modules": ["mlp.gate"]},
            "mla": {"devices": "1-3"}}}}))
    engine_matches(four, model, PROMPT, ("reference",))


def engine_matches(yaml_path, model, prompt, backends, **options):
    """The engine compiled from `yaml_path` (2 workers, keys in chunks of 16, `options`)
    generates transformers' greedy tokens and logits on each backend."""
    engine = tilec_api.compile(str(yaml_path), **{"workers": 2, "kv_chunk": 16, **options})
    ref_tokens, ref_logits = hf_greedy(model, prompt)
    for backend in backends:
        g = engine.generate(prompt, NEW_TOKENS, backend=backend, logits=True,
                            stop_at_eos=False)
        assert len(g.tokens) == NEW_TOKENS
        compare(g.tokens, g.logits, ref_tokens, ref_logits)


@pytest.mark.parametrize("case, without", [
    ("lora_groups", dict(rope_interleave=False)),
    ("lora_groups", dict(topk_group=4)),          # every group kept
    ("plain_q", dict(norm_topk_prob=True)),
    ("plain_q", dict(routed_scaling_factor=1.0)),
    ("yarn", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4))),
    ("yarn", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4,
                                       original_max_position_embeddings=16))),
])
def test_what_each_field_does_matters(tmp_path, case, without):
    """tilec's module follows transformers, and the field moves the logits (the same
    weights with it changed answer differently), so the test above can fail on it."""
    hf = save(tmp_path / case, **CASES[case])
    ours = load_checkpoint(tmp_path / case, max_seq_len=32)
    want = hf_greedy(hf, PROMPT)[1]
    assert (eager_logits(ours, PROMPT, NEW_TOKENS) - want).abs().max().item() < 1e-4
    other = hf_greedy(save(tmp_path / "other", **{**CASES[case], **without}), PROMPT)[1]
    assert (other - want).abs().max().item() > 1e-2


def edit(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}),
     r"rope_parameters: .*\(rope types default and yarn only"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
     "rope_parameters.factor: required for rope_type yarn"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
                           "partial_rotary_factor": 0.5}),
     "rope_parameters.partial_rotary_factor: 0.5 is not supported"),
    (dict(attention_bias=True), "attention_bias: True is not supported"),
    (dict(num_key_value_heads=2), "num_key_value_heads: 2 is not supported"),
    (dict(scoring_func="softmax"), "scoring_func: 'softmax' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act: 'gelu' is not supported"),
    (dict(n_group=3), "n_group: 3 does not divide n_routed_experts 8"),
    (dict(kv_lora_rank=0), "kv_lora_rank: expected a positive integer"),
    (dict(some_new_field=1), "some_new_field: 1 is not supported by tilec's "
                             "DeepseekV3ForCausalLM"),
])
def test_refused_fields_are_named(tmp_path, changes, message):
    save(tmp_path / "c", **CASES["lora_groups"])
    edit(tmp_path / "c", **changes)
    with pytest.raises(ConfigError, match="config.json: " + message):
        load_checkpoint(tmp_path / "c", max_seq_len=32)


def test_every_tensor_is_consumed(tmp_path):
    """An expert the config does not have, or a missing one, is refused by name."""
    from safetensors.torch import load_file, save_file

    save(tmp_path / "c", **CASES["lora_groups"])
    path = tmp_path / "c" / "model.safetensors"
    tensors = load_file(path)
    extra = dict(tensors)
    extra["model.layers.1.mlp.experts.8.up_proj.weight"] = torch.ones(16, 32)
    save_file(extra, path, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=re.escape("experts.8.up_proj.weight")):
        load_checkpoint(tmp_path / "c", max_seq_len=32)
    del tensors["model.layers.1.mlp.experts.3.down_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="layers.1.mlp.experts.down_proj missing"):
        load_checkpoint(tmp_path / "c", max_seq_len=32)


def test_router_stays_float32(tmp_path):
    """transformers keeps the router's weight and bias in float32 in a bfloat16 model
    (_keep_in_fp32_modules_strict); so does tilec's cast, on the meta device too."""
    from tilec.models.deepseek import DeepseekDecodeStep

    save(tmp_path / "c", **CASES["lora_groups"])
    model = load_checkpoint(tmp_path / "c", max_seq_len=32)
    weight = model.layers[1].mlp.gate.weight.detach().clone()
    model = model.to(torch.bfloat16)
    gate = model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.weight, weight)   # not rounded through bfloat16
    assert model.layers[1].mlp.experts.gate_proj.dtype == torch.bfloat16
    empty = DeepseekDecodeStep.empty(model.cfg, 32, torch.bfloat16)
    assert empty.layers[1].mlp.gate.weight.dtype == torch.float32
