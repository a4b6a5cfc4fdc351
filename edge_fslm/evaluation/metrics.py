"""Text-overlap metrics for instruction answers: exact match, ROUGE-1/ROUGE-L F1, Levenshtein similarity.

Pure Python and numpy, so evaluation needs no extra dependency. ROUGE tokenizes like
Google's ``rouge_score`` default tokenizer (lowercase, every run of characters other than
[a-z0-9] becomes a space, no stemming), so scores compare with papers that use it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

import numpy as np

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and symbols, collapse whitespace: what exact match compares."""
    kept = "".join(" " if c.isspace() else c for c in text.lower() if unicodedata.category(c)[0] not in "PS")
    return _SPACES.sub(" ", kept).strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts are equal after :func:`normalize`, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer without stemming."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    precision = overlap / max(n_pred, 1)
    recall = overlap / max(n_ref, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge1(prediction: str, reference: str) -> float:
    """ROUGE-1 F1: unigram overlap, each token counted at most as often as it occurs in both."""
    pred, ref = Counter(rouge_tokens(prediction)), Counter(rouge_tokens(reference))
    overlap = sum((pred & ref).values())
    return _f1(overlap, sum(pred.values()), sum(ref.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison–Dix): O(len(b)) big-int steps."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: precision and recall of the longest common token subsequence."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    return _f1(lcs_length(pred, ref), len(pred), len(ref))


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insert, delete, substitute, each cost 1).

    One numpy step per character of ``a``: a row's insertions are a running minimum,
    ``cur[j] = j + min_k<=j (tmp[k] - k)``, so no Python loop runs over ``b``.
    """
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    codes_b = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    idx = np.arange(len(b) + 1, dtype=np.int64)
    prev = idx.copy()
    for i, ch in enumerate(a, 1):
        tmp = np.empty_like(prev)
        tmp[0] = i
        tmp[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (codes_b != ord(ch)))
        prev = idx + np.minimum.accumulate(tmp - idx)
    return int(prev[-1])


def levenshtein_similarity(prediction: str, reference: str) -> float:
    """1 - distance / max(len, 1): 1.0 for equal texts, 0.0 for nothing in common."""
    return 1.0 - levenshtein(prediction, reference) / max(len(prediction), len(reference), 1)


def text_scores(prediction: str, reference: str) -> dict[str, float]:
    """Every metric for one answer, keyed as the eval report names them."""
    return {
        "exact_match": exact_match(prediction, reference),
        "rouge1": rouge1(prediction, reference),
        "rougeL": rouge_l(prediction, reference),
        "levenshtein": levenshtein_similarity(prediction, reference),
    }
