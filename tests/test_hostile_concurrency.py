"""One Stack shared by 8 threads × 25 calls: results identical to sequential calls (greedy),
no crash, and no cross-talk between the prompts' traces.

The stack has two short stages, the second reading the first, so a run that picked up another
thread's state would show a different output or token count in either stage.
"""

from __future__ import annotations

import threading
import time

import pytest

from edge_fslm import Stack

from edge_fslm.testing.hostile import smollm2

THREADS = 8
CALLS = 25
PROMPTS = [
    "Name a primary color.", "What is 2 + 2?", "Say hello in French.", "Name a planet.", "What is ice?",
    "Name a fruit.", "Why is the sky blue?", "Spell cat.", "Name an ocean.", "Count to three.",
    "What do bees make?", "Name a metal.",
]
MANIFEST = """
[stack]
name = "two-short-stages"
[runtime]
ctx_size = 256
[models.m]
source = "{model}"
[[stages]]
name = "first"
max_tokens = 2
template = "<|im_start|>user\\n{{input}}<|im_end|>\\n<|im_start|>assistant\\n"
[[stages]]
name = "second"
max_tokens = 1
messages = [{{ role = "user", content = "{{input}} / {{first}}" }}]
"""


def fingerprint(result) -> tuple:
    return (result.prompt, result.answer,
            tuple((s.name, s.output, s.prompt_tokens, s.completion_tokens, s.stop_reason) for s in result.stages))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    p = tmp_path_factory.mktemp("conc") / "two.toml"
    p.write_text(MANIFEST.format(model=smollm2()))
    with Stack.load(p, threads=2, measure_rss=False) as st:
        yield st


def test_eight_threads_match_sequential(stack):
    expected = {p: fingerprint(stack.run(p)) for p in PROMPTS}
    assert len({e[1:] for e in expected.values()}) > len(PROMPTS) // 2  # the prompts really differ
    got: list[tuple[str, tuple, list]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(i: int) -> None:
        try:
            start.wait()
            for j in range(CALLS):
                p = PROMPTS[(i * CALLS + j) % len(PROMPTS)]
                seen = []
                if j % 3 == 2:  # some calls stream
                    s = stack.stream(p, on_stage_end=seen.append)
                    text = "".join(s)
                    r = s.result
                    assert text == r.answer
                else:
                    r = stack.run(p, on_stage_end=seen.append)
                with lock:
                    got.append((p, fingerprint(r), [t.name for t in seen]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors[0]
    assert len(got) == THREADS * CALLS
    for p, fp, seen in got:
        assert fp == expected[p], (p, fp, expected[p])
        assert seen == ["first", "second"]  # each call's callback saw only its own stages
    print(f"{THREADS * CALLS} concurrent runs in {time.perf_counter() - t0:.1f} s")


def test_closed_stream_releases_the_stack(stack):
    """A stream closed half-way releases the stack's lock at once."""
    s = stack.stream(PROMPTS[0])
    next(iter(s), None)
    s.close()
    done = threading.Event()
    threading.Thread(target=lambda: (stack.run(PROMPTS[1]), done.set()), daemon=True).start()
    assert done.wait(60), "the next run waited on a lock held by a closed stream"


def test_abandoned_stream_does_not_deadlock(stack):
    s = stack.stream(PROMPTS[0])
    next(iter(s), None)
    del s  # no close(): dropped, e.g. by a client that disconnected
    done = threading.Event()
    threading.Thread(target=lambda: (stack.run(PROMPTS[1]), done.set()), daemon=True).start()
    try:
        assert done.wait(3), "the next run waited on a lock held by an abandoned stream"
    finally:
        import gc

        gc.collect()  # break the cycle so the waiting thread finishes and the module's stack can close
        done.wait(60)


def test_exceptions_in_one_thread_do_not_poison_the_stack(stack):
    """A run that fails (empty prompt, too long, callback raising) leaves the stack usable for everyone."""
    from edge_fslm import PromptError

    def boom(trace):
        raise RuntimeError("callback failed")

    errors = []

    def bad(i):
        for _ in range(5):
            for call in (lambda: stack.run(""), lambda: stack.run("word " * 400), lambda: stack.run("hi", on_stage_end=boom)):
                try:
                    call()
                except (PromptError, RuntimeError) as exc:
                    errors.append(type(exc).__name__)

    ts = [threading.Thread(target=bad, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert sorted(set(errors)) == ["PromptError", "RuntimeError"] and len(errors) == 60
    assert fingerprint(stack.run(PROMPTS[2]))[1]
