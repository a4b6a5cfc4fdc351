"""The real SmolLM2-135M-Instruct, round-tripped: GGUF (Q4_1) -> transformers fp32 -> our converter -> llama.cpp.

The HF checkpoint is the one transformers dequantizes from the packaged GGUF, so
the reference and the converted file hold exactly the same weights.
"""

from __future__ import annotations

import pytest

from edge_fslm import gguf_info

from .convert_helpers import (
    PROMPTS,
    compare,
    converted,
    hf_logits,
    llama_logits,
    smollm2_gguf,
    smollm2_hf_dir,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref():
    return hf_logits(smollm2_hf_dir(), PROMPTS)


def test_smollm2_f32_is_exact(ref):
    path = converted(smollm2_hf_dir(), "f32")
    fid = compare(ref, llama_logits(path, PROMPTS, ref[0]), PROMPTS)
    print(fid.line("SmolLM2-135M f32"))
    assert fid.token_mismatches == [], "llama.cpp must tokenize exactly like the HF tokenizer (digits split)"
    assert fid.agree == fid.total
    assert fid.max_abs <= 2e-2


def test_smollm2_f16_costs_only_f16_rounding(ref):
    """F16 storage itself moves a 30-layer model's logits by a few hundredths; the converter adds nothing.

    Measured here: rounding the weights to f16 inside transformers already moves the logits by ~0.04,
    and llama.cpp's f16 matmuls also round activations to f16, so llama.cpp f16 vs fp32 lands near
    0.085 (logit std 6.6).  The bound is therefore 2.5x the weight-rounding cost (and at least 6e-2).
    Top-1 must agree wherever the reference is not itself within that error of a tie (there is one
    such position: a 0.003 margin).
    """
    path = converted(smollm2_hf_dir(), "f16")
    got = llama_logits(path, PROMPTS, ref[0])
    rounded = compare(ref, hf_logits(smollm2_hf_dir(), PROMPTS, round_weights_f16=True), PROMPTS)
    tol = max(6e-2, 2.5 * rounded.max_abs)
    fid = compare(ref, got, PROMPTS, margin=tol)
    print(fid.line("SmolLM2-135M f16"))
    print(rounded.line("SmolLM2-135M transformers with f16-rounded weights (reference cost of f16)"))
    assert fid.token_mismatches == []
    assert fid.decisive_flips == 0
    assert fid.agree >= fid.total - 2
    assert fid.max_abs <= tol
    # The issue's own metric, at its own bound: the next-token logits of each of the 20 prompts.
    import numpy as np

    last = max(float(np.abs(a[-1] - b[-1]).max()) for a, b in zip(ref[1], got[1]))
    agree_last = sum(int(np.argmax(a[-1]) == np.argmax(b[-1])) for a, b in zip(ref[1], got[1]))
    print(f"FIDELITY SmolLM2-135M f16 next-token: max|dlogit| {last:.3g}, top-1 {agree_last}/{len(PROMPTS)}")
    assert agree_last == len(PROMPTS)
    assert last <= 6e-2


def test_smollm2_metadata_round_trips():
    info = gguf_info.validate_model(converted(smollm2_hf_dir(), "f16"))
    orig = gguf_info.validate_model(smollm2_gguf())
    for field in ("architecture", "n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim_k", "n_vocab",
                  "context_length", "bos_token_id", "eos_token_id", "chat_template"):
        assert getattr(info, field) == getattr(orig, field), field
    assert info.metadata["tokenizer.ggml.pre"] == orig.metadata["tokenizer.ggml.pre"] == "smollm"
    assert "output.weight" not in info.tensors, "tied embeddings are not duplicated"
    assert info.metadata["llama.rope.freq_base"] == orig.metadata["llama.rope.freq_base"]


# The metadata keys llama.cpp's own convert_hf_to_gguf.py writes for this checkpoint (llama-cpp-python 0.3.36's
# vendored converter, llama.cpp 0c1e5709; benchmarks/llamacpp_converter_parity.py compares the files in full).
# It names the model from the folder, so for a folder like "SmolLM2-135M-Instruct" it also writes
# general.basename and general.finetune; the folder here carries no such parts.
LLAMACPP_CONVERTER_KEYS = {
    "general.architecture", "general.type", "general.name", "general.size_label", "general.file_type",
    "general.quantization_version",
    "llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon", "llama.attention.key_length", "llama.attention.value_length",
    "llama.vocab_size", "llama.rope.dimension_count",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
    "tokenizer.ggml.add_bos_token",
}


def test_smollm2_has_the_keys_llamacpps_converter_writes():
    """Every key llama.cpp's converter writes, with its values; the one extra is add_eos_token = false (its default)."""
    for outtype in ("f16", "f32"):
        info = gguf_info.validate_model(converted(smollm2_hf_dir(), outtype))
        keys = {k for k in info.metadata if not k.startswith("GGUF.")}
        assert keys - LLAMACPP_CONVERTER_KEYS == {"tokenizer.ggml.add_eos_token"}, outtype
        assert LLAMACPP_CONVERTER_KEYS - keys == set(), outtype
        m = info.metadata
        assert m["tokenizer.ggml.add_eos_token"] is False
        assert m["tokenizer.ggml.add_bos_token"] is False
        assert m["general.quantization_version"] == 2, "llama.cpp's converter writes it for f32/f16 files too"
        assert m["llama.attention.key_length"] == m["llama.attention.value_length"] == 64, \
            "config.json names head_dim, so llama.cpp's converter writes key/value_length"
        assert m["general.size_label"] == "135M"
        assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"],
                m["tokenizer.ggml.unknown_token_id"], m["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, 2)
