"""Reading a model.yaml: the one place tilec parses YAML.

A model.yaml is small and flat, so the reader refuses what only an attacker or an
accident needs: more than MAX_BYTES, nesting deeper than MAX_DEPTH, and anchors and
aliases (`&a`, `*a`), with which a few hundred bytes expand into billions of values
(the "billion laughs": a 1 kB file took 64 s and 9.5 GB before this). The parser's
events are checked for these before the document is built from them. Bytes that are
not UTF-8, integers too long for Python to parse and unknown tags are refused too. Each
refusal is a ConfigError naming the file and, where there is one, the line.
"""
from __future__ import annotations

from typing import Any

import yaml

from tilec.errors import ConfigError

MAX_BYTES = 256 << 10   # a model.yaml is hundreds of bytes; parsing 1 MB took seconds
MAX_DEPTH = 32          # the schema nests five levels (target.roles.NAME.workers[i])


# libyaml when PyYAML has it: the pure-Python loader took 20 s for a 600 kB file
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_OPEN = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSE = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def _check_events(text: str) -> None:
    """A first pass over the parser's events, before anything is built: no anchor or
    alias, nesting at most MAX_DEPTH (the composer recurses once per level)."""
    depth = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.MarkedYAMLError(
                None, None, "anchors and aliases (&name, *name) are not allowed in a "
                "model.yaml: write the value out", event.start_mark)
        if isinstance(event, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise yaml.MarkedYAMLError(None, None, f"nested more than {MAX_DEPTH} "
                                           "levels deep", event.start_mark)
        elif isinstance(event, _CLOSE):
            depth -= 1


def load_yaml(path: str) -> Any:
    """The document in the yaml file at `path`, as plain Python values."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES} bytes; a model.yaml is a few "
                          "hundred (is this the right file?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"{path}: line {line}, column {column}: byte 0x{data[exc.start]:02x} "
                          "is not UTF-8 text; save the file as UTF-8") from None
    try:
        _check_events(text)
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 (a safe loader, checked first)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where} invalid YAML: {problem}") from None
    except ValueError as exc:   # an integer of thousands of digits, a bad timestamp
        raise ConfigError(f"{path}: invalid YAML value: {str(exc).split(';')[0]}") from None

