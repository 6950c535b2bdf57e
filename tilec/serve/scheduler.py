"""Continuous batching: requests join free sequence slots at step boundaries, leave
when done, and wait in a bounded queue meanwhile.

One thread owns the engine (it is not thread-safe) and runs the loop: at each step
boundary it frees the slots of finished and cancelled requests, admits waiting ones
into free slots, then runs one engine step for the busy slots (`runtime.generate.
advance`), and hands each request its new token. Without a prefill schedule a step
feeds every slot one token (a prompt token, or the last new one); with one
(`runtime.generate.PrefillSlots`) a step is at most one prompt chunk of one new
request's prompt and one decode launch for every running request, so prefill of new
requests interleaves with decode of running ones. The event loop only submits and
cancels requests and reads their events; it never waits for a step.

An exception from a step is an engine fault: the requests in the slots fail (500),
the executor is replaced (fresh state and event counters), and the queue goes on.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from tilec.runtime.generate import DecodeSlots, Sampling, Sequence, advance
from tilec.serve.metrics import Metrics
from tilec.serve.text import TextStream

log = logging.getLogger("tilec.serve")


@dataclass(frozen=True)
class Token:
    id: int
    text: str      # what it adds to the text (may be empty: held back)


@dataclass(frozen=True)
class Done:
    finish_reason: str   # "length" or "stop"
    text: str            # the text held back until the end


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


Event = Token | Done | Failed


class QueueFull(Exception):
    pass


class Unavailable(Exception):
    """The server stops, or the engine could not be restarted after a fault."""


class Job:
    """One request in the scheduler: its sequence, its text, where its events go.
    `deliver` is called from the engine thread and must be thread-safe."""

    def __init__(self, prompt: list[int], max_tokens: int, sampling: Sampling,
                 stop_ids: tuple[int, ...], text: TextStream,
                 deliver: Callable[[Event], None]):
        self.sequence = Sequence(prompt, max_tokens, sampling, stop_ids)
        self.text = text
        self.deliver = deliver
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.steps_after_cancel = 0          # engine steps run for it after `cancel`
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """The client left: the slot is freed at the next step boundary."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def send(self, event: Event) -> None:
        try:
            self.deliver(event)
        except RuntimeError:   # the event loop is gone (the server is stopping)
            pass


class Scheduler:
    def __init__(self, make_slots: Callable[[], DecodeSlots], max_queue: int, metrics: Metrics):
        self._make_slots = make_slots
        self.max_queue = max_queue
        self.metrics = metrics
        self.slots: DecodeSlots | None = None
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._stopping = False
        self.broken: str | None = None        # why the engine cannot run any more
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="tilec-engine", daemon=True)

    # ---- the event loop's side -----------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; returns once the engine's executor is made (or
        raises what making it raised)."""
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping or self.broken:
                raise Unavailable(self.broken or "the server is stopping")
            capacity = self.slots.count + self.max_queue
            if len(self._waiting) + len(self._running) >= capacity:
                raise QueueFull(f"the server is full: {len(self._running)} requests running "
                                f"and {len(self._waiting)} waiting (--max-queue {self.max_queue})")
            self._waiting.append(job)
            self._publish_load()
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        """Stop the engine thread. The HTTP server has drained by now; requests still
        here have no client, and are dropped."""
        with self._cond:
            self._stopping = True
            for job in (*self._waiting, *self._running.values()):
                job.cancel()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    # ---- the engine thread ---------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.slots = self._make_slots()
        except BaseException as e:   # reported by start(), in the caller's thread
            self._start_error = e
            self._ready.set()
            return
        self._ready.set()
        while self._boundary():
            self._step()

    def _boundary(self) -> bool:
        """A step boundary: retire cancelled requests, admit waiting ones into free
        slots; wait while there is nothing to run. False when the thread should end."""
        with self._cond:
            while True:
                for slot, job in list(self._running.items()):
                    if job.cancelled:
                        self._retire(slot)
                if any(j.cancelled for j in self._waiting):
                    self._waiting = deque(j for j in self._waiting if not j.cancelled)
                free = [s for s in range(self.slots.count) if s not in self._running]
                while free and self._waiting:
                    job = self._waiting.popleft()
                    self._running[free.pop(0)] = job
                    self.metrics.admitted(len(job.sequence.prompt))
                self._publish_load()
                if self._running:
                    return True
                if self._stopping:
                    return False
                self._cond.wait()

    def _step(self) -> None:
        running = dict(self._running)
        for job in running.values():
            if job.cancelled:
                job.steps_after_cancel += 1
        t0 = time.perf_counter()
        launches = self.slots.prefill_steps, self.slots.decode_steps
        try:
            new = advance(self.slots, {slot: job.sequence for slot, job in running.items()})
        except Exception as e:
            self._fault(running, e)
            return
        now = time.perf_counter()
        made = sum(t is not None for t in new.values())
        self.metrics.step(now - t0, made, self.slots.prefill_steps - launches[0],
                          self.slots.decode_steps - launches[1])
        for slot, token in new.items():
            job = running[slot]
            if token is not None:
                self._took(job, token, now)
            if job.sequence.finished:
                job.send(Done(job.sequence.finish_reason, job.text.flush()))
                with self._cond:
                    self._retire(slot)

    def _took(self, job: Job, token: int, now: float) -> None:
        if job.first_token_at is None:
            job.first_token_at = now
            self.metrics.first_token(now - job.arrived)
        piece = job.text.push(token)
        if job.text.stopped:
            job.sequence.finish("stop")
        job.send(Token(token, piece))

    def _retire(self, slot: int) -> None:
        """Free a slot (with the lock held)."""
        del self._running[slot]
        self.slots.free(slot)
        self._publish_load()

    def _fault(self, running: dict[int, Job], error: Exception) -> None:
        first = str(error).splitlines()[0] if str(error) else ""
        message = f"engine fault: {type(error).__name__}: {first[:300]}"
        log.error("%s (failing %d request(s), restarting the executor)", message, len(running))
        self.metrics.fault()
        for job in running.values():
            job.send(Failed(500, message))
        with self._cond:
            for slot in running:
                self._retire(slot)
        try:
            self.slots.reset()
        except Exception as e:
            with self._cond:
                self.broken = f"the engine could not be restarted after a fault: {e}"
                log.error(self.broken)
                for job in self._waiting:
                    job.send(Failed(503, self.broken))
                self._waiting.clear()
                self._publish_load()

    def _publish_load(self) -> None:
        self.metrics.load(len(self._waiting), len(self._running))
