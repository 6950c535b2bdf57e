"""No output overwrites an input. Every command (and `tilec.compile`) hands its input
and output paths to `check_outputs` before it reads or writes anything: an output that
is the same file as an input, or as another output, is one error line naming both.

The same file, however it is spelt: `h/../h/model.yaml`, a symlink (the resolved
paths agree) or a hard link (the same device and inode)."""
from __future__ import annotations

import os
from typing import Iterable

from tilec.errors import TilecError

# (what it is, as a message names it: "--output", "the engine"; its path, or None)
Named = tuple[str, "str | os.PathLike[str] | None"]


def check_outputs(inputs: Iterable[Named], outputs: Iterable[Named]) -> None:
    """A TilecError (one line) if an output is the same file as an input or as an
    earlier output; entries whose path is None (an option not given) are skipped."""
    ins = [(what, os.fspath(p), _identity(p)) for what, p in inputs if p is not None]
    seen: list[tuple[str, str, tuple]] = []
    for what, path in outputs:
        if path is None:
            continue
        path, me = os.fspath(path), _identity(path)
        for in_what, in_path, it in ins:
            if _same(me, it):
                raise TilecError(f"{what} {path}: the same file as {in_what} {in_path}; an "
                                 "output must not overwrite an input (choose another path)")
        for out_what, out_path, other in seen:
            if _same(me, other):
                raise TilecError(f"{out_what} {out_path} and {what} {path}: the same file; "
                                 "give each output its own path")
        seen.append((what, path, me))


def _identity(path) -> tuple[str, tuple[int, int] | None]:
    """The resolved path, and (st_dev, st_ino) if the file exists."""
    try:
        st = os.stat(path)
        inode = (st.st_dev, st.st_ino)
    except (OSError, ValueError):   # missing, unreadable, or a NUL in the name
        inode = None
    try:
        return os.path.realpath(path), inode
    except ValueError:
        return os.path.abspath(path), inode


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])
