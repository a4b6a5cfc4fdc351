"""Hostile prompts through the CLI and the Python API: empty, not UTF-8, control characters,
longer than the context, and 1 MB of text (refused fast without --truncate, run with it).

The long-prompt runs use a one-stage SmolLM2 manifest with a 256-token context, so a truncated
prompt costs a few hundred tokens of prompt evaluation, not a whole 2048-token context.
"""

from __future__ import annotations

import random
import time

import pytest

from edge_fslm import PromptError, Stack
from edge_fslm.pipeline import clean_prompt
from edge_fslm.stage import max_token_bytes

from edge_fslm.testing.hostile import assert_clean_refusal, cli, smollm2, stack_for

CTX = 256


def megabyte_of_text() -> str:
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "under", "blue", "sky", "why"]
    text = " ".join(rng.choice(words) for _ in range(260_000))
    return text[: 1 << 20]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    return stack_for(d, smollm2(), template="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                     max_tokens=4, ctx_size=CTX)


@pytest.fixture(scope="module")
def stack(manifest):
    with Stack.load(manifest, threads=1) as st:
        yield st


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("prompt", ["", "   ", " \n\t\r\n "])
def test_cli_empty_prompt(prompt, manifest):
    assert_clean_refusal(cli("run", prompt, "--stack", str(manifest)), "prompt is empty")


def test_cli_control_characters_only(manifest):
    assert_clean_refusal(cli("run", "\x1b\x07\x01\x7f", "--stack", str(manifest)), "prompt is empty")


@pytest.mark.parametrize("data, needle", [(b"", "prompt is empty"), (b"caf\xe9 \xff\xfe", "not valid UTF-8"),
                                          (b"\x00\x00\x1b\x07", "prompt is empty"),
                                          (b"ok \xed\xa0\x80 surrogate", "not valid UTF-8")])
def test_cli_bad_stdin(data, needle, manifest):
    assert_clean_refusal(cli("run", "-", "--stack", str(manifest), stdin=data), needle)


def test_cli_control_characters_are_dropped(manifest):
    proc = cli("run", "-", "--stack", str(manifest), "--json", stdin=b"Say \x00hi\x1b[31m to\x07 me\x08.")
    assert proc.returncode == 0, proc.err
    assert proc.stderr == b""


def test_cli_prompt_longer_than_context(manifest):
    long = "word " * 600
    assert_clean_refusal(cli("run", long, "--stack", str(manifest)), f"over the context of {CTX}",
                         "raise --ctx-size, or pass --truncate")
    proc = cli("run", long, "--stack", str(manifest), "--truncate")
    assert proc.returncode == 0, proc.err
    assert proc.err.startswith("warning: stage 'a': prompt truncated by "), proc.err
    assert "Traceback" not in proc.err


def test_cli_megabyte_prompt(manifest):
    data = megabyte_of_text().encode()
    proc = cli("run", "-", "--stack", str(manifest), stdin=data, timeout=120)
    assert_clean_refusal(proc, f"over the context of {CTX}")
    assert proc.seconds < 30, f"refusing 1 MB took {proc.seconds:.1f} s"
    proc = cli("run", "-", "--stack", str(manifest), "--truncate", stdin=data, timeout=120)
    assert proc.returncode == 0, proc.err
    assert "prompt truncated by" in proc.err and "Traceback" not in proc.err
    assert proc.seconds < 60, f"truncating 1 MB took {proc.seconds:.1f} s"


def test_cli_invalid_utf8_in_argv(manifest):
    import os
    import subprocess

    from edge_fslm.testing.hostile import CHILD_ENV, CMD

    # argv cannot be built from a str with lone surrogates portably; pass raw bytes
    proc = subprocess.run([*map(os.fsencode, CMD), b"run", b"caf\xe9 \xff", b"--stack", os.fsencode(manifest)],
                          capture_output=True, env=CHILD_ENV, timeout=120)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and err.startswith("error: ") and "Traceback" not in err, err


# --------------------------------------------------------------------------- API


@pytest.mark.parametrize("prompt", ["", "  \n", "\x00\x1b\x07", None, b"bytes", 42])
def test_api_refuses_empty_or_non_text(prompt, stack):
    with pytest.raises(PromptError):
        stack.run(prompt)


def test_api_drops_control_characters(stack):
    r = stack.run("Say\x00 hi\x1b[1m to\x07 me\x7f.")
    assert r.prompt == "Say hi[1m to me."
    assert r.stages[0].completion_tokens <= 4


def test_api_long_prompt(stack):
    # the API names its own parameters; the CLI says --ctx-size / --truncate (test_cli_prompt_longer_than_context)
    with pytest.raises(PromptError, match=f"over the context of {CTX} — shorten the prompt, raise ctx_size, or pass truncate=True"):
        stack.run("word " * 600)
    r = stack.run("word " * 600, truncate=True)
    assert r.stages[0].truncated_input_tokens > 300
    assert r.stages[0].prompt_tokens + 4 <= CTX


def test_api_megabyte_prompt_is_fast(stack):
    text = megabyte_of_text()
    lm = stack.pipeline.pool.get(stack.pipeline.models["m"])
    t0 = time.perf_counter()
    n = len(lm.llm.tokenize(text.encode(), add_bos=False, special=True))
    tokenize_s = time.perf_counter() - t0
    assert n > 200_000
    assert tokenize_s < 5.0, f"tokenizing 1 MB took {tokenize_s:.2f} s"
    t0 = time.perf_counter()
    # refused by its byte length, before tokenizing: no 256-token context holds 1 MB
    with pytest.raises(PromptError, match=f"the input is {len(text.encode())} bytes, at least \\d+ tokens,"
                                          f" over the context of {CTX}"):
        stack.run(text)
    refuse_s = time.perf_counter() - t0
    assert refuse_s < 10.0, f"refusing 1 MB took {refuse_s:.2f} s"
    t0 = time.perf_counter()
    r = stack.run(text, truncate=True)
    # a lower bound once the input was cut by bytes: the cut's own tokens plus bytes / longest piece
    dropped = r.stages[0].truncated_input_tokens
    assert len(text.encode()) // max_token_bytes(lm) < dropped < n, (dropped, n)
    assert time.perf_counter() - t0 < 30.0


def test_api_unicode_edge_cases(stack):
    for text in ("🙂" * 20, "مرحبا بالعالم", "e\u0301" * 30, "\u202eevil\u202c", "\ufeffBOM", "a" * 10 + "\u0000"):
        r = stack.run(text)
        assert r.stages[0].completion_tokens <= 4


def test_api_lone_surrogate_is_a_prompt_error(stack):
    with pytest.raises(PromptError):
        stack.run("caf\udce9")


def test_clean_prompt_is_linear():
    t0 = time.perf_counter()
    clean_prompt("\x00a" * 500_000)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("piece, most", [("why is the sky blue ", 2e6), ("café 🙂 naïve ", 10e6)])
def test_a_huge_prompt_is_never_copied_whole(stack, piece, most):
    """A prompt the budget's plan already holds must not be copied whole during the run.

    clean_prompt encoded a copy to look for lone surrogates and stripped another, and every stage
    encoded the whole input to measure its bytes, so a 50 MB prompt took a 335 MB peak under
    ``--budget 300MB`` (benchmarks/reliability.py). Refusing it, or cutting it with truncate, now
    allocates at most a megabyte-sized piece at a time (ASCII: nothing).
    """
    import tracemalloc

    text = piece * (20_000_000 // len(piece))
    for truncate in (False, True):
        tracemalloc.start()
        try:
            r = stack.run(text, truncate=truncate)
            assert truncate and r.stages[0].truncated_input_tokens > 0
        except PromptError as exc:
            assert not truncate and "over the context" in str(exc)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < most, f"truncate={truncate}: {peak / 1e6:.1f} MB allocated at once for a {len(text) / 1e6:.0f}M-character prompt"
