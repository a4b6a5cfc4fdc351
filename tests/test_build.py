"""`edge-fslm build`: source manifest (HF checkpoint + PEFT adapters) + profile -> runnable stack folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_fslm import Stack, gguf_info
from edge_fslm.cli import CliGroup, main
from edge_fslm.convert import ConvertError, build_stack
from edge_fslm.convert.build import REPORT_FILE
from edge_fslm.convert.cli import build as build_cmd
from edge_fslm.errors import ManifestError
from edge_fslm.manifest import load_stack
from edge_fslm.sources import sha256_file

from .convert_helpers import make_lora, tiny_llama_dir, tiny_neox_dir, work_dir

SOURCE = """
[stack]
name = "tiny"
description = "Three tiny stages"
schema = 1

[runtime]
ctx_size = 256
seed = 7

[models.base]
source = "model"

[[stages]]
name = "understand"
model = "base"
max_tokens = 6
template = "Request: {input}\\nTask:"

[[stages]]
name = "keywords"
model = "base"
adapter = "adapters/keywords"
max_tokens = 6
stop = ["\\n"]
messages = [
  { role = "system", content = "List \\"keywords\\"." },
  { role = "user", content = "{input}\\n{understand}" },
]

[[stages]]
name = "answer"
model = "base"
adapter = { source = "adapters/keywords", scale = 0.5 }
max_tokens = 6
template = "{input} / {keywords}:"
"""


@pytest.fixture
def source(tmp_path) -> Path:
    """A source folder: the tiny Llama checkpoint, one PEFT adapter, and source.toml."""
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir(), src / "model")
    lora = make_lora(tiny_llama_dir(), work_dir() / "lora-build", ["q_proj", "v_proj"], b_std=0.1)
    shutil.copytree(lora, src / "adapters" / "keywords")
    (src / "source.toml").write_text(SOURCE, encoding="utf-8")
    return src / "source.toml"


def _run(out: Path, prompt: str = "Name a primary color.") -> object:
    # The profile's budget bounds a whole process's peak RSS; this one holds torch and cached references.
    with Stack.load(out, threads=1, budget="100%") as stack:
        return stack.run(prompt)


def test_build_and_run_with_two_profiles(source, tmp_path):
    for profile in ("pi4-2gb", "laptop-8gb"):
        out = tmp_path / f"build-{profile}"
        lines: list[str] = []
        rep = build_stack(source, profile, out, log=lines.append, threads=1)
        assert rep.skipped == 0 and rep.built == len(rep.artifacts) and lines
        assert (out / "stack.toml").is_file() and (out / REPORT_FILE).is_file()
        manifest = load_stack(out)  # a stack folder: untrusted, relative paths only
        assert manifest.runtime.ctx_size == {"pi4-2gb": 1024, "laptop-8gb": 4096}[profile]
        for spec in manifest.models.values():
            assert not os.path.isabs(spec.source) and spec.sha256 == sha256_file(out / spec.source)
        for art in rep.artifacts:
            assert sha256_file(out / art.path) == art.sha256 and art.size == (out / art.path).stat().st_size
        result = _run(out)
        assert [s.name for s in result.stages] == ["understand", "keywords", "answer"]
        assert isinstance(result.answer, str)
        assert not (out / ".build-tmp").exists() and not list(out.rglob("*.partial"))

    # laptop-8gb gives the answer stage Q8_0: its own copy of the base, and its own adapter build.
    laptop = load_stack(tmp_path / "build-laptop-8gb")
    assert laptop.stage("keywords").model == "base" and laptop.stage("answer").model == "base-q8_0"
    assert gguf_info.read_gguf(tmp_path / "build-laptop-8gb" / laptop.models["base-q8_0"].source).file_type_name == "Q8_0"
    assert laptop.stage("answer").adapter.scale == 0.5
    pi4 = load_stack(tmp_path / "build-pi4-2gb")
    assert set(pi4.models) == {"base"}, "one shared base when every stage uses the same quant type"
    assert pi4.stage("keywords").adapter.source == pi4.stage("answer").adapter.source
    report = json.loads((tmp_path / "build-pi4-2gb" / REPORT_FILE).read_text())
    assert report["profile"] == "pi4-2gb" and report["runtime"]["kv_cache_type"] == "q8_0"
    model_art = next(a for a in report["artifacts"] if a["kind"] == "model")
    assert model_art["qtype"] == "Q4_K_M" and model_art["details"]["fallbacks"], "64-wide rows cannot be Q4_K"


def test_rebuild_skips_what_is_up_to_date(source, tmp_path):
    out = tmp_path / "out"
    first = build_stack(source, "pi-zero-2w", out, threads=1)
    stamps = {a.path: (out / a.path).stat().st_mtime_ns for a in first.artifacts}
    again = build_stack(source, "pi-zero-2w", out, threads=1)
    assert again.built == 0 and again.skipped == len(first.artifacts)
    assert {a.path: (out / a.path).stat().st_mtime_ns for a in again.artifacts} == stamps
    assert [a.sha256 for a in again.artifacts] == [a.sha256 for a in first.artifacts]

    # Touching an adapter input rebuilds only that adapter.
    cfg = source.parent / "adapters" / "keywords" / "adapter_config.json"
    cfg.write_text(cfg.read_text())
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))
    third = build_stack(source, "pi-zero-2w", out, threads=1)
    assert [(a.kind, a.skipped) for a in third.artifacts] == [("model", True), ("adapter", False)]
    # A different profile changes the quant type: the model is rebuilt (the old one removed); force rebuilds all.
    assert build_stack(source, "pi5-8gb", out, threads=1).artifacts[0].skipped is False
    assert sorted(p.name for p in (out / "models").iterdir()) == ["base.Q6_K.gguf"]
    assert build_stack(source, "pi5-8gb", out, threads=1, force=True).skipped == 0
    assert isinstance(_run(out).answer, str)


def test_failed_build_keeps_the_previous_stack(source, tmp_path):
    out = tmp_path / "out"
    build_stack(source, "pi4-2gb", out, threads=1)
    before = (out / "stack.toml").read_text()
    (source.parent / "adapters" / "keywords" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ConvertError):
        build_stack(source, "pi4-2gb", out, threads=1)
    assert (out / "stack.toml").read_text() == before
    assert not list(out.rglob("*.partial")) and not (out / ".build-tmp").exists()


def test_cli_build_then_run(source, tmp_path):
    out = tmp_path / "out"
    group = CliGroup(commands={"build": build_cmd})
    res = CliRunner().invoke(group, ["build", str(source), "--profile", "pi4-2gb", "--out", str(out), "-t", "1"])
    assert res.exit_code == 0, res.output
    assert "2 built, 0 up to date" in res.output
    res = CliRunner().invoke(main, ["run", "--stack", str(out), "-t", "1", "--budget", "100%", "Name a primary color."])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(group, ["build", str(source), "--profile", "pi4-2gb", "--out", str(out), "--json"])
    assert json.loads(res.output)["skipped"] == 2


def test_built_stack_runs_in_a_fresh_process_within_the_profile_budget(source, tmp_path):
    """The real command, in a lean process, with the pi4-2gb profile's own 1GB budget."""
    out = tmp_path / "out"
    build_stack(source, "pi4-2gb", out, threads=1)
    proc = subprocess.run([sys.executable, "-m", "edge_fslm.cli", "run", "--stack", str(out), "-t", "1", "--json",
                           "Name a primary color."], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [s["name"] for s in result["stages"]] == ["understand", "keywords", "answer"]


# --------------------------------------------------------------------------- errors


def _edit_source(source: Path, old: str, new: str) -> None:
    source.write_text(source.read_text().replace(old, new))


def test_unsupported_architecture(source, tmp_path):
    cfg = source.parent / "model" / "config.json"
    cfg.write_text(cfg.read_text().replace("LlamaForCausalLM", "PhiForCausalLM"))
    with pytest.raises(ConvertError, match="architecture PhiForCausalLM is not supported"):
        build_stack(source, "pi4-2gb", tmp_path / "out")


def test_missing_and_wrong_folders(source, tmp_path):
    _edit_source(source, 'source = "model"', 'source = "nowhere"')
    with pytest.raises(ConvertError, match="models.base.source: .*nowhere does not exist"):
        build_stack(source, "pi4-2gb", tmp_path / "out")
    _edit_source(source, 'source = "nowhere"', 'source = "hf://HuggingFaceTB/SmolLM2-135M-Instruct/model.gguf"')
    with pytest.raises(ConvertError, match="not a local folder"):
        build_stack(source, "pi4-2gb", tmp_path / "out")
    _edit_source(source, 'source = "hf://HuggingFaceTB/SmolLM2-135M-Instruct/model.gguf"', 'source = "model"')
    _edit_source(source, 'adapter = "adapters/keywords"', 'adapter = "model"')
    with pytest.raises(ConvertError, match="no adapter_config.json — it is not a PEFT adapter folder"):
        build_stack(source, "pi4-2gb", tmp_path / "out")
    with pytest.raises(ManifestError, match="no such source manifest"):
        build_stack(tmp_path / "missing.toml", "pi4-2gb", tmp_path / "out")
    with pytest.raises(ManifestError, match="did you mean"):
        build_stack(source, "pi4-2g", tmp_path / "out")


def test_adapter_for_another_base(source, tmp_path):
    shutil.rmtree(source.parent / "model")
    shutil.copytree(tiny_neox_dir(), source.parent / "model")
    with pytest.raises(ConvertError, match="different base"):
        build_stack(source, "pi4-2gb", tmp_path / "out", threads=1)


def test_profile_context_too_small(source, tmp_path):
    prof = tmp_path / "small.toml"
    prof.write_text("[profile]\ndescription = 'tiny ctx'\n[quant]\ndefault = 'Q8_0'\n"
                    "[runtime]\nctx_size = 16\nbatch_size = 16\n")
    _edit_source(source, "max_tokens = 6\ntemplate = \"{input}", "max_tokens = 40\ntemplate = \"{input}")
    with pytest.raises(ConvertError, match="ctx_size 16 leaves no room for stage 'answer'"):
        build_stack(source, prof, tmp_path / "out")
    assert not (tmp_path / "out").exists()
