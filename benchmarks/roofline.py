"""How close generation runs to this machine's memory-bandwidth ceiling.

Generating one token reads every weight once (plus the KV cache so far), so tokens/s can
never exceed bandwidth ÷ bytes read per token. Bandwidth is measured here with a large
numpy copy (read + write); generation speed with the default stack's stages.

    python benchmarks/roofline.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import median, smollm2_path, table, write_result

from edge_fslm import Stack
from edge_fslm.gguf_info import read_gguf
from edge_fslm.memory import kv_cache_bytes
from edge_fslm.profile import DEFAULT_PROMPTS


def bandwidth(size: int = 512 << 20, repeats: int = 7) -> float:
    src = np.ones(size // 8, dtype=np.float64)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * size / min(times)  # bytes read + bytes written, best of n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    bw = bandwidth()
    info = read_gguf(smollm2_path())
    with Stack.load("fslm-smollm2", threads=args.threads, measure_rss=False) as stack:
        stack.run(DEFAULT_PROMPTS[0])
        rates, ctx_tokens = [], []
        for p in DEFAULT_PROMPTS:
            for s in stack.run(p).stages:
                if s.completion_tokens > 4:
                    rates.append(s.gen_tokens_per_second)
                    ctx_tokens.append(s.prompt_tokens + s.completion_tokens // 2)
    per_token = info.tensor_bytes + kv_cache_bytes(info, int(median(ctx_tokens)))
    ceiling = bw / per_token
    measured = median(rates)
    print(table([
        ["memory bandwidth (numpy copy)", f"{bw / 1e9:.2f} GB/s"],
        ["bytes read per token (weights + KV)", f"{per_token / 1e6:.1f} MB"],
        ["bandwidth ceiling", f"{ceiling:.0f} tok/s"],
        ["measured generation (median stage)", f"{measured:.1f} tok/s"],
    ], ["SmolLM2-135M Q4_1", "value"]))
    print()
    print(f"generation / bandwidth ceiling: {measured / ceiling:.2f}")
    write_result("roofline", {
        "bandwidth_bytes_per_second": bw, "bytes_per_token": per_token, "ceiling_tokens_per_second": ceiling,
        "measured_gen_tokens_per_second_median": measured, "fraction_of_ceiling": measured / ceiling,
        "threads": args.threads,
    })


if __name__ == "__main__":
    main()
