"""Read a local Hugging Face Llama checkpoint: config.json plus safetensors weights
(one `model.safetensors`, or shards listed in `model.safetensors.index.json`).

Every problem is a ConfigError naming the file and the field or tensor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tilec.errors import ConfigError
from tilec.models.llama import LlamaConfig, LlamaDecodeStep
from tilec.runtime.chat import SPECIAL_TOKEN_NAMES, ChatTemplate

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def read_config(folder: str | os.PathLike) -> LlamaConfig:
    folder = Path(folder)
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
    archs = data.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ConfigError(f"{path}: architectures: {archs!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return LlamaConfig.from_dict(data, where=str(path))


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


def hf_name(ours: str) -> str:
    """Our parameter name -> the checkpoint's."""
    if ours.startswith("lm_head."):
        return ours
    if ours.startswith("layers."):
        _, i, rest = ours.split(".", 2)
        module = rest.split(".")[0]
        group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else \
            "mlp" if module in ("gate_proj", "up_proj", "down_proj") else None
        return f"model.layers.{i}.{group}.{rest}" if group else f"model.layers.{i}.{rest}"
    return f"model.{ours}"


def load_checkpoint(folder: str | os.PathLike, max_seq_len: int) -> LlamaDecodeStep:
    from safetensors import safe_open

    folder = Path(folder)
    cfg = read_config(folder)
    files = weight_files(folder)
    model = LlamaDecodeStep(cfg, max_seq_len)
    handles: dict[Path, object] = {}
    try:
        for name, param in model.named_parameters():
            key = hf_name(name)
            if key not in files:
                raise ConfigError(f"{folder}: tensor {key} missing from the checkpoint")
            path = files[key]
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt").__enter__()
            tensor = handles[path].get_tensor(key)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ConfigError(f"{path.name}: tensor {key} has shape {tuple(tensor.shape)}, "
                                  f"config.json implies {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return model.eval()


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
        rope_scaling=c.rope_scaling, tie_word_embeddings=c.tie_word_embeddings,
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
