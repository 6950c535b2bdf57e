"""The server's metrics, in the Prometheus text exposition format (version 0.0.4).

Written by the event loop (requests) and the engine thread (steps, tokens): every
update and the rendering take one lock.
"""
from __future__ import annotations

import threading
import time
from collections import deque

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RATE_STEPS = 64   # tokens/s is measured over the last this many engine steps


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_number(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    def __init__(self, slots: int):
        self._lock = threading.Lock()
        self.slots = slots
        self.requests: dict[tuple[str, str], int] = {}   # (endpoint, outcome) -> count
        self.queue_depth = 0
        self.running = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.prefill_launches = 0
        self.decode_launches = 0
        self.faults = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.step_time = Histogram(STEP_BUCKETS)
        self._recent: deque[tuple[float, int]] = deque(maxlen=RATE_STEPS)  # (seconds, tokens)
        self.started = time.time()

    def request(self, endpoint: str, outcome: str) -> None:
        with self._lock:
            key = (endpoint, outcome)
            self.requests[key] = self.requests.get(key, 0) + 1

    def load(self, queue_depth: int, running: int) -> None:
        with self._lock:
            self.queue_depth, self.running = queue_depth, running

    def admitted(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def step(self, seconds: float, new_tokens: int, prefill_launches: int = 0,
             decode_launches: int = 0) -> None:
        with self._lock:
            self.steps += 1
            self.prefill_launches += prefill_launches
            self.decode_launches += decode_launches
            self.generated_tokens += new_tokens
            self.step_time.observe(seconds)
            self._recent.append((seconds, new_tokens))

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def fault(self) -> None:
        with self._lock:
            self.faults += 1

    def tokens_per_s(self) -> float:
        busy = sum(s for s, _ in self._recent)
        return sum(n for _, n in self._recent) / busy if busy > 0 else 0.0

    def render(self) -> str:
        with self._lock:
            simple = [   # name, type, help, value
                ("tilec_queue_depth", "gauge", "Requests waiting for a sequence slot.",
                 self.queue_depth),
                ("tilec_running_requests", "gauge", "Requests in a sequence slot.", self.running),
                ("tilec_sequence_slots", "gauge", "Sequences the engine holds at once.",
                 self.slots),
                ("tilec_prompt_tokens_total", "counter", "Prompt tokens admitted.",
                 self.prompt_tokens),
                ("tilec_generated_tokens_total", "counter", "Tokens generated.",
                 self.generated_tokens),
                ("tilec_engine_steps_total", "counter", "Engine steps run.", self.steps),
                ("tilec_prefill_launches_total", "counter",
                 "Launches of the prefill schedule (a chunk of one prompt each).",
                 self.prefill_launches),
                ("tilec_decode_launches_total", "counter",
                 "Launches of the decode step (a token for every decoding slot each).",
                 self.decode_launches),
                ("tilec_engine_faults_total", "counter",
                 "Engine steps that failed (the requests in them answered 500).", self.faults),
                ("tilec_tokens_per_second", "gauge", f"Tokens generated per second of engine "
                 f"steps, over the last {RATE_STEPS} steps.", _number(self.tokens_per_s())),
            ]
            families = [
                ("tilec_requests_total", "counter",
                 "Requests answered, by endpoint and outcome (finished, cancelled, rejected: "
                 "queue full, invalid: 4xx, failed: 5xx).",
                 [f'tilec_requests_total{{endpoint="{e}",outcome="{o}"}} {n}'
                  for (e, o), n in sorted(self.requests.items())]),
                *((name, kind, help_, [f"{name} {value}"]) for name, kind, help_, value in simple),
                ("tilec_time_to_first_token_seconds", "histogram",
                 "From a request's arrival to its first new token.",
                 self.ttft.lines("tilec_time_to_first_token_seconds")),
                ("tilec_step_seconds", "histogram", "Time of one engine step.",
                 self.step_time.lines("tilec_step_seconds")),
            ]
        lines = []
        for name, kind, help_, samples in families:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def _number(x: float) -> str:
    return repr(float(x))
