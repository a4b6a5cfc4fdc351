"""HF -> GGUF conversion on tiny random Llama and GPT-NeoX models: fidelity, metadata, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_fslm import gguf_info
from edge_fslm.convert import ConvertError, convert_hf
from edge_fslm.convert.hf_to_gguf import SUPPORTED_ARCHITECTURES

from .convert_helpers import (
    PROMPTS,
    compare,
    converted,
    hf_logits,
    llama_logits,
    tiny_llama_dir,
    tiny_neox_dir,
)

# max |logit difference| allowed against transformers fp32
TOL = {"f32": 2e-2, "f16": 6e-2}


@pytest.fixture(scope="module")
def llama_ref():
    return hf_logits(tiny_llama_dir(), PROMPTS)


@pytest.fixture(scope="module")
def neox_ref():
    return hf_logits(tiny_neox_dir(), PROMPTS)


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_tiny_llama_matches_transformers(llama_ref, outtype):
    path = converted(tiny_llama_dir(), outtype)
    fid = compare(llama_ref, llama_logits(path, PROMPTS, llama_ref[0]), PROMPTS)
    print(fid.line(f"tiny llama {outtype}"))
    assert fid.token_mismatches == [], "llama.cpp must tokenize exactly like the HF tokenizer"
    assert fid.agree == fid.total
    assert fid.max_abs <= TOL[outtype]


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_tiny_neox_matches_transformers(neox_ref, outtype):
    path = converted(tiny_neox_dir(), outtype)
    fid = compare(neox_ref, llama_logits(path, PROMPTS, neox_ref[0]), PROMPTS)
    print(fid.line(f"tiny gpt-neox {outtype}"))
    assert fid.token_mismatches == []
    assert fid.agree == fid.total
    assert fid.max_abs <= TOL[outtype]


def test_q8_0_and_bf16_outtypes_stay_close(llama_ref):
    """Lossy outtypes: same tokens, most top-1 choices, bounded error (these are random, flat models)."""
    for outtype, tol in (("q8_0", 1.0), ("bf16", 0.5)):
        path = converted(tiny_llama_dir(), outtype)
        info = gguf_info.validate_model(path)
        assert info.tensors["blk.0.attn_q.weight"].ggml_type == outtype.upper()
        assert info.tensors["blk.0.attn_norm.weight"].ggml_type == "F32"
        fid = compare(llama_ref, llama_logits(path, PROMPTS, llama_ref[0]), PROMPTS)
        print(fid.line(f"tiny llama {outtype}"))
        assert fid.top1 >= 0.9 and fid.max_abs <= tol


def test_metadata_of_converted_llama():
    info = gguf_info.validate_model(converted(tiny_llama_dir(), "f16"))
    meta = info.metadata
    assert info.architecture == "llama" and info.general_type == "model"
    assert info.file_type == gguf.LlamaFileType.MOSTLY_F16
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert info.bos_token_id == 1 and info.eos_token_id == 2
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert (info.n_layer, info.n_embd, info.n_head, info.n_head_kv, info.head_dim_k) == (2, 64, 4, 2, 16)
    assert info.tensors["token_embd.weight"].ggml_type == "F16"
    assert info.tensors["output_norm.weight"].ggml_type == "F32"
    assert "output.weight" in info.tensors  # untied


def test_metadata_of_converted_neox():
    info = gguf_info.validate_model(converted(tiny_neox_dir(), "f32"))
    meta = info.metadata
    assert info.architecture == "gptneox"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["gptneox.rope.dimension_count"] == 4  # rotary_pct 0.25 of head size 16
    assert meta["gptneox.use_parallel_residual"] is True
    assert "blk.0.attn_qkv.bias" in info.tensors
    n_tok = len(json.loads((tiny_neox_dir() / "tokenizer.json").read_text())["model"]["vocab"])
    assert info.n_vocab == n_tok + 7, "padded vocab rows get [PAD] tokens"


def test_report_describes_the_conversion(tmp_path):
    rep = convert_hf(tiny_llama_dir(), tmp_path / "m.gguf", "q8_0")
    assert rep.path == tmp_path / "m.gguf" and rep.file_size == rep.path.stat().st_size
    assert rep.architecture == "LlamaForCausalLM" and rep.gguf_architecture == "llama"
    assert rep.tensor_types == {"Q8_0": 16, "F32": 5}
    assert rep.n_tensors == 21 and rep.tokenizer_pre == "smollm"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"], "no temp files left behind"


def test_bf16_and_pytorch_bin_checkpoints(tmp_path):
    """bfloat16 safetensors (read without torch) and pytorch_model.bin give the same tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    src = tiny_llama_dir()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    bf16_dir, bin_dir = tmp_path / "bf16", tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")  # transformers 5 only writes safetensors
    want = model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    model.to(torch.bfloat16).save_pretrained(bf16_dir)
    for d in (bf16_dir, bin_dir):
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if not (d / f).exists():
                shutil.copy(src / f, d / f)

    def tensor(path: Path, name: str) -> np.ndarray:
        r = gguf.GGUFReader(path)
        t = next(t for t in r.tensors if t.name == name)
        return np.array(t.data, dtype=np.float32)

    convert_hf(bf16_dir, tmp_path / "bf16.gguf", "f32")
    convert_hf(bin_dir, tmp_path / "bin.gguf", "f32")
    assert np.array_equal(tensor(tmp_path / "bf16.gguf", "token_embd.weight"), want)
    assert np.array_equal(tensor(tmp_path / "bin.gguf", "token_embd.weight"),
                          tensor(converted(src, "f32"), "token_embd.weight"))


# --------------------------------------------------------------------------- errors


def _copy_tiny(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_llama_dir(), d)
    return d


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    d = _copy_tiny(tmp_path)
    _edit_config(d, architectures=["MistralForCausalLM"])
    with pytest.raises(ConvertError) as exc:
        convert_hf(d, tmp_path / "out.gguf")
    msg = str(exc.value)
    assert "MistralForCausalLM" in msg and all(a in msg for a in SUPPORTED_ARCHITECTURES)
    assert "\n" not in msg
    assert not (tmp_path / "out.gguf").exists()


def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(ConvertError, match="no such folder"):
        convert_hf(tmp_path / "nope", tmp_path / "out.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="no config.json"):
        convert_hf(tmp_path / "empty", tmp_path / "out.gguf")
    d = _copy_tiny(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(ConvertError, match="no model weights"):
        convert_hf(d, tmp_path / "out.gguf")


def test_missing_or_unknown_tokenizer(tmp_path):
    from click.testing import CliRunner

    from edge_fslm.cli import CliGroup
    from edge_fslm.convert.cli import convert as convert_cmd

    d = _copy_tiny(tmp_path)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConvertError, match="unrecognised pre-tokenizer") as exc:
        convert_hf(d, tmp_path / "out.gguf")
    # the API names its own parameter; the command line names the flag
    assert "set pre_tokenizer to one of" in str(exc.value) and "--pre-tokenizer" not in str(exc.value)
    res = CliRunner().invoke(CliGroup(commands={"convert": convert_cmd}),
                             ["convert", str(d), str(tmp_path / "out.gguf")])
    assert res.exit_code == 2 and "unrecognised pre-tokenizer" in res.output
    assert "pass --pre-tokenizer with one of" in res.output and "pre_tokenizer" not in res.output
    convert_hf(d, tmp_path / "forced.gguf", pre_tokenizer="gpt-2")  # an explicit override is honoured
    assert gguf_info.read_gguf(tmp_path / "forced.gguf").metadata["tokenizer.ggml.pre"] == "gpt-2"
    (d / "tokenizer.json").unlink()
    with pytest.raises(ConvertError, match="no tokenizer.json"):
        convert_hf(d, tmp_path / "out.gguf")


def test_bad_settings_and_outputs(tmp_path):
    with pytest.raises(ConvertError, match="outtype 'q4_0'"):
        convert_hf(tiny_llama_dir(), tmp_path / "out.gguf", "q4_0")
    with pytest.raises(ConvertError, match="is a directory"):
        convert_hf(tiny_llama_dir(), tmp_path, "f16")
    with pytest.raises(ConvertError, match="does not exist"):
        convert_hf(tiny_llama_dir(), tmp_path / "no" / "out.gguf", "f16")
    d = _copy_tiny(tmp_path)
    _edit_config(d, vocab_size=4096)
    with pytest.raises(ConvertError, match="vocab_size"):
        convert_hf(d, tmp_path / "out.gguf")
    _edit_config(d, vocab_size=json.loads((tiny_llama_dir() / "config.json").read_text())["vocab_size"],
                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ConvertError, match="rope scaling type 'yarn'"):
        convert_hf(d, tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "failed conversions leave no files"


def test_truncated_weights_fail_cleanly(tmp_path):
    d = _copy_tiny(tmp_path)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    with pytest.raises(ConvertError, match="truncated"):
        convert_hf(d, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


# --------------------------------------------------------------------------- the command


def test_convert_command(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edge_fslm.cli import CliGroup
    from edge_fslm.convert.cli import convert as convert_cmd

    group = CliGroup(commands={"convert": convert_cmd})  # the main group's error handling
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(group, ["convert", str(tiny_llama_dir()), "--outtype", "f32"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tiny-llama.f32.gguf").is_file() and "llama, 21 tensors" in res.output
    res = runner.invoke(group, ["convert", str(tiny_llama_dir()), "out.gguf", "--json"])
    assert json.loads(res.output)["outtype"] == "f16"
    res = runner.invoke(group, ["convert", str(tiny_llama_dir()), "--outfile", "o2.gguf", "-t", "f32"])  # llama.cpp's flag
    assert res.exit_code == 0 and (tmp_path / "o2.gguf").is_file(), res.output
    res = runner.invoke(group, ["convert", str(tiny_llama_dir()), "a.gguf", "-o", "b.gguf"])
    assert res.exit_code == 2 and "two outputs given" in res.output
    res = runner.invoke(group, ["convert", str(tmp_path / "nope"), "x.gguf"])
    assert res.exit_code == 2 and res.output.startswith("error: ") and res.output.count("\n") == 1
    assert "Traceback" not in res.output
