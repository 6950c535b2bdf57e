"""Multi-device engines (target.devices): partition, transfers, the cross-device
verifier, and real runs, one process per device talking gloo, against the one-device
engine and eager PyTorch."""
from __future__ import annotations

import functools
import io
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tilec.api
from engines import EXAMPLES, eager_greedy_of_yaml
from tilec.errors import EngineError
from tilec.ir.schedule import Wait
from tilec.ir.tasks import TRANSFER
from tilec.passes.partition import engine_target
from tilec.passes.verify import verify
from tilec.passes.verify_devices import verify_devices
from tilec.runtime import enginefile as engine_file
from tilec.viz.timeline import task_kinds

ROOT = Path(__file__).resolve().parents[2]
LLAMA = str(EXAMPLES / "llama_tiny.yaml")
PROMPT = [3, 17, 42]
NEW = 5


@functools.lru_cache(maxsize=None)
def engine_file_for(devices: int, tile_n: int | None, tmp: str) -> Path:
    path = Path(tmp) / f"llama_tiny_{devices}dev_{tile_n}.engine"
    tilec.api.compile(LLAMA, devices=devices, tile_n=tile_n).save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("multi"))


def run_tilec(*argv, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tilec", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# ---- compile and verify ----------------------------------------------------------------
@pytest.mark.parametrize("devices, tile_n", [(2, None), (2, 16), (4, 16)])
def test_parts_verify_and_split_the_work(folder, devices, tile_n):
    e = tilec.api.load(engine_file_for(devices, tile_n, folder))
    assert e.devices == devices
    report = e.verify()
    assert report.ok, report.violations
    assert any(name.startswith("device 1: ") for name in report.checks)
    assert "progress_across_devices" in report.checks
    parts = [p.manifest.schedule.taskgraph for p in e.parts]
    transfers = parts[0].transfers
    assert transfers and all(p.transfers == transfers for p in parts)
    # every tile runs somewhere; split groups run each tile once, on one device
    compute = [{(t.group, t.tile) for t in p.tasks if t.group != TRANSFER} for p in parts]
    one = tilec.api.load(engine_file_for(1, tile_n, folder)) if devices == 2 else None
    if one is not None:
        everything = {(t.group, t.tile) for t in one.data.manifest.schedule.taskgraph.tasks}
        assert set().union(*compute) == everything
    if tile_n == 16:   # small tiles: matmuls split, so each device runs fewer tiles
        assert all(len(c) < len(set().union(*compute)) for c in compute)
    # the comm worker is the last; it holds exactly this device's transfers, in order
    for p, sched in zip(parts, (x.schedule() for x in e.parts)):
        comm = sched.target.comm_worker()
        assert comm == sched.workers - 1
        seqs = [p.tasks[t].tile[0] for t in sched.queues[comm]]
        assert seqs == sorted(seqs) and all(p.tasks[t].group == TRANSFER
                                           for t in sched.queues[comm])
        assert not any(p.tasks[t].group == TRANSFER for q in sched.queues[:comm] for t in q)


def _edited(e, device: int, fn):
    scheds = [p.schedule() for p in e.parts]
    scheds[device] = fn(scheds[device])
    return scheds


def _receiver(sched):
    """A task on `sched`'s device that waits on a received transfer, and that wait."""
    tasks = sched.taskgraph.tasks
    received = {sched.signal[t.id] for t in tasks if t.group == TRANSFER and t.writes}
    for t in tasks:
        if t.group != TRANSFER:
            for i, w in enumerate(sched.waits[t.id]):
                if w.event in received:
                    return t.id, i
    raise AssertionError("no task waits on a received transfer")


def test_verifier_catches_a_removed_communication_dependency(folder):
    e = tilec.api.load(engine_file_for(2, 16, folder))

    def drop_wait(sched):
        tid, i = _receiver(sched)
        waits = list(sched.waits)
        waits[tid] = waits[tid][:i] + waits[tid][i + 1:]
        return replace(sched, waits=tuple(waits))

    broken = _edited(e, 1, drop_wait)
    report = verify(broken[1])
    assert not report.ok and not report.checks["conflicts_ordered"], report.violations
    assert "transfer" in " ".join(report.violations)


def test_verifier_catches_a_missing_transfer_and_a_reordered_comm_queue(folder):
    e = tilec.api.load(engine_file_for(2, 16, folder))
    target = engine_target(e.parts[0].manifest.schedule.target)

    def drop_transfer_tasks(sched):
        """The partitioner forgot transfers: device 1 reads what device 0 computed."""
        tg = sched.taskgraph
        comm = sched.target.comm_worker()
        keep = [t for t in sched.queues[comm] if not tg.tasks[t].writes]
        queues = sched.queues[:comm] + (tuple(keep),)
        return replace(sched, queues=queues)

    report = verify_devices(tuple(_edited(e, 1, drop_transfer_tasks)), target)
    assert not report.checks["transfers_matched"], report.violations

    def swap_comm(sched):
        comm = sched.target.comm_worker()
        q = list(sched.queues[comm])
        q[0], q[1] = q[1], q[0]
        return replace(sched, queues=sched.queues[:comm] + (tuple(q),))

    report = verify_devices(tuple(_edited(e, 0, swap_comm)), target)
    assert not report.checks["transfers_matched"], report.violations

    # a wait that can only be met after a later transfer: the devices stop mid-step
    def wait_on_future(sched):
        tasks = sched.taskgraph.tasks
        comm = sched.target.comm_worker()
        last = sched.queues[comm][-1]
        first_kernel = sched.queues[0][0]
        waits = list(sched.waits)
        waits[first_kernel] = waits[first_kernel] + (Wait(sched.signal[last], 1),)
        assert tasks[last].group == TRANSFER
        return replace(sched, waits=tuple(waits))

    report = verify_devices(tuple(_edited(e, 1, wait_on_future)), target)
    assert not report.checks["progress_across_devices"], report.violations


def test_reads_delivered_catches_a_region_nobody_sends(folder):
    e = tilec.api.load(engine_file_for(2, 16, folder))
    target = engine_target(e.parts[0].manifest.schedule.target)
    scheds = [p.schedule() for p in e.parts]
    # shrink one received region to nothing on both ends: the message still matches,
    # but what the reader needs is no longer brought
    tg0 = scheds[0].taskgraph
    k = next(t for t in tg0.transfers if t.parts[0].src == 0)
    part = k.parts[0]
    empty = replace(part.region, box=tuple((a, a) for a, _ in part.region.box))
    shrunk = replace(k, parts=(replace(part, region=empty),) + k.parts[1:])
    transfers = tuple(shrunk if t.seq == k.seq else t for t in tg0.transfers)

    def shrink(sched):
        tg = sched.taskgraph
        d = tg.device
        tasks = tuple(replace(t, reads=shrunk.sends(d), writes=shrunk.receives(d))
                      if t.group == TRANSFER and t.tile[0] == k.seq else t for t in tg.tasks)
        return replace(sched, taskgraph=replace(tg, tasks=tasks, transfers=transfers))

    report = verify_devices(tuple(shrink(s) for s in scheds), target)
    assert not report.checks["reads_delivered"], report.violations
    assert report.checks["transfers_matched"], report.violations


def test_engine_file_round_trip_and_damage(folder, tmp_path):
    path = engine_file_for(2, 16, folder)
    loaded = engine_file.load(path)
    assert isinstance(loaded, engine_file.DeviceEngines) and loaded.devices == 2
    # each device holds its own parts of the split weights (and of the KV cache),
    # smaller than all of them; a pool the same on every device is stored once
    ranks = loaded.ranks
    from engines import read_raw
    _, stored = read_raw(path)
    for k in ranks[0].tensors:
        if k.startswith("pool."):
            same = all(torch.equal(r.tensors[k], ranks[0].tensors[k]) for r in ranks)
            assert (k in stored) == same and (f"device1.{k}" in stored) == (not same), k
    one = engine_file.load(engine_file_for(1, 16, folder))
    whole = one.tensors["pool.w_float32"].numel()
    for r in ranks:
        part = r.tensors["pool.w_float32"].numel()
        assert part < 0.8 * whole, (part, whole)
        stored = [b for b in r.manifest.schedule.buffers if b.stored]
        assert stored and any(b.stored[1] - b.stored[0] < b.type.numel for b in stored)
    copy = tmp_path / "again.engine"
    engine_file.save(loaded, copy)
    assert copy.read_bytes() == path.read_bytes()
    from engines import write_signed
    meta, tensors = read_raw(path)
    meta["manifest.1"] = meta["manifest.0"]   # device 1's slot holds device 0's part
    write_signed(tmp_path / "swapped.engine", meta, tensors)
    with pytest.raises(EngineError, match="device 1"):
        engine_file.load(tmp_path / "swapped.engine")
    meta, tensors = read_raw(path)   # no entry's GPU binary yet, a prefill's neither
    meta["aot.prefill"] = "{}"
    write_signed(tmp_path / "binary.engine", meta, tensors)
    with pytest.raises(EngineError, match="a multi-device engine with a stray entry 'aot.prefill'"):
        engine_file.load(tmp_path / "binary.engine")


def test_in_one_process_every_interleaving_gives_the_one_device_bits(folder):
    """Engine.run outside the ranks runs every device in this process, taking turns:
    splitting tiles over devices and copying regions between them changes no bit."""
    many = tilec.api.load(engine_file_for(4, 16, folder))
    one = tilec.api.load(engine_file_for(1, 16, folder))
    inputs = one.random_inputs(3)
    for backend, policy, seed in [("interpret", "round_robin", 0), ("reference", "random", 1),
                                  ("reference", "random", 2), ("reference", "reverse", 0)]:
        want = one.new_executor(backend).run(dict(inputs))
        got = many.new_executor(backend, policy, seed).run(dict(inputs))
        assert all(torch.equal(got[k], want[k]) for k in want), (backend, policy, seed)


def test_a_rank_runs_only_its_own_device(folder, monkeypatch):
    e = tilec.api.load(engine_file_for(2, None, folder))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(tilec.api.RunError, match="rank 1 of 4 cannot run device 1 of a "
                                                 "2-device engine"):
        tilec.api.load(engine_file_for(2, None, folder)).run(**e.random_inputs(0))


# ---- runs: one process per device --------------------------------------------------------
def _generate(path: Path, tmp_path: Path, *extra, prompt=PROMPT, new=NEW):
    logits = tmp_path / f"logits_{path.stem}_{len(extra)}.safetensors"
    r = run_tilec("run", path, "--prompt-ids", ",".join(map(str, prompt)),
                  "--max-new-tokens", new, "--json", "--logits-out", logits, *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), load_file(str(logits))["logits"]


@pytest.mark.parametrize("devices, tile_n, backend", [(2, 16, "interpret"), (4, 16, "interpret"),
                                                      (2, None, "reference")])
def test_ranks_generate_what_one_device_and_eager_generate(folder, tmp_path, devices, tile_n,
                                                         backend):
    tokens, logits = eager_greedy_of_yaml()
    one, one_logits = _generate(engine_file_for(1, tile_n, folder), tmp_path, "--backend", backend)
    many, many_logits = _generate(engine_file_for(devices, tile_n, folder), tmp_path,
                                  "--backend", backend)
    assert many["new_tokens"] == one["new_tokens"] == tokens
    assert (many_logits - one_logits).abs().max() <= 1e-3
    assert (many_logits - logits).abs().max() <= 1e-3


@pytest.mark.parametrize("devices", [2, 4])
def test_glm_dsa_on_devices_with_an_indexer_device(tmp_path, devices):
    """examples/glm_dsa_tiny_4dev.yaml (and the same on 2 devices): the indexers and the
    routers on device 0 (and nothing else there), the rest split over the others;
    generation past index_topk (the selection drops cached tokens) gives the tokens of
    the one-device engine and of eager PyTorch, logits within 1e-3."""
    data = yaml.safe_load((EXAMPLES / "glm_dsa_tiny_4dev.yaml").read_text())
    data["target"]["devices"] = devices
    data["target"]["roles"]["mla"] = {"devices": f"1-{devices - 1}"}
    source = tmp_path / "glm.yaml"
    source.write_text(yaml.safe_dump(data))
    four = tilec.api.compile(str(source))
    assert four.devices == devices
    report = four.verify()
    assert report.ok, report.violations
    ops = four.data.manifest.schedule.taskgraph.fused.graph.by_name()
    groups = {g.name: g for g in four.data.manifest.schedule.taskgraph.fused.groups}
    for d, part in enumerate(four.parts):
        mine = {t.group for t in part.manifest.schedule.taskgraph.tasks if t.group != TRANSFER}
        sparse = [any(re.search(r"\.indexer(\.|$)|\.mlp\.gate$", path)
                      for m in groups[g].members for path in ops[m].scope) for g in mine]
        assert all(sparse) if d == 0 else not any(sparse), d
        if d == 0:   # both kinds: each layer's indexer and each MoE layer's router
            scopes = {p for g in mine for m in groups[g].members for p in ops[m].scope}
            assert {"layers.0.self_attn.indexer", "layers.1.mlp.gate"} <= scopes
    path = tmp_path / "glm4.engine"
    four.save(path)
    one_path = tmp_path / "glm1.engine"
    tilec.api.compile(str(EXAMPLES / "glm_dsa_tiny.yaml")).save(one_path)
    prompt, new = (5, 6), 5   # 7 positions: the last 3 steps drop cached tokens (top 4)
    tokens, logits = eager_greedy_of_yaml(str(EXAMPLES / "glm_dsa_tiny.yaml"), prompt, new)
    one, one_logits = _generate(one_path, tmp_path, prompt=prompt, new=new)
    many, many_logits = _generate(path, tmp_path, prompt=prompt, new=new)
    assert many["new_tokens"] == one["new_tokens"] == tokens
    assert (many_logits - one_logits).abs().max() <= 1e-3
    assert (many_logits - logits).abs().max() <= 1e-3


def test_torchrun_starts_the_ranks_too(folder, tmp_path):
    path = engine_file_for(2, 16, folder)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--standalone", "-m", "tilec", "run", str(path), "--prompt-ids",
                        ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1   # rank 0 reports; rank 1 is silent
    assert lines[0]["new_tokens"] == eager_greedy_of_yaml()[0]


@pytest.mark.parametrize("devices, dead", [(2, 1), (4, 2)])
def test_a_rank_that_dies_stops_the_others_with_its_name(folder, devices, dead):
    path = engine_file_for(devices, 16, folder)
    t0 = time.monotonic()
    r = run_tilec("run", path, "--prompt-ids", "1,2", "--max-new-tokens", 4,
                  env={"TILEC_FAULT_KILL": f"{dead}:1", "TILEC_COMM_TIMEOUT": "120"})
    elapsed = time.monotonic() - t0
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, r.stderr   # one line, not one per rank
    assert errors[0].startswith(f"error: rank {dead} was killed by SIGKILL"), r.stderr
    assert f"then rank{'s' if devices > 2 else ''} " in errors[0]
    assert elapsed < 100   # the others stopped on their own, long before the timeout


def test_inspect_shows_every_device_and_traces_the_transfers(folder, tmp_path, capsys):
    from engines import run_cli
    path = engine_file_for(4, 16, folder)
    trace = tmp_path / "t.json"
    code, out, err = run_cli(capsys, "inspect", path, "--json", "--device", "2", "--trace", trace)
    assert code == 0, err
    s = json.loads(out)
    assert s["device"] == 2 and [d["device"] for d in s["devices"]] == [0, 1, 2, 3]
    e = tilec.api.load(path)
    transfers = e.data.manifest.schedule.taskgraph.transfers
    parts = [p.manifest.schedule for p in e.parts]
    # joint timing: each transfer starts and ends at one time on all its parties
    for tr in transfers:
        spans = {(p.start_us[t.id], p.finish_us[t.id]) for p in parts for t in p.taskgraph.tasks
                 if t.group == TRANSFER and t.tile[0] == tr.seq}
        assert len(spans) == 1, tr
    assert sum(d["bytes_sent"] for d in s["devices"]) <= \
        sum(d["bytes_received"] for d in s["devices"])
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["pid"] for e in events} == {0, 1, 2, 3}
    arrows = [e for e in events if e.get("cat") == "transfer" and e["ph"] == "s"]
    assert len(arrows) == sum(len(p.dsts) for t in transfers for p in t.parts)
    assert any(len(t.parts) > 1 for t in transfers)   # split groups all-gather at once
    code, out, err = run_cli(capsys, "inspect", path, "--device", "4")
    assert code == 2 and err.startswith("error: --device 4: the engine has 4 devices")


def test_device_roles_place_groups_and_keep_the_bits(tmp_path):
    """A device role: attention and the cache appends on device 0 only, the rest split
    over devices 1 and 2; the bits stay those of one device."""
    data = yaml.safe_load(Path(LLAMA).read_text())
    data["target"] = {"name": "cpu", "workers": 2, "devices": 3,
                      "roles": {"attn": {"devices": [0], "kinds": ["attention", "state_update"]},
                                "rest": {}}}
    data["schedule"] = {"tile_n": 16}
    path = tmp_path / "roles.yaml"
    path.write_text(yaml.safe_dump(data))
    many = tilec.api.compile(str(path))
    assert many.verify().ok, many.verify().violations
    for d, part in enumerate(many.parts):
        sched = part.manifest.schedule
        kinds = set(task_kinds(part.manifest, sched))
        has_attention = bool(kinds & {"attention", "state_update"})
        assert has_attention == (d == 0), (d, kinds)
        if d:
            assert "matmul" in kinds or "matmul_epilogue" in kinds
    one = tilec.api.compile(LLAMA, tile_n=16)
    inputs = one.random_inputs(5)
    want = one.new_executor("reference").run(dict(inputs))
    got = many.new_executor("reference", "random", 4).run(dict(inputs))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_mistakes_are_one_line_before_any_rank_starts(folder, capsys):
    from engines import run_cli
    path = engine_file_for(2, None, folder)
    for argv, message in [(("--max-new-tokens", 100), "exceeds max_seq_len 64"),
                          (("--backend", "gpu"), "--backend gpu: multi-device engines run on "
                                                 "the interpret and reference backends")]:
        code, out, err = run_cli(capsys, "run", path, *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_verify_catches_a_read_outside_the_stored_part_of_a_weight(folder):
    e = tilec.api.load(engine_file_for(2, 16, folder))
    sched = e.parts[1].schedule()
    assert verify(sched).ok
    b = next(b for b in sched.buffers if b.stored and b.stored[1] > b.stored[0] + 16)
    shrunk = replace(b, stored=(b.stored[0] + 16, b.stored[1]))
    broken = replace(sched, buffers=tuple(shrunk if x.name == b.name else x
                                          for x in sched.buffers))
    report = verify(broken)
    assert not report.checks["regions_in_buffers"]
    assert "outside the part" in " ".join(report.violations)


def test_ranks_import_the_launchers_tilec(tmp_path, monkeypatch):
    """`tilec run` of a multi-device engine from any folder: every rank runs this tilec
    (another one on the path would render another kernel and refuse the engine)."""
    from tilec.runtime import distributed

    seen = []

    class Exited:
        def __init__(self, argv, env, **kwargs):
            seen.append(env["PYTHONPATH"].split(os.pathsep)[0])
            self.stderr, self.returncode = io.StringIO(""), 0

        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(distributed.subprocess, "Popen", Exited)
    assert distributed.launch(["--version"], 2) == 0
    assert seen == [str(Path(tilec.__file__).resolve().parents[1])] * 2
