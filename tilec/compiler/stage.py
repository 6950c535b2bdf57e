"""The pieces the pipeline is made of: a `Stage` (a named step over the compile state,
pipeline.CompileState) and a `Hook` (work beside the stages, told of their
boundaries; compiler/hooks.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    """A named step: `run(state) -> state`; `dump(state) -> {file name: text}` for
    `--dump-dir`; `when(state)`: whether it runs; `check(state)` raises after the dump
    is written (the dump of a failing check is what one reads)."""

    name: str
    run: Callable[[Any], Any]
    dump: Callable[[Any], dict[str, str]] | None = None
    when: Callable[[Any], bool] | None = None
    check: Callable[[Any], None] | None = None


class Hook:
    """Does nothing at every boundary; a hook overrides what it needs. `stages`: the
    stages it adds after the pipeline's own."""

    stages: tuple[Stage, ...] = ()

    def after(self, stage: str, state, progress) -> None:
        pass

    def finish(self, state, progress) -> None:
        pass

    def close(self, failed: bool) -> None:
        pass
