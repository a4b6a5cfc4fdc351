"""PEFT LoRA -> llama.cpp LoRA GGUF, applied at run time with llama_set_adapters_lora,
checked against peft's merge_and_unload in transformers."""

from __future__ import annotations

import json
import shutil

import pytest

from edge_fslm import gguf_info
from edge_fslm.errors import GGUFError
from edge_fslm.convert import ConvertError, convert_lora

from .convert_helpers import (
    PROMPTS,
    compare,
    converted,
    hf_logits,
    llama_logits,
    make_lora,
    smollm2_hf_dir,
    tiny_llama_dir,
    tiny_neox_dir,
    work_dir,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEOX_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
TOL = {"f32": 2e-2, "f16": 6e-2}


def _adapter_gguf(peft_dir, base_dir, outtype):
    out = work_dir() / f"{peft_dir.name}.{outtype}.gguf"
    if not out.is_file():
        convert_lora(peft_dir, base_dir, out, outtype, base_gguf=converted(base_dir, outtype))
    return out


def _check_runtime_lora(base_dir, peft_dir, outtype, label, tol):
    ref = hf_logits(base_dir, PROMPTS, adapter=peft_dir)
    plain = hf_logits(base_dir, PROMPTS)
    adapter = _adapter_gguf(peft_dir, base_dir, outtype)
    fid = compare(ref, llama_logits(converted(base_dir, outtype), PROMPTS, ref[0], adapter=adapter), PROMPTS,
                  margin=tol)
    effect = compare(ref, plain, PROMPTS)
    print(fid.line(f"{label} LoRA {outtype} (adapter changes logits by up to {effect.max_abs:.2f})"))
    assert effect.max_abs > 20 * max(fid.max_abs, 1e-3), "the adapter must really change the outputs"
    assert fid.decisive_flips == 0 and fid.agree >= fid.total - 1
    assert fid.max_abs <= tol
    return fid


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_tiny_llama_lora_at_runtime_matches_peft_merge(outtype):
    peft_dir = make_lora(tiny_llama_dir(), work_dir() / "lora-tiny-llama", LLAMA_TARGETS)
    fid = _check_runtime_lora(tiny_llama_dir(), peft_dir, outtype, "tiny llama", TOL[outtype])
    assert fid.agree == fid.total


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_tiny_neox_lora_at_runtime_matches_peft_merge(outtype):
    peft_dir = make_lora(tiny_neox_dir(), work_dir() / "lora-tiny-neox", NEOX_TARGETS, b_std=0.1)
    fid = _check_runtime_lora(tiny_neox_dir(), peft_dir, outtype, "tiny gpt-neox", TOL[outtype])
    assert fid.agree == fid.total


def test_rslora_and_alpha_pattern_are_folded_into_b():
    """llama.cpp applies alpha/r per tensor; PEFT's other scalings must survive the trip."""
    peft_dir = make_lora(tiny_llama_dir(), work_dir() / "lora-tiny-llama-rs", ["q_proj", "k_proj", "v_proj"],
                         r=4, alpha=8.0, use_rslora=True, alpha_pattern={"v_proj": 2.0}, b_std=0.2, seed=3)
    _check_runtime_lora(tiny_llama_dir(), peft_dir, "f32", "tiny llama rsLoRA+alpha_pattern", TOL["f32"])


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_smollm2_lora_at_runtime_matches_peft_merge(outtype):
    peft_dir = make_lora(smollm2_hf_dir(), work_dir() / "lora-smollm2", LLAMA_TARGETS, b_std=0.02)
    # f16: the bound test_convert_smollm2 derives for plain f16 SmolLM2 (2.5x the cost of f16 weights, 0.043)
    _check_runtime_lora(smollm2_hf_dir(), peft_dir, outtype, "SmolLM2-135M", {"f32": 2e-2, "f16": 0.11}[outtype])


def test_adapter_file_layout():
    peft_dir = make_lora(tiny_llama_dir(), work_dir() / "lora-tiny-llama", LLAMA_TARGETS)
    path = _adapter_gguf(peft_dir, tiny_llama_dir(), "f16")
    base = gguf_info.validate_model(converted(tiny_llama_dir(), "f16"))
    info = gguf_info.validate_adapter(path, base)
    assert info.architecture == "llama" and info.adapter_type == "lora" and info.lora_alpha == 16.0
    a, b = info.tensors["blk.0.attn_k.weight.lora_a"], info.tensors["blk.0.attn_k.weight.lora_b"]
    assert a.shape == (64, 8) and b.shape == (8, 32), "gguf shapes [n_in, r] and [r, n_out] (2 kv heads x 16)"
    assert a.ggml_type == b.ggml_type == "F16"
    assert len(info.tensors) == 2 * 7 * 2


def test_merge_writes_a_full_model(tmp_path):
    peft_dir = make_lora(tiny_llama_dir(), work_dir() / "lora-tiny-llama", LLAMA_TARGETS)
    rep = convert_lora(peft_dir, tiny_llama_dir(), tmp_path / "merged.gguf", "f32", merge=True)
    assert gguf_info.validate_model(rep.path).general_type == "model"
    ref = hf_logits(tiny_llama_dir(), PROMPTS[:8], adapter=peft_dir)
    fid = compare(ref, llama_logits(rep.path, PROMPTS[:8], ref[0]), PROMPTS[:8])
    print(fid.line("tiny llama merged LoRA f32"))
    assert fid.agree == fid.total and fid.max_abs <= TOL["f32"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged.gguf"], "the merge's temp checkpoint is cleaned up"


# --------------------------------------------------------------------------- errors


def _copy_lora(tmp_path, **config_changes):
    src = make_lora(tiny_llama_dir(), work_dir() / "lora-tiny-llama", LLAMA_TARGETS)
    d = tmp_path / "adapter"
    shutil.copytree(src, d)
    if config_changes:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(config_changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def test_not_a_peft_folder(tmp_path):
    with pytest.raises(ConvertError, match="not a PEFT adapter folder"):
        convert_lora(tiny_llama_dir(), tiny_llama_dir(), tmp_path / "a.gguf")
    with pytest.raises(ConvertError, match="no such folder"):
        convert_lora(tmp_path / "missing", tiny_llama_dir(), tmp_path / "a.gguf")
    d = _copy_lora(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(ConvertError, match="incomplete"):
        convert_lora(d, tiny_llama_dir(), tmp_path / "a.gguf")


@pytest.mark.parametrize("change, match", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "only LoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "biases"),
])
def test_adapters_llama_cpp_cannot_apply_point_to_merge(tmp_path, change, match):
    from click.testing import CliRunner

    from edge_fslm.cli import CliGroup
    from edge_fslm.convert.cli import convert_lora as convert_lora_cmd

    d = _copy_lora(tmp_path, **change)
    with pytest.raises(ConvertError, match=match) as exc:
        convert_lora(d, tiny_llama_dir(), tmp_path / "a.gguf")
    msg = str(exc.value)
    # the API names its own parameter; the command line names the flag
    assert "convert with merge=True" in msg or "only LoRA" in msg
    assert "--merge" not in msg
    res = CliRunner().invoke(CliGroup(commands={"convert-lora": convert_lora_cmd}),
                             ["convert-lora", str(d), str(tmp_path / "a.gguf"), "--base", str(tiny_llama_dir())])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "convert with --merge" in res.output or "only LoRA" in res.output
    assert "merge=True" not in res.output
    assert not (tmp_path / "a.gguf").exists()


def test_merge_without_the_train_extra_names_the_parameter(tmp_path, monkeypatch):
    import sys

    from edge_fslm.cli import cli_spelling

    d = _copy_lora(tmp_path)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    with pytest.raises(ConvertError) as exc:
        convert_lora(d, tiny_llama_dir(), tmp_path / "a.gguf", merge=True)
    msg = str(exc.value)
    assert msg.startswith("merge_lora (merge=True) needs torch, transformers and peft (peft is missing)")
    assert cli_spelling(msg).startswith("--merge needs torch, transformers and peft (peft is missing)")
    assert not (tmp_path / "a.gguf").exists()


def test_adapter_of_another_base_is_refused(tmp_path):
    d = _copy_lora(tmp_path)
    with pytest.raises(ConvertError, match="different base"):
        convert_lora(d, tiny_neox_dir(), tmp_path / "a.gguf")
    with pytest.raises(ConvertError, match="outtype"):
        convert_lora(d, tiny_llama_dir(), tmp_path / "a.gguf", "q4_0")
    assert not (tmp_path / "a.gguf").exists()


def test_converted_adapter_is_checked_against_the_base_gguf(tmp_path):
    """validate_adapter runs on the output: an adapter for the wrong converted base never appears."""
    d = _copy_lora(tmp_path)
    with pytest.raises(GGUFError, match="different base"):
        convert_lora(d, tiny_llama_dir(), tmp_path / "a.gguf", base_gguf=converted(tiny_neox_dir(), "f16"))
    assert not (tmp_path / "a.gguf").exists()


def test_convert_lora_command(tmp_path):
    from click.testing import CliRunner

    from edge_fslm.cli import CliGroup
    from edge_fslm.convert.cli import convert_lora as convert_lora_cmd

    peft_dir = make_lora(tiny_llama_dir(), work_dir() / "lora-tiny-llama", LLAMA_TARGETS)
    group = CliGroup(commands={"convert-lora": convert_lora_cmd})
    runner = CliRunner()
    res = runner.invoke(group, ["convert-lora", str(peft_dir), str(tmp_path / "a.gguf"), "--base", str(tiny_llama_dir()),
                                "--base-gguf", str(converted(tiny_llama_dir(), "f16"))])
    assert res.exit_code == 0, res.output
    assert "LoRA rank 8, alpha 16" in res.output and "14 layers" in res.output
    res = runner.invoke(group, ["convert-lora", str(tiny_llama_dir()), str(tmp_path / "b.gguf"),
                                "--base", str(tiny_llama_dir())])
    assert res.exit_code == 2 and "not a PEFT adapter folder" in res.output and "Traceback" not in res.output
