"""Probe loads: a file that makes llama.cpp abort is refused in a child process, not in ours."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_fslm import Stack
from edge_fslm.errors import GGUFError
from edge_fslm.probe import probe_model
from edge_fslm.testing import write_random_lora
from edge_fslm.testing.hostile import smollm2, write_tiny_llama

STACK = """[stack]
name = "probe"
[models.m]
source = "{model}"
[[stages]]
name = "a"
model = "m"
max_tokens = 2
messages = [{{ role = "user", content = "{{input}}" }}]
"""


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_FSLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGE_FSLM_PROBE", raising=False)


def stack_of(folder: Path, **model_kw) -> Path:
    """A one-stage stack folder on a tiny llama written with ``model_kw``."""
    folder.mkdir()
    write_tiny_llama(folder / "model.gguf", **model_kw)
    (folder / "stack.toml").write_text(STACK.format(model="model.gguf"))
    return folder


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_fslm.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_a_model_that_aborts_llama_cpp_is_one_error_line_and_exit_2(tmp_path):
    """Four query heads over three KV heads passes the header checks, but llama.cpp's graph builder
    aborts on it (GGML_ASSERT in ggml_mul_mat). Without the probe it takes the process down."""
    bad = stack_of(tmp_path / "gqa", n_head=4, n_head_kv=3)
    proc = cli("run", "--stack", str(bad), "hi")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert str(bad / "model.gguf") in lines[0] and "SIGABRT" in lines[0] and "GGML_ASSERT" in lines[0]
    unprobed = cli("run", "--stack", str(bad), "hi", env={"EDGE_FSLM_PROBE": "0"})
    assert unprobed.returncode in (-6, 134), unprobed.returncode  # what the probe spares a user


def test_the_python_api_refuses_it_and_the_process_goes_on(tmp_path):
    bad = stack_of(tmp_path / "gqa", n_head=4, n_head_kv=3)
    good = stack_of(tmp_path / "ok")
    with pytest.raises(GGUFError, match="crashed loading it"):
        Stack.load(str(bad), preload=False)
    with Stack.load(str(good)) as st:
        assert st.run("hi").stages[0].completion_tokens >= 1


def test_a_passed_probe_is_remembered_until_the_file_changes(tmp_path):
    model = tmp_path / "model.gguf"
    shutil.copy(smollm2(), model)
    adapter = write_random_lora(model, tmp_path / "a.gguf")
    assert probe_model(model, [adapter]) is True  # a child ran
    assert probe_model(model, [adapter]) is False  # remembered
    assert probe_model(model, []) is True  # another combination: probed on its own
    later = time.time() + 5
    os.utime(adapter, (later, later))
    assert probe_model(model, [adapter]) is True  # changed since: probed again


def test_installed_package_files_are_trusted_and_never_probed():
    assert probe_model(smollm2(), []) is False
