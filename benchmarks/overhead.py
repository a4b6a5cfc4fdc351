"""The runtime's own overhead: edge-fslm's per-stage tokens/s against raw ``Llama.generate``.

For each stage of the default stack on each prompt, both sides evaluate the same prompt
tokens from an empty cache and generate the same number of tokens, greedily, on the same
model file with the same threads, ctx and batch. edge-fslm runs with its prefix cache off
here, so both do identical work and only the runtime's bookkeeping differs (the prefix
cache's gain is measured in stack_latency.py).

    python benchmarks/overhead.py [--prompts 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from importlib import resources
from pathlib import Path

from common import smollm2_path, table, write_result

from edge_fslm import Stack
from edge_fslm.profile import DEFAULT_PROMPTS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    prompts = DEFAULT_PROMPTS[: args.prompts]
    # the prompted stack: the raw side runs the bare model, so neither side may carry adapters
    text = (resources.files("edge_fslm.stacks") / "fslm-smollm2-prompted.toml").read_text()
    text = text.replace("[runtime]\n", "[runtime]\nprefix_cache = false\n", 1)
    with tempfile.TemporaryDirectory() as tmp:
        m = Path(tmp) / "stack.toml"
        m.write_text(text)
        stack = Stack.load(str(m), threads=args.threads, measure_rss=False)
    from edge_fslm.stage import prepare

    pool = stack.pipeline.pool
    lm = pool.get(next(iter(stack.pipeline.models.values())))
    stack.run(prompts[0])  # warm-up
    edge = {"prompt_tokens": 0, "prompt_s": 0.0, "gen_tokens": 0, "gen_s": 0.0}
    raw = {"prompt_tokens": 0, "prompt_s": 0.0, "gen_tokens": 0, "gen_s": 0.0}
    llm = lm.llm  # the same Llama object: identical weights, context and threads

    def replay(tokens: list[int], n: int, s) -> None:
        lm.clear_kv()
        t0 = time.perf_counter()
        first = None
        k = 0
        for _tok in llm.generate(tokens, temp=0.0, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                                 repeat_penalty=s.repeat_penalty, reset=True):
            if first is None:
                first = time.perf_counter()
            k += 1
            if k >= n:
                break
        end = time.perf_counter()
        raw["prompt_tokens"] += len(tokens)
        raw["prompt_s"] += first - t0
        raw["gen_tokens"] += max(n - 1, 0)
        raw["gen_s"] += end - first

    runs = 0
    for _ in range(args.rounds):
        for p in prompts:  # each prompt's raw replay runs right after it, so drift hits both sides alike
            r = stack.run(p)
            values = {"input": r.prompt}
            for spec, t in zip(stack.manifest.stages, r.stages):
                tokens, _ = prepare(lm, spec, values, pool.settings.ctx_size)
                # a stage that stops on end-of-generation decoded one more token than it kept
                decoded = t.completion_tokens + (t.stop_reason == "eos")
                values[spec.name] = t.output
                edge["prompt_tokens"] += t.prompt_tokens
                edge["prompt_s"] += t.prompt_seconds
                edge["gen_tokens"] += max(decoded - 1, 0)
                edge["gen_s"] += t.gen_seconds
                replay(tokens, decoded, spec.sampling)
                runs += 1
    stack.close()

    def rates(d):
        return d["prompt_tokens"] / d["prompt_s"], d["gen_tokens"] / d["gen_s"]

    e_pp, e_tg = rates(edge)
    r_pp, r_tg = rates(raw)
    print(table([["raw Llama.generate", f"{r_pp:.1f}", f"{r_tg:.1f}"], ["edge-fslm", f"{e_pp:.1f}", f"{e_tg:.1f}"]],
                [f"SmolLM2-135M Q4_1, {runs} stage runs", "prompt tok/s", "gen tok/s"]))
    print()
    print(f"prompt tok/s, edge-fslm / raw: {e_pp / r_pp:.3f} (target ≥ 0.97)")
    print(f"gen tok/s, edge-fslm / raw: {e_tg / r_tg:.3f} (target ≥ 0.97)")
    write_result("overhead", {
        "model": smollm2_path().name, "stage_runs": runs, "threads": args.threads,
        "edge_fslm": {"prompt_tokens_per_second": e_pp, "gen_tokens_per_second": e_tg, **edge},
        "raw_llama_generate": {"prompt_tokens_per_second": r_pp, "gen_tokens_per_second": r_tg, **raw},
        "ratios": {"prompt": e_pp / r_pp, "gen": e_tg / r_tg}, "target": 0.97,
    })


if __name__ == "__main__":
    main()
