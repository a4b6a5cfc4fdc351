"""Hostile model and adapter files through the real CLI: `edge-fslm run --stack` and `edge-fslm inspect`.

Every case must end with exit code 2 and one line on stderr that starts with ``error: ``, names
the file and says what is wrong: no traceback, and never a signal (a llama.cpp abort or segfault).
The corpus lives in edge_fslm.testing.hostile.model_file_cases(); benchmarks/reliability.py runs it too.
Truncated and patched copies of the real 98 MB SmolLM2 file are sparse: only its 1.8 MB header
is written, the tensor data is a hole.
"""

from __future__ import annotations

import os

import pytest

from edge_fslm.testing.hostile import assert_clean_refusal, cli, model_file_cases, smollm2, stack_for

CASES = {c.id: c for c in model_file_cases()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile-files")


def _build(case, folder):
    d = folder / case.id
    d.mkdir(exist_ok=True)
    return d, case.build(d)


@pytest.mark.parametrize("case_id", list(CASES))
def test_run_refuses_hostile_file(case_id, folder):
    case = CASES[case_id]
    d, path = _build(case, folder)
    if case.as_adapter:
        manifest = stack_for(d, smollm2(), adapter=path)
    else:
        manifest = stack_for(d, path)
    err = assert_clean_refusal(cli("run", "hello", "--stack", str(manifest)), case.name or path.name, *case.needles)
    assert " — " in err  # every message says what to do


@pytest.mark.parametrize("case_id", [c.id for c in CASES.values() if c.inspect])
def test_inspect_refuses_hostile_file(case_id, folder):
    case = CASES[case_id]
    d, path = _build(case, folder)
    assert_clean_refusal(cli("inspect", str(path)), path.name, *case.needles)
    assert_clean_refusal(cli("inspect", str(path), "--json"), path.name)


def test_adapter_for_a_different_base(gemma_path, tmp_path):
    """A LoRA made for Gemma 3, put on a SmolLM2 stage: refused before llama.cpp sees it."""
    from edge_fslm.testing.hostile import Case, model_file_cases as cases

    case = next(c for c in cases(gemma=lambda: gemma_path) if c.id == "adapter-for-gemma")
    path = case.build(tmp_path)
    manifest = stack_for(tmp_path, smollm2(), adapter=path)
    assert_clean_refusal(cli("run", "hello", "--stack", str(manifest)), path.name, "architecture", "gemma3")
    assert isinstance(case, Case)


def test_special_paths(tmp_path):
    """A directory, a FIFO (which would block a naive reader forever), a missing file, /dev/zero."""
    (tmp_path / "dir.gguf").mkdir()
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    for target, needle in ((tmp_path / "dir.gguf", "directory"), (fifo, "not a regular file"),
                           (tmp_path / "missing.gguf", "does not exist"), ("/dev/zero", "not a regular file")):
        assert_clean_refusal(cli("inspect", str(target), timeout=30), str(target).rsplit("/", 1)[-1], needle)
        m = stack_for(tmp_path, target, name="special.toml")
        assert_clean_refusal(cli("run", "hello", "--stack", str(m), timeout=30), needle)


def test_file_changed_to_garbage_between_runs(tmp_path):
    """The header cache keys on inode, size and times: a file rewritten in place is checked again."""
    from edge_fslm.testing.hostile import write_tiny_llama

    model = write_tiny_llama(tmp_path / "m.gguf")
    m = stack_for(tmp_path, model)
    assert cli("run", "hello", "--stack", str(m)).returncode == 0
    data = bytearray(model.read_bytes())
    data[:4] = b"GGML"
    model.write_bytes(bytes(data))
    assert_clean_refusal(cli("run", "hello", "--stack", str(m)), "m.gguf", "not a GGUF file")
