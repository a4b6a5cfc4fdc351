"""Our converter's files against llama.cpp's own convert_hf_to_gguf.py, when that converter is at hand.

llama.cpp's converter comes from the llama-cpp-python sdist on PyPI, which
``benchmarks/llamacpp_converter_parity.py`` downloads once into the user cache
(``~/.cache/edge-fslm/llamacpp-converter``, or under ``EDGE_FSLM_CACHE``).  These tests never
download it: without the cached copy (a fresh CI machine) they skip and say how to get it.
The benchmark runs the full comparison (every outtype, logits on both checkpoints); here one
file per checkpoint is compared, which catches any tensor or metadata drift.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .convert_helpers import PROMPTS, converted, needs_train_extra, smollm2_hf_dir, tiny_spm_llama_dir, work_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench():
    needs_train_extra()
    pytest.importorskip("sentencepiece", reason="llama.cpp's Llama converter imports sentencepiece")
    from edge_fslm.convert import llamacpp_parity as mod

    if mod.cached_converter() is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not cached: run `python "
                    "benchmarks/llamacpp_converter_parity.py` once (it fetches the llama-cpp-python sdist from PyPI)")
    return mod


def _reference(bench, hf_dir: Path, outtype: str) -> Path:
    out = work_dir() / f"{hf_dir.name}.{outtype}.llamacpp.gguf"
    if not out.is_file():
        bench.run_reference(bench.cached_converter(), hf_dir, out, outtype)
    return out


def _assert_same(bench, ours: Path, ref: Path) -> None:
    t = bench.compare_tensors(ours, ref)
    assert t["only_ours"] == [] and t["only_llama_cpp"] == [], t
    assert t["shape_or_type_mismatch"] == [], t["shape_or_type_mismatch"]
    assert t["identical_bytes"] == t["compared"] == t["n_tensors"][1], (t["worst_tensor"], t["max_abs_diff"])
    kv = bench.compare_kv(ours, ref)
    assert kv["unexpected"] == [], {k: kv["differ"].get(k) or kv["only_ours"].get(k) or kv["only_llama_cpp"].get(k)
                                    for k in kv["unexpected"]}


def test_smollm2_f16_matches_llamacpps_converter(bench):
    hf = smollm2_hf_dir()
    ours, ref = converted(hf, "f16"), _reference(bench, hf, "f16")
    _assert_same(bench, ours, ref)
    lg = bench.compare_logits(ours, ref, threads=1, prompts=PROMPTS)
    print(f"PARITY SmolLM2-135M f16 vs llama.cpp's converter: max|dlogit| {lg['max_abs_dlogit']:.3g}, "
          f"top-1 {lg['top1_agree']}/{lg['positions']}")
    assert lg["tokenization_mismatches"] == []
    assert lg["max_abs_dlogit"] <= 1e-3
    assert lg["top1_agree"] == lg["positions"]


def test_gqa_llama_with_its_own_head_dim_matches_llamacpps_converter(bench):
    """Untied output, 4 query / 2 kv heads, head_dim 32 != hidden / heads: paths SmolLM2 does not take."""
    hf = bench.tiny_llama_checkpoint(work_dir())
    from edge_fslm.convert import convert_hf

    ours = work_dir() / f"{hf.name}.f32.ours.gguf"
    convert_hf(hf, ours, "f32")  # under a second; always this code's output, even with EDGE_FSLM_TEST_CACHE kept
    _assert_same(bench, ours, _reference(bench, hf, "f32"))


def test_sentencepiece_llama_matches_llamacpps_converter(bench):
    """A tokenizer.model (SentencePiece BPE, byte fallback, two added special tokens, 6 padded ids): llama.cpp's
    _set_vocab_sentencepiece and ours write the same tokenizer keys, tensors and logits."""
    hf = tiny_spm_llama_dir()
    ours, ref = converted(hf, "f32"), _reference(bench, hf, "f32")
    _assert_same(bench, ours, ref)
    a, b = bench.read_kv(ours), bench.read_kv(ref)
    tok_a = {k for k in a if k.startswith("tokenizer.")}
    tok_b = {k for k in b if k.startswith("tokenizer.")}
    # tokenizer_config.json says add_eos_token=false, so both write it (we would write false if it did not)
    assert tok_a == tok_b and {"tokenizer.ggml.scores", "tokenizer.ggml.add_eos_token"} <= tok_b, tok_a ^ tok_b
    for k in sorted(tok_b):
        assert a[k] == b[k], k
    assert a["tokenizer.ggml.model"][1] == "llama" and a["tokenizer.ggml.add_bos_token"][1] is True
    lg = bench.compare_logits(ours, ref, threads=1, prompts=PROMPTS)
    print(f"PARITY SentencePiece tiny llama f32 vs llama.cpp's converter: {len(a['tokenizer.ggml.tokens'][1])} tokens, "
          f"{len(tok_b)} tokenizer keys identical; max|dlogit| {lg['max_abs_dlogit']:.3g}, top-1 {lg['top1_agree']}/{lg['positions']}")
    assert lg["tokenization_mismatches"] == []
    assert lg["max_abs_dlogit"] == 0.0
