"""Bounds on what an input may make tilec do: memory it may allocate, seeds, and the
length of an error line. Shared by the compiler and the runtime (it imports neither),
so that the yaml, the API, the CLI and a loaded engine are held to the same numbers.

Every size an input can set (a shape, a worker count, a cache length, a pool in an
engine file) is checked against these before anything of that size is allocated: an
input too large for this machine is one error line, not minutes of swapping, a
MemoryError or the kernel's OOM killer."""
from __future__ import annotations

import os
import reprlib
import resource

MAX_SEED = (1 << 32) - 1     # seeds of weights, inputs and interleavings: 0..MAX_SEED
MAX_ERROR_CHARS = 500        # an `error:` line is cut to this many characters


def available_memory() -> int:
    """Bytes this process can still allocate: the least of what the kernel reports
    available (MemAvailable: free memory plus caches it can drop), the cgroup's limit
    less its usage, and the address-space limit (RLIMIT_AS) less what the process maps."""
    found = [_meminfo("MemAvailable")]
    limit = _read_int("/sys/fs/cgroup/memory.max")
    if limit is not None:
        found.append(limit - (_read_int("/sys/fs/cgroup/memory.current") or 0))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append(soft - (_status_kb("VmSize") or 0) * 1024)
    known = [n for n in found if n is not None]
    if not known:   # not Linux: the physical pages free now
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(0, min(known))


def total_memory() -> int:
    """Bytes of memory the machine has (RAM, or the cgroup's limit if lower)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _read_int("/sys/fs/cgroup/memory.max")
    return min(total, limit) if limit is not None else total


def memory_problem(what: str, nbytes: int) -> str | None:
    """Why allocating `nbytes` for `what` would fail on this machine now, or None."""
    free = available_memory()
    if nbytes <= free:
        return None
    return f"{what} takes {gigabytes(nbytes)}, more than the {gigabytes(free)} of memory available"


def gigabytes(nbytes: int) -> str:
    """A byte count for an error line: `12.0 GB`, `3.1 MB`, `512 bytes`."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} bytes"


def seed_problem(seed) -> str | None:
    """What a seed must be, if `seed` is not that; None when it is fine."""
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED:
        return None
    return f"an integer from 0 to {MAX_SEED}"


def check_seed(seed) -> None:
    """A ConfigError unless `seed` is a seed (seed_problem)."""
    if seed_problem(seed):
        from tilec.errors import ConfigError

        raise ConfigError(f"seed: expected {seed_problem(seed)}, found {short_repr(seed)}")


def error_line(message: str) -> str:
    """`message` as one `error:` line: its first line, cut to MAX_ERROR_CHARS."""
    first = message.splitlines()[0] if message.strip() else ""
    if len(first) > MAX_ERROR_CHARS:
        first = first[:MAX_ERROR_CHARS - 3] + "..."
    return first


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6


def short_repr(value) -> str:
    """repr(value), bounded in length and depth whatever the value: a value read from a
    file may be nested a thousand levels deep or hold a million items."""
    return _SHORT.repr(value)


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
