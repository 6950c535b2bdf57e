"""Schedule-level IR: per-worker queues, events and waits, and the memory plan."""
from __future__ import annotations

from dataclasses import dataclass

from tilec.ir.target import DEFAULT_ROLE, Target
from tilec.ir.tasks import Buffer, TaskGraph


@dataclass(frozen=True)
class Event:
    """An int32 counter in global memory. It receives `signals` signals per step, so
    at step s a waiter for all of them waits for `signals * (s + 1)`."""

    id: int
    signals: int


@dataclass(frozen=True)
class Wait:
    event: int
    count: int   # signals needed per step (the threshold is count * (step + 1))


# Every buffer starts at a multiple of this many elements of its pool (memplan), so
# the kernel may promise the compiler 16-byte aligned addresses (any dtype <= 8 bytes
# times 16 elements is a multiple of 16 bytes).
POOL_ALIGN = 16


# Each buffer kind's pool: (name prefix, pool kind). A pool is named PREFIX_DTYPE; the
# kernel takes one pointer argument per pool under that name, so it is an identifier
# by construction, and a manifest naming a pool otherwise describes no tilec kernel.
POOL_OF_BUFFER_KIND = {"weight": ("w", "weight"), "state": ("s", "state"),
                       "input": ("a", "arena"), "output": ("a", "arena"),
                       "activation": ("a", "arena")}
POOL_PREFIX = {"weight": "w", "state": "s", "arena": "a"}   # by pool kind


@dataclass(frozen=True)
class Pool:
    """One typed flat allocation: the kernel gets a pointer per pool."""

    name: str
    dtype: str
    numel: int
    kind: str   # weight | arena | state

    @property
    def well_named(self) -> bool:
        """Named as memplan names the pool of its kind and dtype."""
        return self.kind in POOL_PREFIX and self.name == f"{POOL_PREFIX[self.kind]}_{self.dtype}"


@dataclass(frozen=True)
class Schedule:
    taskgraph: TaskGraph
    target: Target
    queues: tuple[tuple[int, ...], ...]      # task ids per worker, in run order
    order: tuple[int, ...]                   # one global order consistent with all queues
    start_us: tuple[float, ...]              # predicted, per task id
    finish_us: tuple[float, ...]
    events: tuple[Event, ...] = ()
    signal: tuple[int, ...] = ()             # event each task signals, per task id
    waits: tuple[tuple[Wait, ...], ...] = ()  # per task id
    buffers: tuple[Buffer, ...] = ()         # with pool and offset (memplan)
    pools: tuple[Pool, ...] = ()

    @property
    def workers(self) -> int:
        return len(self.queues)

    def task_roles(self) -> tuple[str, ...]:
        """The role of every task, by task id (the implicit one when there are no roles;
        "?" for all when an edited manifest's roles do not match its tasks, which verify
        reports)."""
        tg = self.taskgraph
        if len(tg.roles) != len(tg.tasks):
            return ("?" if tg.roles else DEFAULT_ROLE,) * len(tg.tasks)
        return tg.roles

    def worker_of(self) -> dict[int, tuple[int, int]]:
        """task id -> (worker, position in its queue)."""
        return {t: (w, i) for w, q in enumerate(self.queues) for i, t in enumerate(q)}
