"""Quantizing converted GGUFs with llama.cpp's quantizer: outputs, reports, errors, silence."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_fslm import gguf_info
from edge_fslm.cli import CliGroup
from edge_fslm.convert import QUANT_TYPES, ConvertError, quantize
from edge_fslm.convert.cli import quantize as quantize_cmd
from edge_fslm.errors import GGUFError

from .convert_helpers import (
    PROMPTS,
    compare,
    converted,
    hf_logits,
    llama_logits,
    smollm2_gguf,
    smollm2_hf_dir,
    tiny_llama_dir,
    work_dir,
)


@functools.cache
def smollm2_quantized(qtype: str):
    return quantize(converted(smollm2_hf_dir(), "f16"), work_dir() / f"smollm2.{qtype}.gguf", qtype, threads=1)


def _complete(path: Path, prompt: str) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=128, verbose=False, n_threads=1, n_threads_batch=1)
    try:
        return llm(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


def test_every_listed_type_exists_in_llama_cpp():
    import llama_cpp

    for name, (const, _) in QUANT_TYPES.items():
        assert isinstance(getattr(llama_cpp, const), int), name


@pytest.mark.slow
@pytest.mark.parametrize("qtype, min_top1", [("Q8_0", 0.9), ("Q4_K_M", 0.6)])
def test_smollm2_quantized_loads_and_talks_sense(qtype, min_top1):
    rep = smollm2_quantized(qtype)
    info = gguf_info.validate_model(rep.path)
    assert info.file_type_name == qtype
    assert rep.file_size == rep.path.stat().st_size < rep.in_size
    assert "Paris" in _complete(rep.path, "The capital of France is")
    # Agreement with the f16 model's next-token choices, as a coarse quality figure.
    f16 = converted(smollm2_hf_dir(), "f16")
    ids = hf_logits(smollm2_hf_dir(), PROMPTS)[0]
    fid = compare(llama_logits(f16, PROMPTS, ids), llama_logits(rep.path, PROMPTS, ids), PROMPTS)
    print(f"QUANT SmolLM2 {qtype}: {rep.file_size / 1e6:.1f} MB ({100 * rep.ratio:.0f} % of f16), "
          f"top-1 vs f16 {fid.agree}/{fid.total}, max|dlogit| {fid.max_abs:.2f}, {rep.seconds:.1f} s")
    assert fid.top1 >= min_top1


@pytest.mark.slow
def test_k_quant_fallbacks_are_reported():
    """SmolLM2's rows are 576 wide, not a multiple of 256: llama.cpp stores those tensors in other types."""
    rep = smollm2_quantized("Q4_K_M")
    assert rep.fallbacks, "576-wide rows cannot be Q4_K"
    assert "blk.0.attn_q.weight" in rep.fallbacks and rep.fallbacks["blk.0.attn_q.weight"] != "Q4_K"
    assert "blk.0.ffn_down.weight" not in rep.fallbacks  # 1536 = 6 x 256 fits
    assert set(rep.bytes_by_type) >= {"Q4_K", "F32"}
    assert smollm2_quantized("Q8_0").fallbacks == {}


def test_progress_and_silence(tmp_path, capfd):
    seen = []
    rep = quantize(converted(tiny_llama_dir(), "f16"), tmp_path / "q.gguf", "q8_0", threads=1,
                   progress=lambda done, total, what: seen.append((done, total, what)))
    out, err = capfd.readouterr()
    assert out == "" and err == "", "llama.cpp's log stays silent unless verbose"
    assert rep.qtype == "Q8_0" and seen and seen[-1][0] == seen[-1][1] and seen[-1][2] == "Q8_0"
    assert all(0 <= d <= t for d, t, _ in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["q.gguf"]
    assert isinstance(_complete(rep.path, "Hello"), str)  # loads and generates


def test_unknown_type_suggests_the_right_one(tmp_path):
    with pytest.raises(ConvertError, match=r"did you mean Q4_K_M\?"):
        quantize(converted(tiny_llama_dir(), "f16"), tmp_path / "q.gguf", "Q4_KM")
    with pytest.raises(ConvertError, match="unknown quant type 'Q7'"):
        quantize(converted(tiny_llama_dir(), "f16"), tmp_path / "q.gguf", "Q7")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs(tmp_path):
    with pytest.raises(ConvertError, match="already quantized"):
        quantize(smollm2_gguf(), tmp_path / "q.gguf", "Q8_0")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(GGUFError):
        quantize(junk, tmp_path / "q.gguf", "Q8_0")
    src = tmp_path / "in.gguf"
    src.write_bytes(converted(tiny_llama_dir(), "f16").read_bytes())
    with pytest.raises(ConvertError, match="overwrite the input"):
        quantize(src, src, "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.gguf", "junk.gguf"]


def test_quantize_command(tmp_path):
    group = CliGroup(commands={"quantize": quantize_cmd})  # the main group's error handling
    runner = CliRunner()
    src = converted(tiny_llama_dir(), "f16")
    res = runner.invoke(group, ["quantize", str(src), str(tmp_path / "q.gguf"), "q4_0", "-t", "1"])
    assert res.exit_code == 0, res.output
    assert "Q4_0" in res.output and (tmp_path / "q.gguf").is_file()
    res = runner.invoke(group, ["quantize", str(src), str(tmp_path / "z.gguf"), "Q9_X"])
    assert res.exit_code == 2 and "error: unknown quant type 'Q9_X'" in res.output
