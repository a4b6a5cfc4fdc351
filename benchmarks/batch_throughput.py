"""Batch throughput: stage-major against prompt-major, in the same run, on the same prompts.

Two settings:

* a budget where stages that are separate models must swap: a two-model stack
  (SmolLM2 → Gemma 3 270M) under the ``sequential`` policy, the tightest one;
* the default stack on its shared base at the tightest budget it accepts.

Prompt-major is ``Stack.run`` per prompt; stage-major is ``edge-fslm run --input`` (run_batch)
with one prompt decoded at a time (``--parallel 1``), so this part measures loading only.

Then multi-sequence decoding on the default stack, with its own max_tokens: stage-major with
``--parallel`` 1, 4, 8 and 16 against the ideal sequential loop a user would write with
llama-cpp-python (one resident ``Llama`` per stage adapter, reused for every prompt, one
prompt at a time, replaying exactly the chat messages and token counts edge-fslm produced;
see stack_latency.py). Every parallel run's answers are checked against the sequential ones, with
flash attention on (the default) and off.

    python benchmarks/batch_throughput.py [--prompts 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from types import SimpleNamespace as NS
from pathlib import Path

from common import gemma_path, smollm2_path, table, write_result
from memory import mixed_file

from edge_fslm import Stack
from edge_fslm.batch import run_batch
from edge_fslm.profile import DEFAULT_PROMPTS
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
        report = run_batch(stack, inp, res, parallel=1)
        wall = time.perf_counter() - t0
    out["stage-major"] = {"wall_seconds": wall, "loads": report.loads, "load_seconds": report.load_seconds,
                          "prompts_per_second": len(prompts) / wall}
    for v in out.values():
        v["load_fraction"] = v["load_seconds"] / v["wall_seconds"]
    return out


def multi_sequence(prompts: list[str], folder: Path, widths: tuple[int, ...], flash_attn: tuple[bool, ...]) -> dict:
    """Stage-major with N prompts decoded together, against the ideal one-at-a-time loop; with
    flash attention on (the default) and off, each compared with its own ``--parallel 1``."""
    from llama_cpp import Llama
    from stack_latency import complete, rendered_messages

    from edge_fslm.api import default_threads
    from edge_fslm.manifest import load_builtin

    threads = default_threads()  # what Stack.load uses when --threads is not given
    name = "fslm-smollm2"
    manifest = load_builtin(name)
    inp = folder / "multi.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    runs: dict[str, dict] = {}
    answers: dict[tuple[bool, int], list] = {}
    same: dict[str, str] = {}
    for fa in flash_attn:
        for n in widths:
            res = folder / f"multi-{fa}-{n}.jsonl"
            with Stack.load(name, preload=True, measure_rss=False, flash_attn=fa) as stack:
                t0 = time.perf_counter()
                run_batch(stack, inp, res, parallel=n)
                wall = time.perf_counter() - t0
                adapters = {s.name: str(stack.pipeline.adapters[s.name].path) for s in manifest.stages}
            rows = sorted((json.loads(x) for x in res.read_text().splitlines()), key=lambda r: r["id"])
            answers[fa, n] = [[s["output"] for s in r["stages"]] for r in rows]
            label = f"stage-major, --parallel {n}" + ("" if fa else ", --flash-attn off")
            runs[label] = {"wall_seconds": wall, "prompts_per_second": len(prompts) / wall}
            same[label] = f"{sum(a == b for a, b in zip(answers[fa, n], answers[fa, widths[0]]))}/{len(prompts)}"

    # the ideal loop replays what the --parallel 1 run (flash attention on) produced, prompt by prompt
    seq_rows = sorted((json.loads(x) for x in (folder / f"multi-{flash_attn[0]}-{widths[0]}.jsonl").read_text()
                       .splitlines()), key=lambda r: r["id"])
    work = [rendered_messages(manifest, NS(prompt=r["prompt"], stages=[NS(**s) for s in r["stages"]]), adapters)
            for r in seq_rows]
    path = str(smollm2_path())
    kw = dict(n_ctx=manifest.runtime.ctx_size, n_threads=threads, n_threads_batch=threads,
              n_batch=512, n_ubatch=512, flash_attn=True, verbose=False)
    resident = {a: Llama(path, lora_path=a, **kw) for a in dict.fromkeys(adapters.values())}
    for msgs, k, sp, a in work[0]:  # warm-up
        complete(resident[a], msgs, k, sp)
    t0 = time.perf_counter()
    for w in work:
        for msgs, k, sp, a in w:
            complete(resident[a], msgs, k, sp)
    ideal = time.perf_counter() - t0
    for llm in resident.values():
        llm.close()
    runs = {"ideal sequential loop (resident Llama per adapter)": {"wall_seconds": ideal,
                                                                   "prompts_per_second": len(prompts) / ideal}, **runs}
    ref = runs["ideal sequential loop (resident Llama per adapter)"]["prompts_per_second"]
    for v in runs.values():
        v["vs_ideal"] = v["prompts_per_second"] / ref
    return {"stack": name, "runs": runs, "answers_identical_to_parallel_1": same}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--widths", default="1,4,8,16", help="--parallel values for the multi-sequence part")
    args = ap.parse_args()
    widths = tuple(int(x) for x in args.widths.split(","))
    base = DEFAULT_PROMPTS + EXTRA
    prompts = (base * (args.prompts // len(base) + 1))[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mixed = str(mixed_file(folder, smollm2_path(), gemma_path()))
        results = {
            "two models, sequential (must swap)": measure(mixed, "sequential", prompts, folder, args.max_tokens),
            "default stack, shared base": measure("fslm-smollm2", None, prompts, folder, args.max_tokens),
        }
        multi = multi_sequence(prompts, folder, widths, (True, False))
    rows = []
    for setting, r in results.items():
        for mode, v in r.items():
            rows.append([setting, mode, f"{v['wall_seconds']:.1f}", f"{v['prompts_per_second']:.2f}", v["loads"],
                         f"{v['load_fraction'] * 100:.1f}%"])
    print(table(rows, ["setting", "order", "wall s", "prompts/s", "loads", "time loading"]))
    print()
    rows = [[k, f"{v['wall_seconds']:.1f}", f"{v['prompts_per_second']:.2f}", f"{v['vs_ideal']:.2f}×"]
            for k, v in multi["runs"].items()]
    print(table(rows, [f"{multi['stack']}, {len(prompts)} prompts, stack max_tokens", "wall s", "prompts/s", "vs ideal"]))
    print()
    for setting, r in results.items():
        print(f"{setting}: stage-major / prompt-major throughput {r['stage-major']['prompts_per_second'] / r['prompt-major']['prompts_per_second']:.2f}×,"
              f" stage-major spends {r['stage-major']['load_fraction'] * 100:.1f}% of its time loading (target ≤ 5%)")
    best = max((k for k in multi["runs"] if "--parallel" in k), key=lambda k: multi["runs"][k]["vs_ideal"])
    print(f"answers identical to --parallel {widths[0]}: {multi['answers_identical_to_parallel_1']}")
    print(f"{best} / ideal sequential loop: {multi['runs'][best]['vs_ideal']:.2f}× prompts/s (target ≥ 2×)")
    write_result("batch_throughput", {"prompts": len(prompts), "max_tokens": args.max_tokens, "results": results,
                                      "multi_sequence": multi})


if __name__ == "__main__":
    main()
