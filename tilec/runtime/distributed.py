"""Multi-device runs: one process (rank) per device, torch.distributed between them.

Each rank loads the engine file, takes its device's part and runs it like a one-device
engine, except that its last worker, the comm worker, is driven by the host: it runs
the part's transfers in sequence order, each a blocking point-to-point message (gloo
on CPU) that waits for the same transfer on the other ranks. Every rank runs the same
generation loop on the same inputs, so each ends every step with the same outputs.

Two ways to start the ranks:
* `tilec run ENGINE` sees a multi-device engine and starts one `python -m tilec run`
  per device itself (`launch`), with torchrun's environment variables; it passes
  rank 0's output through and, when a rank fails, stops the others and names it;
* `torchrun --nproc-per-node N -m tilec run ENGINE`: each process finds RANK and
  WORLD_SIZE in its environment and runs its device's part.

A rank that dies closes its sockets: the ranks that exchange messages with it fail at
once with an error naming it, and the ones waiting on them fail in turn, so nothing
hangs. A rank that stops without dying is caught by the message timeout
(TILEC_COMM_TIMEOUT seconds, 300 by default).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

import torch

from tilec.childenv import child_env
from tilec.errors import RunError
from tilec.ir.tasks import Transfer

TIMEOUT_ENV = "TILEC_COMM_TIMEOUT"
# For tests of the failure path: "RANK:STEP" makes that rank kill itself (SIGKILL) at its
# first transfer of that step, as a crashed process would vanish.
FAULT_ENV = "TILEC_FAULT_KILL"
GRACE_S = 10.0   # after a rank fails, how long the others get to stop on their own


def rank_from_env() -> tuple[int, int] | None:
    """(rank, world size) when this process is one rank of a multi-device run."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None:
        return None
    try:
        return int(rank), int(world)
    except ValueError:
        raise RunError(f"RANK={rank!r} and WORLD_SIZE={world!r} are not integers") from None


class Communicator:
    """This rank's side of the transfers: point-to-point messages over the default
    process group (started here from the environment if nobody started it)."""

    def __init__(self, rank: int, world: int):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = rank, world
        if not dist.is_initialized():
            timeout = float(os.environ.get(TIMEOUT_ENV, "300"))
            try:
                dist.init_process_group("gloo", rank=rank, world_size=world,
                                        timeout=timedelta(seconds=timeout))
            except Exception as e:
                raise RunError(f"rank {rank}: could not join the other {world - 1} ranks "
                               f"({_first_line(e)})") from None
        elif (dist.get_rank(), dist.get_world_size()) != (rank, world):
            raise RunError(f"torch.distributed runs rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, not rank {rank} of {world}")
        fault = os.environ.get(FAULT_ENV, "")
        self.fault = tuple(int(x) for x in fault.split(":")) if fault else None

    def transfer(self, transfer: Transfer, view_of, step: int) -> bool:
        """Send the parts this rank computed to their destinations and receive the parts
        it reads, in the transfer's order (`view_of(region)`: a region of this rank's
        buffers); blocks until done (True)."""
        if self.fault == (self.rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
        for part in transfer.parts:
            peer = part.src
            try:
                if self.rank == part.src:
                    data = view_of(part.region).contiguous()
                    for peer in part.dsts:
                        self.dist.send(data, peer)
                elif self.rank in part.dsts:
                    view = view_of(part.region)
                    data = torch.empty(view.shape, dtype=view.dtype)
                    self.dist.recv(data, part.src)
                    view.copy_(data)
            except RuntimeError as e:
                raise RunError(f"rank {self.rank}: transfer {transfer.seq} of "
                               f"{part.region.buffer} with rank {peer} failed, rank {peer} "
                               f"stopped or is unreachable ({_first_line(e)})") from None
        return True

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else type(e).__name__
    return line[:160]   # gloo's lines start with its source file: "[.../pair.cc:553] "


_communicator: Communicator | None = None


def communicator(device: int, devices: int) -> Communicator:
    """This process's Communicator, for device `device` of `devices`: RunError when the
    process is not that rank of a run of that many."""
    global _communicator
    found = rank_from_env()
    if found is None:
        raise RunError(f"this is one device's part of a {devices}-device engine: "
                       f"`tilec run ENGINE` starts its {devices} processes, or start them "
                       f"with `torchrun --nproc-per-node {devices} -m tilec run ENGINE`")
    rank, world = found
    if (rank, world) != (device, devices):
        raise RunError(f"rank {rank} of {world} cannot run device {device} of a "
                       f"{devices}-device engine")
    if _communicator is None:
        _communicator = Communicator(rank, world)
    return _communicator


# ---- every device in this process --------------------------------------------------------
class LocalExchange:
    """Transfers between devices that share this process: a transfer completes when
    every party has offered its buffers (each only once its waits are met), by copying
    each part from its source's buffer into its destinations'. Until then an offer returns False and the
    party tries again on its next turn, as a cooperative worker retries a wait."""

    def __init__(self):
        # (step, seq) -> device -> its region views (`view_of`), once it offered
        self.offers: dict[tuple[int, int], dict[int, object]] = {}
        self.done: set[tuple[int, int, int]] = set()   # (step, seq, device) completed

    def for_device(self, device: int) -> "LocalComm":
        return LocalComm(self, device)

    def offer(self, device: int, transfer: Transfer, view_of, step: int) -> bool:
        key = (step, transfer.seq)
        if (step, transfer.seq, device) in self.done:
            self.done.discard((step, transfer.seq, device))
            return True
        offers = self.offers.setdefault(key, {})
        offers[device] = view_of
        if not all(d in offers for d in transfer.members):
            return False
        for part in transfer.parts:
            for d in part.dsts:
                offers[d](part.region).copy_(offers[part.src](part.region))
        del self.offers[key]
        self.done.update((step, transfer.seq, d) for d in transfer.members if d != device)
        return True


class LocalComm:
    """One device's side of a LocalExchange (the executors' `comm`)."""

    def __init__(self, exchange: LocalExchange, device: int):
        self.exchange, self.device = exchange, device

    def transfer(self, transfer: Transfer, view_of, step: int) -> bool:
        return self.exchange.offer(self.device, transfer, view_of, step)


class LocalDevices:
    """A multi-device engine run in one process: one cooperative executor per device,
    taking turns like the workers inside each (Engine.run from Python, tilec verify
    --interleavings, tests). `make(part, comm)` builds one device's executor. Every
    device ends a step with the same outputs; device 0's are returned."""

    backend = "local"

    def __init__(self, parts, make, policy: str = "round_robin", seed: int = 0):
        import random

        exchange = LocalExchange()
        self.executors = [make(part, exchange.for_device(d)) for d, part in enumerate(parts)]
        self.backend = f"{self.executors[0].backend} ({len(parts)} devices in one process)"
        self.policy = policy
        self.rng = random.Random(seed)
        self.engine = parts[0]
        self.trace = None

    @property
    def step_index(self) -> int:
        return self.executors[0].step_index

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from tilec.errors import ScheduleHangError

        for ex in self.executors:
            ex.write_inputs(inputs)
            ex.begin_launch()
        while True:
            order = [d for d, ex in enumerate(self.executors) if not ex.finished()]
            if not order:
                break
            if self.policy == "random":
                self.rng.shuffle(order)
            elif self.policy == "reverse":
                order.reverse()
            progressed = False
            for d in order:
                progressed |= self.executors[d].pass_over_workers()
            if not progressed:
                stuck = "; ".join(f"device {d}: {self.executors[d].deadlock_report(self.executors[d].live())}"
                                  for d in order)
                raise ScheduleHangError(f"the devices stopped: {stuck}")
        for ex in self.executors:
            ex.step_index += 1
        errors = [ex.take_recorded_error(ex.step_index - 1) for ex in self.executors]
        for error in errors:    # (each device's buffer is cleared, the first is raised)
            if error is not None:
                raise error
        return self.executors[0].read_outputs()

    def start_profile(self) -> None:
        raise RunError("--profile: profile one device of a multi-device engine with "
                       "`tilec run` (real processes), not in one process")


# ---- the launcher ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_ranks(argv: list[str], devices: int, backend: str,
              check: Callable[[], None] | None = None) -> int | None:
    """`tilec run` of a multi-device engine. Outside the ranks: check the backend and
    `check()` (a bad prompt is one line here, not the same error from every rank), then
    start one process per device running `argv` (launch) and return its exit code.
    Inside a rank: None, run this rank's part; every rank computes the same outputs and
    rank 0 reports them, so another rank's stdout goes to /dev/null (reports_outputs)."""
    rank = rank_from_env()
    if rank is not None:
        if rank[0] != 0:
            sys.stdout = open(os.devnull, "w")
        return None
    if backend not in ("auto", "interpret", "reference"):
        raise RunError(f"--backend {backend}: multi-device engines run on the interpret "
                       "and reference backends (gloo between processes)")
    if check is not None:
        check()
    return launch(argv, devices)


def reports_outputs() -> bool:
    """Whether this process writes a run's outputs: rank 0, or a process that is not
    one rank of a multi-device run."""
    rank = rank_from_env()
    return rank is None or rank[0] == 0


def launch(argv: list[str], devices: int) -> int:
    """Run `python -m tilec` + argv once per device and wait for all of them. Rank 0's
    stdout is this process's; every rank's stderr is passed on, each line prefixed by
    its rank (but its `error:` line). When a rank fails, the others get GRACE_S seconds to stop (their messages
    to it fail), then are killed; the error names the rank that failed first."""
    port = _free_port()
    procs = []
    stderr_tails: list[list[str]] = []
    pumps = []
    for rank in range(devices):
        env = child_env(RANK=str(rank), WORLD_SIZE=str(devices), LOCAL_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        p = subprocess.Popen([sys.executable, "-m", "tilec", *argv], env=env,
                             stdout=None if rank == 0 else subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        tail: list[str] = []
        stderr_tails.append(tail)
        pump = threading.Thread(target=_pump, args=(p.stderr, rank, tail), daemon=True)
        pump.start()
        pumps.append(pump)
    failed: list[int] = []
    deadline = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            newly = [r for r, c in enumerate(codes) if c not in (None, 0) and r not in failed]
            # a rank killed by a signal (or crashed) is the cause; the others, which stop
            # with a tilec error (code 2) after it, are its consequences
            newly.sort(key=lambda r: (codes[r] == 2, r))
            failed += newly
            if failed and deadline is None:
                deadline = time.monotonic() + GRACE_S
            if all(c is not None for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
    except KeyboardInterrupt:
        for p in procs:
            p.kill()
        raise
    for pump in pumps:
        pump.join(timeout=5)
    if not failed:
        return 0
    first = failed[0]
    reason = _last_error(stderr_tails[first])
    others = sorted(failed[1:])
    message = f"rank {first} {_describe_exit(procs[first].returncode)}" + \
        (f" ({reason})" if reason else "")
    if others:
        message += f"; then rank{'s' if len(others) > 1 else ''} " + \
            ", ".join(map(str, others)) + " stopped"
    raise RunError(message)


def _pump(stream, rank: int, tail: list[str]) -> None:
    """A rank's stderr, passed on prefixed by its rank, except its `error:` line: the
    launcher's own one line names the rank that failed first and quotes its error."""
    for line in stream:
        tail.append(line.rstrip("\n"))
        del tail[:-20]
        if not line.startswith("error: "):
            sys.stderr.write(f"[rank {rank}] {line}")
    stream.close()


def _last_error(lines: list[str]) -> str:
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    return ""
