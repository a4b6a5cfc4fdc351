"""Batch mode: stage-major, the same answers as single runs, and nothing lost or duplicated on SIGKILL."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_fslm import Stack
from edge_fslm.batch import read_inputs, run_batch
from edge_fslm.errors import EdgeFSLMError, PromptError

PROMPTS = [
    "What is the capital of France?",
    "Name a primary color.",
    "How many legs does a spider have?",
    "Give a synonym for happy.",
    "Why is the sky blue?",
    "What is 2 + 2?",
]
EXE = shutil.which("edge-fslm")


def write_inputs(path, prompts=PROMPTS):
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def read_results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_matches_single_runs(tmp_path):
    inp = write_inputs(tmp_path / "in.jsonl", PROMPTS[:3])
    out = tmp_path / "out.jsonl"
    with Stack.load("fslm-smollm2", max_tokens=10, preload=False) as stack:
        report = run_batch(stack, inp, out)
        singles = {p: stack.run(p) for p in PROMPTS[:3]}
    assert report.completed == 3 and report.loads == 1
    rows = read_results(out)
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"]
    for r in rows:
        single = singles[r["prompt"]]
        assert [s["output"] for s in r["stages"]] == [s.output for s in single.stages]
        assert r["answer"] == single.answer
    assert not (tmp_path / "out.jsonl.state.jsonl").exists()
    # re-running a finished batch does nothing and duplicates nothing
    with Stack.load("fslm-smollm2", max_tokens=10, preload=False) as stack:
        again = run_batch(stack, inp, out)
    assert again.completed == 0 and again.already_done == 3
    assert len(read_results(out)) == 3


def test_stage_major_loads_each_model_once(tmp_path, mixed_manifest):
    inp = write_inputs(tmp_path / "in.jsonl", PROMPTS[:4])
    with Stack.load(mixed_manifest, policy="sequential", max_tokens=6, preload=False) as stack:
        report = run_batch(stack, inp, tmp_path / "out.jsonl")
    assert report.completed == 4
    assert report.loads == 2  # prompt-major would load 2 × 4 = 8 times under this policy


def test_torn_lines_are_recovered(tmp_path):
    inp = write_inputs(tmp_path / "in.jsonl", PROMPTS[:2])
    out = tmp_path / "out.jsonl"
    state = tmp_path / "out.jsonl.state.jsonl"
    with Stack.load("fslm-smollm2", max_tokens=6, preload=False) as stack:
        run_batch(stack, inp, out)
        first = read_results(out)[0]
        # simulate a kill: only p0 finished; a half-written result line and a torn checkpoint
        out.write_text(json.dumps(first) + "\n" + '{"id": "p1", "ans')
        state.write_text('{"stack": "fslm-smollm2", "id": "p1", "stage": "underst')
        report = run_batch(stack, inp, out)
    rows = read_results(out)
    assert [r["id"] for r in rows] == ["p0", "p1"]
    assert report.completed == 1 and report.already_done == 1


def test_bad_inputs(tmp_path):
    cases = {
        '{"id": 1, "prompt": "a"}\nnot json\n': "in.jsonl:2: not valid JSON",
        '{"id": 1}\n': "expected an object with \"id\" and \"prompt\"",
        '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n': "duplicate id '1'",
        '{"id": true, "prompt": "a"}\n': "\"id\" must be a string or an integer",
        '{"id": 1, "prompt": "   "}\n': "prompt is empty",
        "\n\n": "no prompts",
    }
    for text, needle in cases.items():
        p = tmp_path / "in.jsonl"
        p.write_text(text)
        with pytest.raises(EdgeFSLMError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            read_inputs(p)
    p.write_bytes(b'{"id": 1, "prompt": "caf\xe9"}\n')
    with pytest.raises(PromptError, match="not UTF-8"):
        read_inputs(p)
    with pytest.raises(EdgeFSLMError, match="no such input file"):
        read_inputs(tmp_path / "missing.jsonl")


def test_cli_batch_errors(tmp_path):
    cmd = [EXE] if EXE else [sys.executable, "-m", "edge_fslm.cli"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    proc = subprocess.run(cmd + ["run", "--input", str(bad), "--output", str(tmp_path / "o.jsonl")], capture_output=True)
    assert proc.returncode == 2 and b"bad.jsonl:1: not valid JSON" in proc.stderr and b"Traceback" not in proc.stderr
    proc = subprocess.run(cmd + ["run", "--input", str(bad)], capture_output=True)
    assert proc.returncode == 2 and b"both --input and --output" in proc.stderr


def test_sigkill_and_resume_lose_and_duplicate_nothing(tmp_path):
    """Kill the real CLI at several points mid-batch; re-running the same command finishes the job."""
    prompts = PROMPTS * 2
    inp = write_inputs(tmp_path / "in.jsonl", prompts)
    out = tmp_path / "out.jsonl"
    cmd = ([EXE] if EXE else [sys.executable, "-m", "edge_fslm.cli"]) + [
        "run", "--input", str(inp), "--output", str(out), "--max-tokens", "8"]
    kills = 0
    for delay in (1.5, 2.5, 3.5):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    done = subprocess.run(cmd, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    rows = read_results(out)
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(f"p{i}" for i in range(len(prompts)))  # every id exactly once
    assert len(ids) == len(set(ids))
    for r in rows:
        assert len(r["stages"]) == 4 and all(s["output"] for s in r["stages"]) and r["answer"]
    assert not (tmp_path / "out.jsonl.state.jsonl").exists()
    assert kills >= 1


def test_an_old_batch_still_resumes(tmp_path):
    """Output and state files written before the redesign (commit d0b6e4c, tests/data/README.md) resume:
    the finished prompt is kept byte for byte, the checkpointed steps are reused, not run again."""
    old = Path(__file__).parent / "data" / "batch_d0b6e4c"
    for name in ("in.jsonl", "out.jsonl", "out.jsonl.state.jsonl"):
        shutil.copy(old / name, tmp_path / name)
    out, state = tmp_path / "out.jsonl", tmp_path / "out.jsonl.state.jsonl"
    kept = (old / "out.jsonl").read_bytes()
    steps = [json.loads(line) for line in (old / "out.jsonl.state.jsonl").read_text().splitlines()]
    with Stack.load("fslm-smollm2", max_tokens=4, preload=False) as stack:
        last = stack.manifest.stages[-1].name
        ran = []
        report = run_batch(stack, tmp_path / "in.jsonl", out, on_step=lambda item, trace: ran.append((item.id, trace.name)))
    assert (report.total, report.already_done, report.completed, report.resumed_steps) == (3, 1, 2, 6)
    assert ran == [("p1", last), ("p2", last)]  # only the stage no checkpoint held
    assert out.read_bytes().startswith(kept)
    rows = read_results(out)
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"]
    for r in rows[1:]:
        old_steps = [s["trace"] for s in steps if s["id"] == r["id"]]
        assert r["stages"][:-1] == old_steps and r["stages"][-1]["name"] == last and r["answer"]
    assert not state.exists()
