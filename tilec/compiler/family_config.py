"""model.yaml's `model.config` for a model family: every key known and of its type.

A family's config class takes Hugging Face config fields (LlamaConfig's; the DeepSeek
families, `deepseek_v3`, `deepseek_v32` and `glm_moe_dsa`, take their config.json's
fields and check them as a checkpoint's are: tilec/models/deepseek_hf.py).
From a model.yaml each key must be one of its fields, with a value of the field's
type: a misspelt key left the default in place (`vocab_sze: 256` built a 32000-token
vocabulary, and a 27 GB model from the other defaults), and a value of the wrong type
failed deep inside the model's construction. Sizes are positive integers, rates and
scales positive finite numbers, switches booleans.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import fields
from typing import Any

from tilec.errors import ConfigError
from tilec.limits import short_repr
from tilec.models.rope import check_rope_scaling

DEEPSEEK_FAMILIES = ("deepseek_v3", "deepseek_v32", "glm_moe_dsa")
FAMILIES = ("llama",) + DEEPSEEK_FAMILIES
# Keys the llama family takes beyond its config class's fields (LlamaConfig.from_dict
# reads transformers 5.x's `rope_parameters`), and fields that are not config keys.
EXTRA_KEYS = ("rope_parameters",)
NOT_KEYS = ("extra",)


def family_classes(family: str) -> tuple[type, type]:
    """(config class, decode step class) of a model family (one of FAMILIES); the
    config class's from_dict(data, where) reads model.config."""
    if family in DEEPSEEK_FAMILIES:
        from tilec.models.deepseek import DeepseekDecodeStep
        from tilec.models.deepseek_hf import FAMILIES as ARCHS
        from tilec.models.deepseek_hf import DeepseekFamily

        return DeepseekFamily(ARCHS[family]), DeepseekDecodeStep
    from tilec.models.llama import LlamaConfig, LlamaDecodeStep

    return LlamaConfig, LlamaDecodeStep


def config_keys(family: str) -> tuple[str, ...]:
    """The keys `model.config` takes for `family`."""
    config_class = family_classes(family)[0]
    if family in DEEPSEEK_FAMILIES:
        return config_class.keys()
    return tuple(f.name for f in fields(config_class) if f.name not in NOT_KEYS) + EXTRA_KEYS


def check_family_config(family: str, config: dict, where: str) -> None:
    """A ConfigError naming `where`.KEY unless every key of `config` is one `family`
    takes, with a value of its type; then the family's own checks (from_dict)."""
    config_class = family_classes(family)[0]
    types = {f.name: f.type for f in fields(config_class)}
    allowed = config_keys(family)
    for key, value in config.items():
        if key not in allowed:
            shown = key if isinstance(key, str) else short_repr(key)
            close = difflib.get_close_matches(shown, allowed, n=1) if len(shown) < 100 else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown {family} config key {short_repr(shown)}{hint}; "
                              f"allowed: {', '.join(allowed)}")
        if family in DEEPSEEK_FAMILIES:
            continue   # from_dict checks each value, as it checks a checkpoint's
        if key == "rope_parameters":
            check_rope_scaling(value, where, key)
            continue
        expected = _type_problem(types[key], value)
        if expected:
            raise ConfigError(f"{where}: {key}: expected {expected}, found {short_repr(value)}")
        if key == "rope_scaling" and value is not None:
            check_rope_scaling(value, where, key)
    config_class.from_dict(config, where=where)


def _type_problem(annotation: str, value: Any) -> str | None:
    """What a value of a config field annotated `annotation` ("int", "float | None",
    "dict | None", "bool", "str") must be, if `value` is not that."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if "None" in kinds and value is None:
        return None
    if "int" in kinds:
        ok, want = _is_int(value) and value >= 1, "a positive integer"
    elif "float" in kinds:
        ok, want = _is_number(value) and value > 0, "a positive number"
    elif "bool" in kinds:
        ok, want = isinstance(value, bool), "true or false"
    elif "list" in kinds:
        ok, want = isinstance(value, list), "a list"
    elif "dict" in kinds:
        ok, want = isinstance(value, dict), "a mapping"
    elif "str" in kinds:
        ok, want = isinstance(value, str), "a string"
    else:
        ok, want = False, f"a value of type {annotation}"
    if "None" in kinds:
        want += " or null"
    return None if ok else want


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))
