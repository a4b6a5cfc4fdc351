"""edge-fslm profile: the report, the timeline, and the PNG a user would open."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_fslm.errors import EdgeFSLMError
from edge_fslm.profile import DEFAULT_PROMPTS, read_prompts


def test_profile_report_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is the capital of France?\nName a primary color.\n")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    # its own process, as a user runs it: the budget bounds the whole process's RSS
    proc = subprocess.run([sys.executable, "-m", "edge_fslm.cli", "profile", "--prompts", str(prompts), "--max-tokens",
                           "6", "--budget", "400MB", "-o", str(out), "--plot", str(png)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "understand" in proc.stdout and "peak RSS" in proc.stdout and "llama.cpp:" in proc.stdout
    d = json.loads(out.read_text())
    assert d["prompts"] == 2 and [s["name"] for s in d["stages"]] == ["understand", "keywords", "context", "answer"]
    for s in d["stages"]:
        assert s["runs"] == 2 and s["peak_rss_bytes"] > 50e6 and s["ttft_seconds_median"] > 0
        assert s["prompt_tokens_per_second"] > 0
    assert d["stages"][0]["load_seconds_total"] > 0  # the one load happens in the first stage
    samples = d["rss_timeline"]["samples"]
    gaps = [b[0] - a[0] for a, b in zip(samples, samples[1:])]
    assert len(samples) > 100 and sorted(gaps)[len(gaps) // 2] <= 0.010  # sampled every ~5 ms
    assert d["totals"]["peak_rss_bytes"] <= 400e6 and d["budget_bytes"] == 400_000_000
    assert d["machine"]["physical_cores"] >= 1 and "CPU" in d["machine"]["llama_cpp_system_info"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_prompt_files(tmp_path):
    assert read_prompts(None) == DEFAULT_PROMPTS and len(DEFAULT_PROMPTS) == 10
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": 1, "prompt": "a"}\n\n{"prompt": "b"}\n')
    assert read_prompts(p) == ["a", "b"]
    p.write_text('{"id": 1}\n')
    with pytest.raises(EdgeFSLMError, match="p.jsonl:1"):
        read_prompts(p)
    with pytest.raises(EdgeFSLMError, match="cannot read prompts"):
        read_prompts(tmp_path / "missing.txt")
