"""roles: TaskGraph -> TaskGraph with the role of every task (model.yaml `target.roles`).

A role is a set of workers that runs only its own tasks: heterogeneous workers on one
device, e.g. a worker for the KV-cache appends and attention beside workers for the
projections. A fused group, and so each of its tasks, belongs to the role whose `kinds`
name the group's task kind or whose `ops` name an op kind or an op name among the
group's members; groups no role claims go to the one role that names neither. The
scheduler places each task only on its role's workers; verify checks that it did.

Role definitions are checked here as well (`resolve_roles`, `role_problems`) because
the worker count is only final once command-line overrides are applied; model.yaml's
parser calls the same functions with the yaml's count, so both fail alike.
"""
from __future__ import annotations

import difflib
from dataclasses import replace

from tilec.errors import ConfigError
from tilec.ir.graph import Group, Op
from tilec.ir.target import Role, Target

COMM_ROLE = "comm"   # a multi-device schedule's comm worker's role (passes/partition.py)
from tilec.ir.tasks import TaskGraph


def format_workers(workers) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for w in sorted(workers):
        if spans and w == spans[-1][1] + 1:
            spans[-1][1] = w
        else:
            spans.append([w, w])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def resolve_roles(roles: tuple[Role, ...], workers: int, unit: str = "worker",
                  key: str = "target.roles") -> tuple[Role, ...]:
    """`roles` as written (a role may leave `workers` empty: it takes every worker no
    other role lists) -> roles with their workers filled in, checked for `workers`
    workers. A mistake is a ConfigError naming the key path (`key`: where the roles are
    written). `unit` names what the ids count in messages: "device" for device roles
    (resolve_device_roles)."""
    rest = [r.name for r in roles if not r.workers]
    if len(rest) > 1:
        raise ConfigError(f"{key}: roles {rest[0]!r} and {rest[1]!r} both leave out "
                          f"`{unit}s`; at most one may (it takes the {unit}s no other role "
                          "lists)")
    listed = {w for r in roles for w in r.workers}
    leftover = tuple(w for w in range(workers) if w not in listed)
    resolved = tuple(r if r.workers else replace(r, workers=leftover) for r in roles)
    problems = role_problems(resolved, workers, unit, key)
    if problems:
        raise ConfigError(problems[0])
    return resolved


def resolve_device_roles(roles: tuple[Role, ...], devices: int,
                         workers: int) -> tuple[Role, ...]:
    """Like resolve_roles, for roles that own devices (`devices:`) of a multi-device
    target: one device has one role, and at most one role takes the rest. A device
    role's own worker roles (`roles:`) are resolved for the `workers` of each device."""
    as_workers = tuple(replace(r, workers=r.devices, devices=()) for r in roles)
    resolved = resolve_roles(as_workers, devices, unit="device")
    return tuple(replace(r, workers=(), devices=r.workers,
                         roles=_resolve_inner(r, workers)) for r in resolved)


def _resolve_inner(role: Role, workers: int) -> tuple[Role, ...]:
    """A device role's worker roles, resolved for `workers` workers per device."""
    if not role.roles:
        return ()
    key = inner_key(role)
    for r in role.roles:
        if r.name == COMM_ROLE:
            raise ConfigError(f"{key}.{r.name}: the name {COMM_ROLE!r} is the comm worker's "
                              "(it runs the transfers); choose another")
    return resolve_roles(role.roles, workers, key=key)


def inner_key(device_role: Role) -> str:
    """Where a device role's worker roles are written in model.yaml."""
    return f"target.roles.{device_role.name}.roles"


def target_roles(roles: tuple[Role, ...], devices: int, workers: int,
                 stated: str = "yaml") -> tuple[tuple[Role, ...], tuple[Role, ...]]:
    """The one roles check: `roles` as model.yaml gives them, for a target of `devices`
    devices of `workers` workers -> (worker roles, device roles), resolved; one of the
    two is empty: roles own devices on a multi-device target (each device role may hold
    worker roles of its own, `Role.roles`), workers on one device. model.yaml's parser
    checks them against the yaml's counts (`stated` "yaml"), the compile again once
    `--workers` and `--devices` are final ("override"); a mistake is a ConfigError
    naming the key path."""
    for r in roles:
        if stated == "yaml" and devices > 1 and r.workers:
            raise ConfigError(f"target.roles.{r.name}.workers: on a target of {devices} "
                              "devices a role owns devices; give it `devices`, and split a "
                              "device's workers with worker roles under its `roles`")
        if stated == "yaml" and devices == 1 and (r.devices or r.roles):
            what = ("devices", "device roles") if r.devices else \
                ("roles", "worker roles inside a role (a device role's)")
            raise ConfigError(f"target.roles.{r.name}.{what[0]}: {what[1]} need "
                              "`target.devices` of 2 or more")
        if (devices > 1 and r.workers) or (devices == 1 and (r.devices or r.roles)):
            key = "workers" if r.workers else "devices" if r.devices else "roles"
            raise ConfigError(f"target.roles.{r.name}.{key}: roles own devices on a "
                              f"multi-device target and workers on one device; this target "
                              f"has {devices} device{'s' if devices > 1 else ''}")
    if not roles:
        return (), ()
    if devices > 1:
        return (), resolve_device_roles(roles, devices, workers)
    return resolve_roles(roles, workers), ()


def role_problems(roles: tuple[Role, ...], workers: int, unit: str = "worker",
                  key: str = "target.roles") -> list[str]:
    """What is wrong with resolved role definitions for a target of `workers` workers:
    one line per problem, each naming its key path ([] when they are sound)."""
    out = []
    owner: dict[int, str] = {}
    names: set[str] = set()
    for r in roles:
        where = f"{key}.{r.name}.{unit}s"
        if r.name in names:
            out.append(f"{key}: role name {r.name!r} is used twice")
        names.add(r.name)
        if not r.workers:
            out.append(f"{where}: the role has no {unit}s (the other roles list every "
                       f"{unit})")
        for w in r.workers:
            if not 0 <= w < workers:
                out.append(f"{where}: {unit} {w} does not exist (the target has "
                           f"{workers} {unit}s: {format_workers(range(workers))})")
            elif w in owner:
                out.append(f"{where}: {unit} {w} also belongs to role {owner[w]!r}; "
                           f"a {unit} has one role")
            else:
                owner[w] = r.name
    idle = [w for w in range(workers) if w not in owner]
    if idle:
        which = f"{unit}s {format_workers(idle)} belong" if len(idle) > 1 else \
            f"{unit} {idle[0]} belongs"
        out.append(f"{key}: {which} to no role (list it in a role's {unit}s, or "
                   f"leave `{unit}s` out of one role so it takes the rest)")
    rest = [r.name for r in roles if r.takes_the_rest]
    if len(rest) > 1:
        out.append(f"{key}: roles {rest[0]!r} and {rest[1]!r} both name no kinds or "
                   "ops; only one role may take the tasks no other role claims")
    return out


def claimed_by(group: Group, ops: dict[str, Op], role: Role) -> bool:
    """Whether `role` names the group's task kind, an op kind or op name in it, or a
    module one of its ops belongs to."""
    if group.label in role.kinds:
        return True
    return any(ops[m].kind in role.ops or m in role.ops or role.owns_module(ops[m].scope)
               for m in group.members)


def role_of_group(group: Group, ops: dict[str, Op], roles: tuple[Role, ...],
                  key: str = "target.roles") -> str:
    """The role that owns `group`; ConfigError when two roles claim it or none can."""
    claims = [r.name for r in roles if not r.takes_the_rest and claimed_by(group, ops, r)]
    if len(claims) > 1:
        raise ConfigError(f"{key}: group {group.name} (kind {group.label}) is "
                          f"claimed by roles {claims[0]!r} and {claims[1]!r}; give it to one")
    if claims:
        return claims[0]
    rest = [r.name for r in roles if r.takes_the_rest]
    if not rest:
        raise ConfigError(f"{key}: no role takes group {group.name} (kind "
                          f"{group.label}); name it in a role's kinds or ops, or add a "
                          "role with neither to take the rest")
    return rest[0]


def check_names_match(groups: tuple[Group, ...], ops: dict[str, Op],
                      roles: tuple[Role, ...], key: str = "target.roles") -> None:
    """Every kind and op a role names occurs in the model: a misspelt name would
    otherwise move nothing, silently."""
    kinds = sorted({g.label for g in groups})
    members = [ops[m] for g in groups for m in g.members]
    op_words = sorted({o.kind for o in members} | {o.name for o in members})
    for r in roles:
        for kind in r.kinds:
            if kind not in kinds:
                raise ConfigError(f"{key}.{r.name}.kinds: {kind!r} is no task kind of "
                                  f"this model{_suggest(kind, kinds)}; its kinds: "
                                  f"{', '.join(kinds)}")
        for word in r.ops:
            if word not in op_words:
                raise ConfigError(f"{key}.{r.name}.ops: {word!r} is no op kind or op "
                                  f"name in this model's tasks{_suggest(word, op_words)}")
        paths = sorted({path for o in members for path in o.scope if path})
        for word in r.modules:
            if not replace(r, modules=(word,)).owns_module(tuple(paths)):
                raise ConfigError(f"{key}.{r.name}.modules: {word!r} is no module of "
                                  f"this model{_suggest(word, paths)}")


def worker_roles_of_groups(groups: tuple[Group, ...], ops: dict[str, Op],
                           device_roles: tuple[Role, ...],
                           owner: dict[str, str]) -> dict[str, str]:
    """The worker role of each group whose device role (`owner`: group -> device role)
    splits its workers into roles (model.yaml `roles:` inside a device role): group name
    -> worker role name. Checked like `target.roles` on one device, and each worker
    role must run some task of its device role (its workers would idle otherwise)."""
    out: dict[str, str] = {}
    for dr in device_roles:
        if not dr.roles:
            continue
        key = inner_key(dr)
        check_names_match(groups, ops, dr.roles, key)
        mine = [g for g in groups if owner[g.name] == dr.name]
        for g in mine:
            out[g.name] = role_of_group(g, ops, dr.roles, key)
        used = {out[g.name] for g in mine}
        for r in dr.roles:
            if r.name in used:
                continue
            on = f"device role {dr.name!r} (devices {format_workers(dr.devices)})"
            if r.takes_the_rest:
                raise ConfigError(f"{key}.{r.name}: takes the tasks of {on} that no other "
                                  f"worker role claims, and there are none: its workers "
                                  f"{format_workers(r.workers)} would idle")
            raise ConfigError(f"{key}.{r.name}: claims no task of {on}: its kinds, ops and "
                              "modules name only tasks of other device roles")
    return out


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def roles(taskgraph: TaskGraph, target: Target) -> TaskGraph:
    if taskgraph.devices > 1:
        return taskgraph   # one device's part: partition gave its tasks compute or comm roles
    if not target.roles:
        return replace(taskgraph, roles=())
    groups = taskgraph.fused.groups
    ops = taskgraph.fused.graph.by_name()
    check_names_match(groups, ops, target.roles)
    owner = {g.name: role_of_group(g, ops, target.roles) for g in groups}
    return replace(taskgraph, roles=tuple(owner[t.group] for t in taskgraph.tasks))
