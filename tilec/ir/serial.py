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
from typing import Any, Callable


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
    """`data` (plain JSON) as a value of type `tp`, checked against the type hints;
    ValueError (or TypeError) when it does not fit."""
    return _decoder(tp)(data)


@functools.lru_cache(maxsize=None)
def _decoder(tp: Any) -> Callable[[Any], Any]:
    """The function decoding plain data into `tp`, made once per type: a manifest holds a
    million values of a few dozen types, and working out how to decode each of them
    from its type hints every time took seconds of every load."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _dataclass_decoder(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        options = [_decoder(a) for a in args if a is not type(None)]
        optional = type(None) in args

        def union(data):
            if data is None and optional:
                return None
            for decode in options:
                try:
                    return decode(data)
                except (ValueError, TypeError):
                    continue
            raise ValueError(f"{data!r} matches none of {tp}")
        return union
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if args[0] is int:    # the commonest by far (tiles, boxes): no call per item
                return functools.partial(_scalars, tp, None)
            item = _decoder(args[0])

            def tuple_of(data):
                if not isinstance(data, list):
                    raise ValueError(f"expected a list for {tp}, got {type(data).__name__}")
                return tuple(map(item, data))
            return tuple_of
        if all(a in (int, str, bool) for a in args):   # (name, bytes) pairs, boxes
            return functools.partial(_scalars, tp, args)
        items = [_decoder(a) for a in args]

        def fixed_tuple(data):
            if not isinstance(data, list):
                raise ValueError(f"expected a list for {tp}, got {type(data).__name__}")
            if len(items) != len(data):
                raise ValueError(f"expected {len(items)} items for {tp}, got {len(data)}")
            return tuple(decode(v) for decode, v in zip(items, data))
        return fixed_tuple
    if origin is dict:
        value = _decoder(typing.get_args(tp)[1])

        def dict_of(data):
            if not isinstance(data, dict):
                raise ValueError(f"expected an object for {tp}")
            return {k: value(v) for k, v in data.items()}
        return dict_of
    if tp is Any:
        return freeze
    if tp is float:
        def number(data):
            if isinstance(data, bool) or not isinstance(data, (int, float)):
                raise ValueError(f"expected a number, got {data!r}")
            return float(data)
        return number
    if tp in (int, str, bool):
        def exactly(data):
            if type(data) is not tp:
                raise ValueError(f"expected {tp.__name__}, got {data!r}")
            return data
        return exactly
    raise TypeError(f"cannot decode type {tp}")


def _scalars(tp: Any, kinds: tuple[type, ...] | None, data: Any) -> tuple:
    """A tuple of ints, strs or bools, item i of type kinds[i] (`kinds` None: any number
    of ints), checked without a call per item."""
    if not isinstance(data, list):
        raise ValueError(f"expected a list for {tp}, got {type(data).__name__}")
    if kinds is None:
        for v in data:
            if type(v) is not int:
                raise ValueError(f"expected int, got {v!r}")
        return tuple(data)
    if len(kinds) != len(data):
        raise ValueError(f"expected {len(kinds)} items for {tp}, got {len(data)}")
    for kind, v in zip(kinds, data):
        if type(v) is not kind:
            raise ValueError(f"expected {kind.__name__}, got {v!r}")
    return tuple(data)


def _dataclass_decoder(tp: type) -> Callable[[Any], Any]:
    hints, names = _fields(tp)
    fields: dict[str, Callable[[Any], Any]] = {}   # filled on first use: types may nest

    def dataclass(data):
        if not isinstance(data, dict):
            raise ValueError(f"expected an object for {tp.__name__}, got {type(data).__name__}")
        unknown = data.keys() - names
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)} for {tp.__name__}")
        values = {}
        for k, v in data.items():
            decode = fields.get(k)
            if decode is None:
                decode = fields[k] = _decoder(hints[k])
            values[k] = decode(v)
        return tp(**values)
    return dataclass
