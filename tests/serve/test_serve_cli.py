"""`tilec serve` as a command: it prints where it listens, SIGTERM drains the requests
in flight and exits 0, and what it cannot serve is one error line."""
from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import torch

from engines import compiled, run_cli
from servers import openai, tilec_run

ROOT = Path(__file__).resolve().parents[2]


def lines_of(stream) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [q.put(line) for line in stream], daemon=True).start()
    return q


def test_sigterm_drains_the_stream_in_flight_and_exits_0(engine_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tilec", "serve", str(engine_path),
                             "--port", "0", "--backend", "reference"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = lines_of(proc.stdout).get(timeout=120)
        m = re.search(r"model 'chat_tiny' at (http://127\.0\.0\.1:(\d+)/v1) \(backend reference, "
                      r"1 sequence slot\(s\), no prefill, queue 64\)", first)
        assert m, first
        client = openai.OpenAI(base_url=m.group(1), api_key="unused", max_retries=0, timeout=120)
        stream = client.completions.create(model="chat_tiny", prompt=[7, 3], max_tokens=12,
                                           temperature=0, stream=True)
        ids = []
        for chunk in stream:
            ids += chunk.choices[0].token_ids
            if len(ids) == 1:
                proc.send_signal(signal.SIGTERM)
            finish = chunk.choices[0].finish_reason
        assert finish == "length"
        assert ids == tilec_run(engine_path, "--prompt-ids", "7,3", "--max-new-tokens", 12)[
            "new_tokens"]
        assert proc.wait(timeout=60) == 0
        assert "stopped by SIGTERM after draining" in proc.stderr.read()
        with socket.socket() as s:   # the port is closed
            assert s.connect_ex(("127.0.0.1", int(m.group(2)))) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_what_cannot_be_served_is_one_error_line(capsys, engine_path):
    code, _, err = run_cli(capsys, "serve", compiled("mlp"), "--port", "0")
    assert code == 2 and err.startswith("error: tilec serve needs a decoder engine")
    code, _, err = run_cli(capsys, "serve", engine_path, "--max-queue", "-1")
    assert code == 2 and "--max-queue must be >= 0" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", engine_path, "--port", port)
    assert code == 2 and err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert len(err.splitlines()) == 1
    code, _, err = run_cli(capsys, "serve", engine_path, "--host", "no.such.host.invalid")
    assert code == 2 and err.startswith("error: --host no.such.host.invalid")
    if not torch.cuda.is_available():   # the executor is made before serving: its error
        code, _, err = run_cli(capsys, "serve", engine_path, "--port", "0", "--backend", "gpu")
        assert code == 2 and err.startswith("error: the gpu backend needs a CUDA GPU")
