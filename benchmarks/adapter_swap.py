"""Adapter switch on a shared base vs reloading the model (the runtime's main edge).

Switch: ``LoadedModel.activate`` (``llama_set_adapters_lora`` + clearing the KV cache)
cycling through four rank-8 LoRA adapters on SmolLM2-135M. Baseline, measured in the
same run: ``Llama(path)`` + ``close()`` of the same file from a warm page cache, which is
what a runtime without adapter swapping pays to change stage models. Also the default
stack's own four adapters (rank 8 on every linear layer, F16), switched with every adapter
kept loaded and with ``adapter_residency = "active"``, where each switch frees the old
adapter and reads the next from its file (page cache).

    python benchmarks/adapter_swap.py [--swaps 400] [--reloads 15]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import median, p95, smollm2_path, table, write_result

from edge_fslm.testing import write_random_lora
from edge_fslm.gguf_info import read_gguf, validate_adapter
from edge_fslm.pool import LoadSettings, ModelPool, ResolvedAdapter, ResolvedModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--swaps", type=int, default=400)
    ap.add_argument("--reloads", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    path = smollm2_path()
    base = read_gguf(path)
    settings = LoadSettings(ctx_size=2048, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = []
        for i in range(4):
            p = write_random_lora(base, Path(tmp) / f"stage{i}.lora.gguf", rank=8, seed=i)
            adapters.append(ResolvedAdapter(path=p, info=validate_adapter(p, base)))
        pool = ModelPool(settings)
        lm = pool.get(ResolvedModel(id="smollm2", path=path, info=base))
        for a in adapters:  # first use loads each adapter once; not part of the switch cost
            lm.activate(a, pool.counters)
        switch = []
        for i in range(args.swaps):
            a = adapters[i % len(adapters)]
            t0 = time.perf_counter()
            lm.activate(a, pool.counters)
            switch.append(time.perf_counter() - t0)
        # llama.cpp may defer work to the next decode (the graph is rebuilt for a new adapter
        # set), so also time one decode step right after a switch against one without a switch.
        tokens = lm.llm.tokenize(b"The capital of France is", add_bos=False)

        def decode_after(swap: bool, i: int) -> float:
            if swap:
                lm.activate(adapters[i % len(adapters)], pool.counters)
            else:
                lm.clear_kv()
            lm.llm.eval(tokens[:-1])
            t0 = time.perf_counter()
            lm.llm.eval(tokens[-1:])
            return time.perf_counter() - t0

        after_swap, steady = [], []
        for i in range(60):
            after_swap.append(decode_after(True, i))
            steady.append(decode_after(False, i))
        pool.close()

    shipped = sorted(Path(__file__).resolve().parents[1].joinpath("edge_fslm/stacks/fslm-smollm2").glob("*.gguf"))
    shipped_adapters = [ResolvedAdapter(path=p, info=validate_adapter(p, base)) for p in shipped]
    shipped_switch: dict[str, list[float]] = {}
    for residency in ("all", "active"):
        pool = ModelPool(replace(settings, adapter_residency=residency))
        lm = pool.get(ResolvedModel(id="smollm2", path=path, info=base))
        for a in shipped_adapters:
            lm.activate(a, pool.counters)
        times = []
        for i in range(args.swaps):
            t0 = time.perf_counter()
            lm.activate(shipped_adapters[i % len(shipped_adapters)], pool.counters)
            times.append(time.perf_counter() - t0)
        shipped_switch[residency] = times
        pool.close()

    from llama_cpp import Llama

    Llama(str(path), n_ctx=2048, n_threads=args.threads, verbose=False).close()  # warm the page cache
    reload = []
    for _ in range(args.reloads):
        t0 = time.perf_counter()
        llm = Llama(str(path), n_ctx=2048, n_threads=args.threads, flash_attn=True, verbose=False)
        reload.append(time.perf_counter() - t0)
        llm.close()

    sw_med, sw_p95, rl_med = median(switch), p95(switch), median(reload)
    deferred = median(after_swap) - median(steady)
    rows = [
        ["adapter switch (activate)", f"{sw_med * 1e3:.3f}", f"{sw_p95 * 1e3:.3f}", len(switch)],
        ["1-token decode, no switch", f"{median(steady) * 1e3:.3f}", f"{p95(steady) * 1e3:.3f}", len(steady)],
        ["1-token decode after a switch", f"{median(after_swap) * 1e3:.3f}", f"{p95(after_swap) * 1e3:.3f}", len(after_swap)],
        ["reload Llama(...) warm cache", f"{rl_med * 1e3:.1f}", f"{p95(reload) * 1e3:.1f}", len(reload)],
        *[[f"default stack's adapters, {'all kept' if r == 'all' else 'one at a time (reads the file)'}",
           f"{median(t) * 1e3:.3f}", f"{p95(t) * 1e3:.3f}", len(t)] for r, t in shipped_switch.items()],
    ]
    print(table(rows, ["operation", "median ms", "p95 ms", "n"]))
    print()
    print(f"adapter switch median: {sw_med * 1e3:.3f} ms (target ≤ 1 ms): {'PASS' if sw_med <= 1e-3 else 'FAIL'}")
    print(f"switch + deferred decode cost: {(sw_med + max(deferred, 0)) * 1e3:.3f} ms")
    print(f"reload / switch: {rl_med / sw_med:.0f}× (switch call), "
          f"{rl_med / (sw_med + max(deferred, 0)):.0f}× (switch + deferred decode cost)")
    write_result("adapter_swap", {
        "model": path.name,
        "adapters": {"count": 4, "rank": 8, "targets": ["attn_q", "attn_v"], "bytes_each": adapters[0].info.tensor_bytes},
        "switch_seconds": {"median": sw_med, "p95": sw_p95, "min": min(switch), "max": max(switch), "n": len(switch)},
        "reload_seconds": {"median": rl_med, "p95": p95(reload), "n": len(reload)},
        "decode_1_token_seconds": {"after_switch_median": median(after_swap), "no_switch_median": median(steady)},
        "deferred_switch_cost_seconds": deferred,
        "ratio_reload_over_switch": rl_med / sw_med,
        "default_stack_adapters": {
            "bytes_each": shipped_adapters[0].info.tensor_bytes,
            **{f"switch_seconds_{r}": {"median": median(t), "p95": p95(t), "n": len(t)} for r, t in shipped_switch.items()},
            "one_at_a_time_over_all_kept": median(shipped_switch["active"]) / median(shipped_switch["all"]),
            "reload_over_one_at_a_time": rl_med / median(shipped_switch["active"]),
        },
        "target_switch_median_seconds": 1e-3,
        "pass": sw_med <= 1e-3,
    })


if __name__ == "__main__":
    main()
