"""An engine's entries verified together: its decode step and its prefill, two schedules
over one set of weights and one KV cache (memplan.share_fixed placed them).

How work is ordered across entries: an engine's launches, of any entry, run one after
another (one CUDA stream on a GPU; on the CPU executors the host runs each step to its
end), and a launch ends only when every worker has run its whole queue. So a state
write of one launch is complete before the next launch, of either entry, reads it,
provided that (1) every task that writes the state runs in its launch: it is in a queue
(a task in none is never run, and the launch still ends), and (2) both entries mean the
same bytes by the same buffer. A schedule that cannot finish (a deadlock) is caught by
each entry's own `global_order` check. The checks here are (1) and (2):

- `entry_writes_complete`: every task of each entry that writes state is in exactly one
  of that entry's queues; a violation names the write and a task of another entry
  that reads what it should have written (a prefill's KV append and a later decode's
  attention over that cache).
- `entries_share_state`: every weight and state buffer two entries name lies in the
  same pool, at the same offset, with the same shape and dtype, and every pool both
  use has one size.
"""
from __future__ import annotations

from tilec.ir.schedule import Schedule
from tilec.passes.verify import VerifyReport, verify

ENTRY_CHECKS = ("entry_writes_complete", "entries_share_state")


def verify_entries(entries: tuple[tuple[str, Schedule], ...],
                   first: VerifyReport | None = None) -> VerifyReport:
    """Every entry's own checks (the first entry's unnamed, as an engine of one entry
    reports them; `first`: its report, if already computed; the others' named
    `<entry>: <check>`), then ENTRY_CHECKS across them."""
    reports = [("", first if first is not None else verify(entries[0][1]))]
    reports += [(f"{name}: ", verify(s)) for name, s in entries[1:]]
    found = {"entry_writes_complete": _writes_complete(entries),
             "entries_share_state": _share_state(entries)}
    checks = {f"{prefix}{name}": ok for prefix, r in reports for name, ok in r.checks.items()}
    violations = [f"{prefix}{v}" for prefix, r in reports for v in r.violations]
    for name in ENTRY_CHECKS:
        checks[name] = not found[name]
        violations += found[name]
    return VerifyReport(all(checks.values()), checks, tuple(violations))


def _state_names(s: Schedule) -> set[str]:
    return {b.name for b in s.taskgraph.buffers if b.kind == "state"}


def _writes_complete(entries) -> list[str]:
    out = []
    for name, s in entries:
        states = _state_names(s)
        queued: dict[int, int] = {}
        for queue in s.queues:
            for tid in queue:
                queued[tid] = queued.get(tid, 0) + 1
        for task in s.taskgraph.tasks:
            written = sorted({r.buffer for r in task.writes if r.buffer in states})
            if not written or queued.get(task.id) == 1:
                continue
            reader = _reader(entries, name, written[0])
            out.append(f"entry_writes_complete: {name} task {task.id} ({task.group} tile "
                       f"{task.tile}) writes {written[0]} but is queued "
                       f"{queued.get(task.id, 0)} times, so its launch can end without "
                       f"it{reader}")
            if len(out) >= 20:
                return out
    return out


def _reader(entries, writer_entry: str, buffer: str) -> str:
    """', and <entry> task T reads that state next' for the first task of another entry
    (else of the same one) that reads `buffer`."""
    for name, s in sorted(entries, key=lambda e: e[0] == writer_entry):
        for task in s.taskgraph.tasks:
            if any(r.buffer == buffer for r in task.reads):
                return f", and {name} task {task.id} ({task.group}) reads {buffer} next"
    return ""


def _share_state(entries) -> list[str]:
    out = []
    places: dict[str, tuple[str, tuple]] = {}
    sizes: dict[str, tuple[str, int]] = {}
    for name, s in entries:
        for b in s.buffers:
            if b.kind not in ("weight", "state"):
                continue
            where = (b.pool, b.offset, tuple(b.type.shape), b.type.dtype)
            seen = places.setdefault(b.name, (name, where))
            if seen[1] != where:
                out.append(f"entries_share_state: {b.name} lies at {where} in {name} but at "
                           f"{seen[1]} in {seen[0]}")
        for p in s.pools:
            if p.kind in ("weight", "state"):
                seen_size = sizes.setdefault(p.name, (name, p.numel))
                if seen_size[1] != p.numel:
                    out.append(f"entries_share_state: pool {p.name} holds {p.numel} elements "
                               f"in {name} but {seen_size[1]} in {seen_size[0]}")
    return out[:20]
