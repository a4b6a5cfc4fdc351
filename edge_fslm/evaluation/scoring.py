"""Log-likelihood scoring: how probable does a loaded model find each continuation of a context?

Multiple-choice evaluation (ARC, lm-evaluation-harness) ranks answers by this number.
``Llama.eval`` keeps logits for the last position only (``logits_all`` would keep
n_ctx × n_vocab floats for every run), so this module drives llama.cpp's batch API
itself: the shared context is decoded once, with logits for its last token only; each
continuation is then decoded on top of it with logits for its own positions, and its KV
cells are removed again, so the next continuation reuses the context's cache. Four ARC
choices cost one context evaluation. Log-softmax runs in float64 with numpy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import llama
from ..errors import PromptError
from ..pool import LoadedModel

# Continuation tokens per decode call. It bounds memory (llama.cpp's logits buffer holds this many
# rows of n_vocab floats) and keeps scores independent of batching: llama.cpp's CPU flash-attention
# kernel rounds differently for batches of more than about 32 tokens.
LOGIT_CHUNK = 32


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (float32 loses digits when summing many log-probs)."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def encode(lm: LoadedModel, text: str, *, bos: bool = False) -> list[int]:
    """Tokenize data text (never parsing special tokens in it), with BOS only if asked and the model wants it."""
    add_bos = bos and bool(llama.lib().llama_vocab_get_add_bos(lm.vocab))
    return lm.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)


def encode_pair(lm: LoadedModel, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Split tokens the way lm-evaluation-harness does for causal models.

    Trailing spaces of the context move to the continuation; the pair is tokenized as one
    text and cut where the context's own tokens end, so a word boundary tokenizes as it
    would in running text.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(lm, context + continuation, bos=True)
    context_tokens = encode(lm, context, bos=True)
    return context_tokens, whole[len(context_tokens):]


def _decode_run(batch: llama.Batch, ctx, tokens: Sequence[int], start: int, logits: str) -> None:
    """Decode ``tokens`` of sequence 0 at positions ``start...``; logits for the "last" token only or "all"."""
    n = len(tokens)
    for i, tok in enumerate(tokens):
        batch.add(tok, start + i, (0,), logits == "all" or i == n - 1)
    batch.decode(ctx, f"on {n} tokens at position {start} — raise ctx_size, or run with -v for llama.cpp's log")


def _rows(lc, ctx, n: int, n_vocab: int) -> np.ndarray:
    """The logits of the last ``n`` outputs of the latest decode, copied out of llama.cpp."""
    return np.stack([np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i - n), shape=(n_vocab,)) for i in range(n)])


def _score(rows: np.ndarray, targets: Sequence[int]) -> tuple[float, bool]:
    logp = log_softmax(rows)
    picked = logp[np.arange(len(targets)), targets]
    return float(picked.sum()), bool((rows.argmax(axis=-1) == np.asarray(targets)).all())


def loglikelihood(
    lm: LoadedModel,
    context_tokens: Sequence[int],
    continuations: Sequence[Sequence[int]],
    *,
    truncate: bool = False,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), is the continuation the greedy one) for each continuation.

    The context is evaluated once and its KV reused for every continuation. When
    context + longest continuation does not fit the model's context, ``truncate`` drops
    context tokens from the left (as lm-evaluation-harness does); otherwise it is an error.
    The KV cache is empty afterwards, as every stage expects.
    """
    lc = llama.lib()
    ctx = lm.ctx
    # llama.cpp may round the context up (flash attention pads it); the size asked for is the limit
    n_ctx = min(lc.llama_n_ctx(ctx), lm.llm.context_params.n_ctx or lc.llama_n_ctx(ctx))
    n_batch = lc.llama_n_batch(ctx)
    n_vocab = lm.llm.n_vocab()
    context = list(context_tokens)
    conts = [list(c) for c in continuations]
    if not context:
        raise PromptError("scoring needs at least one context token (use BOS/EOS for an empty context)")
    longest = max((len(c) for c in conts), default=0)
    over = len(context) + max(longest - 1, 0) - n_ctx
    if over > 0:
        if not truncate or over >= len(context):
            raise PromptError(
                f"context of {len(context)} tokens plus a continuation of {longest} tokens is over the context"
                f" size of {n_ctx} — raise ctx_size"
            )
        context = context[over:]
    mem = lc.llama_get_memory(ctx)
    n = len(context)
    results: list[tuple[float, bool]] = []
    lm.clear_kv()
    try:
        with llama.Batch(max(1, min(n_batch, n_ctx))) as batch:

            def eval_context() -> np.ndarray:
                for i in range(0, n, batch.capacity):
                    _decode_run(batch, ctx, context[i : i + batch.capacity], i, "last")
                return _rows(lc, ctx, 1, n_vocab).astype(np.float64)

            last = eval_context()
            for k, cont in enumerate(conts):
                if not cont:
                    results.append((0.0, True))
                    continue
                total, greedy = _score(last, cont[:1])
                step = min(LOGIT_CHUNK, batch.capacity)
                for i in range(0, len(cont) - 1, step):  # a chunk's logits predict the chunk shifted by one
                    chunk = cont[i : min(i + step, len(cont) - 1)]
                    _decode_run(batch, ctx, chunk, n + i, "all")
                    s, g = _score(_rows(lc, ctx, len(chunk), n_vocab), cont[i + 1 : i + 1 + len(chunk)])
                    total, greedy = total + s, greedy and g
                results.append((total, greedy))
                if k + 1 < len(conts) and len(cont) > 1 and not lc.llama_memory_seq_rm(mem, 0, n, -1):
                    # a memory that cannot drop a partial sequence (recurrent models): evaluate the context again
                    lm.clear_kv()
                    last = eval_context()
    finally:
        lm.clear_kv()
    return results
