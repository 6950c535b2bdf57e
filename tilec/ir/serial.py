"""Plain-JSON encoding of the frozen IR dataclasses (engine manifests, stage dumps).

`to_plain` turns dataclasses into dicts and tuples into lists; `from_plain` rebuilds
them from the type hints, so every IR class round-trips without code of its own.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from typing import Any


def to_plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (tuple, list)):
        return [to_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): to_plain(v) for k, v in x.items()}
    return x


def to_json(x: Any) -> str:
    """`json.dumps(to_plain(x))`, compact, keys sorted, the same text, five times
    faster: json's C encoder walks the tuples, lists, numbers and strings itself and
    asks back only for the dataclasses (a Llama-1B manifest is 1.3 M objects, most of
    them tuples and ints, and is encoded on every compile)."""
    return json.dumps(x, default=_fields_of, separators=(",", ":"), sort_keys=True)


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> tuple[str, ...] | None:
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) \
        else None


def _fields_of(x: Any) -> dict[str, Any]:
    names = _field_names(type(x))
    if names is None:
        raise TypeError(f"{type(x).__name__} is not JSON serialisable")
    return {n: getattr(x, n) for n in names}


def freeze(x: Any) -> Any:
    """Lists become tuples, recursively, so decoded attributes stay hashable."""
    if isinstance(x, list):
        return tuple(freeze(v) for v in x)
    if isinstance(x, dict):
        return {k: freeze(v) for k, v in x.items()}
    return x


@functools.lru_cache(maxsize=None)
def _fields(tp: type) -> tuple[dict[str, Any], frozenset[str]]:
    """Type hints and field names of a dataclass (evaluating hints is the slow part)."""
    return typing.get_type_hints(tp), frozenset(f.name for f in dataclasses.fields(tp))


def from_plain(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ValueError(f"expected an object for {tp.__name__}, got {type(data).__name__}")
        hints, names = _fields(tp)
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)} for {tp.__name__}")
        return tp(**{k: from_plain(hints[k], v) for k, v in data.items()})
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return from_plain(arg, data)
            except (ValueError, TypeError):
                continue
        raise ValueError(f"{data!r} matches none of {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(data, list):
            raise ValueError(f"expected a list for {tp}, got {type(data).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_plain(args[0], v) for v in data)
        if len(args) != len(data):
            raise ValueError(f"expected {len(args)} items for {tp}, got {len(data)}")
        return tuple(from_plain(a, v) for a, v in zip(args, data))
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(data, dict):
            raise ValueError(f"expected an object for {tp}")
        return {k: from_plain(vt, v) for k, v in data.items()}
    if tp is Any:
        return freeze(data)
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ValueError(f"expected a number, got {data!r}")
        return float(data)
    if tp in (int, str, bool):
        if type(data) is not tp:
            raise ValueError(f"expected {tp.__name__}, got {data!r}")
        return data
    raise TypeError(f"cannot decode type {tp}")
