"""Do the stack's notes help its answer stage? One set of notes, several answer adapters, paired.

Issue 12's goal is a stack that beats its own answer stage alone. This measures exactly that on
an ARC validation split, with the scoring of ``edge-fslm eval arc`` (the same functions): the
stack's note stages write their notes for every question once (cached in a resumable JSONL), and
then each answer adapter scores the choices

* after those notes: the stack, as ``eval arc --stack`` runs it;
* after empty notes: the answer adapter alone, as ``eval arc`` runs the answer-only manifest;

beside the bare base model (``eval arc --single``). All rows are on the same questions, so the
table gives paired wins, losses and the sign-test z of each stack against its answer-only row and
against the single model.

The same notes, written for the recipe's *train* questions, are what ``--train-rows`` turns into
answer-stage training rows: the answer stage then learns from the notes it will really read at
run time, not the teacher's (issue 12's first direction).

    python benchmarks/answer_notes.py --stack build/fslm-smollm2-qwen \\
        --answer teacher-notes=build/fslm-smollm2-qwen/fslm-smollm2/answer.gguf \\
        [--answer student-notes=build/student-notes/answer.gguf] [--split ARC-Easy-validation] [--limit N]
    python benchmarks/answer_notes.py --stack build/fslm-smollm2-qwen --train-rows build/student-notes/data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from common import paired_sign_test, table, write_result

ROOT = Path(__file__).resolve().parents[1]


def cached_notes(stack, items: list[tuple[str, str]], cache: Path) -> dict[str, dict]:
    """``id -> values`` (input plus every note), computing only the ids not in ``cache`` yet."""
    from edge_fslm.evaluation.evaluate import notes_for
    from edge_fslm.jsonl import Appender, read_records

    have = {r["id"]: r["values"] for r in read_records(cache, ("id", "values"), "notes")} if cache.exists() else {}
    todo = [(i, t) for i, t in items if i not in have]
    if todo:
        cache.parent.mkdir(parents=True, exist_ok=True)
        out = Appender(cache)
        t0 = time.perf_counter()
        try:
            for k, (qid, text) in enumerate(todo, 1):
                have[qid] = notes_for(stack, text)
                out.write({"id": qid, "values": have[qid]})
                if k % 25 == 0:
                    print(f"  notes {k}/{len(todo)} ({(time.perf_counter() - t0) / k:.2f} s each)", flush=True)
        finally:
            out.close()
    return have


def with_answer(stack_dir: Path, adapter: Path | None):
    """The stack's manifest with its answer stage's adapter replaced (None: the bare base)."""
    from edge_fslm.manifest import AdapterSpec, load_stack

    m = load_stack(stack_dir / "stack.toml")  # the manifest file itself: trusted to name an absolute path
    last = m.stages[-1]
    spec = AdapterSpec(source=str(adapter.resolve())) if adapter else None
    return dataclasses.replace(m, stages=(*m.stages[:-1], dataclasses.replace(last, adapter=spec)))


def score(stack, values: dict, choices: list[str]) -> int:
    from edge_fslm.evaluation.evaluate import final_prompt
    from edge_fslm.evaluation.scoring import encode, loglikelihood

    lm, context = final_prompt(stack, values)
    lls = [ll for ll, _ in loglikelihood(lm, context, [encode(lm, c) for c in choices], truncate=True)]
    return int(np.argmax(lls))


def single_right(questions, threads: int | None) -> list[bool]:
    """The bare base model, exactly as ``eval arc --single`` scores it."""
    from edge_fslm.evaluation.evaluate import ARC_CONTEXT, load_eval_stack, score_single

    from common import SMOLLM2

    with load_eval_stack("fslm-smollm2", SMOLLM2, chat=False, threads=threads) as st:
        out = []
        for q in questions:
            lls = [ll for ll, _ in score_single(st, ARC_CONTEXT.format(question=q.question), [" " + c for c in q.choices])]
            out.append(int(np.argmax(lls)) == q.answer)
        return out


def write_train_rows(stack_dir: Path, data_dir: Path, out: Path, threads: int | None) -> None:
    """The recipe's answer rows with the student's own notes in place of the teacher's."""
    from edge_fslm import Stack
    from edge_fslm.jsonl import read_records
    from edge_fslm.train.distill import STAGE_ROW_KEYS

    teacher_rows = read_records(stack_dir / "data" / "answer.jsonl", STAGE_ROW_KEYS, "training rows")
    with Stack.load(stack_dir, threads=threads, measure_rss=False) as st:
        notes = cached_notes(st, [(r["id"], r["values"]["input"]) for r in teacher_rows], out / "notes.jsonl")
    tmp = out / "answer.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in teacher_rows:
            fh.write(json.dumps({**r, "values": notes[r["id"]]}, ensure_ascii=False) + "\n")
    tmp.replace(out / "answer.jsonl")
    print(f"wrote {out / 'answer.jsonl'}: {len(teacher_rows)} answer rows on the student's own notes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", type=Path, required=True, help="a stack folder (its note stages write the notes)")
    ap.add_argument("--answer", action="append", default=[], metavar="NAME=ADAPTER.gguf",
                    help="an answer adapter to score (repeatable); default: the stack's own")
    ap.add_argument("--split", default="ARC-Easy-validation")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--train-rows", type=Path, help="write student-notes answer rows here instead of scoring")
    args = ap.parse_args()
    from edge_fslm import Stack
    from edge_fslm.train.data import load_arc

    if args.train_rows:
        write_train_rows(args.stack, args.data_dir, args.train_rows, args.threads)
        return
    questions = load_arc(args.data_dir / "arc" / f"{args.split}.jsonl")[: args.limit]
    if "train" in args.split.lower():
        raise SystemExit("error: score on a validation split; train questions are what the adapters learned from")
    answers = {}
    for spec in args.answer or [f"stack={args.stack / 'fslm-smollm2' / 'answer.gguf'}"]:
        name, _, path = spec.partition("=")
        answers[name] = Path(path)
    t0 = time.perf_counter()
    cache = args.stack / "eval-notes" / f"{args.split}.jsonl"
    with Stack.load(args.stack, threads=args.threads, measure_rss=False) as st:
        notes = cached_notes(st, [(q.id, q.question) for q in questions], cache)
    right: dict[str, list[bool]] = {"single": single_right(questions, args.threads)}
    for name, adapter in answers.items():
        with Stack.load(with_answer(args.stack, adapter), threads=args.threads, measure_rss=False) as st:
            note_names = [s.name for s in st.manifest.stages[:-1]]
            stack_r, alone_r = [], []
            for q in questions:
                values = notes[q.id]
                empty = {"input": values["input"], **{k: "" for k in note_names}}
                stack_r.append(score(st, values, list(q.choices)) == q.answer)
                alone_r.append(score(st, empty, list(q.choices)) == q.answer)
            right[f"{name}: stack"] = stack_r
            right[f"{name}: answer alone"] = alone_r
    seconds = time.perf_counter() - t0
    acc = {k: float(np.mean(v)) for k, v in right.items()}
    rows, result = [], {"split": args.split, "n": len(questions), "seconds": seconds, "stack": str(args.stack),
                        "answers": {k: str(v) for k, v in answers.items()}, "rows": {}}
    for k, v in right.items():
        entry = {"acc": acc[k]}
        cells = [k, f"{acc[k]:.3f}", "", "", ""]
        if k.endswith(": stack"):
            alone = k.replace(": stack", ": answer alone")
            w, l, z = paired_sign_test(v, right[alone])
            ws, ls, zs = paired_sign_test(v, right["single"])
            entry.update(points_vs_answer_alone=100 * (acc[k] - acc[alone]), wins_vs_answer_alone=w,
                         losses_vs_answer_alone=l, z_vs_answer_alone=z, points_vs_single=100 * (acc[k] - acc["single"]),
                         wins_vs_single=ws, losses_vs_single=ls, z_vs_single=zs)
            cells[2:] = [f"{100 * (acc[k] - acc[alone]):+.1f}", f"{w}/{l} z {z:+.2f}",
                         f"{100 * (acc[k] - acc['single']):+.1f} ({ws}/{ls} z {zs:+.2f})"]
        result["rows"][k] = entry
        rows.append(cells)
    print(f"{args.split}: {len(questions)} questions, acc by log-likelihood as eval arc scores it ({seconds:.0f} s)")
    print(table(rows, ["row", "acc", "pts vs its answer alone", "wins/losses", "vs single base"]))
    # one result file per split: ARC-Easy validation keeps the original name
    name = "answer_notes" if args.split == "ARC-Easy-validation" else f"answer_notes_{args.split.lower().replace('-', '_')}"
    print(f"\nwrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
