"""Does prompt-lookup decoding (``--draft-max N``) make the default stack faster here, and why (not)?

Three measurements, all in this run, on the default stack's model (SmolLM2 Q4_1) and threads:

1. **What a decode of n tokens costs** against a decode of one (raw llama.cpp, the answer
   adapter set, 150 tokens already in the cache). Lookup decoding pays off only when the
   guesses it gets right outweigh what each extra token adds to a decode.
2. **How often the guesses are right**: every stage's prompt and greedy output on the prompts
   (recorded once; the output is the same whatever is drafted), replayed through
   ``edge_fslm.lookup.NgramIndex`` for each ``--draft-max``: guesses accepted, tokens per decode,
   and the decode time predicted from (1). Flash attention's 256-position limit is ignored
   here, so this is the most lookup could give.
3. **The stack itself**: ``Stack.run`` over the prompts at ``--draft-max 0`` (the baseline) and
   each N, interleaved, best of ``--repeats``; every stage's output must be identical.

    python benchmarks/lookup_decoding.py [--prompts 10] [--threads 2] [--draft-max 2,4,8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

from common import median, smollm2_path, table, write_result

from edge_fslm import Stack, llama, lookup, stage
from edge_fslm.profile import DEFAULT_PROMPTS
from stack_latency import EXTRA

ANSWER_ADAPTER = "answer.gguf"


def decode_costs(threads: int, widths: list[int], repeats: int = 5, steps: int = 10) -> dict[int, float]:
    """Seconds of a decode of n tokens over the seconds of a one-token decode (medians)."""
    from pathlib import Path

    from llama_cpp import Llama

    lc = llama.lib()
    llm = Llama(str(smollm2_path()), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                flash_attn=True, verbose=False)
    ctx = llama.context_ptr(llm)
    adapter = Path(stage.__file__).parent / "stacks" / "fslm-smollm2" / ANSWER_ADAPTER
    handle = llama.load_adapter(llm, str(adapter))
    assert llama.set_adapter(ctx, handle, 1.0) == 0
    mem = lc.llama_get_memory(ctx)
    with llama.Batch(512) as b:
        for p in range(150):
            b.add(100 + p % 50, p, (0,), False)
        b.decode(ctx, "")
        secs: dict[int, list[float]] = {}
        for _ in range(repeats):
            for n in widths:
                t0 = time.perf_counter()
                for _ in range(steps):
                    for j in range(n):
                        b.add(200 + j, 150 + j, (0,), True)
                    b.decode(ctx, "")
                    lc.llama_memory_seq_rm(mem, 0, 150, -1)
                secs.setdefault(n, []).append((time.perf_counter() - t0) / steps)
    llm.close()
    one = median(secs[1])
    return {n: median(v) / one for n, v in secs.items()}


def record(prompts: list[str], threads: int) -> tuple[list[str], list[tuple[list[int], list[int]]]]:
    """Every stage's prompt tokens and generated tokens, from a run with one guess a decode."""
    seen: list[tuple[list[int], list[int]]] = []
    real = lookup.decode

    def spy(lm, sampler, tokens, n_past, **kw):
        out: list[int] = []
        seen.append((list(tokens), out))
        for t in real(lm, sampler, tokens, n_past, **kw):
            out.append(t)
            yield t

    stage.lookup.decode = spy
    try:
        with Stack.load("fslm-smollm2", draft_max=1, threads=threads, measure_rss=False) as st:
            names = [s.name for s in st.manifest.stages]
            for p in prompts:
                st.run(p)
    finally:
        stage.lookup.decode = real
    return names, seen


def replay(names: list[str], seen: list, draft_max: int, cost: dict[int, float]) -> dict:
    """Per stage: guesses made and accepted, tokens per decode, and decode time over plain decoding."""
    per: dict[str, dict] = {}
    for i, (prompt, out) in enumerate(seen):
        s = per.setdefault(names[i % len(names)], {"drafted": 0, "accepted": 0, "decodes": 0, "tokens": 0, "cost": 0.0})
        index = lookup.NgramIndex(prompt)
        index.push(out[0])  # the first token comes with the prompt's evaluation
        k = 1
        while k < len(out):
            guesses = index.draft(draft_max)
            ok = 0
            while ok < len(guesses) and k + ok < len(out) and guesses[ok] == out[k + ok]:
                ok += 1
            for t in out[k:k + ok + 1]:
                index.push(t)
            s["drafted"] += len(guesses)
            s["accepted"] += ok
            s["decodes"] += 1
            s["cost"] += cost[1 + len(guesses)]
            k += ok + 1
        s["tokens"] += len(out) - 1
    for s in per.values():
        s["tokens_per_decode"] = s["tokens"] / s["decodes"] if s["decodes"] else 1.0
        s["predicted_decode_time"] = s["cost"] / s["tokens"] if s["tokens"] else 1.0
    return per


def stack_times(prompts: list[str], threads: int, widths: list[int], repeats: int) -> dict:
    stacks = {d: Stack.load("fslm-smollm2", draft_max=d, threads=threads, measure_rss=False) for d in [0, *widths]}
    secs: dict[int, list[float]] = {}
    outs: dict[int, list] = {}
    accepted: dict[int, int] = {}
    try:
        for st in stacks.values():
            st.run(prompts[0])  # warm-up: page cache, prefix cache
        for _ in range(repeats):
            for d, st in stacks.items():
                t0 = time.perf_counter()
                runs = [st.run(p) for p in prompts]
                secs.setdefault(d, []).append(time.perf_counter() - t0)
                outs[d] = [[s.output for s in r.stages] for r in runs]
                accepted[d] = sum(s.draft_n_accepted for r in runs for s in r.stages)
    finally:
        for st in stacks.values():
            st.close()
    return {d: {"best_s": min(v), "all_s": v, "vs_off": min(v) / min(secs[0]),
                "identical": sum(a == b for a, b in zip(outs[d], outs[0])), "accepted": accepted[d]}
            for d, v in secs.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-max", default="2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    widths = [int(x) for x in args.draft_max.split(",")]
    prompts = (DEFAULT_PROMPTS + EXTRA)[: args.prompts]

    cost = decode_costs(args.threads, list(range(1, max(widths) + 2)))
    print(table([[n, f"{c:.2f}×"] for n, c in cost.items()], ["tokens in one decode", "time vs one token"]))
    print()
    names, seen = record(prompts, args.threads)
    sims = {d: replay(names, seen, d, cost) for d in widths}
    rows = [[f"--draft-max {d}", name, f"{s['accepted']} / {s['drafted']}", f"{s['tokens_per_decode']:.2f}",
             f"{s['predicted_decode_time']:.2f}×"] for d, per in sims.items() for name, s in per.items()]
    print(table(rows, ["setting", "stage", "guesses right", "tokens a decode", "decode time vs off (predicted)"]))
    print()
    real = stack_times(prompts, args.threads, widths, args.repeats)
    rows = [[f"--draft-max {d}", f"{r['best_s']:.2f}", f"{r['vs_off']:.2f}×", f"{r['identical']} / {len(prompts)}",
             r["accepted"]] for d, r in real.items()]
    print(table(rows, [f"default stack, {len(prompts)} prompts", "best s", "vs off", "identical", "guesses right"]))
    write_result("lookup_decoding", {
        "prompts": len(prompts), "threads": args.threads, "repeats": args.repeats,
        "decode_cost_vs_one_token": cost, "replay": sims, "stack": real,
        "target_latency_vs_resident_ideal": 0.85,
    })


if __name__ == "__main__":
    main()
