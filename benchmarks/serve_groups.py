"""edge-fslm serve --parallel: seconds a request grouped against one at a time (issue 15).

The server tests' two-stage stack (tests/serve_helpers.py: SmolLM2 with two adapters), one
server with ``--parallel 4``: the eight test prompts sent one at a time by one client, then
8 clients × 5 requests at once, ``max_tokens`` 16 (the exactness test's load). Both sides run
in the same server, one after the other, and ``--rounds`` repeats the pair, so a CPU shared
with other work weighs on both alike. Grouped answers are checked against the one-at-a-time
ones. With ``--baseline-tree`` the same rounds also run a server from another source tree (an
older checkout), the two taking turns to go first, so a change is measured against its base
in one run. Each side's server CPU seconds a request are recorded beside the wall seconds: on a
CPU shared with other work they vary far less. So is the server's peak RSS (VmHWM): a kept
context stays resident.

    python benchmarks/serve_groups.py [--rounds 2] [--baseline-tree ../main]
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
import psutil

from common import table, write_result

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_fslm.rss import kernel_peak  # noqa: E402
from edge_fslm.testing import start_server  # noqa: E402
from tests.serve_helpers import write_quick_stack  # noqa: E402

PROMPTS = [
    "Why is the sky blue?", "What do plants need to grow?", "Name a planet in the solar system.",
    "How does a magnet work?", "What is the boiling point of water?", "Why do we have seasons?",
    "What is photosynthesis?", "How many legs does a spider have?",
]


def ask(url: str, prompt: str, max_tokens: int) -> tuple[str, float]:
    t = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", timeout=600,
                   json={"model": "quick", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"], time.perf_counter() - t


def cpu_seconds(proc: "psutil.Process") -> float:
    """The server's CPU time (user + system), every thread: what a shared CPU bends least."""
    t = proc.cpu_times()
    return t.user + t.system


def commit(tree: Path) -> str:
    r = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+changes" if dirty else "")


def measure(tree: Path, stack: Path, args, log: Path) -> dict:
    """One server from ``tree``: the prompts one at a time, then clients × requests at once."""
    env = {"PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    srv = start_server(["--stack", str(stack), "--parallel", str(args.parallel), "--threads", str(args.threads),
                        "--preload"], log, env=env)
    try:
        proc = psutil.Process(srv.proc.pid)
        ask(srv.url, PROMPTS[0], args.max_tokens)  # warm
        t0, c0 = time.perf_counter(), cpu_seconds(proc)
        alone = {p: ask(srv.url, p, args.max_tokens)[0] for p in PROMPTS}
        alone_s = (time.perf_counter() - t0) / len(PROMPTS)
        alone_cpu = (cpu_seconds(proc) - c0) / len(PROMPTS)
        jobs = [PROMPTS[(c + k) % len(PROMPTS)] for c in range(args.clients) for k in range(args.per_client)]
        t0, c0 = time.perf_counter(), cpu_seconds(proc)
        with ThreadPoolExecutor(args.clients) as pool:
            got = list(pool.map(lambda p: ask(srv.url, p, args.max_tokens), jobs))
        wall = time.perf_counter() - t0
        grouped_cpu = (cpu_seconds(proc) - c0) / len(jobs)
        health = httpx.get(f"{srv.url}/health").json()
        peak = kernel_peak(srv.proc.pid) or 0
    finally:
        srv.terminate()
    return {
        "tree": str(tree), "commit": commit(tree),
        "one_at_a_time_s_per_request": alone_s,
        "grouped_s_per_request": wall / len(jobs), "grouped_requests": len(jobs), "grouped_wall_s": wall,
        "grouped_mean_latency_s": sum(s for _, s in got) / len(got),
        "one_at_a_time_cpu_s_per_request": alone_cpu, "grouped_cpu_s_per_request": grouped_cpu,
        "answers_differing": sum(a != alone[p] for p, (a, _) in zip(jobs, got)),
        "requests_grouped": health["requests"]["grouped"], "parallel": health.get("parallel"),
        "server_peak_rss_bytes": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=5)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--baseline-tree", type=Path, help="another source tree to run the same rounds from")
    ap.add_argument("--note", default="", help="what else the CPU was doing, for the results file")
    args = ap.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "edge-fslm-bench-serve-groups"
    stack = write_quick_stack(tmp / "stack")
    trees = [ROOT] + ([args.baseline_tree.resolve()] if args.baseline_tree else [])
    runs = []
    for r in range(args.rounds):
        for i, tree in enumerate(trees if r % 2 == 0 else trees[::-1]):  # each goes first in turn
            run = measure(tree, stack, args, tmp / f"server-{r}-{i}.log")
            run["round"] = r
            runs.append(run)
            print(f"round {r} {run['commit']}: one at a time {run['one_at_a_time_s_per_request']:.3f} s/req, grouped "
                  f"{run['grouped_s_per_request']:.3f} s/req (CPU {run['one_at_a_time_cpu_s_per_request']:.3f} / "
                  f"{run['grouped_cpu_s_per_request']:.3f} s/req), {run['answers_differing']} differ, peak RSS "
                  f"{run['server_peak_rss_bytes'] / 1e6:.1f} MB, {run['parallel']}",
                  flush=True)
    rows = []
    for tree in trees:
        mine = [x for x in runs if x["tree"] == str(tree)]
        alone = sum(x["one_at_a_time_s_per_request"] for x in mine) / len(mine)
        grouped = sum(x["grouped_s_per_request"] for x in mine) / len(mine)
        alone_cpu = sum(x["one_at_a_time_cpu_s_per_request"] for x in mine) / len(mine)
        grouped_cpu = sum(x["grouped_cpu_s_per_request"] for x in mine) / len(mine)
        rows.append([mine[0]["commit"], f"{alone:.3f}", f"{grouped:.3f}", f"{alone / grouped:.2f}x",
                     f"{alone_cpu:.3f}", f"{grouped_cpu:.3f}", f"{alone_cpu / grouped_cpu:.2f}x",
                     sum(x["answers_differing"] for x in mine),
                     f"{max(x['server_peak_rss_bytes'] for x in mine) / 1e6:.1f}"])
    print(f"two-stage test stack, {args.clients} clients × {args.per_client} requests, max_tokens {args.max_tokens}, "
          f"--parallel {args.parallel}, {args.threads} threads, means of {args.rounds} rounds")
    print(table(rows, ["code", "one at a time s/req", "grouped s/req", "speed-up", "alone CPU s/req",
                       "grouped CPU s/req", "CPU ratio", "answers differing",
                                "peak RSS MB"]))
    path = write_result("serve_groups", {
        "stack": "tests/serve_helpers.py quick", "clients": args.clients, "per_client": args.per_client,
        "parallel": args.parallel, "max_tokens": args.max_tokens, "threads": args.threads, "rounds": args.rounds,
        "note": args.note, "runs": runs,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
