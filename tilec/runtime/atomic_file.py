"""The temporary file a save writes and then renames into place (runtime/enginefile/write.py):
a save that fails or is stopped leaves an existing file as it was, and no debris."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from pathlib import Path

from tilec import signals
from tilec.errors import EngineError


class TempFile:
    """A temporary file `f` beside `path` (its folders created), put in place by
    `commit` or removed by `discard` (whichever comes first; the other is a no-op).

    It is created with the mode the umask gives a new file (mkstemp's is 0600), and
    named `.NAME.PID.XXXXXXXX.tmp`, held under an exclusive flock while it exists:
    SIGTERM removes it (tilec.signals); a save killed outright leaves it, and the next
    save to `path` removes it once it is provably stale (_remove_stale_temps)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(self.path)
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.{os.getpid()}.",
                                            suffix=".tmp", dir=self.path.parent)
        except OSError as e:
            raise EngineError(f"cannot write {path}: {e.strerror or e}") from None
        signals.remove_on_terminate(self.tmp)
        self.f = os.fdopen(fd, "wb")
        self.open = True
        # the lock lives on a second descriptor of the file, so it is held until the
        # file has its name (the first is closed before, to see a close's error)
        self.lock = os.dup(fd)
        with contextlib.suppress(OSError):   # some file systems have no flock
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(OSError):   # nor modes
            os.fchmod(fd, 0o666 & ~_umask())

    def commit(self) -> None:
        if self.open:
            self.open = False
            try:
                self.f.close()
                os.replace(self.tmp, self.path)
            except BaseException:
                Path(self.tmp).unlink(missing_ok=True)
                raise
            finally:
                self._release()

    def discard(self) -> None:
        if self.open:
            self.open = False
            try:
                with contextlib.suppress(OSError):   # (the close flushes: a full disk)
                    self.f.close()
                Path(self.tmp).unlink(missing_ok=True)
            finally:
                self._release()

    def _release(self) -> None:
        os.close(self.lock)
        signals.forget_on_terminate(self.tmp)


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` as a save does: whole or not at all, in the umask's mode."""
    file = TempFile(path)
    try:
        file.f.write(data)
        file.commit()
    finally:
        file.discard()


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary files of earlier saves to `path` that were killed: those
    whose process is gone and whose flock nobody holds (so a save of another machine
    or PID namespace into a shared folder, whose PID means nothing here, is kept)."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[a-z0-9_]+\.tmp")
    try:
        with os.scandir(path.parent) as entries:
            stale = [e.path for e in entries if (m := pattern.fullmatch(e.name))
                     and not _process_exists(int(m.group(1)))]
    except OSError:   # a folder we may write but not list: nothing to clean then
        return
    for name in stale:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if _unlocked(fd):
                os.unlink(name)
        except OSError:
            pass
        finally:
            os.close(fd)


def _unlocked(fd: int) -> bool:
    """Whether no save holds the file's flock (True too where flock is not supported:
    then the dead PID alone says the file is stale)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def _process_exists(pid: int) -> bool:
    if not 0 < pid < 1 << 31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's
        return True
    return True


def _umask() -> int:
    """The process's umask, read without setting it where Linux tells it (os.umask
    sets it, and another thread may create a file meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
