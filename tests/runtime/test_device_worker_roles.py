"""Device roles and worker roles in one engine (issue 16 item 3):
examples/glm_dsa_tiny_roles.yaml puts the indexers and routers on device 0, split over
its workers (`index`, `route`), and the MLA on devices 1-3, each with one worker on the
cache appends and attention (`attention`) and the others on everything else
(`projections`). The engine keeps every task in its device and worker role, computes
what eager PyTorch and the one-device engine compute, and shows its roles; the
verifiers catch a task out of either role; mistakes in the definitions are one line
naming the key path."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

import tilec.api
from engines import EXAMPLES, eager_greedy_of_yaml, run_cli
from tilec.compiler.config import parse_config
from tilec.compiler.options import target_options
from tilec.errors import ConfigError
from tilec.ir.schedule import POOL_ALIGN
from tilec.ir.tasks import TRANSFER
from tilec.passes.partition import engine_target, group_roles
from tilec.passes.verify import verify
from tilec.passes.verify_devices import verify_devices
from tilec.runtime.enginefile.checks import _unheld_problem
from tilec.viz.timeline import task_kinds

ROLES_YAML = EXAMPLES / "glm_dsa_tiny_roles.yaml"
ATTENTION_KINDS = {"attention", "state_update"}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The example, saved and loaded (what `tilec inspect` and `verify` read), and the
    one-device engine of the same model and tile sizes."""
    path = tmp_path_factory.mktemp("roles") / "roles.engine"
    tilec.api.compile(str(ROLES_YAML)).save(path)
    one = tilec.api.compile(str(EXAMPLES / "glm_dsa_tiny.yaml"), tile_n=16)
    return path, tilec.api.load(path), one


def _scopes(part, task) -> set[str]:
    tg = part.manifest.schedule.taskgraph
    group = next(g for g in tg.fused.groups if g.name == task.group)
    ops = tg.fused.graph.by_name()
    return {p for m in group.members for p in ops[m].scope}


def test_every_task_runs_in_its_device_role_and_its_worker_role(engines):
    _, four, _ = engines
    report = four.verify()
    assert report.ok, report.violations
    assert "device_roles" in report.checks and "device 3: roles_respected" in report.checks
    for d, part in enumerate(four.parts):
        sched = part.schedule()
        roles = {r.name: set(r.workers) for r in sched.target.roles}
        assert set(roles) == ({"index", "route", "comm"} if d == 0 else
                              {"attention", "projections", "comm"}), d
        kinds = task_kinds(part.manifest, sched)
        worker = {t: w for w, q in enumerate(sched.queues) for t in q}
        for task, role in zip(sched.taskgraph.tasks, sched.taskgraph.roles):
            assert worker[task.id] in roles[role], (d, task.id, role)
            if task.group == TRANSFER:
                assert role == "comm"
                continue
            scopes = _scopes(part, task)
            index = any(re.search(r"\.indexer(\.|$)", p) for p in scopes)
            route = any(p.endswith(".mlp.gate") for p in scopes)
            if d == 0:
                assert (index, route, role) in {(True, False, "index"),
                                                (False, True, "route")}, (task.group, role)
            else:
                assert not index and not route, task.group
                want = "attention" if kinds[task.id] in ATTENTION_KINDS else "projections"
                assert role == want, (d, task.group, kinds[task.id])
        used = {r for r in sched.taskgraph.roles}
        assert used == set(roles), (d, used)   # every worker role has work


def test_same_logits_as_eager_and_as_one_device(engines):
    """Generation past index_topk (the last steps drop cached tokens) on the reference
    executor, the tokens and logits of eager PyTorch (float32, within 1e-3); and a step
    from fresh random inputs on both CPU executors, the bits of the one-device engine."""
    _, four, one = engines
    prompt, new = (5, 6), 5
    tokens, logits = eager_greedy_of_yaml(str(EXAMPLES / "glm_dsa_tiny.yaml"), prompt, new)
    got = four.generate(list(prompt), new, backend="reference", logits=True)
    assert got.tokens == tokens
    assert (got.logits - logits).abs().max() <= 1e-3
    for backend, seed in (("reference", 11), ("interpret", 12)):
        inputs = one.random_inputs(seed)
        assert int(inputs["pos"]) > 0
        want = one.new_executor(backend).run(dict(inputs))
        out = four.new_executor(backend, "random", seed).run(dict(inputs))
        assert torch.equal(out["logits"], want["logits"]), backend


def test_inspect_shows_each_devices_worker_roles(engines, capsys, tmp_path):
    path, four, _ = engines
    code, out, err = run_cli(capsys, "inspect", path, "--json", "--trace", tmp_path / "t.json")
    assert code == 0, err
    rows = json.loads(out)["devices"]
    assert [d["role"] for d in rows] == ["sparse", "mla", "mla", "mla"]
    assert [(r["name"], r["workers"]) for r in rows[0]["roles"]] == \
        [("index", [0, 1]), ("route", [2]), ("comm", [3])]
    for d, row in enumerate(rows):
        tasks = four.parts[d].manifest.schedule.taskgraph.tasks
        assert sum(r["tasks"] for r in row["roles"]) == len(tasks)
        assert all(r["tasks"] > 0 and r["busy_us"] > 0 for r in row["roles"]), row
    assert [(r["name"], r["workers"]) for r in rows[2]["roles"]] == \
        [("attention", [0]), ("projections", [1, 2]), ("comm", [3])]
    tracks = {e["args"]["name"] for e in json.loads((tmp_path / "t.json").read_text())
              ["traceEvents"] if e.get("name") == "thread_name"}
    assert {"worker 0 (index)", "worker 2 (route)", "worker 0 (attention)",
            "worker 1 (projections)"} <= tracks
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 0, err
    assert "roles per device" in out
    assert re.search(r"│\s+0 │ sparse\s+│ route\s+│ 2\s+│ mlp\.gate", out), out


# ---- the verifiers catch a task out of its roles --------------------------------------

def _attention_task(sched) -> int:
    return next(t.id for t, role in zip(sched.taskgraph.tasks, sched.taskgraph.roles)
                if role == "attention")


def _move(sched, task: int, to: int):
    """`task` taken off its worker's queue and put at the end of worker `to`'s."""
    queues = [tuple(t for t in q if t != task) for q in sched.queues]
    queues[to] = queues[to] + (task,)
    return replace(sched, queues=tuple(queues))


def test_verify_catches_a_task_on_another_worker_role(engines):
    _, four, _ = engines
    parts = [p.schedule() for p in four.parts]
    target = engine_target(parts[0].target)
    assert verify_devices(tuple(parts), target).ok
    t = _attention_task(parts[1])
    moved = _move(parts[1], t, 1)   # onto a projections worker
    report = verify(moved)
    assert not report.checks["roles_respected"]
    assert any(f"task {t} " in v and "has role 'attention' but runs on worker 1, which "
               "belongs to role 'projections'" in v for v in report.violations)
    # the task relabelled to go with it: its group is still the attention role's
    tg = moved.taskgraph
    relabelled = replace(moved, taskgraph=replace(tg, roles=tuple(
        "projections" if i == t else r for i, r in enumerate(tg.roles))))
    report = verify(relabelled)
    assert any("has role 'projections', but the target's roles give group" in v
               for v in report.violations), report.violations
    cross = verify_devices((parts[0], relabelled, *parts[2:]), target)
    assert not cross.checks["device_roles"]
    assert any(f"device 1: task {t} " in v and "has worker role 'projections', but its "
               "device role gives the group to worker role 'attention'" in v
               for v in cross.violations), cross.violations


def test_verify_devices_catches_a_device_scheduled_for_other_worker_roles(engines):
    """Device 1's queues swapped between workers 0 and 1 and its roles swapped to match:
    its own verify cannot tell (each task runs where its schedule's roles say), the
    cross-device check can (those are not the roles its device role defines)."""
    _, four, _ = engines
    parts = [p.schedule() for p in four.parts]
    s = parts[1]
    q = list(s.queues)
    q[0], q[1] = q[1], q[0]
    roles = tuple(replace(r, workers=(1,)) if r.name == "attention" else
                  replace(r, workers=(0, 2)) if r.name == "projections" else r
                  for r in s.target.roles)
    swapped = replace(s, queues=tuple(q), target=replace(s.target, roles=roles))
    assert verify(swapped).ok, verify(swapped).violations
    report = verify_devices((parts[0], swapped, *parts[2:]), engine_target(parts[0].target))
    assert not report.checks["device_roles"]
    assert any("device 1: its schedule's worker roles" in v and "not those of its device "
               "role 'mla'" in v for v in report.violations), report.violations


def test_verify_devices_catches_a_task_on_another_device_role(engines):
    """Judged against device roles that give device 0 to `mla`: device 0's indexer
    tasks run outside their role's devices."""
    _, four, _ = engines
    parts = tuple(p.schedule() for p in four.parts)
    target = engine_target(parts[0].target)
    sparse, mla = target.device_roles
    other = replace(target, device_roles=(replace(sparse, devices=(1,)),
                                          replace(mla, devices=(0, 2, 3))))
    report = verify_devices(parts, other)
    assert not report.checks["device_roles"]
    assert any(re.search(r"device 0: task \d+ \(group \S+\) runs outside its role's "
                         r"devices \[1\]", v) for v in report.violations), report.violations


# ---- mistakes ---------------------------------------------------------------------------

MODEL = {"model": {"module": "mlp.py:MLP"}, "inputs": [{"name": "x", "shape": [1, 4],
                                                        "dtype": "float32"}]}


def _target(roles, devices=4, workers=3):
    return {"name": "cpu", "workers": workers, "devices": devices, "roles": roles}


def _yaml(target):
    return parse_config({**MODEL, "target": target}, str(EXAMPLES / "m.yaml")).target


SPARSE = {"devices": [0], "modules": ["indexer", "mlp.gate"]}


@pytest.mark.parametrize("roles, message", [
    ({"sparse": {**SPARSE, "roles": {"a": {"workers": [5], "modules": ["indexer"]}, "b": {}}},
      "mla": {}},
     r"target\.roles\.sparse\.roles\.a\.workers: worker 5 does not exist \(the target has 3 "
     r"workers: 0-2\)"),
    ({"sparse": {**SPARSE, "roles": {"a": {"workers": "0-1", "modules": ["indexer"]},
                                     "b": {"workers": [1, 2]}}}, "mla": {}},
     r"target\.roles\.sparse\.roles\.b\.workers: worker 1 also belongs to role 'a'"),
    ({"sparse": {**SPARSE, "roles": {"a": {"workers": [0], "modules": ["indexer"]},
                                     "b": {"workers": [1]}}}, "mla": {}},
     r"target\.roles\.sparse\.roles: worker 2 belongs to no role"),
    ({"sparse": {**SPARSE, "roles": {"a": {"workers": [0]}, "b": {"workers": "1-2"}}},
      "mla": {}},
     r"target\.roles\.sparse\.roles: roles 'a' and 'b' both name no kinds or ops"),
    ({"sparse": {**SPARSE, "roles": {"a": {}, "b": {}}}, "mla": {}},
     r"target\.roles\.sparse\.roles: roles 'a' and 'b' both leave out `workers`"),
    ({"sparse": {**SPARSE, "roles": {"comm": {"workers": [0], "kinds": ["topk"]}, "b": {}}},
      "mla": {}},
     r"target\.roles\.sparse\.roles\.comm: the name 'comm' is the comm worker's"),
    ({"sparse": {**SPARSE, "roles": {"a": {"devices": [0]}}}, "mla": {}},
     r"unknown key 'target\.roles\.sparse\.roles\.a\.devices'"),
    ({"sparse": {**SPARSE, "roles": {"a": {"roles": {"b": {}}}}}, "mla": {}},
     r"unknown key 'target\.roles\.sparse\.roles\.a\.roles'"),
    ({"sparse": {**SPARSE, "roles": []}, "mla": {}},
     r"target\.roles\.sparse\.roles: expected a mapping of role names"),
    ({"sparse": {**SPARSE, "roles": {"a-b": {}}}, "mla": {}},
     r"target\.roles\.sparse\.roles: expected role names that are identifiers"),
    ({"sparse": {"workers": [0], "roles": {"a": {}}}, "mla": {}},
     r"target\.roles\.sparse\.roles: worker roles go inside a device role"),
    ({"sparse": {"workers": [0], "modules": ["indexer"]}, "mla": {}},
     r"target\.roles\.sparse\.workers: on a target of 4 devices a role owns devices; give it "
     r"`devices`, and split a device's workers with worker roles under its `roles`"),
])
def test_worker_role_mistakes_in_model_yaml(roles, message):
    with pytest.raises(ConfigError, match=message) as info:
        _yaml(_target(roles))
    assert "\n" not in str(info.value)


def test_worker_roles_need_several_devices_and_are_checked_again_after_overrides():
    with pytest.raises(ConfigError, match=r"target\.roles\.a\.roles: worker roles inside a "
                                          r"role \(a device role's\) need `target\.devices` "
                                          r"of 2 or more"):
        _yaml(_target({"a": {"roles": {"b": {}}}}, devices=1))
    t = _yaml(_target({"sparse": {**SPARSE, "roles": {"a": {"workers": [2],
                                                            "modules": ["indexer"]},
                                                      "b": {}}}, "mla": {}}))
    options = target_options("cpu", 3, roles=t.roles, devices=4)
    sparse = options.target.device_roles[0]
    assert [(r.name, r.workers) for r in sparse.roles] == [("a", (2,)), ("b", (0, 1))]
    with pytest.raises(ConfigError, match=r"target\.roles\.sparse\.roles\.a\.workers: worker 2 "
                                          r"does not exist \(the target has 2 workers"):
        target_options("cpu", 2, roles=t.roles, devices=4)      # --workers 2
    with pytest.raises(ConfigError, match=r"target\.roles\.sparse\.devices: roles own devices "
                                          r"on a multi-device target"):
        target_options("cpu", 3, roles=t.roles, devices=1)      # --devices 1


@pytest.mark.parametrize("sparse_roles, message", [
    ({"index": {"workers": [0], "modules": ["indexr"]}, "route": {}},
     r"target\.roles\.sparse\.roles\.index\.modules: 'indexr' is no module of this model"),
    ({"index": {"workers": [0], "modules": ["indexer"]},
      "attn": {"workers": [1], "kinds": ["attention"]}, "route": {}},
     r"target\.roles\.sparse\.roles\.attn: claims no task of device role 'sparse' \(devices "
     r"0\): its kinds, ops and modules name only tasks of other device roles"),
    ({"index": {"workers": [0], "modules": ["indexer"]},
      "route": {"workers": [1], "modules": ["mlp.gate"]}, "rest": {}},
     r"target\.roles\.sparse\.roles\.rest: takes the tasks of device role 'sparse' \(devices "
     r"0\) that no other worker role claims, and there are none: its workers 2 would idle"),
    ({"index": {"workers": [0], "modules": ["indexer"]},
      "route": {"workers": [1], "modules": ["mlp.gate"]}, "gates": {"modules": ["mlp.gate"]}},
     r"target\.roles\.sparse\.roles: group \S+ \(kind \w+\) is claimed by roles 'route' "
     r"and 'gates'; give it to one"),
    ({"index": {"workers": "0-1", "modules": ["indexer"]},
      "route": {"workers": [2], "kinds": ["gather"]}},   # not the router's matmul
     r"target\.roles\.sparse\.roles: no role takes group \S+ \(kind matmul_epilogue\); "
     r"name it in a role's kinds or ops"),
])
def test_worker_role_mistakes_found_against_the_model(engines, sparse_roles, message):
    """Checked when the model's groups are known (the partition pass), on the example's
    own task graph."""
    _, four, _ = engines
    taskgraph = four.parts[0].manifest.schedule.taskgraph
    t = _yaml(_target({"sparse": {**SPARSE, "roles": sparse_roles}, "mla": {}}))
    options = target_options("cpu", 3, roles=t.roles, devices=4)
    with pytest.raises(ConfigError, match=message) as info:
        group_roles(taskgraph, options.target)
    assert "\n" not in str(info.value)


# ---- what each device holds -------------------------------------------------------------

def test_device_0_holds_only_what_its_roles_need(engines):
    """Device 0 runs the indexers and the routers: its weight and state pools hold their
    parts of those buffers and nothing else (each pool used to span the largest buffer
    of the model, whole: an expert pool, the embeddings, 6.4 GB of GLM-5's full-size
    plan), and the bits stay those of the one-device engine (test above)."""
    _, four, _ = engines
    sched = four.parts[0].manifest.schedule
    held = {b.name: b.stored for b in sched.buffers
            if b.kind in ("weight", "state") and b.stored[0] < b.stored[1]}
    assert held and all(re.search(r"indexer|mlp_gate|inv_freq|positions", n) for n in held), \
        sorted(held)
    for pool in sched.pools:
        if pool.kind in ("weight", "state"):
            parts = [hi - lo for b in sched.buffers if b.pool == pool.name and b.name in held
                     for lo, hi in [held[b.name]]]
            assert sum(parts) <= pool.numel < sum(parts) + POOL_ALIGN * len(parts), pool
    untouched = [b for b in sched.buffers if b.kind == "weight" and b.name not in held]
    assert max(b.type.numel for b in untouched) > sum(
        p.numel for p in sched.pools if p.kind == "weight")   # the expert pools, lm_head


def test_a_task_that_addresses_a_buffer_its_device_does_not_hold_is_refused(engines):
    """The loader (and verify) refuse a device schedule whose tasks run a group naming a
    buffer the device holds none of: such a buffer need not lie in its pool."""
    _, four, _ = engines
    sched = four.parts[0].schedule()
    assert _unheld_problem(sched) is None
    task = next(t for t in sched.taskgraph.tasks if t.group != TRANSFER and t.reads)
    name = next(r.buffer for r in task.reads
                if next(b for b in sched.buffers if b.name == r.buffer).kind == "weight")
    dropped = replace(sched, buffers=tuple(replace(b, stored=(0, 0)) if b.name == name else b
                                           for b in sched.buffers))
    problem = _unheld_problem(dropped)
    assert re.fullmatch(rf"task {task.id} \('{task.group}'\) addresses buffer '\S+, of which "
                        "this device holds nothing", problem), problem
    assert f"buffer '{name[:30]}" in problem   # (clip shortens a long name)
    report = verify(dropped)
    assert not report.checks["regions_in_buffers"], report.violations
