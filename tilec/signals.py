"""What a tilec process does on Ctrl-C and SIGTERM. Imports nothing heavy: the package
imports it before torch.

Ctrl-C (SIGINT) in the `tilec` command is one line, `error: interrupted`, and exit
status 130, at any moment. While the command's own code runs (`interrupts_raise`, in
cli.main) it is Python's KeyboardInterrupt, so `finally` blocks run (a save removes
its temporary file, a GPU compile's child is stopped) and cli.main prints the line.
Before that (the interpreter importing torch takes seconds) and after it, nothing is
being written, and `_exit_interrupted` ends the process at once.

SIGTERM while files are registered with `remove_on_terminate` (the temporary file of
each save in progress) removes them, then ends the process as SIGTERM would have
(status 143 in a shell).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


def _exit_interrupted(signum, frame) -> None:
    os.write(2, b"error: interrupted\n")
    os._exit(130)


def started_as_command() -> bool:
    """Whether this process is the `tilec` command: `python -m tilec` (while a module
    run with -m is imported, sys.argv[0] is "-m") or the `tilec` console script."""
    if sys.argv[:1] == ["-m"]:
        argv = getattr(sys, "orig_argv", [])
        runs = [b for a, b in zip(argv, argv[1:]) if a == "-m"] + \
            [a[2:] for a in argv if a.startswith("-m") and len(a) > 2]
        return runs[:1] == ["tilec"]
    return bool(sys.argv) and os.path.basename(sys.argv[0]) == "tilec"


def exit_on_interrupt() -> None:
    """Ctrl-C ends the process at once, with one line and status 130 (unless SIGINT
    is ignored or handled by someone else already)."""
    if _main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_interrupted)


@contextlib.contextmanager
def interrupts_raise():
    """Within: Ctrl-C raises KeyboardInterrupt, if `exit_on_interrupt` had it end the
    process (otherwise the handler is left as it is)."""
    ours = _main_thread() and signal.getsignal(signal.SIGINT) is _exit_interrupted
    if ours:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGINT, _exit_interrupted)


_removing: set[str] = set()         # files to remove on SIGTERM
_lock = threading.Lock()
_installed = False                  # whether _on_terminate handles SIGTERM


def remove_on_terminate(path: str) -> None:
    """Remove `path` if SIGTERM ends the process before `forget_on_terminate(path)`.
    The handler is installed while any path is registered, by the main thread (a save
    in another thread is covered while the main thread has one in progress too), and
    only over SIGTERM's default action: a program that handles SIGTERM itself decides
    whether the process ends (then `finally` blocks remove the files, if it unwinds)."""
    global _installed
    with _lock:
        _removing.add(path)
        if not _installed and _main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_terminate)
            _installed = True


def forget_on_terminate(path: str) -> None:
    global _installed
    with _lock:
        _removing.discard(path)
        if not _removing and _installed and _main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _installed = False


def _on_terminate(signum, frame) -> None:
    for path in list(_removing):
        with contextlib.suppress(OSError):
            os.unlink(path)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)   # ends the process as SIGTERM does


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
