"""Do better notes help the answer stage? Teacher notes against the stack's own notes and none.

The fine-tuned answer stage of the *first* ``fslm-smollm2`` adapters (taught by SmolLM2 itself,
``fslm-smollm2-v1.recipe.toml``; shipped until 2026-12-03) scores each ARC choice after notes
from one of three sources, on the same questions:

* none: the notes left empty (the answer adapter alone);
* own: the notes the shipped stack's fine-tuned note stages write at run time;
* teacher: the notes Qwen2.5-Coder-1.5B-Instruct wrote for these questions, read from the
  committed distillation (``edge_fslm/stacks/fslm-smollm2-qwen/distill.jsonl``) — the oracle.

The questions are the distilled ARC *train* questions that the shipped adapters were never
trained on (their recipe took the first 150 ARC-Easy and 50 ARC-Challenge train rows), so no
evaluation split is touched and the teacher is not needed at run time. The baseline is
"none", measured in the same run; the table gives each source's accuracy, its difference in
points, and the paired wins, losses and sign-test z against "none".

Today's shipped adapters were trained on every distilled question, so none is unseen by them:
rebuild the v1 adapters first (``edge-fslm train-recipe fslm-smollm2-v1 --data-dir ../shared/data
-o build/fslm-smollm2-v1``), then

    python benchmarks/notes_oracle.py [--stack build/fslm-smollm2-v1] [--data-dir ../shared/data] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import paired_sign_test, table, write_result

ROOT = Path(__file__).resolve().parents[1]
DISTILLED = ROOT / "edge_fslm" / "stacks" / "fslm-smollm2-qwen" / "distill.jsonl"
RECIPE = ROOT / "edge_fslm" / "stacks" / "fslm-smollm2-v1.recipe.toml"


def unseen_questions(data_dir: Path) -> list:
    """Distilled ARC questions past the shipped recipe's limits: never trained on by its adapters."""
    from edge_fslm.train.data import load_arc
    from edge_fslm.train.recipe import load_recipe

    shipped = {Path(d.file).name: d.limit for d in load_recipe(RECIPE).data}
    distilled = {json.loads(line)["id"]: json.loads(line) for line in DISTILLED.read_text().splitlines()}
    out = []
    for name in ("ARC-Easy-train.jsonl", "ARC-Challenge-train.jsonl"):
        questions = load_arc(data_dir / "arc" / name)
        seen = shipped.get(name) or 0
        out += [(q, distilled[q.id]["notes"]) for q in questions[seen:] if q.id in distilled]
    return out


def score(stack, values: dict, choices: list[str]) -> int:
    from edge_fslm.evaluation.evaluate import final_prompt
    from edge_fslm.evaluation.scoring import encode, loglikelihood

    lm, context = final_prompt(stack, values)
    lls = [ll for ll, _ in loglikelihood(lm, context, [encode(lm, c) for c in choices], truncate=True)]
    return int(np.argmax(lls))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--stack", type=Path, default=ROOT / "build" / "fslm-smollm2-v1",
                    help="the stack folder train-recipe wrote for fslm-smollm2-v1")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    from edge_fslm import Stack
    from edge_fslm.evaluation.evaluate import notes_for

    items = unseen_questions(args.data_dir)
    right: dict[str, list[bool]] = {"none": [], "own": [], "teacher": []}
    t0 = time.perf_counter()
    with Stack.load(args.stack, threads=args.threads, measure_rss=False) as st:
        for q, teacher_notes in items:
            own = notes_for(st, q.question)
            empty = {"input": own["input"], **{k: "" for k in teacher_notes}}
            for source, values in (("none", empty), ("own", own), ("teacher", {"input": own["input"], **teacher_notes})):
                right[source].append(score(st, values, list(q.choices)) == q.answer)
    seconds = time.perf_counter() - t0
    n = len(items)
    acc = {k: float(np.mean(v)) for k, v in right.items()}
    rows = []
    result = {"n": n, "seconds": seconds, "questions": [q.id for q, _ in items], "sources": {}}
    for k in right:
        w, l, z = paired_sign_test(right[k], right["none"])
        rows.append([k, f"{acc[k]:.3f}", f"{100 * (acc[k] - acc['none']):+.1f}", w, l, f"{z:+.2f}"])
        result["sources"][k] = {"acc": acc[k], "points_vs_none": 100 * (acc[k] - acc["none"]),
                                "wins_vs_none": w, "losses_vs_none": l, "z_vs_none": z}
    print(f"fine-tuned answer stage on {n} distilled ARC train questions its adapters never saw ({seconds:.0f} s)")
    print(table(rows, ["notes", "acc", "points vs none", "wins", "losses", "z"]))
    print(f"\nwrote {write_result('notes_oracle', result)}")


if __name__ == "__main__":
    main()
