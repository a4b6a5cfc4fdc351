"""Real parts for tests and benchmarks: synthetic LoRA adapters, a server process.

They are real llama.cpp LoRA GGUFs (the layout llama.cpp's own tooling writes) with
random weights: they change the logits measurably but teach the model nothing. Trained
adapters come from ``edge-fslm finetune``/``convert-lora``; these exist so that loading,
swapping and memory can be measured on any base, today.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..gguf_info import GGUFInfo, read_gguf


def write_random_lora(
    base: str | os.PathLike | GGUFInfo,
    out_path: str | os.PathLike,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = ("attn_q", "attn_v"),
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    """Write a rank-``rank`` LoRA adapter for every ``blk.N.<target>.weight`` of ``base``."""
    import gguf

    info = base if isinstance(base, GGUFInfo) else read_gguf(base)
    rng = np.random.default_rng(seed)
    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=info.architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    n = 0
    for name, t in sorted(info.tensors.items()):
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in targets or len(t.shape) != 2:
            continue
        n_in, n_out = t.shape  # as gguf-py reports it: (ne0, ne1)
        a = rng.normal(0.0, std, size=(rank, n_in)).astype(np.float16)  # reported shape (n_in, r)
        b = rng.normal(0.0, std, size=(n_out, rank)).astype(np.float16)  # reported shape (r, n_out)
        writer.add_tensor(f"{name}.lora_a", a)
        writer.add_tensor(f"{name}.lora_b", b)
        n += 1
    if n == 0:
        raise ValueError(f"{info.path}: no 2-D tensors named blk.N.({'|'.join(targets)}).weight to adapt")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def write_two_model_stack(
    folder: str | os.PathLike, first: str | os.PathLike, second: str | os.PathLike, *,
    keywords_tokens: int = 16, answer_tokens: int = 32, name: str = "mixed.toml",
) -> Path:
    """A two-stage stack on two different base models (e.g. SmolLM2 then Gemma 3), so the
    multi-model residency policies (all, lru, sequential) can be exercised on real files."""
    path = Path(folder) / name
    path.write_text(f"""
[stack]
name = "mixed"
[models.smol]
source = "{first}"
[models.gemma]
source = "{second}"
[[stages]]
name = "keywords"
model = "smol"
max_tokens = {keywords_tokens}
stop = ["\\n"]
messages = [{{ role = "user", content = "List the key concepts of this request, comma-separated: {{input}}" }}]
[[stages]]
name = "answer"
model = "gemma"
max_tokens = {answer_tokens}
stop = ["\\n\\n"]
template = "Key concepts: {{keywords}}\\nQuestion: {{input}}\\nAnswer:"
""", encoding="utf-8")
    return path


# -- a real server process, for the server's tests and benchmarks -------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_ray_cluster(temp_dir: str | os.PathLike, timeout: float = 10.0) -> int:
    """Stop the Ray processes of the cluster started with ``ray start --temp-dir temp_dir``, and
    only those: ``ray stop`` stops every Ray process on the machine, other users' clusters too.

    Its daemons name the folder on their command lines; its workers and agents are their
    children. Returns how many processes were stopped.
    """
    import psutil

    tag = os.fspath(temp_dir)
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}  # a command line that names the folder to stop it
    procs: set = set()
    for p in psutil.process_iter(["cmdline"]):
        if p.pid not in spared and any(tag in arg for arg in p.info["cmdline"] or ()):
            procs.add(p)
            try:
                procs.update(p.children(recursive=True))
            except psutil.Error:
                pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return len(procs)


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
    import httpx

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


def chromium_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) when both are installed (Debian's chromium and chromium-driver)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def headless_chrome(window: str = "1000,900"):
    """A Selenium driver on a real headless chromium, for the page tests and the benchmark's
    screenshot; None when selenium, chromium or chromedriver is missing. The caller quits it."""
    paths = chromium_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    if paths is None:
        return None
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={window}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=paths[1]))
    driver.set_page_load_timeout(60)
    return driver
