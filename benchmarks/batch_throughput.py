"""Batch throughput: stage-major against prompt-major, in the same run, on the same prompts.

Two settings:

* a budget where stages that are separate models must swap: a two-model stack
  (SmolLM2 → Gemma 3 270M) under the ``sequential`` policy, the tightest one;
* the default stack on its shared base at the tightest budget it accepts.

Prompt-major is ``Stack.run`` per prompt; stage-major is ``edge-fslm run --input`` (run_batch).

    python benchmarks/batch_throughput.py [--prompts 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import gemma_path, smollm2_path, table, write_result
from memory import mixed_file

from edge_fslm import Stack
from edge_fslm.batch import run_batch
from edge_fslm.profiler import DEFAULT_PROMPTS
from stack_latency import EXTRA


def measure(manifest: str, policy: str | None, prompts: list[str], folder: Path, max_tokens: int) -> dict:
    out = {}
    with Stack.load(manifest, policy=policy, max_tokens=max_tokens, preload=False, measure_rss=False) as stack:
        c0 = stack.pipeline.pool.counters.snapshot()
        t0 = time.perf_counter()
        for p in prompts:
            stack.run(p)
        spent = stack.pipeline.pool.counters.since(c0)
        wall = time.perf_counter() - t0
        out["prompt-major"] = {"wall_seconds": wall, "loads": spent.loads, "load_seconds": spent.load_seconds,
                               "prompts_per_second": len(prompts) / wall}
    inp = folder / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    res = folder / f"out-{time.monotonic_ns()}.jsonl"
    with Stack.load(manifest, policy=policy, max_tokens=max_tokens, preload=False, measure_rss=False) as stack:
        t0 = time.perf_counter()
        report = run_batch(stack, inp, res)
        wall = time.perf_counter() - t0
    out["stage-major"] = {"wall_seconds": wall, "loads": report.loads, "load_seconds": report.load_seconds,
                          "prompts_per_second": len(prompts) / wall}
    for v in out.values():
        v["load_fraction"] = v["load_seconds"] / v["wall_seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    base = DEFAULT_PROMPTS + EXTRA
    prompts = (base * (args.prompts // len(base) + 1))[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mixed = str(mixed_file(folder, smollm2_path(), gemma_path()))
        results = {
            "two models, sequential (must swap)": measure(mixed, "sequential", prompts, folder, args.max_tokens),
            "default stack, shared base": measure("fslm-smollm2", None, prompts, folder, args.max_tokens),
        }
    rows = []
    for setting, r in results.items():
        for mode, v in r.items():
            rows.append([setting, mode, f"{v['wall_seconds']:.1f}", f"{v['prompts_per_second']:.2f}", v["loads"],
                         f"{v['load_fraction'] * 100:.1f}%"])
    print(table(rows, ["setting", "order", "wall s", "prompts/s", "loads", "time loading"]))
    print()
    for setting, r in results.items():
        print(f"{setting}: stage-major / prompt-major throughput {r['stage-major']['prompts_per_second'] / r['prompt-major']['prompts_per_second']:.2f}×,"
              f" stage-major spends {r['stage-major']['load_fraction'] * 100:.1f}% of its time loading (target ≤ 5%)")
    write_result("batch_throughput", {"prompts": len(prompts), "max_tokens": args.max_tokens, "results": results,
                                      "not_done": "multi-sequence decoding (several prompts per llama_batch) is not built yet"})


if __name__ == "__main__":
    main()
