"""edge-fslm serve against llama-cpp-python's own server, on the same model and the same stack.

The peer a user would pick instead is ``python -m llama_cpp.server`` (llama-cpp-python's
``[server]`` extra) running SmolLM2-135M-Instruct. It cannot switch LoRA adapters, so the only
stack it can run is the prompted one, ``fslm-smollm2-prompted``; its client chains the four
stage prompts itself (each stage's messages, max_tokens, stop and repeat_penalty, greedy), as
an app would. edge-fslm serves the same stack as one model.

Measured in one run, on the same prompts: requests/s and p50/p95 latency of a whole stack
request at 1, 4 and 8 concurrent clients (edge-fslm with ``--parallel 4``), and the server
process's peak RSS (VmHWM) after that load test, and serving one stack against two stacks on the
same base, each server with the same flags and the same eight requests one at a time. With
chromium and Selenium installed it also saves a screenshot of the page at ``/``.

    python benchmarks/serve.py [--requests 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from common import RESULTS, median, p95, smollm2_path, table, write_result

from edge_fslm.rss import kernel_peak
from edge_fslm.testing import free_port, headless_chrome, start_server
from edge_fslm.units import fmt_bytes

STACK = "fslm-smollm2-prompted"
PROMPTS = [
    "Why is the sky blue?", "What do plants need to grow?", "How does a magnet work?",
    "Why do we have seasons?", "What is photosynthesis?", "How do bees make honey?",
    "What causes rain?", "Why does ice float on water?",
]


def start_peer(threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_path()), "--n_ctx", "2048",
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("llama_cpp.server did not start")


def peer_request(url: str, manifest, prompt: str) -> str:
    """What an app does against llama_cpp.server: render each stage's messages, chain the outputs."""
    values = {"input": prompt}
    with httpx.Client(timeout=600) as client:
        for stage in manifest.stages:
            messages = [{"role": m.role, "content": m.content.render(values)} for m in stage.messages]
            body = {"messages": messages, "max_tokens": stage.max_tokens, "temperature": 0.0,
                    "repeat_penalty": stage.sampling.repeat_penalty, "stop": list(stage.stop) or None}
            r = client.post(f"{url}/v1/chat/completions", json=body)
            r.raise_for_status()
            values[stage.name] = r.json()["choices"][0]["message"]["content"].strip()
    return values[manifest.stages[-1].name]


def ours_request(url: str, prompt: str, model: str = STACK) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=600,
                   json={"model": model, "messages": [{"role": "user", "content": prompt}]})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def load(fn, clients: int, n: int) -> dict:
    """``n`` requests from ``clients`` concurrent clients; throughput and latency."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    lat: list[float] = []

    def one(p: str) -> None:
        t = time.perf_counter()
        fn(p)
        lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": n, "seconds": wall, "rps": n / wall, "p50_s": median(lat),
            "p95_s": p95(lat)}


def screenshot(url: str, out: Path) -> bool:
    d = headless_chrome("1000,1100")
    if d is None:
        return False
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        d.get(url + "/")
        WebDriverWait(d, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        d.find_element(By.ID, "prompt").send_keys("Why do leaves change color in autumn?")
        d.find_element(By.ID, "send").click()
        WebDriverWait(d, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, "body[data-done='1']"))
        return d.save_screenshot(str(out))
    finally:
        d.quit()


def served_rss(args: argparse.Namespace, log: Path, stacks: list[str], order: list[str]) -> int:
    """The server's peak RSS serving ``stacks`` (with the load test's flags) after PROMPTS[:4] to each model of ``order``."""
    flags = [f for st in stacks for f in ("--stack", st)]
    srv = start_server([*flags, "--parallel", str(args.parallel), "--threads", str(args.threads), "--preload"], log)
    try:
        for p in PROMPTS[:4]:
            for model in order:
                ours_request(srv.url, p, model)
        return kernel_peak(srv.proc.pid) or 0
    finally:
        srv.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=8, help="requests at each concurrency level")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--parallel", type=int, default=4)
    args = ap.parse_args()
    from edge_fslm.manifest import load_stack

    manifest = load_stack(STACK)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "edge-fslm-bench-serve"
    tmp.mkdir(parents=True, exist_ok=True)
    levels = (1, 4, 8)

    peer, peer_url = start_peer(args.threads, tmp / "peer.log")
    try:
        peer_request(peer_url, manifest, PROMPTS[0])  # warm
        peer_rows = [load(lambda p: peer_request(peer_url, manifest, p), c, args.requests) for c in levels]
        peer_rss = kernel_peak(peer.pid) or 0
    finally:
        peer.terminate()
        peer.wait(30)

    ours = start_server(["--stack", STACK, "--parallel", str(args.parallel), "--threads", str(args.threads),
                         "--preload"], tmp / "ours.log")
    try:
        ours_request(ours.url, PROMPTS[0])
        our_rows = [load(lambda p: ours_request(ours.url, p), c, args.requests) for c in levels]
        loaded_rss = kernel_peak(ours.proc.pid) or 0
        shot = screenshot(ours.url, RESULTS / "serve_page.png")
    finally:
        ours.terminate()

    # One stack against two on the same base: the same flags and the same eight requests, one at a
    # time, so the ratio is what the second stack costs and nothing else.
    one_stack_rss = served_rss(args, tmp / "one.log", [STACK], [STACK, STACK])
    two_stack_rss = served_rss(args, tmp / "two.log", [STACK, "fslm-smollm2"], [STACK, "fslm-smollm2"])

    rows = []
    for mine, theirs in zip(our_rows, peer_rows):
        rows.append([mine["clients"], f"{mine['rps']:.3f}", f"{theirs['rps']:.3f}", f"{mine['rps'] / theirs['rps']:.2f}x",
                     f"{mine['p50_s']:.2f} / {mine['p95_s']:.2f}", f"{theirs['p50_s']:.2f} / {theirs['p95_s']:.2f}"])
    print(f"{STACK}, {args.requests} requests a level, {args.threads} threads; edge-fslm --parallel {args.parallel}")
    print(table(rows, ["clients", "edge-fslm req/s", "llama_cpp.server req/s", "ratio", "ours p50/p95 s",
                       "peer p50/p95 s"]))
    ratio = two_stack_rss / one_stack_rss
    print(f"\nserver peak RSS: after the load test {fmt_bytes(loaded_rss)}, llama_cpp.server {fmt_bytes(peer_rss)};"
          f" eight requests one at a time: one stack {fmt_bytes(one_stack_rss)}, two stacks on one base"
          f" {fmt_bytes(two_stack_rss)} ({ratio:.2f}x; target <= 1.2x)")
    if shot:
        print(f"page screenshot: {RESULTS / 'serve_page.png'}")
    path = write_result("serve", {
        "stack": STACK, "threads": args.threads, "parallel": args.parallel, "requests_per_level": args.requests,
        "edge_fslm": our_rows, "llama_cpp_server": peer_rows,
        "throughput_ratio": {str(m["clients"]): m["rps"] / t["rps"] for m, t in zip(our_rows, peer_rows)},
        "peak_rss_bytes": {"after_load_test": loaded_rss, "llama_cpp_server": peer_rss,
                           "one_stack": one_stack_rss, "two_stacks_one_base": two_stack_rss},
        "two_stack_rss_ratio": ratio,
        "targets": {"ratio_1_client": 1.0, "ratio_8_clients": 1.5, "two_stack_rss_ratio": 1.2},
        "screenshot": "serve_page.png" if shot else None,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
