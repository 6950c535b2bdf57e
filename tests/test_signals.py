"""A `tilec` process stopped from outside: Ctrl-C at any moment (during the imports too)
is one line and exit status 130; SIGINT or SIGTERM during a save leaves no temporary
file; SIGKILL leaves one that the next save to that path removes; the GPU compile's
child process dies with its parent, however the parent ends. Engines are written with
the mode the umask gives. Each test runs `python -m tilec compile` as a real process."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tilec.api
from engines import compiled
from tilec.runtime import atomic_file

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "examples" / "mlp.yaml"
TIMEOUT = 120     # seconds for one compile on a busy 2-core machine
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc to find the compile's child process")


def start(*argv, importtime: bool = False) -> subprocess.Popen:
    """`python -m tilec ARGV`, in the environment a user has (no TRITON_INTERPRET: the
    package imports torch to choose the mode, which takes seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.Popen([sys.executable, *flags, "-m", "tilec", *map(str, argv)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, pattern: str) -> list[str]:
    """Read stderr until a line matches; the lines read."""
    lines, t0 = [], time.monotonic()
    while time.monotonic() - t0 < TIMEOUT:
        line = proc.stderr.readline()
        assert line, f"exited ({proc.wait()}) before {pattern!r}: {''.join(lines)[-2000:]}"
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no {pattern!r} in {TIMEOUT} s")


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def gone(pid: int, seconds: float = 10.0) -> bool:
    """Whether process `pid` ends (or is a zombie no one reaped) within `seconds`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("after", [r"torch\._\w+", r"torch\.nn\.modules\.\w+"])
def test_ctrl_c_while_torch_is_imported(tmp_path, after):
    """-X importtime reports each module as its import ends: a `torch.` line before the
    `torch` line itself means the signal lands inside `import torch` (early, or late:
    after torch.nn)."""
    proc = start("compile", MLP, "-o", tmp_path / "e.engine", importtime=True)
    lines = wait_for_line(proc, rf"\| +{after}$")
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert not any(re.search(r"\| +torch$", ln.rstrip()) for ln in lines), "too late"
    said = [ln for ln in err.splitlines() if not ln.startswith("import time:")]
    assert code == 130 and said == ["error: interrupted"], err[-3000:]
    assert debris(tmp_path) == []


def test_ctrl_c_as_the_compile_starts(tmp_path):
    """In cli.main, as the compiler's modules (torch.export among them) are imported."""
    proc = start("compile", MLP, "-o", tmp_path / "e.engine")
    wait_for_line(proc, r"^tilec compile ")
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 130 and err.splitlines() == ["error: interrupted"], err[-3000:]
    assert debris(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_save_leaves_nothing(tmp_path, sig):
    """A GPU target's save writes the weights while the kernel compiles for sm_90 in a
    child process (stage `save`, then `aot`): the signal lands with the temporary file
    open and the child compiling. Neither is left behind."""
    proc = start("compile", MLP, "--target", "h100", "--workers", "4",
                 "-o", tmp_path / "e.engine")
    wait_for_line(proc, r"^\s+save ")
    assert [f for f in debris(tmp_path) if f.startswith(".e.engine.")], "a save in progress"
    kids = children(proc.pid)
    assert kids, "the GPU compile runs in a child process"
    proc.send_signal(sig)
    code, err = finish(proc)
    if sig == signal.SIGINT:
        assert code == 130 and err.splitlines()[-1] == "error: interrupted", err[-3000:]
        assert "Traceback" not in err
    else:
        assert code == -signal.SIGTERM, err[-3000:]
    assert debris(tmp_path) == []
    assert all(gone(k) for k in kids)


@pytest.mark.slow
def test_sigkill_during_the_save(tmp_path):
    """SIGKILL: the child compile dies with its parent; the temporary file stays, and
    the next save to the same path removes it."""
    out = tmp_path / "e.engine"
    proc = start("compile", MLP, "--target", "h100", "--workers", "4", "-o", out)
    wait_for_line(proc, r"^\s+save ")
    kids = children(proc.pid)
    assert kids
    proc.kill()
    proc.wait()
    # (its compile has seconds to go: it ended by itself 2.4 s later when it did not
    # watch its parent)
    assert all(gone(k, seconds=1.0) for k in kids), "the compile's child outlived its parent"
    left = debris(tmp_path)
    assert len(left) == 1 and re.fullmatch(rf"\.e\.engine\.{proc.pid}\.\w+\.tmp", left[0])
    tilec.api.load(compiled("mlp")).save(out)
    assert debris(tmp_path) == ["e.engine"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_only_provably_stale_temporary_files_are_removed(tmp_path):
    out = tmp_path / "e.engine"
    dead = dead_pid()
    stale = tmp_path / f".e.engine.{dead}.abc_123.tmp"
    live = tmp_path / f".e.engine.{os.getpid()}.abc_123.tmp"      # a save in progress
    locked = tmp_path / f".e.engine.{dead}.locked.tmp"   # another machine's save
    other = tmp_path / f".f.engine.{dead}.abc_123.tmp"              # another target's
    for p in (stale, live, locked, other):
        p.write_bytes(b"partial")
    holder = os.open(locked, os.O_RDWR)
    try:
        import fcntl

        fcntl.flock(holder, fcntl.LOCK_EX)
        tilec.api.load(compiled("mlp")).save(out)
    finally:
        os.close(holder)
    assert debris(tmp_path) == sorted([".e.engine.%d.abc_123.tmp" % os.getpid(),
                                       locked.name, other.name, "e.engine"])


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_engines_are_written_with_the_umask_mode(tmp_path, umask):
    before = os.umask(umask)
    try:
        tilec.api.load(compiled("mlp")).save(tmp_path / "e.engine")
        atomic_file.write_file(tmp_path / "f", b"x")
    finally:
        os.umask(before)
    assert (tmp_path / "e.engine").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~umask
