"""`tilec inspect` (summary, --json, --trace, --dot, --html), `tilec run --profile`, and
the verifier's stage dump. The checks recompute what they can from the engine itself
(critical path, flows, bars) instead of trusting the code under test."""
from __future__ import annotations

import html.parser
import json
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import networkx as nx
import pytest
import torch
import yaml

import tilec.api
from engines import run_cli
from tilec.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WORKERS = 3
CHROMIUM = Path("/usr/bin/chromium")
SUMMARY_KEYS = ("model", "target", "backend", "workers", "tasks", "events", "waits",
                "task_kinds", "roles", "per_worker", "predicted_step_us", "lower_bound_us",
                "critical_path_us", "critical_path", "memory_bound_us", "work_bound_us", "bytes",
                "fusion_groups", "event_table", "kernel", "cross_worker_waits")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """examples/block.yaml on 3 workers, compiled with stage dumps."""
    folder = tmp_path_factory.mktemp("inspect")
    path = folder / "block.engine"
    assert main(["compile", str(EXAMPLES / "block.yaml"), "-o", str(path), "--workers",
                 str(WORKERS), "--dump-dir", str(folder / "dump")]) == 0
    return folder, path, tilec.api.load(path, trust_engine_code=True)


def inspect_json(capsys, path) -> dict:
    code, out, err = run_cli(capsys, "inspect", path, "--json")
    assert code == 0, err
    return json.loads(out)


# ---- the summary ----------------------------------------------------------------------

def longest_path(engine) -> float:
    """The critical path recomputed with networkx from the tasks' conflicts (engines
    store no edges: the deps pass finds them from the regions) and the schedule's
    predicted task durations."""
    from tilec.passes.deps import conflicts

    sched = engine.data.schedule()
    assert not sched.taskgraph.deps  # not stored: recomputed below
    dur = [f - s for s, f in zip(sched.start_us, sched.finish_us)]
    g = nx.DiGraph()
    g.add_nodes_from(range(len(dur)))
    g.add_edges_from((d.before, d.after) for d in conflicts(sched.taskgraph))
    best = {}
    for t in nx.topological_sort(g):
        best[t] = dur[t] + max((best[p] for p in g.predecessors(t)), default=0.0)
    return max(best.values())


def test_json_keys_and_invariants(capsys, built):
    _, path, engine = built
    s = inspect_json(capsys, path)
    for key in SUMMARY_KEYS:
        assert key in s, key
    sched = engine.data.schedule()
    tg = sched.taskgraph
    assert s["model"] == "block" and s["target"] == "cpu" and s["workers"] == WORKERS
    assert s["tasks"] == len(tg.tasks) == sum(s["task_kinds"].values())
    busy = sum(sched.finish_us[t] - sched.start_us[t] for t in range(len(tg.tasks)))
    assert s["roles"] == [{"name": "compute", "workers": list(range(WORKERS)), "kinds": [],
                           "ops": [], "modules": [], "tasks": len(tg.tasks),
                           "busy_us": pytest.approx(busy)}]
    assert all(w["role"] == "compute" for w in s["per_worker"])
    assert sum(w["tasks"] for w in s["per_worker"]) == s["tasks"]
    assert all(0 < w["utilisation"] <= 1 for w in s["per_worker"])
    assert s["predicted_step_us"] == pytest.approx(max(sched.finish_us))

    # critical path: a chain of deps, as long as networkx's longest path
    from tilec.passes.deps import conflicts

    path_ids = [c["task"] for c in s["critical_path"]]
    edges = {(d.before, d.after) for d in conflicts(tg)}
    assert len(path_ids) > 1  # block's tasks form chains: a lone task would be a bug
    assert all((a, b) in edges for a, b in zip(path_ids, path_ids[1:]))
    assert s["critical_path_us"] == pytest.approx(longest_path(engine))
    assert s["critical_path_us"] == pytest.approx(
        sum(c["finish_us"] - c["start_us"] for c in s["critical_path"]))
    busy = [sum(s["per_worker"][w]["busy_us"] for w in r["workers"]) / len(r["workers"])
            for r in s["roles"]]
    assert s["work_bound_us"] == pytest.approx(max(busy))
    assert s["lower_bound_us"] == max(s["critical_path_us"], s["work_bound_us"],
                                      s["memory_bound_us"])
    assert s["lower_bound_us"] <= s["predicted_step_us"] * (1 + 1e-9)

    # bytes: every weight is read at least once; fusion keeps intermediates in registers
    b = s["bytes"]
    weights = sum(x.type.nbytes for x in tg.buffers if x.kind == "weight")
    assert b["weights"] >= weights > 0
    assert b["kv"] == 0          # the block has no state
    assert 0 < b["intermediate"] < b["intermediate_unfused"]
    assert b["cost_model"] == sum(t.bytes for t in tg.tasks)
    # the cpu target prices every byte at its bandwidth (no latencies, no L2)
    assert b["cost_model_hbm"] == sum(t.bytes for t in tg.tasks if t.group != "transfer")
    assert s["memory_bound_us"] == pytest.approx(b["cost_model_hbm"] /
                                                 (sched.target.bandwidth_gbps * 1e3))
    # the HBM floor: weights and KV over the bandwidth (the cpu target has no measured
    # copy bandwidth: its datasheet-like figure stands in, and says so)
    assert s["hbm_floor_us"] == pytest.approx((b["weights"] + b["kv"]) /
                                              (sched.target.bandwidth_gbps * 1e3))
    assert not s["hbm_floor_measured"]
    assert s["predicted_over_hbm_floor"] == pytest.approx(s["predicted_step_us"] / s["hbm_floor_us"])

    # fusion groups partition the compute ops
    members = [op for g in s["fusion_groups"] for op in g["ops"]]
    compute = [op.name for op in tg.fused.graph.ops
               if op.kind not in ("input", "weight", "state")]
    assert sorted(members) == sorted(compute)
    assert sum(g["tasks"] for g in s["fusion_groups"]) == s["tasks"]

    # events: every task signals exactly one, every wait is listed once
    ev = s["event_table"]
    assert len(ev) == s["events"]
    assert sorted(t for e in ev for t in e["signalled_by"]) == list(range(s["tasks"]))
    assert sum(len(e["waited_by"]) for e in ev) == s["waits"]
    assert all(len(e["signalled_by"]) == e["signals"] for e in ev)
    k = s["kernel"]
    assert k["source_lines"] == engine.data.kernel_source.count("\n") and k["aot"] is None
    assert set(k["task_kinds"]) == set(s["task_kinds"])


def test_memory_bound_counts_what_the_cost_model_reads_from_hbm(tmp_path):
    """On a GPU target the cost model reads weights and state from HBM and a batch's
    activations (each column tile reads its rows of A) from L2: the memory bound is the
    first over the bandwidth, so never above the predicted step (it counted every byte
    at HBM speed, and batched decode's predicted step came out below its "bound")."""
    config = yaml.safe_load((EXAMPLES / "llama_tiny.yaml").read_text())
    config["target"] = {"name": "h200", "workers": 16}
    config["model"].update(batch=8, prefill=False)
    path = tmp_path / "b8.yaml"
    path.write_text(yaml.safe_dump(config))
    s = tilec.api.compile(str(path), aot=False).summary()
    b = s["bytes"]
    assert b["intermediate"] > 0 and b["cost_model"] > b["cost_model_hbm"]
    assert b["cost_model_hbm"] == b["weights"] + b["kv"]
    assert s["memory_bound_us"] == pytest.approx(s["hbm_floor_us"])
    assert s["lower_bound_us"] <= s["predicted_step_us"] * (1 + 1e-9)


def test_table_output(capsys, built):
    _, path, _ = built
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 0, err
    assert out.startswith(f"block: target cpu (cpu), {WORKERS} workers")
    for title in ("task kinds", "workers", "lower bound", "critical path", "bytes per step",
                  "unfused", "fusion groups", "cross-worker waits", "kernel:", "compute"):
        assert title in out, title


def test_aot_flag(capsys, built, monkeypatch):
    """--aot on a CPU target is a one-line error; on a GPU target it reports what
    compile_for_gpu says (stubbed here: the real compile takes seconds and is tested in
    tests/codegen)."""
    _, path, engine = built
    code, out, err = run_cli(capsys, "inspect", path, "--aot")
    assert code == 2 and err.startswith("error: --aot") and len(err.strip().splitlines()) == 1
    import tilec.codegen.aot as aot
    from tilec.inspect import summary
    from tilec.ir.target import TARGETS

    calls = []

    def fake(source, pools, arch=90, **kw):
        calls.append(arch)
        return {"arch": arch, "ptx_target": "sm_90a", "n_regs": 77, "n_spills": 5,
                "shared": 1234, "cubin_size": 99, "num_warps": 4, "cubin": b"x"}

    monkeypatch.setattr(aot, "compile_for_gpu", fake)
    data = engine.data
    gpu = replace(data, manifest=replace(data.manifest, schedule=replace(
        data.manifest.schedule, target=replace(TARGETS["h200"], workers=WORKERS))))
    a = summary(gpu, aot=True)["kernel"]["aot"]
    assert calls == [90]
    assert (a["n_regs"], a["n_spills"], a["shared"]) == (77, 5, 1234) and "cubin" not in a
    assert summary(gpu)["kernel"]["aot"] is None and calls == [90]


def test_verify_stage_dump(built):
    folder, _, _ = built
    text = (folder / "dump" / "06_verify.txt").read_text()
    lines = text.strip().splitlines()
    assert "ok   each_task_once" in lines and "ok   conflicts_ordered" in lines
    assert lines[-1] == "schedule verified: ok"
    assert not any(line.startswith("FAIL") for line in lines)


# ---- traces ---------------------------------------------------------------------------

def check_trace(trace: dict, n_tasks: int, workers: int, steps: int = 1,
                roles: tuple[str, ...] = ()) -> dict:
    """The Chrome trace format as tilec writes it; returns the X events by (step, task).
    `roles`: each worker's role (default: all "compute")."""
    events = trace["traceEvents"]
    assert all(e["ph"] in ("M", "X", "s", "f") for e in events)
    names = {e["tid"]: e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(names) == list(range(workers))
    for tid, name in names.items():
        role = roles[tid] if roles else "compute"
        assert name == f"worker {tid} ({role})", name
    assert any(e["ph"] == "M" and e["name"] == "process_name" for e in events)
    xs = [e for e in events if e["ph"] == "X"]
    runs = Counter((e["args"]["step"], e["args"]["task"]) for e in xs)
    assert set(runs.values()) == {1}, "a task ran twice in one step"
    assert set(runs) == {(s, t) for s in range(steps) for t in range(n_tasks)}
    for e in xs:
        assert e["dur"] > 0 and e["ts"] >= 0 and e["tid"] in names
        for key in ("kind", "tile", "bytes", "flops", "waits", "signal", "group", "role"):
            assert key in e["args"], key
        assert e["name"] == e["args"]["kind"]
    by_run = {(e["args"]["step"], e["args"]["task"]): e for e in xs}

    def bound(flow):  # the X event on flow's thread enclosing its timestamp
        hits = [e for e in xs if e["tid"] == flow["tid"] and e["pid"] == flow["pid"]
                and e["ts"] <= flow["ts"] <= e["ts"] + e["dur"]]
        assert len(hits) == 1, f"flow {flow} binds to {len(hits)} tasks"
        return hits[0]

    flows = defaultdict(dict)
    for e in events:
        if e["ph"] in ("s", "f"):
            assert e["ph"] not in flows[e["id"]], "flow id reused"
            flows[e["id"]][e["ph"]] = e
    pairs = set()
    for fid, ends in flows.items():
        assert set(ends) == {"s", "f"}, f"flow {fid} lacks an end"
        assert ends["f"].get("bp") == "e"
        src, dst = bound(ends["s"]), bound(ends["f"])
        assert src["tid"] != dst["tid"], "a flow within one worker"
        assert src["args"]["step"] == dst["args"]["step"]
        assert src["args"]["signal"] in [w["event"] for w in dst["args"]["waits"]]
        assert src["ts"] + src["dur"] <= dst["ts"] + 1e-6, "consumer started before producer"
        pairs.add((src["args"]["step"], src["args"]["task"], dst["args"]["task"]))
    # every wait satisfied from another worker has its arrow
    want = set()
    for (step, task), e in by_run.items():
        for w in e["args"]["waits"]:
            for (step2, other), o in by_run.items():
                if step2 == step and o["args"]["signal"] == w["event"] and o["tid"] != e["tid"]:
                    want.add((step, other, task))
    assert pairs == want and want, "flows differ from the cross-worker waits"
    return by_run


def test_predicted_trace(capsys, built, tmp_path):
    _, path, engine = built
    out = tmp_path / "predicted.json"
    code, _, err = run_cli(capsys, "inspect", path, "--json", "--trace", out)
    assert code == 0, err
    sched = engine.data.schedule()
    by_run = check_trace(json.loads(out.read_text()), len(sched.taskgraph.tasks), WORKERS)
    where = sched.worker_of()
    for (_, t), e in by_run.items():
        assert e["tid"] == where[t][0]
        assert e["ts"] == pytest.approx(sched.start_us[t])
        assert e["dur"] == pytest.approx(sched.finish_us[t] - sched.start_us[t])


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_measured_trace(capsys, built, tmp_path, backend):
    _, path, engine = built
    out = tmp_path / "measured.json"
    code, stdout, err = run_cli(capsys, "run", path, "--backend", backend, "--profile", out,
                                "--json")
    assert code == 0, err
    json.loads(stdout)   # --profile keeps stdout one JSON object
    trace = json.loads(out.read_text())
    assert f"measured ({backend})" in json.dumps(trace["traceEvents"][0])
    sched = engine.data.schedule()
    by_run = check_trace(trace, len(sched.taskgraph.tasks), WORKERS)
    for w, queue in enumerate(sched.queues):
        spans = [by_run[(0, t)] for t in queue]
        assert all(e["tid"] == w for e in spans)
        # a worker runs its queue in order, one task at a time
        assert all(a["ts"] + a["dur"] <= b["ts"] for a, b in zip(spans, spans[1:]))


def test_profile_decoder_steps(tmp_path):
    """A decoder engine's decode entry profiled over generation: every task once per
    decode step (the prompt goes through the prefill entry, another executor)."""
    engine = tilec.api.compile(str(EXAMPLES / "llama_tiny.yaml"))
    ex = engine.executor("reference")
    ex.start_profile()
    g = engine.generate([3, 5], 2, backend="reference")
    from tilec.viz.timeline import measured
    from tilec.viz.trace import chrome_trace

    sched = engine.data.schedule()
    trace = chrome_trace(measured(engine.data.manifest, sched, ex.trace, ex.backend))
    assert (g.prefill_steps, g.decode_steps) == (1, 1)
    check_trace(trace, len(sched.taskgraph.tasks), sched.workers, steps=g.decode_steps)
    s = engine.summary()
    assert s["bytes"]["kv"] > 0 and s["bytes"]["intermediate"] < s["bytes"]["intermediate_unfused"]
    assert s["lower_bound_us"] <= s["predicted_step_us"] * (1 + 1e-9)


def test_profile_gpu_without_gpu_is_an_error(capsys, built, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _, path, _ = built
    code, _, err = run_cli(capsys, "run", path, "--backend", "gpu", "--profile",
                           tmp_path / "p.json")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.json").exists()


# ---- DOT ------------------------------------------------------------------------------

TOKEN = re.compile(r'\s+|//[^\n]*|/\*.*?\*/|(?P<t>"(?:[^"\\]|\\.)*"|->|--|[{}\[\];,=]|'
                   r'[A-Za-z_][A-Za-z0-9_.]*|-?(?:\.\d+|\d+(?:\.\d*)?))', re.S)


def tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        assert m, f"DOT syntax error at {text[pos:pos + 40]!r}"
        if m.group("t"):
            tokens.append(m.group("t"))
        pos = m.end()
    return tokens


def parse_dot(text: str) -> dict:
    """A small parser of the DOT subset tilec writes (attribute lists, node and edge
    statements, nested subgraphs): returns nodes (with attrs and cluster), edges and
    clusters; raises AssertionError on a syntax error."""
    toks = tokenize(text) + ["<end>"]
    i = 0

    def take(expected=None):
        nonlocal i
        t = toks[i]
        assert t != "<end>", "unexpected end of DOT"
        assert expected is None or t == expected, f"expected {expected!r}, got {t!r}"
        i += 1
        return t

    def ident():
        t = take()
        assert t not in "{}[];,=" and t not in ("->", "--"), f"expected an ID, got {t!r}"
        return json.loads(t) if t.startswith('"') else t

    def attrs():
        out = {}
        take("[")
        while toks[i] != "]":
            assert toks[i] != "<end>", "unterminated attribute list"
            k = ident()
            take("=")
            out[k] = ident()
            if toks[i] in (",", ";"):
                take()
        take("]")
        return out

    g = {"nodes": {}, "edges": [], "clusters": {}}

    def stmts(cluster):
        while toks[i] != "}":
            assert toks[i] != "<end>", "unbalanced braces"
            if toks[i] == "subgraph":
                take()
                name = ident()
                take("{")
                g["clusters"][name] = []
                stmts(name)
                take("}")
            elif toks[i] in ("node", "edge", "graph"):
                take()
                attrs()
            else:
                a = ident()
                if toks[i] == "=":
                    take()
                    ident()
                elif toks[i] == "->":
                    take()
                    b = ident()
                    g["edges"].append((a, b, attrs() if toks[i] == "[" else {}))
                else:
                    g["nodes"][a] = {"attrs": attrs() if toks[i] == "[" else {},
                                     "cluster": cluster}
                    if cluster is not None:
                        g["clusters"][cluster].append(a)
            if toks[i] == ";":
                take()

    take("digraph")
    ident()
    take("{")
    stmts(None)
    take("}")
    assert toks[i] == "<end>", "text after the graph"
    return g


def test_dot_parser_rejects_broken_text():
    with pytest.raises(AssertionError):
        parse_dot('digraph "x" { "a" -> ; }')
    with pytest.raises(AssertionError):
        parse_dot('digraph "x" { subgraph cluster_0 { "a"; }')


def test_dot_ops(capsys, built, tmp_path):
    _, path, engine = built
    out = tmp_path / "ops.dot"
    code, _, err = run_cli(capsys, "inspect", path, "--json", "--dot", out)
    assert code == 0, err
    g = parse_dot(out.read_text())
    fused = engine.data.schedule().taskgraph.fused
    assert all(name.startswith("cluster_") for name in g["clusters"])
    assert sorted(sorted(m) for m in g["clusters"].values()) == \
        sorted(sorted(grp.members) for grp in fused.groups)
    for a, b, _ in g["edges"]:
        assert a in g["nodes"] and b in g["nodes"]
    # every data edge between compute ops of the graph is drawn
    ops = fused.graph.by_name()
    want = {(o.value, op.name) for op in fused.graph.ops for o in op.inputs
            if op.name in g["nodes"] and o.value in g["nodes"]}
    assert {(a, b) for a, b, _ in g["edges"]} == want
    assert all(ops[n].kind != "weight" for n in g["nodes"])


def test_dot_tasks(capsys, built, tmp_path):
    _, path, engine = built
    out = tmp_path / "tasks.dot"
    code, _, err = run_cli(capsys, "inspect", path, "--json", "--dot", out, "--level", "tasks")
    assert code == 0, err
    g = parse_dot(out.read_text())
    sched = engine.data.schedule()
    tasks = {n: v for n, v in g["nodes"].items() if n.startswith("t")}
    assert sorted(tasks) == sorted(f"t{t.id}" for t in sched.taskgraph.tasks)
    colour_of = defaultdict(set)
    for w, queue in enumerate(sched.queues):
        for t in queue:
            colour_of[w].add(tasks[f"t{t}"]["attrs"]["fillcolor"])
    assert all(len(c) == 1 for c in colour_of.values()), "one colour per worker"
    assert len({next(iter(c)) for c in colour_of.values()}) == WORKERS


@pytest.mark.filterwarnings("ignore:.*deprecated.*")  # pydot's own use of pyparsing
def test_dot_tasks_draws_every_dependency(capsys, built, tmp_path):
    """An edge per dependency the compiler found (its stage dump 04_tasks.json: the
    engine stores none, inspect finds them again), dashed within a worker; parsed with
    pydot, Graphviz's grammar."""
    pydot = pytest.importorskip("pydot")
    folder, path, engine = built
    out = tmp_path / "tasks.dot"
    code, _, err = run_cli(capsys, "inspect", path, "--dot", out, "--level", "tasks")
    assert code == 0, err
    (graph,) = pydot.graph_from_dot_file(str(out))
    drawn = {(int(e.get_source().strip('"')[1:]), int(e.get_destination().strip('"')[1:])):
             e.get_style() for e in graph.get_edges()}
    dumped = json.loads((folder / "dump" / "04_tasks.json").read_text())["deps"]
    want = {(before, after) for before, after, _, _ in dumped}
    assert len(want) > 1 and set(drawn) == want
    assert len(drawn) == len(graph.get_edges()), "one edge per dependency"
    worker = engine.data.schedule().worker_of()
    assert {pair: style == "dashed" for pair, style in drawn.items()} == \
        {(a, b): worker[a][0] == worker[b][0] for a, b in want}
    assert not all(style == "dashed" for style in drawn.values())


# ---- the HTML report in a browser -----------------------------------------------------

class _Rects(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rects = []

    def handle_starttag(self, tag, attrs):
        if tag == "rect":
            self.rects.append(dict(attrs))


def test_html_report_in_chromium(capsys, built, tmp_path):
    _, path, engine = built
    page = tmp_path / "report.html"
    s = inspect_json(capsys, path)
    code, _, err = run_cli(capsys, "inspect", path, "--json", "--html", page)
    assert code == 0, err
    text = page.read_text()
    assert "<link" not in text and " src=" not in text, "the report must be self-contained"
    if not CHROMIUM.exists():
        pytest.skip("needs /usr/bin/chromium (make test installs it where apt-get exists)")
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parser = _Rects()
    parser.feed(proc.stdout)
    classes = [set(r.get("class", "").split()) for r in parser.rects]
    bars = [r for r, c in zip(parser.rects, classes) if "task" in c]
    critical = [r for r, c in zip(parser.rects, classes) if "critical" in c]
    n = len(engine.data.schedule().taskgraph.tasks)
    assert len(bars) == n, f"{len(bars)} bars for {n} tasks"
    assert sorted(int(r["data-task"]) for r in bars) == list(range(n))
    assert all(float(r["width"]) > 0 for r in bars)
    assert sorted(int(r["data-task"]) for r in critical) == \
        sorted(c["task"] for c in s["critical_path"])


@pytest.mark.filterwarnings("ignore:.*deprecated.*")  # pydot's own use of pyparsing
@pytest.mark.parametrize("level", ["ops", "tasks"])
def test_dot_parses_with_networkx(capsys, built, tmp_path, level):
    """The DOT files load in networkx (through pydot): Graphviz's own grammar."""
    nx_pydot = pytest.importorskip("networkx.drawing.nx_pydot")
    pytest.importorskip("pydot")
    _, path, engine = built
    out = tmp_path / f"{level}.dot"
    code, _, err = run_cli(capsys, "inspect", path, "--dot", out, "--level", level)
    assert code == 0, err
    graph = nx_pydot.read_dot(str(out))
    ours = parse_dot(out.read_text())
    assert set(ours["nodes"]) <= {n.strip('"') for n in graph.nodes}
    assert graph.number_of_edges() == len(ours["edges"])
