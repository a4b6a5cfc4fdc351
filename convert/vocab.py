"""Tokenizer metadata for a converted model, read from ``tokenizer.json``.

llama.cpp re-implements the tokenizer from GGUF metadata, so a converter has to
name *which* pre-tokenizer rules the model was trained with.  llama.cpp's own
script recognises a tokenizer by hashing its output on a test string; here the
rules are read from the structure of ``tokenizer.json`` instead, which needs no
table of hashes and still refuses what it does not recognise (a wrong guess
would silently tokenize differently from the model's training data).

Supported: byte-level BPE tokenizers (GPT-2 family, SmolLM2/StarCoder digit
splitting, Llama 3).  SentencePiece tokenizers (Llama 2, TinyLlama) are not
supported yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ._common import ConvertError
from .checkpoint import read_json

__all__ = ["VocabInfo", "PRE_TOKENIZERS", "detect_pre_tokenizer", "add_vocab"]

#: llama.cpp pre-tokenizer names this converter can detect (or accept as an override).
PRE_TOKENIZERS = ("gpt-2", "smollm", "llama-bpe", "olmo", "starcoder")

# The Split regex of the Llama 3 tokenizer.json (llama.cpp's "llama-bpe").
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


@dataclass
class VocabInfo:
    """What was written about the tokenizer, for the conversion report."""

    model: str
    pre: str
    n_tokens: int
    n_merges: int
    special: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _step(s: dict[str, Any]) -> tuple[Any, ...]:
    t = s.get("type")
    if t == "ByteLevel":
        return ("ByteLevel", bool(s.get("use_regex", True)), bool(s.get("add_prefix_space", False)))
    if t == "Digits":
        return ("Digits", bool(s.get("individual_digits", False)))
    if t == "Split":
        pat = s.get("pattern", {})
        return ("Split", pat.get("Regex") or pat.get("String"), s.get("behavior"), bool(s.get("invert", False)))
    return (t,)


_KNOWN: dict[tuple[tuple[Any, ...], ...], str] = {
    (("ByteLevel", True, False),): "gpt-2",
    (("Digits", True), ("ByteLevel", True, False)): "smollm",
    (("Split", _LLAMA3_REGEX, "Isolated", False), ("ByteLevel", False, False)): "llama-bpe",
}


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer name whose rules match this tokenizer.json, or None."""
    pre = tokenizer_json.get("pre_tokenizer")
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not all(isinstance(s, dict) for s in steps):
        return None
    return _KNOWN.get(tuple(_step(s) for s in steps))


def _describe_pre(tokenizer_json: dict[str, Any]) -> str:
    pre = tokenizer_json.get("pre_tokenizer")
    if not isinstance(pre, dict):
        return "none"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return " + ".join(str(s.get("type")) for s in steps if isinstance(s, dict)) or "empty"


def _looks_special(text: str) -> bool:
    """Added tokens some models forget to mark special (same rule as llama.cpp's converter)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def add_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int, pre_tokenizer: str | None = None) -> VocabInfo:
    """Write the tokenizer of the HF folder ``folder`` into ``writer``; ``vocab_size`` is the embedding's row count."""
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        if (folder / "tokenizer.model").is_file():
            raise ConvertError(f"{folder}: has a SentencePiece tokenizer.model but no tokenizer.json — SentencePiece "
                               "tokenizers (Llama 2, TinyLlama) are not supported yet; save a fast tokenizer "
                               "(AutoTokenizer.save_pretrained) or use llama.cpp's convert_hf_to_gguf.py")
        raise ConvertError(f"{folder}: no tokenizer.json — save the tokenizer next to the model "
                           "(AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
    tj = read_json(tj_path, "save the tokenizer with save_pretrained()")
    model = tj.get("model") or {}
    warnings: list[str] = []
    byte_level = (tj.get("decoder") or {}).get("type") == "ByteLevel" or "ByteLevel" in _describe_pre(tj)
    if model.get("type") != "BPE" or not byte_level:
        kind = model.get("type") or "unknown"
        if model.get("byte_fallback"):
            kind = "SentencePiece-style BPE (byte_fallback)"
        raise ConvertError(f"{tj_path}: {kind} tokenizer — only byte-level BPE tokenizers (GPT-2, SmolLM2, Pythia, "
                           "Llama 3) are supported; SentencePiece models (Llama 2, TinyLlama) are not yet")

    detected = detect_pre_tokenizer(tj)
    if pre_tokenizer is not None:
        if pre_tokenizer not in PRE_TOKENIZERS:
            raise ConvertError(f"pre-tokenizer {pre_tokenizer!r} is not one this converter knows — "
                               f"choose one of {', '.join(PRE_TOKENIZERS)}")
        if detected is not None and detected != pre_tokenizer:
            warnings.append(f"pre-tokenizer forced to {pre_tokenizer!r}; tokenizer.json looks like {detected!r}")
        pre = pre_tokenizer
    elif detected is None:
        raise ConvertError(f"{tj_path}: unrecognised pre-tokenizer ({_describe_pre(tj)}) — llama.cpp would split "
                           f"text differently from the model's training; pass --pre-tokenizer with one of "
                           f"{', '.join(PRE_TOKENIZERS)} if you know which rules it uses")
    else:
        pre = detected
    normalizer = tj.get("normalizer")
    if normalizer is not None:
        ntype = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        if ntype != "NFC":
            raise ConvertError(f"{tj_path}: normalizer {ntype!r} is not supported by llama.cpp's BPE tokenizer — "
                               "only tokenizers without a normalizer (or with NFC) can be converted")
        warnings.append("tokenizer.json applies NFC normalization, which llama.cpp does not; "
                        "text that is not already NFC may tokenize differently")

    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ConvertError(f"{tj_path}: model.vocab is missing or empty — re-save the tokenizer")
    by_id: dict[int, str] = {}
    for text, i in vocab.items():
        if isinstance(i, int):
            by_id[i] = text
    added: dict[int, dict[str, Any]] = {}
    for t in tj.get("added_tokens") or []:
        if isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str):
            added[t["id"]] = t
            by_id[t["id"]] = t["content"]
    top = max(by_id)
    if top >= vocab_size:
        raise ConvertError(f"{tj_path}: token id {top} does not fit the model's vocab_size {vocab_size} "
                           "(config.json) — the tokenizer does not belong to this model")

    tokens: list[str] = []
    types: list[int] = []
    n_padded = 0
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            n_padded += 1
        elif i in added:
            tokens.append(text)
            special = bool(added[i].get("special")) or _looks_special(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    if n_padded:
        warnings.append(f"{n_padded} unused ids padded as [PAD<id>] to reach vocab_size {vocab_size}")

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    # SpecialVocab knows every place HF keeps merges, special ids, add_bos/eos and the chat template.
    gguf_log = logging.getLogger("gguf")
    old = gguf_log.level
    gguf_log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    finally:
        gguf_log.setLevel(old)
    if not special.merges:
        raise ConvertError(f"{tj_path}: has no BPE merges — re-save the tokenizer")
    special.add_to_gguf(writer, quiet=True)
    # Say explicitly what HF does, so llama.cpp's per-model defaults cannot differ.
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(False)
    if "eos" not in special.add_special_token:
        writer.add_add_eos_token(False)
    return VocabInfo(model="gpt2", pre=pre, n_tokens=vocab_size, n_merges=len(special.merges),
                     special=dict(special.special_token_ids), warnings=warnings)
