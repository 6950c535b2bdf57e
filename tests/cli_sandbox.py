"""Run `tilec ...` many times, each in a fresh process with bounded memory and time, and
measure what each took, without paying for the imports every time.

A server process (`python tests/cli_sandbox.py`) imports tilec once, then for every
command line it is sent forks a child that lowers its address-space limit
(RLIMIT_AS) to what it maps now plus `memory` bytes and its CPU time (RLIMIT_CPU) to
`timeout` seconds, arms a wall alarm of a few times that, and runs
`tilec.cli.main(argv)`. The server reports the exit status, the child's peak resident
memory above what it started with (VmHWM, reset at the start), the CPU seconds it
used (user + system: a loaded machine does not stretch them), and what
the child wrote. The children start with no threads (the server has
run no torch op), so forking is safe. `Sandbox` is the test-side client.
"""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

WALL_FACTOR = 6   # wall alarm = WALL_FACTOR x the CPU bound: a hang, not a slow machine


@dataclass(frozen=True)
class Result:
    code: int                # exit status, or -signal if the child was killed
    seconds: float           # CPU seconds, user + system
    peak_bytes: int          # peak resident memory above the child's start (-1: unknown)
    stdout: str
    stderr: str


class Sandbox:
    """The client: `run(argv, timeout, memory)` -> Result. Use as a context manager."""

    def __init__(self):
        env = dict(os.environ, TRITON_INTERPRET="1")
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=root)

    def run(self, argv: list[str], timeout: float, memory: int) -> Result:
        self.proc.stdin.write(json.dumps({"argv": argv, "timeout": timeout,
                                          "memory": memory}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the sandbox server died")
        return Result(**json.loads(line))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _child(argv: list[str], timeout: float, memory: int, out: str, err: str,
           peak: str) -> None:
    """In the forked child: limits, output to files, the command, then its peak
    resident memory above the start (VmHWM, reset at the start) into `peak`; never
    returns."""
    code = 3
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # VmHWM := VmRSS now (Linux >= 4.0)
        start_kb = _status_kb("VmRSS")
        for fd, name in ((1, out), (2, err)):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_status_kb("VmSize") * 1024 + memory, hard))
        # The bound is on work, CPU seconds (RLIMIT_CPU: SIGXCPU, default action kills),
        # not on wall time, which a loaded machine stretches; a wall alarm of a few
        # times more still ends a child that sleeps or waits.
        seconds = max(1, math.ceil(timeout))
        resource.setrlimit(resource.RLIMIT_CPU, (seconds + 1, resource.RLIM_INFINITY))
        signal.alarm(WALL_FACTOR * seconds)
        from tilec.cli import main

        code = main(argv)
        Path(peak).write_text(str((_status_kb("VmHWM") - start_kb) * 1024))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import tilec  # noqa: F401  (first: it fixes Triton's mode)
    import torch

    import tilec.api
    import tilec.cli  # noqa: F401

    # One thread: no OpenMP pool to lose in a fork. Then one small compile here, so
    # each child finds what a compile loads on first use (torch.export, the
    # decompositions, the templates) loaded already: seconds of every child's time.
    torch.set_num_threads(1)
    tilec.api.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()),
                      (torch.randn(2, 8),))

    folder = tempfile.mkdtemp(prefix="tilec-sandbox-")
    out, err, peak = (os.path.join(folder, name) for name in ("out", "err", "peak"))
    for line in sys.stdin:
        job = json.loads(line)
        Path(peak).write_text("-1")   # unknown: the child died before it could say
        pid = os.fork()
        if pid == 0:
            _child(job["argv"], job["timeout"], job["memory"], out, err, peak)
        _, status, usage = os.wait4(pid, 0)
        result = {"code": os.waitstatus_to_exitcode(status),
                  "seconds": usage.ru_utime + usage.ru_stime,
                  "peak_bytes": int(Path(peak).read_text()),
                  "stdout": Path(out).read_text(errors="replace")[-4000:],
                  "stderr": Path(err).read_text(errors="replace")[-4000:]}
        print(json.dumps(result), flush=True)
    for name in (out, err, peak):
        Path(name).unlink(missing_ok=True)
    os.rmdir(folder)


if __name__ == "__main__":
    serve()
