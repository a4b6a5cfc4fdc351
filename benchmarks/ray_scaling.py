"""Batch runs on a Ray cluster against the same batch run on one machine, and what N nodes would give.

The baseline is ``edge-fslm run --input --output`` on this machine with all its cores
(``-t`` = cores), measured in the same run on the same prompts. Against it:

* ``--ray`` on a local cluster that this script starts (``ray start --head``, one node) with
  1 actor × ``-t cores`` and with ``cores`` actors × ``-t 1``: what Ray's sharding, actor start-up
  and the driver's merge cost, and whether several single-thread actors beat one multi-thread
  process on the same cores;
* every run's answers are checked against the local batch (same ids, same answers).

Then the N-node model, from these measurements: a run of P prompts on N nodes of this kind takes
``startup + P / (N × r)`` seconds, where ``r`` is one node's prompts/s through Ray (the best of the
two layouts above) and ``startup`` the fixed cost measured here (cluster connection, actors loading
the stack). It assumes the prompts are independent, shards are spread evenly
(``--ray-shard-size`` ≪ P / N) and the driver's merge is not the bottleneck; merging is one
sequential append of small JSON lines, measured here as part of the run.

    python benchmarks/ray_scaling.py [--prompts 32] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table, write_result

from edge_fslm.testing import free_port

PROMPTS = [f"In one sentence: what is interesting about the number {i}?" for i in range(200)]


def _run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def _answers(path: Path) -> dict[str, str]:
    return {json.loads(line)["id"]: json.loads(line)["answer"] for line in path.read_text().splitlines()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24, help="cap every stage's tokens (-n)")
    ap.add_argument("--shard-size", type=int, default=4)
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_bin is None:
        raise SystemExit("error: needs the [ray] extra (pip install -e '.[ray]')")
    work = Path(tempfile.mkdtemp(prefix="edge-fslm-ray-scaling-"))
    inp = work / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[: args.prompts])))
    base = [sys.executable, "-m", "edge_fslm.cli", "run", "--input", str(inp), "-n", str(args.max_tokens)]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}

    local_out = work / "local.jsonl"
    local_s = _run(base + ["--output", str(local_out), "-t", str(cores)], env)
    reference = _answers(local_out)

    port = free_port()
    address = f"127.0.0.1:{port}"
    rows = {}
    try:
        t0 = time.perf_counter()
        subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--num-cpus", str(cores),
                        "--node-ip-address", "127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True)
        cluster_start = time.perf_counter() - t0
        layouts = {f"1 actor × {cores} threads": (1, cores), f"{cores} actors × 1 thread": (cores, 1)}
        for name, (actors, threads) in layouts.items():
            out = work / f"ray-{actors}.jsonl"
            secs = _run(base + ["--output", str(out), "-t", str(threads), "--ray", address, "--ray-actors", str(actors),
                                "--ray-shard-size", str(args.shard_size)], env)
            got = _answers(out)
            # a one-prompt run measures the fixed cost: connecting and loading the actors
            one = work / f"in-one-{actors}.jsonl"
            one.write_text(inp.read_text().splitlines()[0] + "\n")
            fixed = _run(base[:4] + ["--input", str(one), "-n", str(args.max_tokens), "--output",
                                     str(work / f"one-{actors}.jsonl"), "-t", str(threads), "--ray", address,
                                     "--ray-actors", "1"], env)
            rows[name] = {"actors": actors, "threads": threads, "seconds": secs,
                          "prompts_per_second": args.prompts / secs, "fixed_seconds": fixed,
                          "answers_identical": sum(got.get(k) == v for k, v in reference.items()),
                          "ids_exactly_once": sorted(got) == sorted(reference)}
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)

    local_rate = args.prompts / local_s
    print(f"{args.prompts} prompts, default stack, -n {args.max_tokens}, {cores} cores; ray start took {cluster_start:.1f} s")
    print(table([["local batch (baseline)", f"{local_s:.1f}", f"{local_rate:.3f}", "1.00x", "-", "-"]]
                + [[k, f"{v['seconds']:.1f}", f"{v['prompts_per_second']:.3f}", f"{v['prompts_per_second'] / local_rate:.2f}x",
                    f"{v['fixed_seconds']:.1f}", f"{v['answers_identical']}/{args.prompts}"] for k, v in rows.items()],
                ["run", "seconds", "prompts/s", "vs local", "fixed s (1 prompt)", "answers = local"]))
    best = max(rows.values(), key=lambda v: v["prompts_per_second"])
    per_prompt = (best["seconds"] - best["fixed_seconds"]) / max(args.prompts - 1, 1)
    r = 1 / per_prompt if per_prompt > 0 else best["prompts_per_second"]
    model = {str(n): {"prompts_per_second_10k": 10_000 / (best["fixed_seconds"] + 10_000 / (n * r))} for n in (1, 2, 4, 8, 16)}
    print(f"\nN-node model (nodes like this one, the best layout: {r:.3f} prompts/s a node after "
          f"{best['fixed_seconds']:.1f} s fixed), 10,000 prompts:")
    print(table([[n, f"{10_000 / m['prompts_per_second_10k'] / 3600:.2f} h", f"{m['prompts_per_second_10k']:.2f}",
                  f"{m['prompts_per_second_10k'] / local_rate:.2f}x"] for n, m in model.items()],
                ["nodes", "wall", "prompts/s", "vs one local machine"]))
    path = write_result("ray_scaling", {"prompts": args.prompts, "max_tokens": args.max_tokens, "cores": cores,
                                        "shard_size": args.shard_size, "cluster_start_seconds": cluster_start,
                                        "local": {"seconds": local_s, "prompts_per_second": local_rate},
                                        "ray": rows, "node_rate": r, "model_10k_prompts": model})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
