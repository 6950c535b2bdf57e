"""examples/llama_tiny_roles.yaml: worker roles end to end. The engine computes the
same bits as the model without roles, keeps every task in its role, stores the roles
(and old engines without them still load), `tilec verify` catches a task moved onto
another role's worker, and inspect, the trace and the report show the roles."""
from __future__ import annotations

import json

import pytest
import torch

import tilec.api
from engines import EXAMPLES, compiled, resign, run_cli
from tilec.runtime import enginefile as engine_file
from tilec.viz.timeline import task_kinds

ATTENTION_KINDS = {"attention", "state_update"}


@pytest.fixture(scope="module")
def engines():
    return tilec.api.load(compiled("llama_tiny_roles")), tilec.api.load(compiled("llama_tiny"))


def test_tasks_stay_in_their_roles(engines):
    roles, _ = engines
    s = roles.summary()
    assert [(r["name"], r["workers"]) for r in s["roles"]] == [("attention", [0]),
                                                               ("compute", [1, 2])]
    assert [w["role"] for w in s["per_worker"]] == ["attention", "compute", "compute"]
    sched = roles.data.schedule()
    kinds = task_kinds(roles.data.manifest, sched)
    on_zero = {kinds[t] for t in sched.queues[0]}
    elsewhere = {kinds[t] for q in sched.queues[1:] for t in q}
    assert on_zero == ATTENTION_KINDS and not elsewhere & ATTENTION_KINDS
    assert sum(r["tasks"] for r in s["roles"]) == s["tasks"]
    assert s["roles"][0]["tasks"] == sum(s["task_kinds"][k] for k in ATTENTION_KINDS)
    assert sum(r["busy_us"] for r in s["roles"]) == pytest.approx(
        sum(w["busy_us"] for w in s["per_worker"]))
    assert roles.verify().ok, roles.verify().violations


def test_same_bits_as_without_roles(engines):
    roles, plain = engines
    assert roles.data.schedule().queues != plain.data.schedule().queues
    for seed in (1, 2):
        inputs = roles.random_inputs(seed)
        want = plain.run(backend="interpret", **inputs)
        for policy in ("round_robin", "random"):
            got = roles.run(backend="interpret", policy=policy, seed=seed, **inputs)
            assert got.keys() == want.keys()
            for k in want:
                assert torch.equal(got[k], want[k]), (seed, policy, k)


def test_roles_survive_save_and_load_and_old_engines_load(engines, tmp_path):
    roles, _ = engines
    stored = engine_file.load(compiled("llama_tiny_roles")).manifest.schedule
    assert stored.target.roles == roles.data.schedule().target.roles != ()
    assert len(stored.taskgraph.roles) == len(stored.taskgraph.tasks)

    def strip(plain):   # an engine written before roles existed
        del plain["schedule"]["target"]["roles"]
        del plain["schedule"]["taskgraph"]["roles"]
    old = resign(compiled("llama_tiny"), tmp_path / "old.engine", manifest=strip)
    loaded = tilec.api.load(old)
    assert loaded.data.schedule().target.roles == () and loaded.verify().ok
    assert loaded.summary()["roles"][0]["name"] == "compute"


def test_verify_catches_a_task_on_another_roles_worker(capsys, tmp_path):
    engine = engine_file.load(compiled("llama_tiny_roles"))
    starts = engine.tensors["queue_start"].tolist()
    table, ids = engine.tensors["tasks"], engine.tensors["task_ids"]
    a, b = starts[0], starts[1]   # first row of worker 0 (attention) and of worker 1
    for t in (table, ids):   # swap the two records: each task lands in the other role
        t[a], t[b] = t[b].clone(), t[a].clone()
    path = tmp_path / "swapped.engine"
    engine_file.save(engine, path)
    code, out, _ = run_cli(capsys, "verify", path, "--json")
    report = json.loads(out)
    assert code == 1 and report["checks"]["roles_respected"] is False
    moved = int(ids[a])
    role = engine.manifest.schedule.taskgraph.roles[moved]
    assert any(v.startswith(f"roles_respected: task {moved} ") and
               f"has role {role!r} but runs on worker 0, which belongs to role 'attention'" in v
               for v in report["violations"]), report["violations"]


def test_inspect_trace_and_report_show_roles(capsys, tmp_path):
    path = compiled("llama_tiny_roles")
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 0, err
    assert "roles: attention (1 worker), compute (2 workers)" in out
    assert "attention, state_update" in out and "the rest" in out
    trace, report = tmp_path / "t.json", tmp_path / "r.html"
    code, _, err = run_cli(capsys, "inspect", path, "--trace", trace, "--html", report)
    assert code == 0, err
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert names == {0: "worker 0 (attention)", 1: "worker 1 (compute)",
                     2: "worker 2 (compute)"}
    tasks = [e for e in events if e["ph"] == "X"]
    assert {e["args"]["role"] for e in tasks if e["tid"] == 0} == {"attention"}
    page = report.read_text()
    assert "<h2>Roles</h2>" in page and "worker 0 (attention)" in page


def test_a_worker_count_that_leaves_a_worker_without_a_role_is_an_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compile", EXAMPLES / "llama_tiny_roles.yaml", "-o",
                           tmp_path / "e.engine", "--workers", "4")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: {EXAMPLES / 'llama_tiny_roles.yaml'}: target.roles: worker 3 belongs to "
        "no role (list it in a role's workers, or "
        "leave `workers` out of one role so it takes the rest)")
