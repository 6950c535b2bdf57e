"""Read a local Hugging Face decoder checkpoint (the architectures of
tilec/models/architectures.py): config.json plus safetensors weights
(one `model.safetensors`, or shards listed in `model.safetensors.index.json`).

Every problem is a ConfigError naming the file and the field or tensor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tilec.errors import ConfigError
from tilec.models.architectures import ARCHITECTURES, Architecture, architecture_of, decoder_fields
from tilec.models.deepseek import DeepseekConfig, DeepseekDecodeStep
from tilec.models.deepseek_hf import METADATA as DEEPSEEK_METADATA
from tilec.models.deepseek_hf import deepseek_config, load_deepseek
from tilec.models.llama import LlamaConfig, LlamaDecodeStep
from tilec.runtime.chat import SPECIAL_TOKEN_NAMES, ChatTemplate

# Every config.json field is honoured (the architecture's fields: architectures.py),
# metadata, or refused.
_GENERATION_DEFAULT = ("a default of transformers' generate(), not of the model: "
                       "tilec run takes its own sampling flags")
# Metadata: fields that do not change what the model computes, and why.
METADATA = {
    "_name_or_path": "where transformers loaded the checkpoint from",
    "transformers_version": "the version of transformers that wrote the file",
    "torch_dtype": "the stored weights' dtype: the engine computes in model.yaml's dtype",
    "dtype": "the stored weights' dtype: the engine computes in model.yaml's dtype",
    "bos_token_id": "a token id, for tokenizers",
    "pad_token_id": "a token id for padding, not part of what the model computes",
    "eos_token_id": "a token id: tilec run stops at it (eos_token_ids)",
    "tokenizer_class": "names the tokenizer, not part of the model",
    "initializer_range": "the scale of a training run's random weights: these come from "
                         "the checkpoint",
    "attention_dropout": "dropout is off at inference",
    "resid_pdrop": "dropout is off at inference",
    "embd_pdrop": "dropout is off at inference",
    "hidden_dropout": "dropout is off at inference",
    "attn_pdrop": "dropout is off at inference",
    "dropout": "dropout is off at inference",
    "layerdrop": "LayerDrop skips layers in training only",
    "init_std": "the scale of a training run's random weights: these come from the "
                "checkpoint",
    **{key: "GPT2DoubleHeadsModel's sequence-summary head, not part of a causal LM" for key in (
        "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
        "summary_first_dropout")},
    "classifier_dropout": "dropout of a classification head, not of this model",
    "use_cache": "a transformers forward option: tilec always keeps a KV cache",
    "pretraining_tp": "the tensor-parallel split of pretraining: transformers computes "
                      "the same function with any value",
    "output_attentions": "a transformers forward option (what it returns)",
    "output_hidden_states": "a transformers forward option (what it returns)",
    "return_dict": "a transformers forward option (what it returns)",
    "torchscript": "a transformers export option",
    **{key: _GENERATION_DEFAULT for key in (
        "max_length", "min_length", "do_sample", "temperature", "top_k", "top_p",
        "repetition_penalty", "num_beams")},
}


def read_config(folder: str | os.PathLike) -> LlamaConfig | DeepseekConfig:
    return _read(Path(folder))[1]


def step_class(folder: str | os.PathLike) -> type:
    """The decode-step class the checkpoint's architecture becomes."""
    return DeepseekDecodeStep if _read(Path(folder))[0].family == "deepseek" else LlamaDecodeStep


def _read(folder: Path) -> tuple[Architecture, LlamaConfig | DeepseekConfig]:
    """config.json's architecture and what it configures."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise ConfigError(f"{folder}: checkpoint folder not found")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (a Hugging Face checkpoint needs config.json)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    arch = architecture_of(data, str(path))
    for key, value in data.items():
        if key not in arch.honoured and key not in METADATA and \
                not (arch.family == "deepseek" and key in DEEPSEEK_METADATA):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ConfigError(f"{path}: {key}: {shown} is not supported by tilec's {arch.name} "
                              f"(a field tilec does not know may change what the model "
                              f"computes; the fields it honours: docs/model-yaml.md)")
    if arch.family == "deepseek":
        return arch, deepseek_config(data, str(path), arch.name)
    return arch, LlamaConfig.from_dict(decoder_fields(arch, data, str(path)), where=str(path))


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{index}: weight_map: unreadable ({e})") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in set(files.values()):
            if not shard.exists():
                raise ConfigError(f"{index}: weight_map: shard {shard.name} is missing")
        return files
    if single.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except Exception as e:
            raise ConfigError(f"{single}: not a readable safetensors file ({e})") from None
    raise ConfigError(f"{folder}: no model.safetensors or model.safetensors.index.json")


LLAMA = ARCHITECTURES["LlamaForCausalLM"]
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "qkv_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")


def hf_name(ours: str, arch: Architecture = LLAMA) -> str:
    """Our parameter name -> the checkpoint's."""
    if ours.startswith("lm_head."):   # the one name without the prefix
        return arch.names.get("lm_head", "lm_head") + ours[len("lm_head"):]
    if not ours.startswith("layers."):
        module, kind = ours.split(".", 1)
        return f"{arch.prefix}{arch.names.get(module, module)}.{kind}"
    _, i, rest = ours.split(".", 2)
    module, kind = rest.split(".", 1)
    layer = f"{arch.prefix}{arch.layers}.{i}"
    if module in arch.names:
        return f"{layer}.{arch.names[module]}.{kind}"
    group = "self_attn" if module in ATTENTION_MODULES else \
        "mlp" if module in MLP_MODULES else None
    return f"{layer}.{group}.{rest}" if group else f"{layer}.{rest}"


def checkpoint_class(folder: str | os.PathLike, max_seq_len: int):
    """(decode step class, its config) of the checkpoint, from config.json alone: what
    `tilec compile --plan` builds on the meta device, reading no weights."""
    folder = Path(folder)
    arch, cfg = _read(folder)
    if arch.family == "deepseek":
        return DeepseekDecodeStep, cfg
    cfg.check_max_seq_len(max_seq_len, str(folder / "config.json"))
    return LlamaDecodeStep, cfg


def load_checkpoint(folder: str | os.PathLike, max_seq_len: int,
                    batch: int = 1) -> LlamaDecodeStep | DeepseekDecodeStep:
    """The checkpoint as tilec's decode step (of `batch` sequences): every tensor in it
    is consumed or refused."""
    folder = Path(folder)
    arch, cfg = _read(folder)
    files = weight_files(folder)
    if arch.family == "deepseek":
        with _Tensors(files) as tensors:
            return load_deepseek(cfg, files, tensors, max_seq_len)
    cfg.check_max_seq_len(max_seq_len, str(folder / "config.json"))
    model = LlamaDecodeStep(cfg, max_seq_len, batch)
    params = dict(model.named_parameters())
    with _Tensors(files) as tensors:
        for name, param in params.items():
            key, rows, shape = _source(arch, name, params, cfg.num_attention_heads)
            if key not in files:
                raise ConfigError(f"{folder}: tensor {key} missing from the checkpoint")
            tensor = tensors.get(key)
            if arch.conv1d and name.startswith("layers.") and tensor.dim() == 2:
                tensor = tensor.t()   # stored [in, out]
            if tuple(tensor.shape) != shape:
                raise ConfigError(f"{files[key].name}: tensor {key} has shape "
                                  f"{tuple(tensor.shape)}, config.json implies {shape}")
            tensor = tensor[rows]
            if not tensor.is_floating_point():
                raise ConfigError(f"{files[key].name}: tensor {key} has dtype {tensor.dtype}, "
                                  f"expected a floating-point type (quantized weights are not "
                                  f"supported)")
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
        for key in sorted(set(files) - tensors.read):
            _check_redundant(model, key, tensors.get(key), files[key])
    return model.eval()


def _source(arch: Architecture, name: str, params: dict,
            heads: int) -> tuple[str, slice | torch.Tensor, tuple]:
    """Where parameter `name` is in the checkpoint: (tensor name, its rows there, that
    tensor's shape). Its own tensor, or its rows of a tensor the architecture fuses
    (Phi3's qkv_proj stacks q_proj, k_proj and v_proj; GPT-NeoX's query_key_value
    stacks them head by head)."""
    param = params[name]
    fused = [(f, parts) for f, parts in arch.fused.items()
             if any(f".{p}." in name for p in parts)]
    if not name.startswith("layers.") or not fused:
        return hf_name(name, arch), slice(None), tuple(param.shape)
    whole, parts = fused[0]
    own = next(p for p in parts if f".{p}." in name)
    sizes = [params[name.replace(f".{own}.", f".{p}.")].shape[0] for p in parts]
    key = hf_name(name.replace(f".{own}.", f".{whole}."), arch)
    shape = (sum(sizes),) + tuple(param.shape[1:])
    if arch.fused_per_head:   # [heads, parts, head_dim] rows, every part heads x head_dim
        width = param.shape[0] // heads
        rows = torch.arange(sum(sizes)).view(heads, len(parts), width)[:, parts.index(own)]
        return key, rows.reshape(-1), shape
    start = sum(sizes[:parts.index(own)])
    return key, slice(start, start + param.shape[0]), shape


class _Tensors:
    """Tensors read by name from the checkpoint's files, each file opened once."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.handles: dict[Path, object] = {}
        self.read: set[str] = set()
        self.last: tuple[str, torch.Tensor] | None = None   # a fused tensor is read once

    def get(self, key: str) -> torch.Tensor:
        if self.last is None or self.last[0] != key:
            self.last = key, self._read(key)
        return self.last[1]

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[key]
        if path not in self.handles:
            self.handles[path] = safe_open(str(path), framework="pt").__enter__()
        self.read.add(key)
        return self.handles[path].get_tensor(key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles.values():
            h.__exit__(None, None, None)


def _check_redundant(model: LlamaDecodeStep, key: str, tensor: torch.Tensor, path: Path) -> None:
    """A checkpoint tensor no parameter took: accepted only where it repeats what the
    model has (a tied lm_head stored anyway, old checkpoints' RoPE frequencies), else
    refused, since dropping it would compute another model than the checkpoint's."""
    repeats = None
    if key == "lm_head.weight" and model.cfg.tie_word_embeddings:
        repeats = model.embed_tokens.weight
    elif key.startswith("model.layers.") and key.endswith(".self_attn.rotary_emb.inv_freq"):
        repeats = model.inv_freq
    if repeats is not None and tensor.shape == repeats.shape and torch.allclose(
            tensor.float(), repeats.float(), rtol=1e-3, atol=0):
        return
    why = "it differs from what this config.json implies" if repeats is not None else \
        "tilec's Llama with this config.json has no such tensor"
    hint = " (see attention_bias, mlp_bias)" if key.endswith(".bias") else ""
    raise ConfigError(f"{path.name}: tensor {key} {tuple(tensor.shape)} would be ignored: "
                      f"{why}{hint}")


def tokenizer_json(folder: str | os.PathLike) -> str | None:
    path = Path(folder) / "tokenizer.json"
    return path.read_text() if path.exists() else None


def chat_template(folder: str | os.PathLike) -> ChatTemplate | None:
    """The checkpoint's chat template as transformers loads it (chat_template.jinja,
    else tokenizer_config.json's `chat_template`: a string, or a list of named templates
    of which "default" is used), with the special tokens it may name from
    tokenizer_config.json (else special_tokens_map.json); None without one."""
    folder = Path(folder)
    config = _json_object(folder / "tokenizer_config.json")
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    else:
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None:
            return None
        if not isinstance(template, str):
            raise ConfigError(f"{folder / 'tokenizer_config.json'}: chat_template: expected a "
                              f"string or a list of {{name, template}} with a default")
    tokens = {}
    for source in (config, _json_object(folder / "special_tokens_map.json")):
        for name in SPECIAL_TOKEN_NAMES:
            value = source.get(name)
            if isinstance(value, dict):   # an AddedToken: {"content": ..., ...}
                value = value.get("content")
            if isinstance(value, str) and name not in tokens:
                tokens[name] = value
    return ChatTemplate(template, tokens)


def _json_object(path: Path) -> dict:
    """A JSON object file of the checkpoint; {} if absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def eos_token_ids(folder: str | os.PathLike) -> tuple[int, ...]:
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(eos, int):
            return (eos,)
        if isinstance(eos, list):
            return tuple(e for e in eos if isinstance(e, int))
    return ()


def to_transformers(model: LlamaDecodeStep, device: str = "cpu"):
    """The same weights as a transformers LlamaForCausalLM (for benchmarks and tests)."""
    import transformers

    c = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.kv_heads,
        head_dim=c.dim_head, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        rope_scaling=c.rope_scaling, hidden_act=c.hidden_act, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=c.attention_bias, mlp_bias=c.mlp_bias,
        max_position_embeddings=max(c.max_position_embeddings, model.max_seq_len))
    dtype = model.embed_tokens.weight.dtype
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(hf_cfg).to(dtype)
    # caches, positions and inv_freq are non-persistent buffers: not in the state dict
    state = {hf_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (c.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not map onto transformers: missing {missing}, "
                         f"unexpected {unexpected}")
    return hf.eval()
