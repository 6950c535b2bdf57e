"""`tilec serve`: an engine behind an OpenAI-compatible HTTP API.

    app.py        the Starlette app: routes, streaming, error answers
    protocol.py   the OpenAI request and response shapes
    scheduler.py  continuous batching over the engine's sequence slots, in one thread
    text.py       prompts to ids, ids to text (incremental, with stop strings)
    metrics.py    Prometheus text

Starlette and uvicorn, not FastAPI: five routes whose request checking must answer
with the OpenAI error object (FastAPI's pydantic validation answers 422 in its own
shape and would have to be overridden), and no use for generated API docs; Starlette
is the layer FastAPI is built on, and uvicorn handles SIGTERM by draining.
"""
from __future__ import annotations

import signal
import socket
import sys

from tilec.errors import TilecError


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one), or one error line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise TilecError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise TilecError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def serve(engine_path: str, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 64,
          backend: str = "auto", trust_engine_code: bool = False) -> int:
    """Serve until SIGTERM or Ctrl-C, then drain (requests in flight finish, new
    connections are refused) and return 0."""
    import uvicorn

    from tilec.api import load
    from tilec.serve.app import Server

    server = Server(load(engine_path, trust_engine_code=trust_engine_code), backend, max_queue)
    sock = listen(host, port)
    try:
        server.start()
    except BaseException:
        sock.close()
        raise
    where = sock.getsockname()
    url = f"http://{host if ':' not in host else f'[{host}]'}:{where[1]}"
    slots = server.scheduler.slots
    chunks = f"prefill chunk {slots.prefill_chunk}" if slots.prefill_chunk > 1 else "no prefill"
    print(f"tilec serve: model {server.model!r} at {url}/v1 (backend {slots.backend}, "
          f"{slots.count} sequence slot(s), {chunks}, queue {max_queue})", flush=True)
    config = uvicorn.Config(server.app, lifespan="on", log_level="info",
                            timeout_graceful_shutdown=None)
    http = uvicorn.Server(config)
    stopped_by: list[int] = []

    def on_stop(signum, frame):
        # uvicorn handles the signal while it serves (drains), then raises it again
        # for the handler it found: this one, so the command ends with status 0
        stopped_by.append(signum)
        http.should_exit = True

    previous = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        http.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
        server.scheduler.stop()
    if stopped_by:
        print(f"tilec serve: stopped by {signal.Signals(stopped_by[0]).name} after "
              "draining the requests in flight", file=sys.stderr)
    return 0
