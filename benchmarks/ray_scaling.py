"""Batch runs on a Ray cluster against the same batch run on one machine, and what N nodes would give.

The baseline is ``edge-fslm run --input --output`` on this machine with all its cores
(``-t`` = cores), measured in the same run on the same prompts, in the environment the script
was started with (no thread settings are changed for it). Against it:

* ``--ray`` on a local cluster that this script starts (``ray start --head``, one node) with
  1 actor × ``-t cores`` and with ``cores`` actors × ``-t 1``: what Ray's sharding, actor start-up
  and the driver's merge cost, and whether several single-thread actors beat one multi-thread
  process on the same cores;
* every run's answers are checked against the local batch (same ids, same answers);
* where the time goes: the CLI's summary gives ray.init's time and the actors' time inside
  shards (``busy``); a one-prompt run gives the fixed start-up (CLI, connect, actor start,
  stack load); the ``cores`` × 1 layout run again with larger shards gives the per-shard
  overhead inside an actor (busy time per extra shard).

Then the N-node model, from these measurements: a run of P prompts on N nodes of this kind takes
``startup + P / (N × r) + one shard`` seconds, where ``r`` is one node's prompts/s inside shards
(the best layout's actors × prompts / busy seconds), ``startup`` the fixed cost measured here and
the last term the worst tail (one actor finishing one more shard). It assumes the prompts are
independent and the driver's merge is not the bottleneck (one sequential append of small JSON
lines a shard). The cluster is stopped by its own temp folder, never with ``ray stop``, which
would stop every Ray cluster on the machine.

    python benchmarks/ray_scaling.py [--prompts 32] [--max-tokens 24] [--shard-size 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table, write_result

from edge_fslm.testing import free_port, stop_ray_cluster

PROMPTS = [f"In one sentence: what is interesting about the number {i}?" for i in range(200)]
_SUMMARY = re.compile(r"(\d+) shards.*?(\d+) Ray actors \(connect ([\d.]+) s, busy ([\d.]+) s\)")


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0, r.stderr


def _ray_run(cmd: list[str], env: dict) -> dict:
    """One ``run --ray``: its wall time and the CLI summary's shards, connect and busy seconds."""
    secs, err = _run(cmd, env)
    m = _SUMMARY.search(err)
    if m is None:
        raise SystemExit(f"no Ray summary line in:\n{err[-2000:]}")
    return {"seconds": secs, "shards": int(m[1]), "connect_seconds": float(m[3]), "busy_seconds": float(m[4])}


def _answers(path: Path) -> dict[str, str]:
    return {json.loads(line)["id"]: json.loads(line)["answer"] for line in path.read_text().splitlines()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24, help="cap every stage's tokens (-n)")
    ap.add_argument("--shard-size", type=int, default=2,
                    help="prompts a shard: small, so that the last shards end close together")
    ap.add_argument("--note", default="", help="what else ran on the machine (stored with the result)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))  # so the cluster is still stopped
    cores = os.cpu_count() or 2
    big_shard = max(args.shard_size + 1, args.prompts // (2 * cores))  # for the per-shard overhead
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_bin is None:
        raise SystemExit("error: needs the [ray] extra (pip install -e '.[ray]')")
    work = Path(tempfile.mkdtemp(prefix="edge-fslm-ray-scaling-"))
    inp = work / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[: args.prompts])))
    one = work / "in-one.jsonl"
    one.write_text(inp.read_text().splitlines()[0] + "\n")
    base = [sys.executable, "-m", "edge_fslm.cli", "run", "-n", str(args.max_tokens)]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}

    local_out = work / "local.jsonl"
    local_s, _ = _run(base + ["--input", str(inp), "--output", str(local_out), "-t", str(cores)], env)
    reference = _answers(local_out)

    port = free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    rows = {}
    try:
        t0 = time.perf_counter()
        subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--num-cpus", str(cores), "--temp-dir", temp_dir,
                        "--node-ip-address", "127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True)
        cluster_start = time.perf_counter() - t0

        def on_ray(name: str, actors: int, threads: int, shard: int, prompts: Path) -> dict:
            out = work / f"{name}.jsonl"
            got = _ray_run(base + ["--input", str(prompts), "--output", str(out), "-t", str(threads), "--ray", address,
                                   "--ray-actors", str(actors), "--ray-shard-size", str(shard)], env)
            return {**got, "answers": _answers(out)}

        layouts = {f"1 actor × {cores} threads": (1, cores), f"{cores} actors × 1 thread": (cores, 1)}
        for name, (actors, threads) in layouts.items():
            run = on_ray(f"ray-{actors}", actors, threads, args.shard_size, inp)
            # a one-prompt run measures the fixed cost: the CLI, connecting, starting and loading an actor
            fixed = on_ray(f"one-{actors}", 1, threads, 1, one)
            got = run.pop("answers")
            rows[name] = {"actors": actors, "threads": threads, "seconds": run["seconds"],
                          "prompts_per_second": args.prompts / run["seconds"],
                          "vs_local": local_s / run["seconds"],
                          "fixed_seconds": fixed["seconds"],
                          "startup_seconds": fixed["seconds"] - fixed["busy_seconds"],
                          "connect_seconds": run["connect_seconds"], "shards": run["shards"],
                          "busy_seconds": run["busy_seconds"],
                          "idle_actor_seconds": actors * run["seconds"] - run["busy_seconds"],
                          "prompts_per_actor_busy_second": args.prompts / run["busy_seconds"],
                          "answers_identical": sum(got.get(k) == v for k, v in reference.items()),
                          "ids_exactly_once": sorted(got) == sorted(reference)}
        wide = f"{cores} actors × 1 thread"
        big = on_ray("ray-big", cores, 1, big_shard, inp)
        big.pop("answers")
        small = rows[wide]
        per_shard = (small["busy_seconds"] - big["busy_seconds"]) / max(small["shards"] - big["shards"], 1)
        overhead = {"layout": wide, "shard_sizes": [args.shard_size, big_shard],
                    "shards": [small["shards"], big["shards"]],
                    "busy_seconds": [small["busy_seconds"], big["busy_seconds"]],
                    "seconds": [small["seconds"], big["seconds"]],
                    "per_shard_busy_seconds": per_shard}
    finally:  # this cluster only
        stop_ray_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)

    local_rate = args.prompts / local_s
    print(f"{args.prompts} prompts, default stack, -n {args.max_tokens}, {cores} cores, shards of {args.shard_size};"
          f" ray start took {cluster_start:.1f} s")
    print(table([["local batch (baseline)", f"{local_s:.1f}", f"{local_rate:.3f}", "1.00x", "-", "-", "-", "-"]]
                + [[k, f"{v['seconds']:.1f}", f"{v['prompts_per_second']:.3f}", f"{v['vs_local']:.2f}x",
                    f"{v['startup_seconds']:.1f}", f"{v['connect_seconds']:.1f}",
                    f"{v['busy_seconds']:.1f} / {v['idle_actor_seconds']:.1f}", f"{v['answers_identical']}/{args.prompts}"]
                   for k, v in rows.items()],
                ["run", "seconds", "prompts/s", "vs local", "start-up s", "connect s", "actor busy / idle s",
                 "answers = local"]))
    print(f"per-shard overhead inside an actor ({wide}, shards of {args.shard_size} vs {big_shard}):"
          f" {per_shard:+.3f} s ({big['seconds']:.1f} s wall with the larger shards)")
    best_name, best = max(rows.items(), key=lambda kv: kv[1]["prompts_per_second"])
    r = best["actors"] * best["prompts_per_actor_busy_second"]  # one node, inside shards
    startup = best["startup_seconds"]
    tail = args.shard_size / best["prompts_per_actor_busy_second"]  # the worst tail: one actor, one more shard
    model = {str(n): {"prompts_per_second_10k": 10_000 / (startup + 10_000 / (n * r) + tail)} for n in (1, 2, 4, 8, 16)}
    print(f"\nN-node model (nodes like this one, {best_name}: {r:.3f} prompts/s a node inside shards, "
          f"{startup:.1f} s start-up, {tail:.1f} s tail), 10,000 prompts:")
    print(table([[n, f"{10_000 / m['prompts_per_second_10k'] / 3600:.2f} h", f"{m['prompts_per_second_10k']:.2f}",
                  f"{m['prompts_per_second_10k'] / local_rate:.2f}x"] for n, m in model.items()],
                ["nodes", "wall", "prompts/s", "vs one local machine"]))
    load = os.getloadavg()
    path = write_result("ray_scaling", {"prompts": args.prompts, "max_tokens": args.max_tokens, "cores": cores,
                                        "shard_size": args.shard_size, "cluster_start_seconds": cluster_start,
                                        "local": {"seconds": local_s, "prompts_per_second": local_rate},
                                        "ray": rows, "per_shard_overhead": overhead, "node_rate": r,
                                        "startup_seconds": startup, "tail_seconds": tail,
                                        "model_10k_prompts": model, "load_average_after": list(load),
                                        "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")
                                                if k in os.environ},
                                        "note": args.note})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
