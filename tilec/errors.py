"""One error hierarchy for everything a user can get wrong.

The CLI prints ``error: <message>`` for any ``TilecError`` and exits with status 2;
``--debug`` shows the traceback instead. Messages are one line and say what to fix.
"""


class TilecError(Exception):
    """Base of every error tilec raises on purpose."""


class ConfigError(TilecError):
    """A model.yaml (or a checkpoint it names) is missing, malformed or inconsistent."""


class UnsupportedOpError(TilecError):
    """The traced model uses an ATen operator tilec cannot lower."""


class ScheduleError(TilecError):
    """A schedule violates one of the invariants of DESIGN.md."""


class ScheduleHangError(ScheduleError):
    """A schedule stopped making progress at run time (deadlock or watchdog expiry)."""


class EngineError(TilecError):
    """An engine file is corrupted, foreign, or was written by an incompatible tilec."""


class RunError(TilecError):
    """Running an engine failed for a reason the user can fix (inputs, backend, prompt)."""
