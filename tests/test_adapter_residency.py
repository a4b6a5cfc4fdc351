"""Adapter residency: every LoRA adapter kept loaded, or only the active one, on real models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edge_fslm import Stack
from edge_fslm.batch import run_batch
from edge_fslm.errors import BudgetError, GGUFError, ManifestError
from edge_fslm.gguf_info import read_gguf
from edge_fslm.plan import prepare_stack

from .conftest import adapted_manifest, write_manifest

MB = 1_000_000
PROMPT = "Why is the sky blue?"
FILLS_UBATCH = "The quick brown fox jumps over the lazy dog. " * 60  # past 512 tokens, truncated to fit


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, smollm2_path, adapters) -> str:
    """Four one-line stages on SmolLM2, each with its own random adapter, so each stage says something else."""
    return adapted_manifest(tmp_path_factory.mktemp("residency"), smollm2_path, adapters)


def test_one_adapter_at_a_time_says_the_same(adapted):
    outputs = {}
    for residency in ("all", "active"):
        with Stack.load(adapted, adapter_residency=residency, preload=False) as stack:
            assert stack.plan.adapter_residency == residency
            first, second = stack.run(PROMPT), stack.run(PROMPT)
            lm = stack.pipeline.pool.get(next(iter(stack.pipeline.models.values())))
            held = len(lm.adapters)
        assert first.adapter_swaps == second.adapter_swaps == 4
        outputs[residency] = [s.output for s in first.stages + second.stages]
        if residency == "all":
            assert (first.adapter_loads, second.adapter_loads, held) == (4, 0, 4)
        else:  # every swap reads the next adapter again, and only the active one stays loaded
            assert (first.adapter_loads, second.adapter_loads, held) == (4, 4, 1)
    assert outputs["all"] == outputs["active"]
    assert len(set(outputs["all"][:4])) > 1  # the adapters really differ, so a wrong one would show


def test_the_plan_counts_one_adapter_and_auto_takes_it_only_when_the_budget_needs_it(adapted, adapters):
    adapter_bytes = [read_gguf(a).tensor_bytes for a in adapters.values()]
    _, _, _, roomy = prepare_stack(adapted)
    _, _, _, lean = prepare_stack(adapted, adapter_residency="active")
    (fp_all,), (fp_one,) = roomy.footprints.values(), lean.footprints.values()
    assert (roomy.adapter_residency, fp_all.adapters) == ("all", sum(adapter_bytes))
    assert (lean.adapter_residency, fp_one.adapters) == ("active", max(adapter_bytes))
    between = (roomy.predicted_peak + lean.predicted_peak) // 2
    assert prepare_stack(adapted, budget=roomy.predicted_peak + MB)[3].adapter_residency == "all"
    squeezed = prepare_stack(adapted, budget=between)[3]
    assert squeezed.fits and squeezed.adapter_residency == "active"
    with pytest.raises(BudgetError):  # told to keep every adapter, the same budget is too small
        Stack.load(adapted, budget=between, adapter_residency="all")
    with pytest.raises(BudgetError, match="needs at least"):  # the smallest budget named is the lean plan's
        Stack.load(adapted, budget=lean.predicted_peak - 20 * MB)


def test_one_adapter_at_a_time_costs_less_peak_memory_and_stays_within_its_plan():
    """The default stack in fresh processes: the same answer, at least two adapters' bytes less peak RSS.

    The prompt fills the 512-token micro-batch at ctx 512: the worst case the plan predicts, so
    the plan must be within 10% of the peak there (a short prompt leaves the micro-batch's
    compute pages untouched; see test_memory.test_run_respects_tightest_budget)."""
    peaks, answers = {}, {}
    for residency in ("all", "active"):
        proc = subprocess.run(
            [sys.executable, "-m", "edge_fslm.cli", "run", "-", "--json", "-n", "8", "--ctx-size", "512",
             "--truncate", "--adapter-residency", residency],
            input=FILLS_UBATCH.encode(), capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()
        d = json.loads(proc.stdout)
        assert d["stages"][0]["prompt_tokens"] > 480
        assert d["peak_rss_bytes"] <= d["predicted_peak_rss_bytes"] <= d["peak_rss_bytes"] * 1.10, residency
        peaks[residency], answers[residency] = d["peak_rss_bytes"], [s["output"] for s in d["stages"]]
    assert answers["all"] == answers["active"]
    assert peaks["all"] - peaks["active"] > 2 * 4.9 * MB, peaks


def test_parallel_batches_with_one_adapter_at_a_time_say_the_same(adapted, tmp_path):
    """The multi-sequence context sets adapters too: nothing it still uses may be freed under it."""
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in
                               enumerate([PROMPT, "Name a fruit.", "What is 2 + 2?", "Say hello."])))
    results = {}
    for residency, parallel in (("all", 1), ("active", 2)):
        out = tmp_path / f"{residency}.jsonl"
        with Stack.load(adapted, adapter_residency=residency, preload=False) as stack:
            run_batch(stack, prompts, out, parallel=parallel)
        results[residency] = [json.loads(line) for line in out.read_text().splitlines()]
    strip = lambda rows: [(r["id"], r["answer"], [s["output"] for s in r["stages"]]) for r in rows]  # noqa: E731
    assert strip(results["active"]) == strip(results["all"])


def test_eval_scores_the_same_with_one_adapter_at_a_time():
    """What issue 12 measures memory on: ARC scoring, through the CLI, both ways."""
    from pathlib import Path

    data = Path(__file__).resolve().parent / "data" / "arc_easy_validation_tiny.jsonl"  # 5 ARC-Easy validation rows
    reports = {}
    for residency in ("all", "active"):
        proc = subprocess.run([sys.executable, "-m", "edge_fslm.cli", "eval", "arc", "-d", str(data), "--limit", "2",
                               "-n", "8", "--json", "--adapter-residency", residency], capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()
        reports[residency] = json.loads(proc.stdout)
    scores = {r: [(x["id"], x["logliks"], x["notes"]) for x in reports[r]["records"]] for r in reports}
    assert scores["all"] == scores["active"]
    assert reports["active"]["peak_rss_bytes"] < reports["all"]["peak_rss_bytes"]


def test_an_adapter_rewritten_after_validation_is_refused(adapted, adapters, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    text = open(adapted).read()
    src = str(adapters["answer"])
    dst = folder / "answer.lora.gguf"
    dst.write_bytes(open(src, "rb").read())
    m = write_manifest(folder, text.replace(src, str(dst)))
    with Stack.load(m, adapter_residency="active", preload=False) as stack:
        stack.run(PROMPT)
        dst.write_bytes(dst.read_bytes())  # same bytes, a new write: llama.cpp must not read it unchecked
        os.utime(dst, ns=(1, 1))
        with pytest.raises(GGUFError, match="answer.lora.gguf: the file changed on disk after it was validated"):
            stack.run(PROMPT)


def test_a_manifest_names_the_residency(adapted, tmp_path):
    text = open(adapted).read().replace('[stack]\n', '[runtime]\nadapter_residency = "active"\n[stack]\n', 1)
    with Stack.load(write_manifest(tmp_path, text), preload=False) as stack:
        assert stack.plan.adapter_residency == "active"
    bad = text.replace('"active"', '"some"')
    with pytest.raises(ManifestError, match=r"bad\.toml: runtime: adapter_residency: expected one of auto, all, active,"
                                            r" got 'some'"):
        Stack.load(write_manifest(tmp_path, bad, name="bad.toml"))
