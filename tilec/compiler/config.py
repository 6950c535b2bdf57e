"""model.yaml: what to compile, with which example inputs, for which target.

```yaml
model:                        # required; one of three forms:
  module: mlp.py:MLP          #   a Python module: FILE.py:FACTORY, FILE relative to this yaml
  kwargs: {d_in: 64, d_hidden: 128}   # passed to FACTORY(**kwargs); default {}
# model: {family: llama, config: {hidden_size: 64, ...}, max_seq_len: 128}
#                             #   a model family with seeded random weights (HF config
#                             #   fields); families: llama, deepseek_v3, deepseek_v32,
#                             #   glm_moe_dsa (tilec/models/)
# model: {hf: ./Llama-3.2-1B, max_seq_len: 2048}
#                             #   a local Hugging Face checkpoint (folder relative to this yaml)
#                             # family and hf models: `batch: 8` (default 1) makes one decode
#                             # step advance 8 sequences, each in its own KV-cache slot;
#                             # `prefill: {chunk: 64}` sizes the engine's prefill entry
#                             # (default: the target's chunk), `prefill: false` leaves it out
inputs:                       # required for `module` (at least one), derived for the others;
                              # in the order forward() takes them
  - {name: x, shape: [4, 64], dtype: float32}
  - {name: tokens, shape: [1, 8], dtype: int64, low: 0, high: 32000}  # ints draw from [low, high)
dtype: float32                # optional: float32 | bfloat16; casts the module's parameters
seed: 0                       # optional (0): seeds the weights and the example inputs
target: {name: cpu, workers: 2}   # optional (cpu): cpu | h100 | h200; short form `target: cpu`
# target: {name: h200, roles: {attn: {workers: "0-7", kinds: [attention]}, rest: {}}}
#                             #   optional worker roles: each role runs only the tasks it
#                             #   owns (docs/model-yaml.md, "Worker roles")
# target: {name: cpu, devices: 4, roles: {indexer: {devices: [0], modules: [indexer]}, mla: {}}}
#                             #   optional: a multi-device engine, one kernel per device;
#                             #   roles then own devices (docs/model-yaml.md, "Devices"), and
#                             #   a device role may split its devices' workers with worker
#                             #   roles of its own: mla: {roles: {attn: {workers: [0],
#                             #   kinds: [attention]}, rest: {}}} ("Device and worker roles")
schedule:                     # optional; every field optional
  policy: critical_path       #   critical_path | round_robin
  tile_m: 16                  #   tile sizes: powers of two; unset = the target's choice
  tile_n: 64
  tile_k: 64
  kv_chunk: 64                #   keys per attention partial task (>= 16); unset = GPU
                              #   targets: a partial per worker; cpu: one chunk
```

Every mistake is a `ConfigError` whose one line names the yaml file, the key path
(`schedule.tile_m`, `inputs[1].dtype`), what was expected and what was found.
"""
from __future__ import annotations

import difflib
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, NoReturn

import torch

from tilec.compiler.family_config import FAMILIES, check_family_config
from tilec.compiler.yaml_file import load_yaml
from tilec.errors import ConfigError
from tilec.ir.target import MAX_DEVICES, TARGETS, Role
from tilec.limits import seed_problem, short_repr
from tilec.passes.roles import target_roles

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT_DTYPES = {"int64": torch.int64, "int32": torch.int32}
INPUT_DTYPES = {**FLOAT_DTYPES, **INT_DTYPES}
MODEL_DTYPES = ("float32", "bfloat16")
POLICIES = ("critical_path", "round_robin")

TOP_KEYS = ("model", "inputs", "dtype", "seed", "target", "schedule")
MODEL_KEYS = ("module", "kwargs", "family", "config", "hf", "max_seq_len", "batch", "prefill")
PREFILL_KEYS = ("chunk",)
# model.prefill, parsed: DEFAULT_PREFILL (the target's chunk where the model has a
# prefill entry, else none), NO_PREFILL (`prefill: false`), or a chunk of rows >= 2.
DEFAULT_PREFILL = None
NO_PREFILL = 0
DEFAULT_MAX_SEQ_LEN = 256
MAX_BATCH = 1024   # sequences per decode step; a typo's 10**9 would only fill memory
INPUT_KEYS = ("name", "shape", "dtype", "low", "high")
TARGET_KEYS = ("name", "workers", "devices", "roles")
ROLE_KEYS = ("workers", "devices", "kinds", "ops", "modules", "roles")
WORKER_ROLE_KEYS = ("workers", "kinds", "ops", "modules")   # a device role's worker roles
SCHEDULE_KEYS = ("policy", "tile_m", "tile_n", "tile_k", "kv_chunk")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    low: int = 0              # integer inputs draw from [low, high)
    high: int | None = None   # required for integer dtypes


@dataclass(frozen=True)
class ModuleSpec:
    file: str                 # absolute path of the Python file
    factory: str              # name of a class or function in it
    kwargs: dict


@dataclass(frozen=True)
class FamilySpec:
    family: str               # one of FAMILIES
    config: dict              # the family's config fields (LlamaConfig's, or config.json's)
    max_seq_len: int          # sizes the KV cache
    batch: int = 1            # sequences one decode step advances (KV-cache slots)
    prefill: int | None = DEFAULT_PREFILL   # the prefill entry's chunk (see PREFILL_KEYS)


@dataclass(frozen=True)
class CheckpointSpec:
    folder: str               # absolute path of a Hugging Face checkpoint folder
    max_seq_len: int
    batch: int = 1            # sequences one decode step advances (KV-cache slots)
    prefill: int | None = DEFAULT_PREFILL   # the prefill entry's chunk (see PREFILL_KEYS)


@dataclass(frozen=True)
class TargetSpec:
    name: str = "cpu"
    workers: int | None = None   # None: the target's default
    # None: one role with every worker. A role with no workers takes those no other
    # role lists (resolved when the worker count is final: passes/roles.py).
    # On a multi-device target (devices > 1) roles own devices instead (Role.devices).
    roles: tuple[Role, ...] | None = None
    devices: int = 1


@dataclass(frozen=True)
class ScheduleSpec:
    policy: str = "critical_path"
    tile_m: int | None = None
    tile_n: int | None = None
    tile_k: int | None = None
    kv_chunk: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    path: str                 # the yaml file, as given
    model: ModuleSpec | FamilySpec | CheckpointSpec
    inputs: tuple[InputSpec, ...]
    dtype: str | None
    seed: int
    target: TargetSpec
    schedule: ScheduleSpec


# ----------------------------------------------------------------------------- loading

def load_config(path: str | os.PathLike) -> ModelConfig:
    path = os.fspath(path)
    return parse_config(load_yaml(path), path)


def parse_config(data: Any, path: str) -> ModelConfig:
    """Validate an already-parsed model.yaml; relative files resolve against dirname(path)."""
    path = os.fspath(path)
    if not isinstance(data, dict):
        found = "an empty file" if data is None else _describe(data)
        raise ConfigError(f"{path}: top level: expected a mapping with keys 'model' and "
                          f"'inputs', found {found}")
    _check_keys(data, TOP_KEYS, "", path)
    if "model" not in data:
        raise ConfigError(f"{path}: model: required key is missing")
    model = _parse_model(data["model"], path)
    if isinstance(model, ModuleSpec) and "inputs" not in data:
        raise ConfigError(f"{path}: inputs: required key is missing")
    if not isinstance(model, ModuleSpec) and "inputs" in data:
        raise ConfigError(f"{path}: inputs: a model family's inputs are fixed (token, pos); "
                          "remove this key")
    dtype = data.get("dtype")
    if dtype is not None and dtype not in MODEL_DTYPES:
        _fail(path, "dtype", " or ".join(MODEL_DTYPES), dtype)
    seed = data.get("seed", 0)
    if seed_problem(seed):
        _fail(path, "seed", seed_problem(seed), seed)
    return ModelConfig(
        path=path,
        model=model,
        inputs=_parse_inputs(data["inputs"], path) if "inputs" in data else (),
        dtype=dtype,
        seed=seed,
        target=_parse_target(data.get("target", "cpu"), path),
        schedule=_parse_schedule(data.get("schedule", {}), path),
    )


def _parse_model(model: Any, path: str) -> ModuleSpec | FamilySpec | CheckpointSpec:
    _need_mapping(model, "model", path)
    _check_keys(model, MODEL_KEYS, "model.", path)
    forms = [k for k in ("module", "family", "hf") if k in model]
    if len(forms) > 1:
        raise ConfigError(f"{path}: model: give one of module, family or hf, found {forms}")
    if forms and forms[0] != "module":
        return _parse_decoder(model, forms[0], path)
    for key in ("config", "max_seq_len", "batch", "prefill"):
        if key in model:
            raise ConfigError(f"{path}: model.{key}: only for `family` or `hf` models")
    if "module" not in model:
        raise ConfigError(f"{path}: model.module: required key is missing "
                          f"(expected FILE.py:FACTORY)")
    module = model["module"]
    if not isinstance(module, str) or ":" not in module:
        _fail(path, "model.module", "FILE.py:FACTORY", module)
    file, factory = (part.strip() for part in module.rsplit(":", 1))
    if not file or not factory.isidentifier():
        _fail(path, "model.module", "FILE.py:FACTORY", module)
    file = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(path)), file))
    if not os.path.isfile(file):
        raise ConfigError(f"{path}: model.module: file {file} not found")
    kwargs = model.get("kwargs", {})
    if kwargs is None:
        kwargs = {}
    _need_mapping(kwargs, "model.kwargs", path)
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            _fail(path, "model.kwargs", "keyword names", key)
    return ModuleSpec(file=file, factory=factory, kwargs=dict(kwargs))


def _parse_decoder(model: dict, form: str, path: str) -> FamilySpec | CheckpointSpec:
    if "kwargs" in model:
        raise ConfigError(f"{path}: model.kwargs: only for `module` models")
    max_seq_len = model.get("max_seq_len", DEFAULT_MAX_SEQ_LEN)
    if not _is_int(max_seq_len) or max_seq_len < 1:
        _fail(path, "model.max_seq_len", "an integer >= 1", max_seq_len)
    batch = model.get("batch", 1)
    if not _is_int(batch) or not 1 <= batch <= MAX_BATCH:
        _fail(path, "model.batch", f"an integer from 1 to {MAX_BATCH}", batch)
    prefill = _parse_prefill(model.get("prefill", {}), max_seq_len, path)
    if form == "family":
        family = model["family"]
        if family not in FAMILIES:
            raise ConfigError(f"{path}: model.family: expected one of {', '.join(FAMILIES)}, "
                              f"found {short_repr(family)}{_suggest(family, FAMILIES)}")
        config = model.get("config", {}) or {}
        _need_mapping(config, "model.config", path)
        check_family_config(family, config, f"{path}: model.config")
        return FamilySpec(family, dict(config), max_seq_len, batch, prefill)
    if "config" in model:
        raise ConfigError(f"{path}: model.config: an hf checkpoint brings its own config.json")
    folder = model["hf"]
    if not isinstance(folder, str):
        _fail(path, "model.hf", "a folder path", folder)
    folder = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(path)), folder))
    if not os.path.isdir(folder):
        raise ConfigError(f"{path}: model.hf: checkpoint folder {folder} not found")
    return CheckpointSpec(folder, max_seq_len, batch, prefill)


def _parse_prefill(prefill: Any, max_seq_len: int, path: str) -> int | None:
    """model.prefill: {} or absent (the target's chunk), false (no prefill entry), or
    {chunk: P}, P from 2 to max_seq_len rows per launch."""
    if prefill is False:
        return NO_PREFILL
    if prefill is None or prefill is True:
        prefill = {}
    if not isinstance(prefill, dict):
        _fail(path, "model.prefill", "{chunk: N}, {} or false", prefill)
    _check_keys(prefill, PREFILL_KEYS, "model.prefill.", path)
    chunk = prefill.get("chunk", DEFAULT_PREFILL)
    if chunk is not None and (not _is_int(chunk) or not 2 <= chunk <= max_seq_len):
        _fail(path, "model.prefill.chunk", f"an integer from 2 to max_seq_len ({max_seq_len})",
              chunk)
    return chunk


def _parse_inputs(inputs: Any, path: str) -> tuple[InputSpec, ...]:
    if not isinstance(inputs, list) or not inputs:
        _fail(path, "inputs", "a non-empty list of {name, shape, dtype}", inputs)
    specs, seen = [], set()
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        _need_mapping(item, where, path)
        _check_keys(item, INPUT_KEYS, f"{where}.", path)
        for key in ("name", "shape", "dtype"):
            if key not in item:
                raise ConfigError(f"{path}: {where}.{key}: required key is missing")
        name, shape, dtype = item["name"], item["shape"], item["dtype"]
        if not isinstance(name, str) or not name.isidentifier():
            _fail(path, f"{where}.name", "an identifier", name)
        if name in seen:
            _fail(path, f"{where}.name", "a name not used by another input", name)
        seen.add(name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 1 for d in shape):
            _fail(path, f"{where}.shape", "a list of integers >= 1", shape)
        if not isinstance(dtype, str) or dtype not in INPUT_DTYPES:
            _fail(path, f"{where}.dtype", " | ".join(INPUT_DTYPES), dtype)
        low, high = item.get("low", 0), item.get("high")
        if dtype in INT_DTYPES:
            if not _is_int(low):
                _fail(path, f"{where}.low", "an integer", low)
            if high is None:
                raise ConfigError(f"{path}: {where}.high: required for {dtype} inputs "
                                  f"(values are drawn from [low, high))")
            if not _is_int(high) or high <= low:
                _fail(path, f"{where}.high", f"an integer > low ({low})", high)
        else:
            for key in ("low", "high"):
                if key in item:
                    raise ConfigError(f"{path}: {where}.{key}: only integer inputs take "
                                      f"low/high, found dtype {dtype}")
        specs.append(InputSpec(name=name, shape=tuple(shape), dtype=dtype, low=low, high=high))
    return tuple(specs)


def _parse_target(target: Any, path: str) -> TargetSpec:
    if isinstance(target, str):
        target = {"name": target}
    _need_mapping(target, "target", path, also="or a target name")
    _check_keys(target, TARGET_KEYS, "target.", path)
    name, workers = target.get("name", "cpu"), target.get("workers")
    if not isinstance(name, str) or name not in TARGETS:
        _fail(path, "target.name", " | ".join(sorted(TARGETS)), name)
    if workers is not None and workers_problem(workers, name):
        _fail(path, "target.workers", workers_problem(workers, name), workers)
    devices = target.get("devices", 1)
    if not _is_int(devices) or not 1 <= devices <= MAX_DEVICES:
        _fail(path, "target.devices", f"an integer from 1 to {MAX_DEVICES}", devices)
    roles = None
    if "roles" in target:
        roles = _parse_roles(target["roles"], path)
        try:   # against the yaml's counts; `--workers` and `--devices` are checked again
            target_roles(roles, devices, workers or TARGETS[name].workers, "yaml")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return TargetSpec(name=name, workers=workers, roles=roles, devices=devices)


def _parse_roles(roles: Any, path: str, key: str = "target.roles") -> tuple[Role, ...]:
    """`target.roles`, or (`key` "target.roles.NAME.roles") a device role's worker
    roles, which take no `devices` and no `roles` of their own."""
    inner = key != "target.roles"
    if not isinstance(roles, dict) or not roles:
        _fail(path, key, "a mapping of role names to {workers, kinds, ops, modules}", roles)
    out = []
    for name, spec in roles.items():
        if not isinstance(name, str) or not name.isidentifier():
            _fail(path, key, "role names that are identifiers", name)
        where = f"{key}.{name}"
        spec = {} if spec is None else spec
        _need_mapping(spec, where, path)
        _check_keys(spec, WORKER_ROLE_KEYS if inner else ROLE_KEYS, f"{where}.", path)
        if "workers" in spec and "devices" in spec:
            raise ConfigError(f"{path}: {where}: a role owns workers (of one device) or "
                              "devices, not both; split a device role's workers with worker "
                              "roles under its `roles`")
        if "workers" in spec and "roles" in spec:
            raise ConfigError(f"{path}: {where}.roles: worker roles go inside a device role "
                              "(one with `devices`, or the one that takes the rest), not "
                              "inside a worker role")
        workers, devices = (_parse_workers(spec[k], f"{where}.{k}", path, k[:-1])
                            if k in spec else () for k in ("workers", "devices"))
        kinds, ops, modules = (_parse_names(spec.get(k, []), f"{where}.{k}", path)
                               for k in ("kinds", "ops", "modules"))
        nested = _parse_roles(spec["roles"], path, f"{where}.roles") if "roles" in spec else ()
        out.append(Role(name, workers, kinds, ops, devices, modules, nested))
    return tuple(out)


MAX_WORKER_ID = 1 << 16   # far beyond any GPU's SM count; keeps a typo from filling memory


def _parse_workers(value: Any, key: str, path: str, unit: str = "worker") -> tuple[int, ...]:
    """An integer, an "A-B" range (both ends included), or a list of those (worker or,
    `unit` "device", device ids)."""
    expected = (f'{unit} ids in 0..{MAX_WORKER_ID - 1}: an integer, an "A-B" range or a '
                'list of those')
    items = value if isinstance(value, list) else [value]
    if not items:
        _fail(path, key, expected, value)
    found: list[int] = []
    for item in items:
        if _is_int(item) and 0 <= item < MAX_WORKER_ID:
            found.append(item)
            continue
        ends = item.split("-") if isinstance(item, str) else []
        if len(ends) != 2 or not all(e.strip().isdigit() for e in ends) or \
                not int(ends[0]) <= int(ends[1]) < MAX_WORKER_ID:
            _fail(path, key, expected, item)
        found.extend(range(int(ends[0]), int(ends[1]) + 1))
    twice = sorted(w for w, n in Counter(found).items() if n > 1)
    if twice:
        raise ConfigError(f"{path}: {key}: {unit} {twice[0]} is listed twice")
    return tuple(sorted(found))


def _parse_names(value: Any, key: str, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        _fail(path, key, "a list of names", value)
    return tuple(value)


def _parse_schedule(schedule: Any, path: str) -> ScheduleSpec:
    if schedule is None:
        schedule = {}
    _need_mapping(schedule, "schedule", path)
    _check_keys(schedule, SCHEDULE_KEYS, "schedule.", path)
    policy = schedule.get("policy", "critical_path")
    if policy not in POLICIES:
        _fail(path, "schedule.policy", " | ".join(POLICIES), policy)
    sizes = {key: schedule.get(key) for key in TILE_SIZE_KEYS}
    for key, value in sizes.items():
        expected = tile_size_problem(key, value)
        if expected:
            _fail(path, f"schedule.{key}", expected, value)
    return ScheduleSpec(policy=policy, **sizes)


TILE_SIZE_KEYS = ("tile_m", "tile_n", "tile_k", "kv_chunk")


def workers_problem(workers: Any, target: str) -> str | None:
    """What a worker count for `target` (a name in TARGETS) must be, if `workers` is not
    that; None when it is fine. The bound is the target's (Target.max_workers)."""
    most = TARGETS[target].max_workers
    if _is_int(workers) and 1 <= workers <= most:
        return None
    return f"an integer from 1 to {most} (the most workers target {target} holds)"


def tile_size_problem(key: str, value: Any) -> str | None:
    """What a tile size (a `schedule` key, or the same keyword of tilec.compile) must be,
    if `value` is not that; None when it is fine or unset."""
    low = 16 if key == "kv_chunk" else 1   # a key chunk is a tensor-core dim
    if value is None or (_is_int(value) and value >= low and not value & (value - 1)):
        return None
    return f"a power of two >= {low}"


# ----------------------------------------------------------------------------- helpers

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {short_repr(value)}"


def _fail(path: str, key: str, expected: str, found: Any) -> NoReturn:
    raise ConfigError(f"{path}: {key}: expected {expected}, found {_describe(found)}")


def _need_mapping(value: Any, key: str, path: str, also: str = "") -> None:
    if not isinstance(value, dict):
        _fail(path, key, f"a mapping{' ' + also if also else ''}", value)


def _suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
    if not isinstance(word, str) or len(word) > 100:
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _check_keys(data: dict, allowed: tuple[str, ...], prefix: str, path: str) -> None:
    for key in data:
        if key not in allowed:
            name = prefix + (key if isinstance(key, str) else short_repr(key))
            raise ConfigError(f"unknown key {short_repr(name)} in {path}"
                              f"{_suggest(key, allowed, prefix)}; allowed: {', '.join(allowed)}")
