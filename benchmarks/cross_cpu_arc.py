"""Do the committed ARC cells hold on this CPU? The SmolLM2 rows of fslm_quality, recomputed here.

Issue 12 is checked by running ``edge-fslm eval arc`` on another machine. llama.cpp's CPU kernels
differ between instruction sets (AVX2, AVX-512, NEON), so log-likelihoods move a little, and the
stack's notes, being generated text, can change from the first token that flips. This runs the
single base model, the answer stage alone and the fine-tuned stack on the first N ARC-Easy
validation questions exactly as ``fslm_quality.py`` does (the same manifests and CLI commands),
then compares them with the committed cells on the same questions: picks that moved, the largest
log-likelihood change, each row's acc here and there, and the stack's paired edge here.

    python benchmarks/cross_cpu_arc.py --limit 300 [--reports DIR]   # DIR keeps (or reuses) the eval reports
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import RESULTS, table, write_result
from fslm_quality import SYSTEMS, answer_only_manifest, paired
from quant_arc import evaluate

ROOT = Path(__file__).resolve().parents[1]
CELLS = RESULTS / "fslm_quality"
ROWS = ("single", "answer-only", "fine-tuned")


def report(system: str, data: Path, limit: int, folder: Path, threads: int | None) -> dict:
    """``eval arc`` for one row, or the report a previous run left in ``folder``."""
    out = folder / f"{system}.json"
    if out.is_file():
        return json.loads(out.read_text())
    print(f"… {system}", file=sys.stderr, flush=True)
    return evaluate([*SYSTEMS[system], "--limit", str(limit)], data, out, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=300, help="the first N ARC-Easy validation questions")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--reports", type=Path, help="keep the eval reports here, and reuse those already there")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    SYSTEMS["answer-only"] = ["--stack", str(answer_only_manifest())]
    data = args.data_dir / "arc" / "ARC-Easy-validation.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.reports or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        here = {s: report(s, data, args.limit, folder, args.threads)["records"] for s in ROWS}
    rows, result = [], {"limit": args.limit, "rows": {}}
    for s in ROWS:
        recs = here[s]
        there = _cells(s, recs)
        acc_here = sum(r["predicted"] == r["gold"] for r in recs) / len(recs)
        acc_there = sum(r["predicted"] == r["gold"] for r in there) / len(there)
        moved = sum(a["predicted"] != b["predicted"] for a, b in zip(recs, there))
        dll = max(abs(x - y) for a, b in zip(recs, there) for x, y in zip(a["logliks"], b["logliks"]))
        entry = {"acc_here": acc_here, "acc_committed": acc_there, "picks_moved": moved, "max_abs_loglik_change": dll}
        if s == "fine-tuned":
            notes_changed = sum(a.get("notes") != b.get("notes") for a, b in zip(recs, there))
            entry["notes_changed"] = notes_changed
            for other in ("answer-only", "single"):
                entry[f"vs {other} here"] = paired(recs, here[other])
                entry[f"vs {other} committed"] = paired(there, _cells(other, recs))
        result["rows"][s] = entry
        rows.append([s, f"{acc_here:.3f}", f"{acc_there:.3f}", moved, f"{dll:.2f}"])
    print(f"ARC-Easy validation, first {args.limit} questions: this CPU against the committed cells")
    print(table(rows, ["row", "acc here", "acc committed", "picks moved", "max |Δ loglik|"]))
    ft = result["rows"]["fine-tuned"]
    for other in ("answer-only", "single"):
        h, c = ft[f"vs {other} here"], ft[f"vs {other} committed"]
        print(f"stack vs {other}: here {h['wins']}/{h['losses']} z {h['z']:+.2f}; "
              f"committed {c['wins']}/{c['losses']} z {c['z']:+.2f}")
    print(f"\nwrote {write_result('cross_cpu_arc', result)}")


def _cells(system: str, recs: list[dict]) -> list[dict]:
    """The committed records of ``system`` for the questions in ``recs``."""
    committed = {r["id"]: r for r in json.loads((CELLS / f"{system}-arc-easy-all.json").read_text())["records"]}
    return [committed[r["id"]] for r in recs]


if __name__ == "__main__":
    main()
