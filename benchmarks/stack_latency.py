"""End-to-end latency of a stack against what users would write with llama-cpp-python.

Two stacks, each on its own baselines, same model files, threads, ctx and prompts, all
measured in this run:

* ``fslm-smollm2`` (the default: one LoRA adapter per stage on a shared base) and
* ``fslm-smollm2-prompted`` (the same four stages, few-shot prompted, no adapters).

Columns:

* naive: a new ``Llama(...)`` per stage per prompt (with that stage's ``lora_path``),
  ``create_chat_completion``, ``close()``;
* ideal: one resident ``Llama`` per distinct adapter (one in all for the prompted stack),
  reused for every prompt, so it pays no loads at all. For the fine-tuned stack that is
  four contexts; llama-cpp-python's high-level API cannot swap adapters on one;
* ideal with its KV reset before each call: llama-cpp-python's ``Llama`` reuses the KV of
  whatever prefix the new prompt shares with the previous call, which gives the resident
  per-stage contexts a free prefix cache (each sees the same stage's prompt every time).
  Reset, it evaluates every prompt from scratch, exactly like edge-fslm without its cache;
* edge-fslm without its prefix cache, and edge-fslm as shipped (prefix cache on);
* edge-fslm with prompt-lookup decoding (``--draft-max``, 8 by default): its answers must equal
  the shipped column's, and each stage's guesses verified and accepted are reported
  (``benchmarks/lookup_decoding.py`` explains why it does not pay on a small x86 CPU).

Targets: edge-fslm without prefix cache ≤ 1.05× the cold ideal (same work); shipped edge-fslm
against the warm ideal shows what the saved prefixes gain.

The baselines replay exactly the chat messages edge-fslm rendered and generate exactly as
many tokens as edge-fslm did for each stage (``max_tokens`` = that count, plus the end token
when the stage stopped on it; no stop strings),
so every column does the same work except what the runtime saves.

    python benchmarks/stack_latency.py [--prompts 20] [--threads 2] [--stacks fslm-smollm2,...] [--draft-max 8]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from common import median, p95, smollm2_path, table, write_result

from edge_fslm import Stack
from edge_fslm.manifest import load_builtin
from edge_fslm.profile import DEFAULT_PROMPTS

EXTRA = [
    "What is the boiling point of water?", "Name a mammal that can fly.", "What is the opposite of cold?",
    "Why do leaves change color in autumn?", "What is the largest planet?", "How do bees make honey?",
    "What is the chemical symbol for gold?", "Give an example of a verb.", "What causes rain?",
    "What is the main job of the heart?",
]

STACKS = ("fslm-smollm2", "fslm-smollm2-prompted")


def edge_runs(name: str, prompts: list[str], threads: int, prefix_cache: bool,
              draft_max: int = 0) -> tuple[list[float], list, dict]:
    """Time ``Stack.run`` per prompt; also return the traces and each stage's adapter path (or None)."""
    m = load_builtin(name)
    m = replace(m, runtime=replace(m.runtime, prefix_cache=prefix_cache))
    with Stack.load(m, threads=threads, measure_rss=False, draft_max=draft_max) as stack:
        adapters = {s.name: (str(a.path) if (a := stack.pipeline.adapters.get(s.name)) else None)
                    for s in m.stages}
        stack.run(prompts[0])  # warm-up: page cache, first-touch, and (when on) the prefix cache
        times, traces = [], []
        for p in prompts:
            t0 = time.perf_counter()
            r = stack.run(p)
            times.append(time.perf_counter() - t0)
            traces.append(r)
        return times, traces, adapters


def rendered_messages(manifest, result, adapters: dict) -> list[tuple[list[dict], int, object, str | None]]:
    values = {"input": result.prompt}
    out = []
    for spec, trace in zip(manifest.stages, result.stages):
        msgs = [{"role": m.role, "content": m.content.render(values)} for m in spec.messages]
        # a stage that ended on end-of-generation decoded its last token to sample that end:
        # one more step than max_tokens = completion_tokens would take
        n = trace.completion_tokens + (trace.stop_reason == "eos")
        out.append((msgs, n, spec.sampling, adapters[spec.name]))
        values[spec.name] = trace.output
    return out


def complete(llm, msgs, n, s) -> None:
    llm.create_chat_completion(msgs, max_tokens=max(n, 1), temperature=0.0, top_k=s.top_k, top_p=s.top_p,
                               min_p=s.min_p, repeat_penalty=s.repeat_penalty)


def lookup_stats(traces: list) -> dict:
    """Per stage: guesses verified and accepted, and tokens per decode after the first token
    (each decode yields one token of its own plus the guesses it accepted)."""
    out = {}
    for i, st in enumerate(traces[0].stages):
        rows = [r.stages[i] for r in traces]
        drafted = sum(s.draft_n for s in rows)
        accepted = sum(s.draft_n_accepted for s in rows)
        after_first = sum(max(s.completion_tokens - 1, 0) for s in rows)
        out[st.name] = {"drafted": drafted, "accepted": accepted,
                        "acceptance": accepted / drafted if drafted else 0.0,
                        "tokens_per_decode": after_first / (after_first - accepted) if after_first > accepted else 1.0}
    return out


def measure_stack(name: str, prompts: list[str], threads: int, draft_max: int) -> dict:
    from llama_cpp import Llama

    manifest = load_builtin(name)
    path = str(smollm2_path())
    kw = dict(n_ctx=manifest.runtime.ctx_size, n_threads=threads, n_threads_batch=threads,
              n_batch=512, n_ubatch=512, flash_attn=True, verbose=False)

    shipped, traces, adapters = edge_runs(name, prompts, threads, prefix_cache=True)
    no_prefix, _, _ = edge_runs(name, prompts, threads, prefix_cache=False)
    lookup, lookup_traces, _ = edge_runs(name, prompts, threads, prefix_cache=True, draft_max=draft_max)
    same = sum([s.output for s in a.stages] == [s.output for s in b.stages] for a, b in zip(traces, lookup_traces))
    work = [rendered_messages(manifest, r, adapters) for r in traces]

    resident = {a: Llama(path, lora_path=a, **kw) for a in dict.fromkeys(adapters.values())}
    for msgs, n, s, a in work[0]:  # warm-up
        complete(resident[a], msgs, n, s)
    ideal, cold = [], []
    for w in work:
        t0 = time.perf_counter()
        for msgs, n, s, a in w:
            complete(resident[a], msgs, n, s)
        ideal.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for msgs, n, s, a in w:
            resident[a].reset()  # forget the KV llama-cpp-python would otherwise reuse from the last call
            complete(resident[a], msgs, n, s)
        cold.append(time.perf_counter() - t0)
    for llm in resident.values():
        llm.close()

    naive = []
    for w in work:
        t0 = time.perf_counter()
        for msgs, n, s, a in w:
            llm = Llama(path, lora_path=a, **kw)
            complete(llm, msgs, n, s)
            llm.close()
        naive.append(time.perf_counter() - t0)

    cols = {"naive (new Llama per stage)": naive, "ideal (resident Llama, no loads)": ideal,
            "ideal, KV reset before each call": cold,
            "edge-fslm, prefix cache off": no_prefix, "edge-fslm (shipped)": shipped,
            f"edge-fslm, --draft-max {draft_max}": lookup}
    ref = median(ideal)
    return {
        "adapters": sorted(a for a in set(adapters.values()) if a),
        "ideal_resident_llamas": len(resident),
        "tokens_per_stage": [[s.completion_tokens for s in r.stages] for r in traces],
        "seconds": {k: {"median": median(v), "p95": p95(v), "all": v} for k, v in cols.items()},
        "ratios_vs_ideal": {k: median(v) / ref for k, v in cols.items()},
        "ratios_vs_ideal_cold": {k: median(v) / median(cold) for k, v in cols.items()},
        "prefix_cache_latency_saving": 1 - median(shipped) / median(no_prefix),
        "lookup": {"draft_max": draft_max, "identical_answers": same, "of": len(prompts),
                   "stages": lookup_stats(lookup_traces), "latency_vs_shipped": median(lookup) / median(shipped)},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stacks", default=",".join(STACKS))
    ap.add_argument("--draft-max", type=int, default=8, help="prompt-lookup guesses per decode for the lookup column")
    args = ap.parse_args()
    prompts = (DEFAULT_PROMPTS + EXTRA)[: args.prompts]
    from edge_fslm import llama

    llama.lib()  # same OpenMP wait policy for every column
    results = {name: measure_stack(name, prompts, args.threads, args.draft_max) for name in args.stacks.split(",")}
    for name, res in results.items():
        secs = res["seconds"]
        ref = secs["ideal (resident Llama, no loads)"]["median"]
        rows = [[k, f"{v['median']:.3f}", f"{v['p95']:.3f}", f"{v['median'] / ref:.2f}×"] for k, v in secs.items()]
        print(table(rows, [f"{name}, {len(prompts)} prompts", "median s", "p95 s", "vs ideal"]))
        print()
    for name, res in results.items():
        r = res["ratios_vs_ideal"]
        print(f"{name}: naive / ideal: {r['naive (new Llama per stage)']:.2f}×")
        c = res["ratios_vs_ideal_cold"]
        print(f"{name}: edge-fslm without prefix cache / cold ideal: {c['edge-fslm, prefix cache off']:.2f}× (target ≤ 1.05×)")
        print(f"{name}: edge-fslm / ideal: {r['edge-fslm (shipped)']:.2f}×"
              f" (prefix cache saves {res['prefix_cache_latency_saving'] * 100:.0f}% of the latency)")
        lk = res["lookup"]
        print(f"{name}: --draft-max {lk['draft_max']} / shipped: {lk['latency_vs_shipped']:.2f}×,"
              f" {lk['identical_answers']} of {lk['of']} answers identical (every stage)")
        for stage, st in lk["stages"].items():
            print(f"  {stage:<12} {st['accepted']:>5} of {st['drafted']:>5} guesses accepted,"
                  f" {st['tokens_per_decode']:.2f} tokens per decode")
    write_result("stack_latency", {
        "prompts": len(prompts),
        "threads": args.threads,
        "stacks": results,
        "target_no_prefix_over_cold_ideal": 1.05,
        "target_lookup_over_ideal": 0.85,
    })


if __name__ == "__main__":
    main()
