"""End-to-end latency of the prompted stack (fslm-smollm2-prompted) against what users would write with llama-cpp-python.

Same model file, same threads and ctx, same prompts, same per-stage prompts and the same
number of generated tokens per stage, all measured in this run:

* naive: a new ``Llama(...)`` per stage per prompt, ``create_chat_completion``, ``close()``;
* ideal: one resident ``Llama`` reused for every stage (pays no loads at all);
* edge-fslm without its prefix cache, and edge-fslm as shipped (prefix cache on).

The baselines replay exactly the chat messages edge-fslm rendered and generate exactly as
many tokens as edge-fslm did for each stage (``max_tokens`` = that count, no stop strings),
so every column does the same work except what the runtime saves.

    python benchmarks/stack_latency.py [--prompts 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

from common import median, p95, smollm2_path, table, write_result

from edge_fslm import Stack
from edge_fslm.profiler import DEFAULT_PROMPTS

EXTRA = [
    "What is the boiling point of water?", "Name a mammal that can fly.", "What is the opposite of cold?",
    "Why do leaves change color in autumn?", "What is the largest planet?", "How do bees make honey?",
    "What is the chemical symbol for gold?", "Give an example of a verb.", "What causes rain?",
    "What is the main job of the heart?",
]


STACK = "fslm-smollm2-prompted"


def edge_runs(prompts: list[str], threads: int, prefix_cache: bool) -> tuple[list[float], list]:
    from dataclasses import replace

    from edge_fslm.manifest import load_builtin

    # the prompted stack: the baselines replay its prompts on the bare model, which llama-cpp-python's
    # high-level API cannot do with a different LoRA adapter per stage
    m = load_builtin(STACK)
    m = replace(m, runtime=replace(m.runtime, prefix_cache=prefix_cache))
    with Stack.load(m, threads=threads, measure_rss=False) as stack:
        stack.run(prompts[0])  # warm-up: page cache, first-touch, and (when on) the prefix cache
        times, traces = [], []
        for p in prompts:
            t0 = time.perf_counter()
            r = stack.run(p)
            times.append(time.perf_counter() - t0)
            traces.append(r)
        return times, traces


def rendered_messages(stack_manifest, result) -> list[tuple[list[dict], int, object]]:
    values = {"input": result.prompt}
    out = []
    for spec, trace in zip(stack_manifest.stages, result.stages):
        msgs = [{"role": m.role, "content": m.content.render(values)} for m in spec.messages]
        out.append((msgs, trace.completion_tokens, spec.sampling))
        values[spec.name] = trace.output
    return out


def replay(llm, work) -> None:
    for msgs, n, s in work:
        llm.create_chat_completion(msgs, max_tokens=max(n, 1), temperature=0.0, top_k=s.top_k, top_p=s.top_p,
                                   min_p=s.min_p, repeat_penalty=s.repeat_penalty)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    prompts = (DEFAULT_PROMPTS + EXTRA)[: args.prompts]
    from llama_cpp import Llama

    from edge_fslm.manifest import load_builtin
    from edge_fslm.pool import _llama_cpp

    _llama_cpp()  # same OpenMP wait policy for every column
    manifest = load_builtin(STACK)
    path = str(smollm2_path())
    kw = dict(n_ctx=manifest.runtime.ctx_size, n_threads=args.threads, n_threads_batch=args.threads,
              n_batch=512, n_ubatch=512, flash_attn=True, verbose=False)

    shipped, traces = edge_runs(prompts, args.threads, prefix_cache=True)
    no_prefix, _ = edge_runs(prompts, args.threads, prefix_cache=False)
    work = [rendered_messages(manifest, r) for r in traces]

    ideal_llm = Llama(path, **kw)
    replay(ideal_llm, work[0])  # warm-up
    ideal = []
    for w in work:
        t0 = time.perf_counter()
        replay(ideal_llm, w)
        ideal.append(time.perf_counter() - t0)
    ideal_llm.close()

    naive = []
    for w in work:
        t0 = time.perf_counter()
        for step in w:
            llm = Llama(path, **kw)
            replay(llm, [step])
            llm.close()
        naive.append(time.perf_counter() - t0)

    cols = {"naive (new Llama per stage)": naive, "ideal (one resident Llama)": ideal,
            "edge-fslm, prefix cache off": no_prefix, "edge-fslm (shipped)": shipped}
    ref = median(ideal)
    rows = [[k, f"{median(v):.3f}", f"{p95(v):.3f}", f"{median(v) / ref:.2f}×"] for k, v in cols.items()]
    print(table(rows, [f"default stack, {len(prompts)} prompts", "median s", "p95 s", "vs ideal"]))
    gained = 1 - median(shipped) / median(no_prefix)
    print()
    print(f"naive / ideal: {median(naive) / ref:.2f}×")
    print(f"edge-fslm without prefix cache / ideal: {median(no_prefix) / ref:.2f}× (target ≤ 1.05×)")
    print(f"edge-fslm / ideal: {median(shipped) / ref:.2f}× (prefix cache saves {gained * 100:.0f}% of the latency)")
    write_result("stack_latency", {
        "prompts": len(prompts),
        "threads": args.threads,
        "tokens_per_stage": [[s.completion_tokens for s in r.stages] for r in traces],
        "seconds": {k: {"median": median(v), "p95": p95(v), "all": v} for k, v in cols.items()},
        "ratios_vs_ideal": {k: median(v) / ref for k, v in cols.items()},
        "prefix_cache_latency_saving": gained,
        "target_no_prefix_over_ideal": 1.05,
    })


if __name__ == "__main__":
    main()
