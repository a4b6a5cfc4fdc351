"""Several prompts of one stage decoded together (batch --parallel).

What holds exactly, and is asserted: each prompt's prompt evaluation (shared prefix
copied, split where the sequential path splits it, adapters) gives bit-identical logits, so
with one token per stage every answer equals a one-at-a-time run; the fallbacks (sampled
stages, no room in the budget) are the sequential path itself. Whole answers are identical
too, with flash attention on and off (edge_fslm/parallel.py says what that takes).
"""

from __future__ import annotations

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
FACT = ("Photosynthesis turns light into chemical energy stored in sugar. Plants, algae and some bacteria"
        " do it, and nearly every food web rests on them. ")
# short ones, and ones whose stage prompts pass 256 tokens, where a lone decode's attention
# kernel changes (edge_fslm/parallel.py): each step then holds sequences on both sides of it
LONG_PROMPTS = [PROMPTS[0], FACT * 6 + "Why do food webs depend on plants?", PROMPTS[4],
                FACT * 9 + "Summarise this in one sentence.", PROMPTS[2], FACT * 3 + "What do plants store energy in?"]


def test_seq_cells_round_up_to_whole_steps():
    assert seq_cells([[0] * 10, [0] * 300], 64) == 2 * CTX_ROUND
    assert seq_cells([[0] * 10], 5) == CTX_ROUND


def batch_and_singles(tmp_path, stack_name, prompts, parallel, **load):
    inp = write_inputs(tmp_path / "in.jsonl", prompts)
    out = tmp_path / "out.jsonl"
    with Stack.load(stack_name, preload=False, **load) as stack:
        report = run_batch(stack, inp, out, parallel=parallel)
        assert all(lm.parallel is None for lm in stack.pipeline.pool.loaded)  # nothing left behind
        singles = {p: stack.run(p) for p in prompts}
    assert report.completed == len(prompts) and report.loads == 1
    rows = read_results(out)
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(len(prompts)))
    return rows, singles


@pytest.mark.parametrize("stack_name", ["fslm-smollm2", "fslm-smollm2-prompted"])
def test_prompt_evaluation_is_bit_identical(tmp_path, stack_name):
    """One token per stage: each stage's only token comes straight from the prompt's logits."""
    rows, singles = batch_and_singles(tmp_path, stack_name, PROMPTS[:5], 3, max_tokens=1)
    for r in rows:
        single = singles[r["prompt"]]
        assert [s["output"] for s in r["stages"]] == [s.output for s in single.stages], r["prompt"]
        assert all(s["cached_prompt_tokens"] > 10 for s in r["stages"])  # the shared prefix went in once


@pytest.mark.parametrize("stack_name,flash_attn", [("fslm-smollm2", True), ("fslm-smollm2-prompted", True),
                                                   ("fslm-smollm2", False)])
def test_whole_answers_are_identical(tmp_path, stack_name, flash_attn):
    """Every stage's whole greedy answer, at its own max_tokens, with slots refilled as prompts
    finish (6 prompts, 4 slots) so each step holds sequences at different lengths, some past 256
    tokens. This needs a llama.cpp built without llamafile (scripts/install.sh) and, with flash
    attention on, slots past LONE_FROM decoded alone: the two kernels that differ between a lone
    decode and a batched one (benchmarks/batch_invariance.py)."""
    from edge_fslm.llama import system_info

    assert "LLAMAFILE = 1" not in system_info(), "this llama.cpp was built with llamafile: run scripts/install.sh"
    rows, singles = batch_and_singles(tmp_path, stack_name, LONG_PROMPTS, 4, flash_attn=flash_attn)
    assert max(s["prompt_tokens"] + s["completion_tokens"] for r in rows for s in r["stages"]) > 300
    for r in rows:
        single = singles[r["prompt"]]
        assert [s["output"] for s in r["stages"]] == [s.output for s in single.stages], r["prompt"]
        assert r["answer"] == single.answer


def test_longer_answers_complete(tmp_path):
    rows, singles = batch_and_singles(tmp_path, "fslm-smollm2", PROMPTS[:5], 3, max_tokens=12)
    for r in rows:
        assert r["answer"] and len(r["stages"]) == 4
        for s in r["stages"]:
            assert s["output"] and 1 <= s["completion_tokens"] <= 12 and s["stop_reason"] in ("eos", "stop", "length")
        assert r["stages"][0]["output"][:8] == singles[r["prompt"]].stages[0].output[:8]  # same start


def test_sampled_stages_run_one_at_a_time(tmp_path):
    rows, singles = batch_and_singles(tmp_path, "fslm-smollm2", PROMPTS[:3], 3, max_tokens=12, temperature=0.8)
    for r in rows:
        assert [s["output"] for s in r["stages"]] == [s.output for s in singles[r["prompt"]].stages]


def test_slots_report_each_prompt_and_fit_the_budget():
    values = [{"input": p} for p in PROMPTS[:4]]
    seen = []
    with Stack.load("fslm-smollm2", max_tokens=1, preload=False) as stack:
        pipe = stack.pipeline
        together = pipe.finish_stage_group(0, values, width=2, on_trace=lambda j, t: seen.append(j))
        assert sorted(seen) == [0, 1, 2, 3]  # each reported as it finished
        lm = pipe.pool.get(next(iter(pipe.models.values())))  # loaded already: no load
        assert lm.parallel is not None and lm.parallel.n_seq == 3  # two slots and the prefix
        pipe.pool.close_parallel()
        assert lm.parallel is None
        # no spare memory: the width is halved down to one prompt at a time
        alone = pipe.finish_stage_group(0, values, width=4, spare_bytes=0)
        assert lm.parallel is None
    assert [t.output for t in together] == [t.output for t in alone]


def test_grouped_pieces_are_the_sequential_pieces():
    """``on_piece`` hears each prompt's text as it is decoded, in the pieces a one-at-a-time run
    yields (the server streams grouped requests with it), and listening changes no output."""
    values = [{"input": p} for p in PROMPTS[:4]]
    with Stack.load("fslm-smollm2", max_tokens=16, preload=False) as stack:
        pipe = stack.pipeline
        heard: dict[int, list[str]] = {j: [] for j in range(len(values))}
        together = pipe.finish_stage_group(0, values, width=4, on_piece=lambda j, t: heard[j].append(t))
        quiet = pipe.finish_stage_group(0, values, width=4)
        pipe.pool.close_parallel()
        fallback: dict[int, list[str]] = {j: [] for j in range(len(values))}  # no room: one at a time
        pipe.finish_stage_group(0, values, width=4, spare_bytes=0, on_piece=lambda j, t: fallback[j].append(t))
        alone = [list(pipe.run_stage(0, v)) for v in values]  # the lone path's pieces
    assert [t.output for t in together] == [t.output for t in quiet] == ["".join(a) for a in alone]
    assert list(heard.values()) == list(fallback.values()) == alone
    assert all(len(a) > 1 for a in alone)


def test_a_dropped_prompt_leaves_its_slot_at_once_and_the_others_keep_their_answers():
    """A grouped prompt nobody waits for any more (a server request whose client hung up) stops at
    the next step with no trace, its slot goes to the next prompt, and every other answer is the
    one it gets without the drop; the one-at-a-time fallback stops it at its next piece."""
    values = [{"input": p} for p in PROMPTS[:5]]
    with Stack.load("fslm-smollm2", max_tokens=24, preload=False) as stack:
        pipe = stack.pipeline
        alone = [list(pipe.run_stage(0, v)) for v in values]
        assert len(alone[0]) > 4  # long enough to be cut short

        def run(spare_bytes=None):
            heard: dict[int, list[str]] = {j: [] for j in range(len(values))}
            traced: dict[int, str] = {}

            def dropped(j: int) -> bool:  # prompt 0 hangs up after two pieces; prompt 3 before it starts
                return (j == 0 and len(heard[0]) >= 2) or j == 3

            before = pipe.pool.counters.snapshot()
            pipe.finish_stage_group(0, values, width=2, spare_bytes=spare_bytes, dropped=dropped,
                                    on_piece=lambda j, t: heard[j].append(t),
                                    on_trace=lambda j, t: traced.__setitem__(j, t.output))
            return heard, traced, pipe.pool.counters.since(before).parallel_drops

        for spare in (None, 0):  # grouped, then no room for a group: one at a time
            heard, traced, drops = run(spare)
            assert sorted(traced) == [1, 2, 4], spare
            assert all(traced[j] == "".join(alone[j]) and heard[j] == alone[j] for j in traced), spare
            assert heard[0] == alone[0][:2] and heard[3] == [], spare  # nothing after the hang-up
            assert drops == (1 if spare is None else 0), spare  # only a slot in a group is a drop
        pipe.pool.close_parallel()


def test_bad_parallel(tmp_path):
    inp = write_inputs(tmp_path / "in.jsonl", PROMPTS[:1])
    with Stack.load("fslm-smollm2", preload=False) as stack:
        with pytest.raises(EdgeFSLMError, match="parallel=0"):
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


def test_llama_cpp_failures_in_the_parallel_path_are_one_clear_error(tmp_path, monkeypatch):
    """Fault injection: llama.cpp refusing the multi-sequence context, then failing a parallel decode.

    Each is one EdgeFSLMError that says to lower parallel (the CLI says --parallel), and the
    stack still runs prompts one at a time afterwards.
    """
    import ctypes

    import llama_cpp

    inp = write_inputs(tmp_path / "in.jsonl", PROMPTS[:3])
    with Stack.load("fslm-smollm2", max_tokens=4, preload=False) as stack:
        stack.run("warm up")  # the model and its own context exist before anything is patched
        monkeypatch.setattr(llama_cpp, "llama_init_from_model", lambda model, params: None)
        with pytest.raises(EdgeFSLMError, match="could not create a 3-sequence context .* — lower parallel"):
            run_batch(stack, inp, tmp_path / "a.jsonl", parallel=2)
        monkeypatch.undo()

        created: set[int] = set()
        real_init, real_decode = llama_cpp.llama_init_from_model, llama_cpp.llama_decode

        def init(model, params):
            ctx = real_init(model, params)
            created.add(ctypes.cast(ctx, ctypes.c_void_p).value)
            return ctx

        def decode(ctx, batch):  # fails only on the parallel context, after its prefix is built
            if ctypes.cast(ctx, ctypes.c_void_p).value in created and batch.n_tokens <= 2:
                return 1
            return real_decode(ctx, batch)

        monkeypatch.setattr(llama_cpp, "llama_init_from_model", init)
        monkeypatch.setattr(llama_cpp, "llama_decode", decode)
        with pytest.raises(EdgeFSLMError, match="llama_decode failed with code 1 in a parallel batch — lower parallel"):
            run_batch(stack, inp, tmp_path / "b.jsonl", parallel=2)
        monkeypatch.undo()
        assert stack.run("still works").answer  # the sequential path is untouched


def test_a_kept_context_reuses_its_shared_prefixes():
    """The server keeps the multi-sequence context across request groups (serve/scheduler.py).
    Each stage's shared prefix is then evaluated once and restored from its saved sequence state
    by the next group, with the answers of evaluating it again and of one-at-a-time runs."""
    def group(pipe) -> list[list[str]]:
        rows = [{"input": p} for p in PROMPTS[:3]]
        out: list[list[str]] = [[] for _ in rows]
        pipe.run_stage_major(rows, width=2, on_trace=lambda k, i, t: out[k].append(t.output),
                             on_error=lambda k, exc: pytest.fail(str(exc)))
        return out

    with Stack.load("fslm-smollm2", max_tokens=4, preload=False) as stack:
        pipe, c = stack.pipeline, stack.pipeline.pool.counters
        n = len(stack.manifest.stages)
        first = group(pipe)
        assert (c.parallel_opens, c.parallel_prefix_evals, c.parallel_prefix_reuses) == (1, n, 0)
        again = group(pipe)  # a second group on the kept context: nothing opened or evaluated again
        assert (c.parallel_opens, c.parallel_prefix_evals, c.parallel_prefix_reuses) == (1, n, n)
        lm = next(lm for lm in pipe.pool.loaded if lm.parallel is not None)
        assert len(lm.parallel.prefixes) == n and lm.parallel.prefix_bytes > 0
        # the last stage's prefix is still in place: a group of that stage alone keeps it as it is
        rows = [{"input": p, **{s.name: o for s, o in zip(stack.manifest.stages, outs)}}
                for p, outs in zip(PROMPTS[:3], first)]
        kept = [t.output for t in pipe.finish_stage_group(n - 1, rows, width=2)]
        assert c.parallel_prefix_reuses == n + 1 and c.parallel_prefix_evals == n
        pipe.pool.close_parallel()
        assert lm.parallel is None
        singles = [[s.output for s in stack.run(p).stages] for p in PROMPTS[:3]]
    assert first == again == singles
    assert kept == [s[-1] for s in singles]
