"""Engines shared by the verify, watchdog and hostile-input tests: compiled once per
test process (a compile is seconds; loading one is milliseconds), plus a helper that
rewrites an engine file with its metadata or tensors edited and signs it again, so the
checksum passes and only the checks behind it can refuse the edit; and the eager
model's greedy tokens and logits that multi-device engines are held to."""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tilec.api
from tilec.compiler.build import build_model
from tilec.compiler.config import load_config
from tilec.cli import main
from tilec.runtime.enginefile.digest import file_digest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WORKERS = 3

_dir = Path(tempfile.mkdtemp(prefix="tilec-test-engines-"))
atexit.register(shutil.rmtree, _dir, True)


@functools.lru_cache(maxsize=None)
def compiled(example: str) -> Path:
    """examples/<example>.yaml compiled for the cpu target with 3 workers."""
    path = _dir / f"{example}.engine"
    tilec.api.compile(str(EXAMPLES / f"{example}.yaml"), workers=WORKERS).save(path)
    return path


def read_raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def write_signed(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """Write an engine with a valid checksum over whatever meta and tensors say."""
    meta = dict(meta)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta["sha256"] = file_digest(meta, tensors)
    save_file(tensors, str(path), metadata=meta)


def resign(src: Path, dst: Path, *, manifest: Callable[[dict], object] | None = None,
           tensors: Callable[[dict], object] | None = None,
           meta: Callable[[dict], object] | None = None) -> Path:
    """Copy src to dst with the manifest JSON, the tensors or the raw metadata edited in
    place by the given functions, and a recomputed sha256."""
    m, t = read_raw(src)
    if manifest is not None:
        plain = json.loads(m["manifest"])
        manifest(plain)
        m["manifest"] = json.dumps(plain, separators=(",", ":"), sort_keys=True)
    if tensors is not None:
        t = {k: v.clone() for k, v in t.items()}
        tensors(t)
    if meta is not None:
        meta(m)
    write_signed(dst, m, t)
    return dst


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`tilec ARGV...` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def lowest_index_topk(x, k, dim=-1, largest=True, sorted=True):
    """torch.topk with equal values taken lowest index first, as tilec takes them (torch
    leaves the order of ties open): monkeypatch it in for an eager model whose top-k
    may tie (the DSA indexer's scores tie at zero where every head's ReLU is zero)."""
    ranked = torch.sort(x, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((ranked.values.narrow(dim, 0, k),
                                    ranked.indices.narrow(dim, 0, k)))


@functools.lru_cache(maxsize=None)
def eager_greedy_of_yaml(yaml_path: str = str(EXAMPLES / "llama_tiny.yaml"),
                 prompt: tuple[int, ...] = (3, 17, 42),
                 new: int = 5) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and logits of the eager model: the prompt, then `new` tokens. Top-k
    ties go to the lowest index, as in tilec (torch leaves them open)."""
    model, _ = build_model(load_config(yaml_path))
    tokens, logits = [], []
    topk = torch.topk
    torch.topk = lowest_index_topk
    try:
        with torch.no_grad():
            seq = list(prompt)
            for pos in range(len(prompt) + new - 1):
                out = model(torch.tensor([seq[pos]]), torch.tensor([pos]))
                if pos >= len(prompt) - 1:
                    logits.append(out["logits"].reshape(-1).float())
                    nxt = int(out["logits"].argmax())
                    tokens.append(nxt)
                    seq.append(nxt)
    finally:
        torch.topk = topk
    return tokens, torch.stack(logits)


def eager_greedy(model, prompt: list[int], new_tokens: int):
    """tilec's decoder module fed one token per call, greedy: the new tokens and the
    logits [new_tokens, vocab] of each (the module's cache is reset first)."""
    model.reset_cache()
    tokens, logits = list(prompt), []
    with torch.no_grad():
        for pos in range(len(prompt) + new_tokens - 1):
            out = model(torch.tensor([tokens[pos]]), torch.tensor([pos]))
            if pos >= len(prompt) - 1:
                logits.append(out["logits"][0])
                if len(tokens) == pos + 1:
                    tokens.append(int(out["next_token"][0]))
    return tokens[len(prompt):], torch.stack(logits)


def check_unqueued_prefill_append_caught(engine) -> None:
    """An engine's prefill schedule with its first KV append dropped from its queues
    ends its launch without it: across entries, entry_writes_complete names the append
    and the decode's attention that would read the stale cache."""
    import dataclasses

    from tilec.passes.entries import verify_entries

    decode = ("decode", engine.data.schedule())
    sched = engine.data.entry("prefill").schedule()
    append = next(t for t in sched.taskgraph.tasks if t.group.endswith("_state_update"))
    queues = tuple(tuple(t for t in q if t != append.id) for q in sched.queues)
    report = verify_entries((decode, ("prefill", dataclasses.replace(sched, queues=queues))))
    assert not report.ok and not report.checks["entry_writes_complete"]
    line = next(v for v in report.violations if v.startswith("entry_writes_complete"))
    assert f"prefill task {append.id}" in line and "_cache" in line and "decode task" in line
