"""Tokenizer metadata for a converted model, read from ``tokenizer.model`` or ``tokenizer.json``.

llama.cpp re-implements the tokenizer from GGUF metadata, so a converter has to
write everything it needs to split text exactly as the model's own tokenizer does.

* SentencePiece (Llama 2, TinyLlama; GGUF tokenizer model ``llama``): when the
  folder has a ``tokenizer.model``, it is read with the ``sentencepiece`` package
  the way llama.cpp's ``convert_hf_to_gguf.py`` (``_set_vocab_sentencepiece``)
  does: pieces, scores and token types, added tokens from ``added_tokens.json``
  and ``tokenizer_config.json`` (and, beyond llama.cpp, ``tokenizer.json`` for
  ids past the SentencePiece model that neither lists, as transformers 5 saves
  them), ``[PAD<id>]`` up to config.json's vocab_size.  A folder with only a
  Llama-style ``tokenizer.json`` (BPE with byte_fallback, llama.cpp's
  ``_set_vocab_llama_hf`` case) is converted too; its scores are derived from the
  merge ranks, because llama.cpp's SentencePiece tokenizer merges by score and
  llama.cpp's own fallback, which gives every token -1000, splits words
  differently from the model.
* Byte-level BPE (GPT-2 family, SmolLM2/StarCoder digit splitting, Llama 3; GGUF
  tokenizer model ``gpt2``): llama.cpp also has to be told *which* pre-tokenizer
  rules the model was trained with.  llama.cpp's own script recognises a
  tokenizer by hashing its output on a test string; here the rules are read from
  the structure of ``tokenizer.json`` instead, which needs no table of hashes and
  still refuses what it does not recognise (a wrong guess would silently
  tokenize differently from the model's training data).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from .common import ConvertError
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
    """Write the tokenizer of the HF folder ``folder`` into ``writer``; ``vocab_size`` is the embedding's row count.

    The same choice as llama.cpp's converter for Llama models: a ``tokenizer.model`` is SentencePiece; otherwise
    ``tokenizer.json`` is either a Llama-style SentencePiece export or a byte-level BPE tokenizer.
    """
    tj_path = folder / "tokenizer.json"
    spm_path = folder / "tokenizer.model"
    note: str | None = None
    if spm_path.is_file():
        sp = _load_sentencepiece(spm_path)
        if isinstance(sp, str):  # not a SentencePiece model (a tiktoken file, say)
            if not tj_path.is_file():
                raise ConvertError(f"{spm_path}: {sp} — it is not a SentencePiece model, and there is no "
                                   "tokenizer.json to use instead")
            note = f"{spm_path.name} is not a SentencePiece model ({sp}); used tokenizer.json"
        else:
            _no_pre_tokenizer(pre_tokenizer, spm_path)
            return _add_sentencepiece_vocab(writer, folder, spm_path, sp, vocab_size)
    if not tj_path.is_file():
        raise ConvertError(f"{folder}: no tokenizer.json or tokenizer.model — save the tokenizer next to the model "
                           "(AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
    tj = read_json(tj_path, "save the tokenizer with save_pretrained()")
    if _is_llama_hf(tj):
        _no_pre_tokenizer(pre_tokenizer, tj_path)
        info = _add_llama_hf_vocab(writer, folder, tj_path, tj, vocab_size)
    else:
        info = _add_bpe_vocab(writer, folder, tj_path, tj, vocab_size, pre_tokenizer)
    if note:
        info.warnings.insert(0, note)
    return info


def _no_pre_tokenizer(pre_tokenizer: str | None, path: Path) -> None:
    if pre_tokenizer is not None:
        raise ConvertError(f"{path}: is a SentencePiece tokenizer, which has no pre-tokenizer to choose — "
                           "pre_tokenizer only applies to byte-level BPE tokenizers; leave it out")


# --------------------------------------------------------------------------- SentencePiece

# SentencePiece's token types are llama.cpp's (gguf.TokenType): NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4,
# UNUSED 5, BYTE 6.
_TT = gguf.TokenType
_PAD_SCORE = -10000.0  # what llama.cpp's converter gives [PAD<id>] entries
_ADDED_SCORE = -1000.0  # ... and added tokens


def _load_sentencepiece(path: Path) -> Any:
    """A loaded SentencePieceProcessor, or a string saying why the file is not a SentencePiece model."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise ConvertError(f"{path}: reading a SentencePiece tokenizer needs the sentencepiece package — "
                           "pip install sentencepiece (it comes with pip install 'edge-fslm[train]')") from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (RuntimeError, OSError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return sp


def _sentencepiece_settings(path: Path) -> dict[str, Any]:
    """The trainer and normalizer settings that decide whether llama.cpp can tokenize like this model,
    read with sentencepiece's own ModelProto (as llama.cpp's converter does; needs protobuf)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise ConvertError(f"{path}: reading a SentencePiece tokenizer's settings needs protobuf — "
                           "pip install protobuf (it comes with pip install 'edge-fslm[train]')") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # protobuf's DecodeError; the processor already loaded it, so this is unexpected
        return {}
    model_type = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(proto.trainer_spec.model_type, "unknown")
    norm = proto.normalizer_spec
    return {
        "model_type": model_type,
        "normalizer": norm.name,
        "add_dummy_prefix": norm.add_dummy_prefix,
        "remove_extra_whitespaces": norm.remove_extra_whitespaces,
    }


def _check_sentencepiece(path: Path, s: dict[str, Any]) -> list[str]:
    """Refuse what llama.cpp's "llama" tokenizer cannot reproduce; return warnings about what it may get wrong."""
    out = []
    if s.get("model_type") not in (None, "bpe"):
        # A unigram model trained on the test corpus: llama.cpp split 35 of 47 sentences differently.
        raise ConvertError(f"{path}: is a SentencePiece {s['model_type']} model — llama.cpp's SentencePiece "
                           "tokenizer merges the highest-scoring pairs (BPE), which splits most text differently "
                           "from a unigram model; only BPE SentencePiece models (Llama 2, TinyLlama) are supported")
    if s.get("normalizer") not in (None, "", "identity"):
        out.append(f"{path.name} normalizes text with {s['normalizer']!r}, which llama.cpp does not apply; "
                   "text that the normalization changes can tokenize differently")
    if s.get("remove_extra_whitespaces"):
        out.append(f"{path.name} collapses runs of spaces, which llama.cpp does not; text with repeated or "
                   "leading/trailing spaces can tokenize differently")
    return out


def _add_sentencepiece_vocab(writer: gguf.GGUFWriter, folder: Path, spm_path: Path, sp: Any,
                             vocab_size: int) -> VocabInfo:
    """llama.cpp's _create_vocab_sentencepiece, plus the added tokens only tokenizer.json lists."""
    n_pieces = sp.vocab_size()
    if n_pieces > vocab_size:
        raise ConvertError(f"{spm_path}: has {n_pieces} pieces but the model's vocab_size is {vocab_size} "
                           "(config.json) — the tokenizer does not belong to this model")
    settings = _sentencepiece_settings(spm_path)
    warnings = _check_sentencepiece(spm_path, settings)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [_PAD_SCORE] * vocab_size
    types = [int(_TT.UNUSED)] * vocab_size
    for i in range(n_pieces):
        kind = _TT.NORMAL
        if sp.IsUnknown(i):
            kind = _TT.UNKNOWN
        elif sp.IsControl(i):
            kind = _TT.CONTROL
        elif sp.IsUnused(i):
            kind = _TT.UNUSED
        elif sp.IsByte(i):
            kind = _TT.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), float(sp.GetScore(i)), int(kind)

    skipped: list[int] = []
    set_by_config: set[int] = set()
    added_json = folder / "added_tokens.json"
    if added_json.is_file():
        added = read_json(added_json, "re-save the tokenizer")
        for text, i in added.items() if isinstance(added, dict) else ():
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise ConvertError(f"{added_json}: id {i!r} of {text!r} is not a token id — re-save the tokenizer")
            if i >= vocab_size:
                skipped.append(i)
                continue
            tokens[i], scores[i], types[i] = text, _ADDED_SCORE, int(_TT.USER_DEFINED)
            set_by_config.add(i)

    def added_token(i: int, text: str, special: bool) -> None:
        if special or _looks_special(text):
            types[i] = int(_TT.CONTROL)
        else:
            text = text.replace("\u2581", " ")  # pre-normalize user-defined spaces, as llama.cpp does
            types[i] = int(_TT.USER_DEFINED)
        tokens[i], scores[i] = text, _ADDED_SCORE
        set_by_config.add(i)

    tc_path = folder / "tokenizer_config.json"
    tc = read_json(tc_path, "re-save the tokenizer") if tc_path.is_file() else {}
    decoder = tc.get("added_tokens_decoder")
    for key, data in (decoder or {}).items() if isinstance(decoder, dict) else ():
        if not (isinstance(data, dict) and isinstance(data.get("content"), str) and str(key).isdigit()):
            raise ConvertError(f"{tc_path}: added_tokens_decoder entry {key!r} is malformed — re-save the tokenizer")
        i = int(key)
        if i >= vocab_size:
            skipped.append(i)
            continue
        added_token(i, data["content"], bool(data.get("special")))

    # transformers 5 keeps added tokens in tokenizer.json only; llama.cpp's converter would leave those ids [PAD].
    tj_path = folder / "tokenizer.json"
    tj = read_json(tj_path, "save the tokenizer with save_pretrained()") if tj_path.is_file() else None
    from_tj = 0
    for t in (tj or {}).get("added_tokens") or []:
        if not (isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str)):
            continue
        i = t["id"]
        if i < n_pieces or i in set_by_config:
            continue
        if i >= vocab_size:
            skipped.append(i)
            continue
        added_token(i, t["content"], bool(t.get("special")))
        from_tj += 1
    if skipped:
        warnings.append(f"{len(set(skipped))} added token(s) with ids past vocab_size {vocab_size} left out "
                        f"(ids {', '.join(map(str, sorted(set(skipped))[:5]))}{', ...' if len(set(skipped)) > 5 else ''})")
    if from_tj:
        warnings.append(f"{from_tj} added token(s) taken from tokenizer.json (llama.cpp's converter reads only "
                        "added_tokens.json and tokenizer_config.json, and would write them as [PAD<id>])")
    n_pad = sum(1 for i in range(n_pieces, vocab_size) if tokens[i] == f"[PAD{i}]")
    if n_pad:
        warnings.append(f"{n_pad} unused ids padded as [PAD<id>] to reach vocab_size {vocab_size}")
    if settings.get("add_dummy_prefix") is False and not isinstance(tc.get("add_prefix_space"), bool):
        # llama.cpp's SentencePiece tokenizer adds the "▁" prefix unless told not to; this model does not add it.
        writer.add_add_space_prefix(False)
    special = _write_llama_vocab(writer, folder, tc, tj, tokens, scores, types)
    return VocabInfo(model="llama", pre="default", n_tokens=vocab_size, n_merges=0, special=special,
                     warnings=warnings)


def _special_vocab(folder: Path, **kwargs: Any) -> gguf.SpecialVocab:
    """gguf-py's SpecialVocab with its info-level chatter silenced (it logs every file it looks for)."""
    gguf_log = logging.getLogger("gguf")
    old = gguf_log.level
    gguf_log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(folder, **kwargs)
    finally:
        gguf_log.setLevel(old)


def _write_llama_vocab(writer: gguf.GGUFWriter, folder: Path, tc: dict[str, Any], tj: dict[str, Any] | None,
                       tokens: list[str], scores: list[float], types: list[int]) -> dict[str, int]:
    """The keys llama.cpp's converter writes for a SentencePiece ("llama") vocabulary; returns the special ids."""
    add_prefix_space = tc.get("add_prefix_space")
    if isinstance(add_prefix_space, bool):  # llama.cpp's LlamaModel.set_vocab
        writer.add_add_space_prefix(add_prefix_space)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = _special_vocab(folder, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    # llama.cpp adds BOS to SentencePiece text unless told otherwise.  A tokenizer.json post-processor that
    # SpecialVocab found no leading special token in means transformers adds none: say so.
    if "bos" not in special.add_special_token and isinstance((tj or {}).get("post_processor"), dict):
        writer.add_add_bos_token(False)
    if "eos" not in special.add_special_token:
        writer.add_add_eos_token(False)
    return dict(special.special_token_ids)


def _is_llama_hf(tj: dict[str, Any]) -> bool:
    """A SentencePiece tokenizer exported to tokenizer.json (Llama 2, TinyLlama): the test of gguf-py's LlamaHfVocab."""
    model = tj.get("model") or {}
    decoder = tj.get("decoder") or {}
    return (isinstance(model, dict) and model.get("type") == "BPE" and bool(model.get("byte_fallback"))
            and isinstance(decoder, dict) and decoder.get("type") == "Sequence"
            and "ByteLevel" not in _describe_pre(tj))


def _merge_pair(m: Any) -> tuple[str, str] | None:
    if isinstance(m, str):
        parts = m.split(" ")
        return (parts[0], parts[1]) if len(parts) == 2 else None
    if isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(x, str) for x in m):
        return (m[0], m[1])
    return None


def _add_llama_hf_vocab(writer: gguf.GGUFWriter, folder: Path, tj_path: Path, tj: dict[str, Any],
                        vocab_size: int) -> VocabInfo:
    """A Llama-style tokenizer.json as a SentencePiece vocabulary (llama.cpp's _set_vocab_llama_hf, other scores).

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose merged token scores highest; the BPE
    model in tokenizer.json applies merges by rank.  Scoring each token by minus the rank of the first merge
    that makes it gives the same order; llama.cpp's own fallback scores every token -1000, which makes it
    merge left to right instead and split many words differently from the model.
    """
    model = tj["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ConvertError(f"{tj_path}: model.vocab is missing or empty — re-save the tokenizer")
    merges = [p for p in (_merge_pair(m) for m in model.get("merges") or []) if p is not None]
    if not merges:
        raise ConvertError(f"{tj_path}: has no BPE merges — re-save the tokenizer")
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    warnings: list[str] = []
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [_PAD_SCORE] * vocab_size
    types = [int(_TT.UNUSED)] * vocab_size
    seen: set[int] = set()
    for text, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            continue
        if i >= vocab_size:
            raise ConvertError(f"{tj_path}: token id {i} does not fit the model's vocab_size {vocab_size} "
                               "(config.json) — the tokenizer does not belong to this model")
        r = rank.get(text)
        tokens[i] = text
        # Tokens no merge makes never come out of a merge; keep them below every merge, in id order.
        scores[i] = -float(r) if r is not None else -float(len(merges) + i)
        types[i] = int(_TT.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else _TT.NORMAL)
        seen.add(i)
    skipped: list[int] = []
    for t in tj.get("added_tokens") or []:
        if not (isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str)):
            continue
        i, text = t["id"], t["content"]
        if i >= vocab_size:
            skipped.append(i)
            continue
        tokens[i], scores[i] = text, _ADDED_SCORE
        types[i] = int(_TT.CONTROL if t.get("special") or _looks_special(text) else _TT.USER_DEFINED)
        seen.add(i)
    if skipped:
        warnings.append(f"{len(skipped)} added token(s) with ids past vocab_size {vocab_size} left out")
    n_pad = vocab_size - len(seen)
    if n_pad:
        warnings.append(f"{n_pad} unused ids padded as [PAD<id>] to reach vocab_size {vocab_size}")
    tc_path = folder / "tokenizer_config.json"
    tc = read_json(tc_path, "re-save the tokenizer") if tc_path.is_file() else {}
    special = _write_llama_vocab(writer, folder, tc, tj, tokens, scores, types)
    return VocabInfo(model="llama", pre="default", n_tokens=vocab_size, n_merges=0, special=special,
                     warnings=warnings)


# --------------------------------------------------------------------------- byte-level BPE


def _add_bpe_vocab(writer: gguf.GGUFWriter, folder: Path, tj_path: Path, tj: dict[str, Any], vocab_size: int,
                   pre_tokenizer: str | None) -> VocabInfo:
    model = tj.get("model") or {}
    warnings: list[str] = []
    byte_level = (tj.get("decoder") or {}).get("type") == "ByteLevel" or "ByteLevel" in _describe_pre(tj)
    if model.get("type") != "BPE" or not byte_level:
        kind = model.get("type") or "unknown"
        if model.get("byte_fallback"):
            kind = "SentencePiece-style BPE (byte_fallback) without a Sequence decoder"
        raise ConvertError(f"{tj_path}: {kind} tokenizer — supported are byte-level BPE tokenizers (GPT-2, SmolLM2, "
                           "Pythia, Llama 3) and SentencePiece ones (a tokenizer.model, or a Llama-style "
                           "tokenizer.json); if the model has a SentencePiece tokenizer.model, put it next to tokenizer.json")

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
                           f"text differently from the model's training; set pre_tokenizer to one of "
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
    special = _special_vocab(folder, load_merges=True, n_vocab=vocab_size)
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
