"""Several prompts of one stage decoded together: the same outputs as one at a time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from edge_fslm import Stack
from edge_fslm.batch import run_batch
from edge_fslm.errors import EdgeFSLMError
from edge_fslm.parallel import CTX_ROUND, seq_cells

from .test_batch import PROMPTS, read_results, write_inputs

EXE = shutil.which("edge-fslm")


def test_seq_cells_round_up_to_whole_steps():
    assert seq_cells([[0] * 10, [0] * 300], 64) == 2 * CTX_ROUND
    assert seq_cells([[0] * 10], 5) == CTX_ROUND


@pytest.mark.parametrize("stack_name, temperature", [("fslm-smollm2", None), ("fslm-smollm2-prompted", None),
                                                      ("fslm-smollm2", 0.8)])
def test_parallel_batch_equals_single_runs(tmp_path, stack_name, temperature):
    """Greedy stages (with and without adapters and repeat penalties) decode together; sampled
    stages fall back to one at a time, and both give exactly the single runs' outputs."""
    inp = write_inputs(tmp_path / "in.jsonl", PROMPTS[:5])
    out = tmp_path / "out.jsonl"
    with Stack.load(stack_name, max_tokens=12, temperature=temperature, preload=False) as stack:
        report = run_batch(stack, inp, out, parallel=3)  # 5 prompts through 3 slots
        assert all(lm.parallel is None for lm in stack.pipeline.pool._loaded.values())  # nothing left behind
        singles = {p: stack.run(p) for p in PROMPTS[:5]}
    assert report.completed == 5 and report.loads == 1
    rows = read_results(out)
    assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(5)]
    for r in rows:
        single = singles[r["prompt"]]
        assert [s["output"] for s in r["stages"]] == [s.output for s in single.stages], r["prompt"]
        assert [s["completion_tokens"] for s in r["stages"]] == [s.completion_tokens for s in single.stages]
        assert [s["stop_reason"] for s in r["stages"]] == [s.stop_reason for s in single.stages]


def test_slots_share_the_prompt_prefix_and_fit_the_budget():
    values = [{"input": p} for p in PROMPTS[:4]]
    seen = []
    with Stack.load("fslm-smollm2", max_tokens=8, preload=False) as stack:
        pipe = stack.pipeline
        together = pipe.finish_stage_group(0, values, width=2, on_trace=lambda j, t: seen.append(j))
        assert sorted(seen) == [0, 1, 2, 3]  # each reported as it finished
        assert all(t.cached_prompt_tokens > 10 for t in together)  # the system prompt went in once
        lm = next(iter(pipe.pool._loaded.values()))
        assert lm.parallel is not None and lm.parallel.n_seq == 3  # two slots and the prefix
        pipe.pool.close_parallel()
        # no spare memory: the width is halved down to one prompt at a time, with the same outputs
        alone = pipe.finish_stage_group(0, values, width=4, spare_bytes=0)
        assert lm.parallel is None
    assert [t.output for t in together] == [t.output for t in alone]


def test_bad_parallel(tmp_path):
    inp = write_inputs(tmp_path / "in.jsonl", PROMPTS[:1])
    with Stack.load("fslm-smollm2", preload=False) as stack:
        with pytest.raises(EdgeFSLMError, match="--parallel 0"):
            run_batch(stack, inp, tmp_path / "out.jsonl", parallel=0)
    cmd = [EXE] if EXE else [sys.executable, "-m", "edge_fslm.cli"]
    proc = subprocess.run(cmd + ["run", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--parallel", "0"],
                          capture_output=True)
    assert proc.returncode == 2 and b"--parallel" in proc.stderr and b"Traceback" not in proc.stderr


def test_cli_parallel_batch(tmp_path):
    inp = write_inputs(tmp_path / "in.jsonl", PROMPTS[:4])
    out = tmp_path / "out.jsonl"
    cmd = [EXE] if EXE else [sys.executable, "-m", "edge_fslm.cli"]
    proc = subprocess.run(cmd + ["run", "--input", str(inp), "--output", str(out), "-n", "8", "-np", "4"],
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    rows = read_results(out)
    assert len(rows) == 4 and all(r["answer"] and len(r["stages"]) == 4 for r in rows)
    assert json.loads(inp.read_text().splitlines()[0])["id"] == "p0"
