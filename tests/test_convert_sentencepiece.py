"""SentencePiece tokenizers (Llama 2, TinyLlama): a tiny Llama with a real trained tokenizer.model, converted.

Three references for llama.cpp's tokenization of the converted file: sentencepiece itself (the
tokenizer the model was trained with), transformers 5's LlamaTokenizer, and for the logits
transformers in fp32.  transformers 5 and sentencepiece disagree in two places, and llama.cpp
sides with sentencepiece in the first and with transformers' ``legacy=True`` mode in the second:

* text that starts with a space: sentencepiece adds its dummy prefix "▁" anyway ("  two" ->
  ▁ ▁ ▁two); transformers 5's Metaspace(prepend_scheme="first") does not (▁ ▁two);
* text right after an added special token: llama.cpp adds the dummy prefix there too
  ("<|im_start|>user" -> <|im_start|> ▁ u s er), as transformers did before ``legacy=False``;
  that is, llama.cpp encodes each stretch of text between added tokens as sentencepiece would.

The tests pin each prompt to the reference it must match, so no other difference can hide.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_fslm import gguf_info
from edge_fslm.convert import ConvertError, convert_hf

from .convert_helpers import (
    PROMPTS,
    SPM_ADDED,
    SPM_PADDING,
    compare,
    converted,
    hf_logits,
    llama_logits,
    needs_train_extra,
    tiny_spm_llama_dir,
    tiny_spm_model,
)
from .test_convert import TOL

#: More text that SentencePiece handles in its own ways: leading/trailing spaces, byte fallback, newlines.
EXTRA = (
    " leading space",
    "trailing space ",
    "\n\nnewlines first",
    "unknown: ☃ ∑ ж ß",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|> spaced <|im_end|>\n",
    "markers </s> and <s> inside text",
)


#: every token transformers splits out of the text before the tokenizer model sees it
_SPECIAL = SPM_ADDED + ("<s>", "</s>", "<unk>")


def _has_added(text: str) -> bool:
    return any(t in text for t in _SPECIAL)


@pytest.fixture(scope="module")
def spm_dir() -> Path:
    needs_train_extra()
    pytest.importorskip("sentencepiece", reason="SentencePiece conversion needs the sentencepiece package")
    return tiny_spm_llama_dir()


@pytest.fixture(scope="module")
def spm_ref(spm_dir):
    return hf_logits(spm_dir, PROMPTS)


def _vocab_only(path: Path):
    import llama_cpp

    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _tokenize_all(path: Path, prompts) -> list[list[int]]:
    llm = _vocab_only(path)
    try:
        return [llm.tokenize(p.encode("utf-8"), add_bos=True, special=True) for p in prompts]
    finally:
        llm.close()


def _kv(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    out = {}
    for k, f in r.fields.items():
        if not k.startswith("tokenizer."):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[1] == gguf.GGUFValueType.STRING:
                out[k] = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            else:
                out[k] = [f.parts[i].tolist()[0] for i in f.data]
        elif f.types[0] == gguf.GGUFValueType.STRING:
            out[k] = bytes(f.parts[f.data[0]]).decode("utf-8")
        else:
            out[k] = f.parts[f.data[0]].tolist()[0]
    return out


# --------------------------------------------------------------------------- fidelity


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_tiny_spm_llama_matches_transformers(spm_dir, spm_ref, outtype):
    """llama.cpp runs transformers' token ids; top-1 may flip in f16 only where the reference is within TOL of a tie."""
    path = converted(spm_dir, outtype)
    got = llama_logits(path, PROMPTS, spm_ref[0])
    fid = compare(spm_ref, got, PROMPTS, margin=TOL[outtype])
    last = max(float(np.abs(a[-1] - b[-1]).max()) for a, b in zip(spm_ref[1], got[1]))
    agree_last = sum(int(np.argmax(a[-1]) == np.argmax(b[-1])) for a, b in zip(spm_ref[1], got[1]))
    print(fid.line(f"tiny llama, SentencePiece tokenizer, {outtype}"))
    print(f"FIDELITY tiny llama, SentencePiece tokenizer, {outtype} next-token: max|dlogit| {last:.3g}, "
          f"top-1 {agree_last}/{len(PROMPTS)}")
    known = {p for p in PROMPTS if p.startswith(" ") or _has_added(p)}
    assert set(fid.token_mismatches) == known, "only the two documented transformers 5 differences"
    assert fid.max_abs <= TOL[outtype]
    assert fid.decisive_flips == 0
    if outtype == "f32":
        assert fid.agree == fid.total
    assert agree_last == len(PROMPTS)


def _sentencepiece_ids(sp, added: dict[str, int], text: str) -> list[int]:
    """BOS, then each stretch of text between added tokens encoded by sentencepiece (with its dummy prefix)."""
    import re

    ids = [sp.bos_id()]
    for part in re.split("(" + "|".join(map(re.escape, added)) + ")", text):
        ids += [added[part]] if part in added else sp.encode(part) if part else []
    return ids


def test_spm_tokenization_matches_sentencepiece_and_transformers(spm_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    prompts = PROMPTS + EXTRA
    got = _tokenize_all(converted(spm_dir, "f32"), prompts)
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(spm_dir)
    hf_legacy = AutoTokenizer.from_pretrained(spm_dir, legacy=True)
    added = {t: hf.convert_tokens_to_ids(t) for t in _SPECIAL}
    same_hf = 0
    for p, ids in zip(prompts, got):
        assert ids == _sentencepiece_ids(sp, added, p), f"{p!r}: llama.cpp and sentencepiece split it differently"
        same_hf += ids == hf(p).input_ids
        if not (p.startswith(" ") or _has_added(p)):
            assert ids == hf(p).input_ids, f"{p!r}: llama.cpp and transformers split it differently"
        elif not any(t + " " in p for t in _SPECIAL) and not p.startswith(" "):
            assert ids == hf_legacy(p).input_ids, f"{p!r}: llama.cpp and transformers (legacy=True) differ"
    print(f"TOKENS SentencePiece: llama.cpp = sentencepiece on {len(prompts)}/{len(prompts)} prompts, "
          f"= transformers 5 on {same_hf}/{len(prompts)} (the rest start with a space or hold added tokens)")


def test_spm_detokenization_round_trips(spm_dir):
    """Plain text comes back byte for byte; with added tokens rendered, each is followed by the space llama.cpp
    tokenized after it (the dummy prefix of the next stretch of text)."""
    import re

    specials = "|".join(map(re.escape, _SPECIAL))
    llm = _vocab_only(converted(spm_dir, "f32"))
    try:
        for p in PROMPTS + EXTRA:
            ids = llm.tokenize(p.encode("utf-8"), add_bos=True, special=True)
            if not _has_added(p):
                assert llm.detokenize(ids).decode("utf-8") == p, p
            rendered = llm.detokenize(ids, special=True).decode("utf-8")
            assert rendered == re.sub(rf"({specials})(?!{specials}|\Z)", r"\1 ", "<s>" + p), p
    finally:
        llm.close()


# --------------------------------------------------------------------------- metadata


def test_spm_metadata(spm_dir):
    import sentencepiece as spm

    path = converted(spm_dir, "f16")
    kv = _kv(path)
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    n = sp.vocab_size()
    n_vocab = n + len(SPM_ADDED) + SPM_PADDING
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in kv
    tokens, scores, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.scores"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == n_vocab
    T = gguf.TokenType
    # <unk> <s> </s> are listed special in tokenizer_config.json's added_tokens_decoder: CONTROL, as llama.cpp does
    assert types[:3] == [T.CONTROL] * 3 and tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3 + 0x0A] == "<0x0A>" and types[3 + 0x0A] == T.BYTE and types[3:259] == [T.BYTE] * 256
    assert all(types[i] == T.NORMAL and tokens[i] == sp.id_to_piece(i) for i in range(259, n))
    assert np.allclose(scores[3:n], [sp.GetScore(i) for i in range(3, n)])
    assert tokens[n:n + 2] == list(SPM_ADDED) and types[n:n + 2] == [T.CONTROL] * 2 and scores[n:n + 2] == [-1000.0] * 2
    assert tokens[n + 2:] == [f"[PAD{i}]" for i in range(n + 2, n_vocab)]
    assert types[n + 2:] == [T.UNUSED] * SPM_PADDING and scores[n + 2:] == [-10000.0] * SPM_PADDING
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    info = gguf_info.validate_model(path)
    assert info.tokenizer_model == "llama" and info.n_vocab == n_vocab


def test_report_and_command_name_the_sentencepiece_tokenizer(spm_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edge_fslm.cli import CliGroup
    from edge_fslm.convert.cli import convert as convert_cmd

    rep = convert_hf(spm_dir, tmp_path / "m.gguf", "f32")
    assert (rep.tokenizer_model, rep.tokenizer_pre) == ("llama", "default")
    assert rep.warnings == [f"{SPM_PADDING} unused ids padded as [PAD<id>] to reach vocab_size "
                            f"{json.loads((spm_dir / 'config.json').read_text())['vocab_size']}"]
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(CliGroup(commands={"convert": convert_cmd}), ["convert", str(spm_dir), "-t", "f32"])
    assert res.exit_code == 0, res.output
    assert "SentencePiece tokenizer" in res.output


# --------------------------------------------------------------------------- other layouts


def _copy(spm_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(spm_dir, d)
    return d


def test_added_tokens_only_in_tokenizer_json(spm_dir, tmp_path):
    """transformers 5 saves added tokens in tokenizer.json only; llama.cpp's converter would write [PAD<id>]."""
    d = _copy(spm_dir, tmp_path)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    del tc["added_tokens_decoder"]
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    rep = convert_hf(d, tmp_path / "a.gguf", "f32")
    assert any("taken from tokenizer.json" in w for w in rep.warnings)
    kv, ref = _kv(tmp_path / "a.gguf"), _kv(converted(spm_dir, "f32"))
    n = len(ref["tokenizer.ggml.tokens"]) - len(SPM_ADDED) - SPM_PADDING
    assert kv["tokenizer.ggml.tokens"] == ref["tokenizer.ggml.tokens"]
    assert kv["tokenizer.ggml.token_type"][n:] == ref["tokenizer.ggml.token_type"][n:]
    assert kv["tokenizer.ggml.token_type"][0] == gguf.TokenType.UNKNOWN  # sentencepiece's own type, unlisted now

    # added_tokens.json (older saves) makes them user-defined, as llama.cpp's converter does
    (d / "added_tokens.json").write_text(json.dumps({SPM_ADDED[0]: n}))
    convert_hf(d, tmp_path / "b.gguf", "f32")
    types = _kv(tmp_path / "b.gguf")["tokenizer.ggml.token_type"]
    assert (types[n], types[n + 1]) == (gguf.TokenType.USER_DEFINED, gguf.TokenType.CONTROL)


def test_tokenizer_json_only(spm_dir, tmp_path):
    """No tokenizer.model: the Llama-style tokenizer.json is converted as SentencePiece, scores from merge ranks."""
    d = _copy(spm_dir, tmp_path)
    (d / "tokenizer.model").unlink()
    rep = convert_hf(d, tmp_path / "hf.gguf", "f32")
    assert rep.tokenizer_model == "llama"
    kv, ref = _kv(tmp_path / "hf.gguf"), _kv(converted(spm_dir, "f32"))
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
              "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"):
        assert kv[k] == ref[k], k
    prompts = PROMPTS + EXTRA
    assert _tokenize_all(tmp_path / "hf.gguf", prompts) == _tokenize_all(converted(spm_dir, "f32"), prompts)


def test_model_without_dummy_prefix(spm_dir, tmp_path):
    """A tokenizer.model trained with add_dummy_prefix=false: llama.cpp is told not to add "▁" (add_space_prefix)."""
    import sentencepiece as spm

    d = _copy(spm_dir, tmp_path)
    shutil.copy(tiny_spm_model("bpe", dummy_prefix=False), d / "tokenizer.model")
    convert_hf(d, tmp_path / "np.gguf", "f32")
    assert _kv(tmp_path / "np.gguf")["tokenizer.ggml.add_space_prefix"] is False
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    prompts = [p for p in PROMPTS + EXTRA if not _has_added(p)]
    assert _tokenize_all(tmp_path / "np.gguf", prompts) == [sp.encode(p, add_bos=True) for p in prompts]


# --------------------------------------------------------------------------- errors


def test_unigram_sentencepiece_is_refused(spm_dir, tmp_path):
    d = _copy(spm_dir, tmp_path)
    shutil.copy(tiny_spm_model("unigram"), d / "tokenizer.model")
    with pytest.raises(ConvertError, match="SentencePiece unigram model") as exc:
        convert_hf(d, tmp_path / "out.gguf", "f32")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out.gguf").exists()


def test_sentencepiece_errors(spm_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edge_fslm.cli import CliGroup
    from edge_fslm.convert.cli import convert as convert_cmd

    d = _copy(spm_dir, tmp_path)
    # the API names its own parameter; the command line names the flag
    with pytest.raises(ConvertError, match="pre_tokenizer only applies to byte-level BPE") as exc:
        convert_hf(d, tmp_path / "out.gguf", "f32", pre_tokenizer="gpt-2")
    assert "--pre-tokenizer" not in str(exc.value)
    res = CliRunner().invoke(CliGroup(commands={"convert": convert_cmd}),
                             ["convert", str(d), str(tmp_path / "out.gguf"), "-t", "f32", "--pre-tokenizer", "gpt-2"])
    assert res.exit_code == 2 and "--pre-tokenizer only applies to byte-level BPE" in res.output
    assert "pre_tokenizer" not in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out.gguf").exists()

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if it were not installed
    with pytest.raises(ConvertError) as exc:
        convert_hf(d, tmp_path / "out.gguf", "f32")
    msg = str(exc.value)
    assert str(d / "tokenizer.model") in msg and "pip install sentencepiece" in msg and "\n" not in msg
    monkeypatch.delitem(sys.modules, "sentencepiece")

    (d / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model")  # falls back to tokenizer.json
    rep = convert_hf(d, tmp_path / "fallback.gguf", "f32")
    assert rep.tokenizer_model == "llama" and "not a SentencePiece model" in rep.warnings[0]
    (d / "tokenizer.json").unlink()
    with pytest.raises(ConvertError, match="not a SentencePiece model, and there is no tokenizer.json"):
        convert_hf(d, tmp_path / "out.gguf", "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fallback.gguf", "model"], "failed conversions leave no files"
