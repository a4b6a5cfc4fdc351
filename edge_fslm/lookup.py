"""Prompt-lookup decoding: exact speculative decoding drafted from the stack's own text.

Why: later stages copy words from the request and from the notes earlier stages wrote. When
the last few generated tokens also occur earlier in the prompt (or the answer so far), the
tokens that followed them there are a cheap guess at what comes next. One decode of the
next token plus ``draft_max`` guessed ones gives the logits at every position; each guess
the model would have produced itself is kept, so a step can yield several tokens. That pays
only where a decode of a few tokens costs little more than a decode of one (a GPU, or a
memory-bound CPU); where it costs nearly that many one-token decodes, it does not
(``benchmarks/lookup_decoding.py`` measures both sides), which is why it is off by default.

Exactness: every position is sampled with the stage's own sampler chain, in order, exactly as
one-token decoding samples it (the same repeat-penalty history, the same random draws), and
the first token that differs from the guess replaces it and ends the step. So the output is
identical to plain decoding as long as the logits of a multi-token decode equal those of
one-token decodes. On the CPU kernels this build uses they do, bit for bit
(``benchmarks/stack_latency.py`` and tests/test_lookup.py check it), with two exceptions,
both kept out here:

* flash attention: a lone query over 512 or more KV cells (a sequence past position 255)
  takes a split-KV kernel that a multi-token decode does not (parallel.py's ``LONE_FROM``),
  so with flash attention on, no guess is verified at or past that position;
* weights whose multi-row matmul sums in another order than a one-row one (llama.cpp's tiled
  K-quant matmul, repacked Q4_0/IQ4_NL weights: ``benchmarks/batch_invariance.py``). Only
  the weight types in ``EXACT_TYPES`` draft at all; other models decode one token at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from . import llama
from .gguf_info import GGUFInfo

# Weight types whose multi-row matmul was checked bit-identical to a one-row one on this build
# (the built-in stacks' SmolLM2 Q4_1 file holds Q4_1, Q8_0 and F32 tensors; adapters are F16).
EXACT_TYPES = frozenset({"F32", "F16", "Q4_1", "Q8_0"})
MAX_NGRAM = 3  # the longest tail looked up, tried first
MIN_NGRAM = 2  # a one-token match guesses too often wrongly to pay for its decode


def inexact_types(info: GGUFInfo) -> list[str]:
    """The weight types of ``info`` outside EXACT_TYPES (empty when lookup decoding is exact)."""
    return sorted({t.ggml_type for t in info.tensors.values()} - EXACT_TYPES)


def effective_draft_max(info: GGUFInfo, requested: int) -> int:
    """The guesses a decode may verify on this model: none where they would not be exact. The
    pool and the planner both use this, so they agree."""
    return 0 if inexact_types(info) else requested


class NgramIndex:
    """Where each n-gram of a token sequence last ended, kept up to date as tokens arrive."""

    def __init__(self, tokens: list[int]):
        self.tokens: list[int] = []
        self.last: dict[tuple[int, ...], int] = {}  # n-gram -> index just past its latest earlier occurrence
        for t in tokens:
            self.push(t)

    def push(self, token: int) -> None:
        # index the n-grams that ended at the previous token first, so a lookup of the current
        # tail never finds the tail itself
        toks = self.tokens
        toks.append(token)
        end = len(toks) - 1
        for n in range(MIN_NGRAM, MAX_NGRAM + 1):
            if end >= n:
                self.last[tuple(toks[end - n:end])] = end

    def draft(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the longest recent tail seen before."""
        toks = self.tokens
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(toks) <= n:
                continue
            at = self.last.get(tuple(toks[-n:]))
            if at is not None:
                return toks[at:at + limit]
        return []


@dataclass
class LookupStats:
    """How lookup decoding went for one generation."""

    drafted: int = 0  # guessed tokens sent for verification
    accepted: int = 0  # ... that the model produced itself


def decode(lm: Any, sampler: Any, tokens: list[int], n_past: int, *, draft_max: int, lone_from: int | None,
           n_batch: int, stats: LookupStats) -> Iterator[int]:
    """Yield the tokens the stage generates after ``tokens`` (of which the first ``n_past`` are
    already in the KV cache), verifying up to ``draft_max`` guesses a decode.

    The prompt's rest is evaluated in ``n_batch``-token decodes, split where ``Llama.eval``
    splits it, so its logits are those of the plain path. ``lone_from``: the first position a
    guess may not reach (flash attention's split-KV kernel), or None.
    """
    lc = llama.lib()
    ctx = lm.ctx
    mem = lc.llama_get_memory(ctx)
    n_ctx = lc.llama_n_ctx(ctx)
    lc.llama_memory_seq_rm(mem, 0, n_past, -1)
    index = NgramIndex(tokens)
    with llama.Batch(n_batch) as batch:
        idx = batch.decode_from(ctx, tokens, n_past, 0, n_batch, "while evaluating the prompt")
        token = lc.llama_sampler_sample(sampler, ctx, idx)
        pos = len(tokens)  # where ``token`` goes
        while True:
            yield token
            index.push(token)
            if pos >= n_ctx:
                return
            room = min(draft_max, n_ctx - pos - 1, n_batch - 1)  # a decode holds at most n_batch tokens
            if lone_from is not None:
                room = min(room, lone_from - 1 - pos)
            guesses = index.draft(room) if room > 0 else []
            slots = [batch.add(token, pos, (0,), True)]
            slots += [batch.add(g, pos + 1 + j, (0,), True) for j, g in enumerate(guesses)]
            batch.decode(ctx, "while generating")
            stats.drafted += len(guesses)
            for j, slot in enumerate(slots):
                token = lc.llama_sampler_sample(sampler, ctx, slot)
                pos += 1
                if j < len(guesses) and token == guesses[j]:
                    stats.accepted += 1
                    yield token
                    index.push(token)
                    continue
                if j < len(guesses):  # the guesses from here on are wrong: drop their cells
                    lc.llama_memory_seq_rm(mem, 0, pos, -1)
                break
