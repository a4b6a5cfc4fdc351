"""Prompt and generation speed of SmolLM2-135M per quant type on this CPU, against the shipped Q4_1.

Why: llama.cpp's fast CPU paths depend on the weight type, not on its bit count. Some types
are repacked at load into interleaved layouts (``ggml-cpu/repack.cpp``: Q4_0 and IQ4_NL into
8-row blocks on AVX2, 4-row blocks on ARM with dot product) or have llamafile's tiled matmul
(``llamafile/sgemm.cpp``: Q8_0, Q4_0, Q5_0, IQ4_NL on x86); Q4_1, the type the default model
ships in, has neither. This measures what that costs on the machine it runs on.

Baseline, in the same run: the shipped Q4_1 file. The other files are made here, the way
``quant_quality.py`` makes them: the shipped GGUF dequantized by transformers, converted to F16
(``edge_fslm.convert``), then quantized by llama.cpp's own quantizer (``convert.quantize``).
``Q4_1`` among them is that F16 quantized back to Q4_1, a check that requantizing by itself
changes nothing in speed.

Every model is loaded once (raw ``llama_cpp.Llama``, the runtime's settings: flash attention
on, ``n_batch`` = ``n_ubatch`` = 512) and timed in rounds, all models in each round, each
round in a rotated order, so background load falls on every row alike; the table gives medians.
Per round and model: one prompt of ``--prompt-tokens`` held-out Alpaca tokens from an empty
KV cache (prompt tokens/s), then ``--gen-tokens`` greedy tokens after it (generation tokens/s).
EOS does not stop generation, so every row decodes the same number of tokens.

    python benchmarks/quant_speed.py [--types Q4_1,Q4_0,IQ4_NL,Q4_K_M,Q8_0,F16] [--rounds 9]

The work folder (``--work-dir``) is shared with quant_quality.py; the F16 file needs the train
extra (torch + transformers) once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from common import median, run_child, smollm2_path, table, write_result
from quant_quality import build_f16, held_out_examples

from edge_fslm import llama
from edge_fslm.convert import quantize
from edge_fslm.convert.quantize import normalize_qtype
from edge_fslm.gguf_info import validate_model

TYPES = ["Q4_1", "Q4_0", "IQ4_NL", "Q4_K_M", "Q8_0", "F16"]
SHIPPED = "Q4_1 (shipped)"
_REPACK = re.compile(r"CPU_REPACK model buffer size\s*=\s*([0-9.]+) MiB")


CHILD_RSS = r"""
import json, sys
from edge_fslm.rss import reset_kernel_peak, kernel_peak
from edge_fslm import llama
llama_cpp = llama.lib()
path, threads, ctx, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
reset_kernel_peak()
llm = llama_cpp.Llama(path, n_ctx=ctx, n_batch=512, n_ubatch=512, flash_attn=True, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
llm.eval(prompt)
print(json.dumps({"peak": kernel_peak()}))
"""


@dataclass
class Row:
    """One model under test and its timings, one entry per round."""

    name: str
    path: Path
    prompt_tps: list[float] = field(default_factory=list)
    gen_tps: list[float] = field(default_factory=list)
    repacked_mib: float = 0.0
    peak_rss: int | None = None
    first_tokens: list[int] = field(default_factory=list)


def make_files(types: list[str], work: Path, threads: int) -> dict[str, Path]:
    """The shipped file plus each requested type, quantized from the F16 made from it (cached in ``work``)."""
    f16 = build_f16(work)
    paths = {SHIPPED: smollm2_path()}
    for q in types:
        if q == "F16":
            paths[q] = f16
            continue
        out = work / f"smollm2.{q}.gguf"
        if not out.is_file() or out.stat().st_mtime < f16.stat().st_mtime:
            quantize(f16, out, q, threads=threads)
        paths[q] = out
    return paths


def load(path: Path, threads: int, ctx: int) -> tuple[Any, float]:
    """A raw ``Llama`` with the runtime's settings; returns it and how many MiB llama.cpp repacked at load."""
    llama_cpp = llama.lib()
    log = io.StringIO()
    llama.set_verbose(True)  # llama.cpp's log goes to sys.stderr; verbose=False would point that at /dev/null
    try:
        with contextlib.redirect_stderr(log):
            llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=512, n_ubatch=512, flash_attn=True,
                                  n_threads=threads, n_threads_batch=threads, verbose=True)
    finally:
        llama.set_verbose(False)
    return llm, sum(float(m) for m in _REPACK.findall(log.getvalue()))


def time_once(llm: Any, prompt: list[int], gen: int) -> tuple[float, float, list[int]]:
    """Prompt tokens/s from an empty KV cache, then greedy generation tokens/s, and the tokens generated."""
    llama_cpp = llama.lib()
    n_vocab = llama_cpp.llama_n_vocab(llama.vocab(llm))
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t_prompt = time.perf_counter() - t0
    out: list[int] = []
    t0 = time.perf_counter()
    for _ in range(gen):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.context_ptr(llm), -1), shape=(n_vocab,))
        out.append(int(logits.argmax()))
        llm.eval([out[-1]])
    t_gen = time.perf_counter() - t0
    return len(prompt) / t_prompt, gen / t_gen, out


def other_load(cpu0: Any, own0: Any, wall: float) -> tuple[float, float]:
    """Cores' worth of CPU that other processes used since the snapshots (the machine's busy time minus
    ours), and cores' worth the hypervisor stole: both slow llama.cpp's threads down."""
    cpu1, own1 = psutil.cpu_times(), psutil.Process().cpu_times()
    busy = sum(getattr(cpu1, f) - getattr(cpu0, f) for f in ("user", "nice", "system", "irq", "softirq")
               if hasattr(cpu1, f))
    own = (own1.user - own0.user) + (own1.system - own0.system)
    steal = getattr(cpu1, "steal", 0.0) - getattr(cpu0, "steal", 0.0)
    return max(0.0, busy - own) / wall, steal / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated quant types, besides the shipped Q4_1")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds (one untimed warm-up round first)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop after the round that passes this many seconds of timing (a busy machine can be 10x slower)")
    ap.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "edge-fslm" / "quant-quality")
    args = ap.parse_args()
    types = [normalize_qtype(t) for t in args.types.split(",") if t.strip()]
    args.work_dir.mkdir(parents=True, exist_ok=True)

    paths = make_files(types, args.work_dir, args.threads)
    ctx = args.prompt_tokens + args.gen_tokens + 16
    rows: list[Row] = []
    models = []
    for name, path in paths.items():
        llm, repacked = load(path, args.threads, ctx)
        rows.append(Row(name, path, repacked_mib=repacked))
        models.append(llm)
    text = " ".join(e["output"] for e in held_out_examples(100))
    prompt = models[0].tokenize(text.encode(), add_bos=True, special=False)[: args.prompt_tokens]
    if len(prompt) < args.prompt_tokens:
        raise SystemExit(f"--prompt-tokens: the held-out text has only {len(prompt)} tokens")

    for r in rows:  # a fresh process per file: a repacked type holds its weights in anonymous memory, not the mmap
        r.peak_rss = run_child(CHILD_RSS, str(r.path), str(args.threads), str(ctx), json.dumps(prompt))["peak"]

    load_start = os.getloadavg()
    cpu0, own0, t_start = psutil.cpu_times(), psutil.Process().cpu_times(), time.perf_counter()
    order = list(range(len(rows)))
    rounds = 0
    for rnd in range(args.rounds + 1):
        shift = rnd % len(order)
        for i in order[shift:] + order[:shift]:
            p_tps, g_tps, toks = time_once(models[i], prompt, args.gen_tokens)
            if rnd == 0:  # warm-up: page faults, first-use allocations
                rows[i].first_tokens = toks[:16]
                continue
            rows[i].prompt_tps.append(p_tps)
            rows[i].gen_tps.append(g_tps)
        rounds = rnd
        elapsed = time.perf_counter() - t_start
        print(f"round {rnd}/{args.rounds}: {elapsed:.0f} s", file=sys.stderr, flush=True)
        if rnd and args.max_seconds is not None and elapsed > args.max_seconds:
            break
    wall = time.perf_counter() - t_start
    others, steal = other_load(cpu0, own0, wall)
    for llm in models:
        llm.close()

    base = rows[0]
    bp, bg = median(base.prompt_tps), median(base.gen_tps)
    n_params = validate_model(paths["F16"] if "F16" in paths else base.path).n_params
    results = []
    for r in rows:
        info = validate_model(r.path)
        results.append({
            "qtype": r.name, "file": r.path.name, "file_type": info.file_type_name,
            "file_size": info.file_size, "bits_per_weight": 8 * info.file_size / n_params,
            "repacked_mib": r.repacked_mib, "peak_rss_bytes": r.peak_rss,
            "prompt_tps": median(r.prompt_tps), "gen_tps": median(r.gen_tps),
            "prompt_vs_shipped": median(r.prompt_tps) / bp, "gen_vs_shipped": median(r.gen_tps) / bg,
            # the same ratio taken round by round (each round's rows ran seconds apart), then the median
            "prompt_vs_shipped_paired": median([a / b for a, b in zip(r.prompt_tps, base.prompt_tps)]),
            "gen_vs_shipped_paired": median([a / b for a, b in zip(r.gen_tps, base.gen_tps)]),
            "prompt_tps_rounds": r.prompt_tps, "gen_tps_rounds": r.gen_tps,
            "first_tokens": r.first_tokens,
        })
    path = write_result("quant_speed", {
        "model": "SmolLM2-135M-Instruct: the shipped Q4_1 GGUF, and types quantized from its F16 dequantization",
        "settings": {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                     "rounds": rounds, "n_batch": 512, "n_ubatch": 512, "flash_attn": True, "n_ctx": ctx,
                     "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "load": {"loadavg_at_start_of_timing": list(load_start), "loadavg_at_end": list(os.getloadavg()),
                 "other_processes_cores": others, "steal_cores": steal,
                 "timing_seconds": wall},
        "results": results,
    })
    print(table([[r["qtype"], r["file_type"], f"{r['file_size'] / 1e6:.1f}", f"{r['bits_per_weight']:.2f}",
                  f"{r['repacked_mib']:.0f}", f"{(r['peak_rss_bytes'] or 0) / 2**20:.0f}", f"{r['prompt_tps']:.0f}",
                  f"{r['gen_tps']:.1f}"] for r in results],
                ["type", "file type", "MB", "bits/w", "repacked MiB", "peak RSS MiB", "prompt tok/s", "gen tok/s"]))
    print(f"\nmedians of {rounds} interleaved rounds; {args.prompt_tokens}-token prompt, "
          f"{args.gen_tokens} generated tokens, {args.threads} threads; other processes used "
          f"{others:.2f} cores and the hypervisor stole {steal:.2f} on average during timing; results in {path}")
    fastest_p = max(results, key=lambda r: r["prompt_tps"])["qtype"]
    fastest_g = max(results, key=lambda r: r["gen_tps"])["qtype"]
    print(f"fastest on this CPU: {fastest_p} (prompt), {fastest_g} (generation)")
    print(f"ratios vs {SHIPPED}:")
    print(table([[r["qtype"], f"{r['prompt_vs_shipped']:.2f}x", f"{r['gen_vs_shipped']:.2f}x",
                  f"{r['prompt_vs_shipped_paired']:.2f}x", f"{r['gen_vs_shipped_paired']:.2f}x"] for r in results],
                ["type", "prompt speed", "gen speed", "prompt, per round", "gen, per round"]))


if __name__ == "__main__":
    main()
