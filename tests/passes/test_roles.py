"""Roles: model.yaml's `target.roles`, resolving them for the final worker count, the
roles pass on a hand-built fused graph, and verify recomputing what the pass decided."""
from __future__ import annotations

from dataclasses import replace

import pytest

from tilec.compiler.config import parse_config
from tilec.compiler.options import target_options
from tilec.errors import ConfigError
from tilec.ir.graph import FusedGraph, Graph, Group, Op, Operand, TensorType
from tilec.ir.target import TARGETS, Role
from tilec.ir.tasks import Buffer, Region, Task, TaskGraph
from tilec.passes.deps import deps
from tilec.passes.memplan import memplan
from tilec.passes.roles import format_workers, resolve_roles, roles
from tilec.passes.schedule import schedule
from tilec.passes.sync import sync
from tilec.passes.verify import verify

MODEL = {"model": {"family": "llama", "config": {}}}


def parse_roles(spec, workers=4, name="cpu"):
    cfg = parse_config({**MODEL, "target": {"name": name, "workers": workers, "roles": spec}},
                       "m.yaml")
    return cfg.target.roles


# ---------------------------------------------------------------- model.yaml

def test_worker_forms_and_the_role_that_takes_the_rest():
    got = parse_roles({"idx": {"workers": [0, "2-3"], "kinds": ["gather"], "ops": ["argmax"]},
                       "rest": None}, workers=5)
    assert got == (Role("idx", (0, 2, 3), ("gather",), ("argmax",)), Role("rest", ()))
    assert resolve_roles(got, 5)[1] == Role("rest", (1, 4))
    assert parse_roles({"a": {"workers": "0-1", "ops": ["mm"]}, "b": {"workers": 2}},
                       workers=3)[1].workers == (2,)


@pytest.mark.parametrize("spec, message", [
    ({}, r"target\.roles: expected a mapping of role names"),
    ([0], r"target\.roles: expected a mapping"),
    ({"a b": {}}, r"target\.roles: expected role names that are identifiers"),
    ({"a": {"devices": [1]}}, r"target\.roles\.a\.devices: device roles need "
                              r"`target\.devices` of 2 or more"),
    ({"a": {"devices": [1], "workers": [0]}}, r"target\.roles\.a: a role owns workers"),
    ({"a": {"worker": [1]}}, r"unknown key 'target\.roles\.a\.worker'.*did you mean "
                             r"'target\.roles\.a\.workers'"),
    ({"a": {"workers": []}}, r"target\.roles\.a\.workers: expected worker ids"),
    ({"a": {"workers": "3-1"}}, r"target\.roles\.a\.workers: expected worker ids"),
    ({"a": {"workers": [-1]}}, r"target\.roles\.a\.workers: expected worker ids"),
    ({"a": {"workers": "0-1000000000"}}, r"target\.roles\.a\.workers: expected worker ids"),
    ({"a": {"workers": [1 << 40]}}, r"target\.roles\.a\.workers: expected worker ids"),
    ({"a": {"workers": [0, "0-1"]}}, r"target\.roles\.a\.workers: worker 0 is listed twice"),
    ({"a": {"workers": [4]}}, r"target\.roles\.a\.workers: worker 4 does not exist \(the "
                              r"target has 4 workers: 0-3\)"),
    ({"a": {"workers": [0, 1], "kinds": ["x"]}, "b": {"workers": "1-3"}},
     r"target\.roles\.b\.workers: worker 1 also belongs to role 'a'"),
    ({"a": {"workers": [0], "kinds": ["x"]}, "b": {"workers": [1]}},
     r"target\.roles: workers 2-3 belong to no role"),
    ({"a": {"workers": [0]}, "b": {}}, r"roles 'a' and 'b' both name no kinds or ops"),
    ({"a": {"kinds": ["x"]}, "b": {}}, r"roles 'a' and 'b' both leave out `workers`"),
    ({"a": {"workers": "0-3", "kinds": ["x"]}, "b": {}},
     r"target\.roles\.b\.workers: the role has no workers"),
    ({"a": {"workers": [0], "kinds": "matmul"}, "b": {}},
     r"target\.roles\.a\.kinds: expected a list of names"),
    ({"a": {"workers": [0], "ops": [""]}, "b": {}}, r"target\.roles\.a\.ops: expected a list"),
])
def test_role_mistakes_are_one_line_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_roles(spec)
    assert str(info.value).startswith("m.yaml: ") or "in m.yaml" in str(info.value)
    assert "\n" not in str(info.value)


def test_roles_are_checked_again_for_the_final_worker_count():
    spec = parse_roles({"attn": {"workers": [0], "kinds": ["attention"]}, "rest": {}}, 3)
    options = target_options("cpu", 6, roles=spec)
    assert options.target.roles == (Role("attn", (0,), ("attention",)),
                                    Role("rest", (1, 2, 3, 4, 5)))
    assert options.target.worker_roles() == ("attn",) + ("rest",) * 5
    fixed = parse_roles({"attn": {"workers": [2], "kinds": ["attention"]},
                         "rest": {"workers": "0-1"}}, 3)
    with pytest.raises(ConfigError, match="worker 2 does not exist"):
        target_options("cpu", 2, roles=fixed)
    with pytest.raises(ConfigError, match="worker 3 belongs to no role"):
        target_options("cpu", 4, roles=fixed)
    assert target_options("cpu", 4).target.roles == ()


def test_format_workers():
    assert format_workers([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8"
    assert format_workers([]) == ""


# ---------------------------------------------------------------- the roles pass

def op(name, kind, shape, *inputs, dtype="float32", **attrs):
    return Op(name, kind, TensorType(shape, dtype),
              tuple(Operand.whole(i.name, i.type.shape) for i in inputs),
              tuple(attrs.items()))


def small_model() -> TaskGraph:
    """x @ w -> relu (one matmul group, 4 row tiles) -> argmax (one row group, 2 tiles)."""
    x = op("x", "input", (8, 16))
    w = op("w", "weight", (16, 16))
    mm = op("mm", "matmul", (8, 16), x, w)
    relu = op("relu", "elementwise", (8, 16), mm, fn="relu")
    am = op("am", "argmax", (8, 1), relu, dtype="int64")
    graph = Graph((x, w, mm, relu, am), ("x",), (("am", Operand.whole("am", (8, 1))),))
    groups = (Group("g0_matmul_epilogue", "matmul", "mm", (), ("relu",), ("relu",), 8, 16),
              Group("g1_argmax", "row", None, (), ("am",), ("am",), 8, 1))
    buffers = tuple(Buffer(o.name, o.type, kind) for o, kind in
                    ((x, "input"), (w, "weight"), (relu, "activation"), (am, "output")))

    def box(b, r0, r1):
        return Region(b, ((r0, r1), (0, 16 if b != "am" else 1)))

    tasks = [Task(i, "g0_matmul_epilogue", (0, i, 0), (box("x", 2 * i, 2 * i + 2),
                                                       Region("w", ((0, 16), (0, 16)))),
                  (box("relu", 2 * i, 2 * i + 2),), 1024, 4096) for i in range(4)]
    tasks += [Task(4 + i, "g1_argmax", (0, i, 0), (box("relu", 4 * i, 4 * i + 4),),
                   (box("am", 4 * i, 4 * i + 4),), 64, 512) for i in range(2)]
    return deps(TaskGraph(FusedGraph(graph, groups), buffers, (), tuple(tasks)))


def with_roles(*rs: Role, workers: int = 3):
    return replace(TARGETS["cpu"], workers=workers, roles=resolve_roles(rs, workers))


@pytest.mark.parametrize("owner", [
    Role("head", (0,), kinds=("argmax",)),
    Role("head", (0,), ops=("argmax",)),          # an op kind
    Role("head", (0,), ops=("am",)),              # an op name
])
def test_the_pass_gives_each_task_its_groups_role(owner):
    t = with_roles(owner, Role("rest", ()))
    tg = roles(small_model(), t)
    assert tg.roles == ("rest",) * 4 + ("head",) * 2
    s = memplan(sync(schedule(tg, t)))
    assert verify(s).ok, verify(s).violations
    assert set(s.queues[0]) == {4, 5} and not set(s.queues[0]) & {0, 1, 2, 3}
    assert roles(small_model(), replace(t, roles=())).roles == ()


def test_a_group_of_the_default_role_can_be_claimed_through_its_prologue_or_epilogue_op():
    t = with_roles(Role("mm", (0, 1), ops=("elementwise",)), Role("rest", (2,)))
    assert roles(small_model(), t).roles == ("mm",) * 4 + ("rest",) * 2


@pytest.mark.parametrize("rs, message", [
    ((Role("a", (0,), kinds=("argmaxx",)), Role("b", (1, 2))),
     r"target\.roles\.a\.kinds: 'argmaxx' is no task kind of this model \(did you mean "
     r"'argmax'\?\); its kinds: argmax, matmul_epilogue"),
    ((Role("a", (0,), ops=("reluu",)), Role("b", (1, 2))),
     r"target\.roles\.a\.ops: 'reluu' is no op kind or op name .*did you mean 'relu'"),
    ((Role("a", (0,), kinds=("argmax",)), Role("b", (1, 2), ops=("x_unused",))), r"x_unused"),
    ((Role("a", (0,), kinds=("argmax",)), Role("b", (1, 2), ops=("relu",))),
     None),
    ((Role("a", (0,), kinds=("argmax",)), Role("b", (1, 2), ops=("matmul",))), None),
    ((Role("a", (0,), kinds=("argmax",)), Role("b", (1,), ops=("sum",)), Role("c", (2,))),
     r"'sum' is no op kind"),
])
def test_pass_matching_and_mistakes(rs, message):
    t = with_roles(*rs)
    if message is None:
        assert roles(small_model(), t).roles == ("b",) * 4 + ("a",) * 2
        return
    with pytest.raises(ConfigError, match=message):
        roles(small_model(), t)


def test_a_group_claimed_twice_or_by_no_role_is_an_error():
    t = with_roles(Role("a", (0,), kinds=("argmax",)), Role("b", (1,), kinds=("argmax",)),
                   Role("rest", (2,)))
    with pytest.raises(ConfigError, match=r"group g1_argmax \(kind argmax\) is claimed by "
                                          r"roles 'a' and 'b'; give it to one"):
        roles(small_model(), t)
    t = with_roles(Role("a", (0,), kinds=("argmax",)), Role("b", (1, 2), ops=("am",)),
                   workers=3)
    with pytest.raises(ConfigError, match="no role takes group g0_matmul_epilogue \\(kind "
                                          "matmul_epilogue\\)"):
        roles(small_model(), t)


def test_verify_recomputes_each_tasks_role_from_the_definitions():
    t = with_roles(Role("head", (0,), kinds=("argmax",)), Role("rest", ()))
    s = memplan(sync(schedule(roles(small_model(), t), t)))
    # Say task 4 (an argmax) belongs to "rest" and move it onto a "rest" worker: the
    # placement matches the stored role, but the definitions give argmax to "head".
    queues = [tuple(x for x in q if x != 4) for q in s.queues]
    queues[1] += (4,)
    lying = replace(s, queues=tuple(queues),
                    taskgraph=replace(s.taskgraph, roles=s.taskgraph.roles[:4] + ("rest", "head")))
    report = verify(lying)
    assert not report.checks["roles_respected"]
    assert any("task 4 " in v and "has role 'rest', but the target's roles give group "
               "g1_argmax to role 'head'" in v for v in report.violations), report.violations
    overlapping = replace(s, target=replace(t, roles=(Role("head", (0, 1), ("argmax",)),
                                                      Role("rest", (1, 2)))))
    report = verify(overlapping)
    assert any("worker 1 also belongs to role 'head'" in v for v in report.violations)


# ---------------------------------------------------------------- device roles

def parse_target(target):
    return parse_config({**MODEL, "target": target}, "m.yaml").target


def test_device_roles_resolve_like_worker_roles():
    t = parse_target({"name": "cpu", "devices": 4,
                      "roles": {"indexer": {"devices": [0], "ops": ["topk"]}, "mla": None}})
    assert t.devices == 4
    assert [(r.name, r.devices, r.workers) for r in t.roles] == [("indexer", (0,), ()),
                                                                 ("mla", (), ())]
    from tilec.compiler.options import target_options
    options = target_options("cpu", 2, roles=t.roles, devices=4)
    assert [(r.name, r.devices) for r in options.target.device_roles] == \
        [("indexer", (0,)), ("mla", (1, 2, 3))]
    assert options.target.roles == ()


@pytest.mark.parametrize("target, message", [
    ({"devices": 0}, r"target\.devices: expected an integer from 1 to 62"),
    ({"devices": "2"}, r"target\.devices: expected an integer from 1 to 62"),
    ({"devices": 2, "roles": {"a": {"workers": [0]}, "b": {}}},
     r"target\.roles\.a\.workers: on a target of 2 devices a role owns devices"),
    ({"devices": 2, "roles": {"a": {"devices": [2]}, "b": {}}},
     r"target\.roles\.a\.devices: device 2 does not exist \(the target has 2 devices: 0-1\)"),
    ({"devices": 3, "roles": {"a": {"devices": [0], "kinds": ["x"]}, "b": {"devices": [1]}}},
     r"target\.roles: device 2 belongs to no role"),
    ({"devices": 2, "roles": {"a": {"devices": [0, 0]}, "b": {}}},
     r"target\.roles\.a\.devices: device 0 is listed twice"),
])
def test_device_role_mistakes_are_one_line_config_errors(target, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_target({"name": "cpu", **target})
    assert "\n" not in str(info.value)


def test_override_to_one_device_refuses_device_roles():
    t = parse_target({"name": "cpu", "devices": 2,
                      "roles": {"a": {"devices": [0], "kinds": ["gather"]}, "b": {}}})
    from tilec.compiler.options import target_options
    with pytest.raises(ConfigError, match=r"target\.roles\.a\.devices: roles own devices on a "
                                          r"multi-device target and workers on one device"):
        target_options("cpu", 2, roles=t.roles, devices=1)


def test_a_role_owns_modules_by_path(tmp_path):
    """`modules:` claims every group with an op computed inside a module: here layer 1
    of llama_tiny on worker 0; a misspelt module is an error with a suggestion."""
    import yaml

    import tilec.api
    from engines import EXAMPLES
    data = yaml.safe_load((EXAMPLES / "llama_tiny.yaml").read_text())
    data["target"] = {"name": "cpu", "workers": 3,
                      "roles": {"second": {"workers": [0], "modules": ["layers.1"]}, "rest": {}}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    e = tilec.api.compile(str(path))
    assert e.verify().ok
    sched = e.data.schedule()
    tg = sched.taskgraph
    ops = tg.fused.graph.by_name()
    groups = {g.name: g for g in tg.fused.groups}

    def in_layer_1(task):
        return any("layers.1" in ops[m].scope for m in groups[task.group].members)
    assert {in_layer_1(tg.tasks[t]) for t in sched.queues[0]} == {True}
    assert not any(in_layer_1(tg.tasks[t]) for q in sched.queues[1:] for t in q)
    data["target"]["roles"]["second"]["modules"] = ["layer.1"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"target\.roles\.second\.modules: 'layer\.1' is no "
                                          r"module of this model \(did you mean 'layers\.1'\?\)"):
        tilec.api.compile(str(path))
