"""Does a faster quant type cost ARC accuracy? The base alone and the answer stage, per type.

quant_quality.py gives each type's KL and perplexity against the float reference; this gives
what a user would notice: ARC-Easy validation accuracy of the single base model and of the
fine-tuned answer stage alone (the shipped ``answer`` adapter, notes left empty), with the
base swapped for a requantized file and the adapter left as trained (on the shipped Q4_1).

Baseline, in the same run: the shipped Q4_1 file. The other files are the ones quant_quality.py
and quant_speed.py make (the shipped GGUF dequantized, converted to F16, quantized by llama.cpp),
in the same work folder; ``Q4_1`` among them is that F16 quantized back to Q4_1, which shows
what requantizing alone changes. Each row is ``edge-fslm eval arc`` in its own process; every
type is paired with the shipped file on the same questions (wins, losses, sign-test z).

    python benchmarks/quant_arc.py [--types Q4_1,IQ4_NL,Q4_0] [--limit 570] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SMOLLM2, smollm2_path, table, write_result
from fslm_quality import ANSWER_ONLY, paired

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "edge_fslm" / "stacks" / "fslm-smollm2" / "answer.gguf"


def evaluate(args: list[str], data: Path, out: Path, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "edge_fslm.cli", "eval", "arc", *args, "--data", str(data), "-o", str(out), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_1,IQ4_NL,Q4_0", help="requantized types to compare with the shipped Q4_1")
    ap.add_argument("--limit", type=int, help="first N ARC-Easy validation questions (default all 570)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "arc" / "ARC-Easy-validation.jsonl")
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "edge-fslm" / "quant-quality")
    args = ap.parse_args()

    files = {"Q4_1 (shipped)": smollm2_path()}
    for q in args.types.split(","):
        path = args.work_dir / f"smollm2.{q}.gguf"
        if not path.is_file():
            raise SystemExit(f"{path}: not made yet — run `python benchmarks/quant_quality.py --types {q}` first")
        files[q] = path
    rows, doc = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if args.limit:
            lines = [ln for ln in data.read_text(encoding="utf-8").splitlines() if ln.strip()][: args.limit]
            data = tmp / "arc.jsonl"
            data.write_text("\n".join(lines) + "\n", encoding="utf-8")
        for label, path in files.items():
            source = SMOLLM2 if label == "Q4_1 (shipped)" else str(path)
            stack = tmp / f"answer-{len(doc)}.toml"
            stack.write_text(ANSWER_ONLY.format(adapter=ADAPTER).replace(SMOLLM2, source))
            t0 = time.perf_counter()
            single = evaluate(["--stack", "fslm-smollm2-prompted", "--single", source], data, tmp / "s.json",
                              args.threads)
            answer = evaluate(["--stack", str(stack)], data, tmp / "a.json", args.threads)
            print(f"… {label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            doc[label] = {"file": str(path), "file_size": path.stat().st_size, "single": single, "answer": answer}
    base = doc["Q4_1 (shipped)"]
    summary = {}
    for label, d in doc.items():
        summary[label] = {"file_size": d["file_size"]}
        for system in ("single", "answer"):
            recs, ref = d[system]["records"], base[system]["records"]
            pair = paired(recs, ref)  # by question id, as fslm_quality pairs its rows
            wins, losses, z = pair["wins"], pair["losses"], pair["z"]
            summary[label][system] = {"acc": d[system]["acc"], "acc_norm": d[system]["acc_norm"],
                                      "acc_vs_shipped": d[system]["acc"] - base[system]["acc"],
                                      "wins": wins, "losses": losses, "z": z,
                                      "picks_changed": sum(a["predicted"] != b["predicted"] for a, b in zip(recs, ref)),
                                      "mean_seconds": d[system]["mean_seconds"]}
            rows.append([label, system, f"{d[system]['acc']:.3f}", f"{d[system]['acc_norm']:.3f}",
                         f"{(d[system]['acc'] - base[system]['acc']) * 100:+.1f}", f"{wins}/{losses}", f"{z:+.2f}",
                         f"{d[system]['mean_seconds']:.2f}"])
    n = len(base["single"]["records"])
    print(table(rows, [f"ARC-Easy validation, {n} questions", "system", "acc", "acc_norm", "vs shipped (points)",
                       "wins/losses", "z", "s/question"]))
    write_result("quant_arc", {"data": str(args.data), "questions": n, "adapter": str(ADAPTER), "results": summary})


if __name__ == "__main__":
    main()
