"""Decode several prompts of one stage together: one ``llama_batch``, several sequences.

Why: generating a token reads every weight once, whether the batch holds one sequence or
eight, so on a CPU a step for eight prompts costs far less than eight steps. Stage-major
batch runs (batch.py) have many prompts waiting at the same stage under the same adapter,
which is exactly the case.

How: a second llama.cpp context on the already-loaded model (weights and adapter handles
are shared; only a KV cache and compute buffers are new), with ``n_seq_max`` sequences,
each with its own KV stream sized for this group's prompts. The group's common prompt
prefix is evaluated once and copied to every sequence with ``llama_memory_seq_cp``; then
every prompt's remaining tokens go in together, and each step decodes one token per
unfinished sequence. The KV streams are kept separate (``kv_unified = false``): with one
unified cache, llama.cpp 0.3.36's CPU logits for a sequence drifted by up to ~1.0 from
the same prompt run alone; with separate streams they are bit-identical. Sampling uses llama-cpp-python's own sampler construction (``Llama._init_sampler``,
the pinned 0.3.36 API), the same one ``Llama.generate`` uses, and stop rules use the same
:class:`~edge_fslm.stage.TokenCollector` as the sequential path.

So greedy outputs are the sequential path's, token for token (tests/test_parallel.py).
Stages that sample (temperature > 0) are not batched: in our tests their draws drifted
from the sequential path's after a few tokens, for a reason not yet found.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Any

from .errors import EdgeFSLMError
from .manifest import StageSpec
from .pool import _GGML_TYPES, LoadedModel, LoadSettings, PoolCounters, ResolvedAdapter, _llama_cpp
from .stage import Generation, TokenCollector

CTX_ROUND = 256  # KV cells are allocated in steps, so nearly equal groups reuse one context


def chunk_size(settings: LoadSettings) -> int:
    """Tokens per decode in the main context (``Llama``'s n_batch), which the parallel path copies."""
    return min(settings.batch_size, settings.ctx_size)


def seq_cells(token_lists: list[list[int]], max_tokens: int) -> int:
    """KV cells each sequence of a group needs: its longest prompt plus a full answer."""
    need = max(len(t) for t in token_lists) + max_tokens
    return -(-need // CTX_ROUND) * CTX_ROUND


@dataclass
class ParallelContext:
    """A multi-sequence llama.cpp context on a loaded model, reused while it is big enough."""

    lm: LoadedModel
    ctx: Any
    n_ctx: int
    n_seq: int
    n_batch: int
    adapter: tuple[str, float] | None | str = "unset"

    @classmethod
    def open(cls, lm: LoadedModel, settings: LoadSettings, n_seq: int, cells: int, kv_type: str) -> "ParallelContext":
        """A context of ``n_seq`` sequences with ``cells`` KV cells each, batching like the main one."""
        lc = _llama_cpp()
        p = lc.llama_context_default_params()
        n_batch = chunk_size(settings)
        n_ctx = max(n_seq * cells, n_batch)
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_batch
        p.n_seq_max = n_seq
        p.kv_unified = False  # a stream per sequence: see the module docstring
        p.n_threads = settings.threads
        p.n_threads_batch = settings.threads
        p.type_k = _GGML_TYPES[kv_type]
        p.type_v = _GGML_TYPES[kv_type]
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lc.llama_init_from_model(lm.llm._model.model, p)
        if not ctx:
            raise EdgeFSLMError(
                f"{lm.model.path}: llama.cpp could not create a {n_seq}-sequence context of {cells} tokens each"
                " — lower --parallel"
            )
        return cls(lm=lm, ctx=ctx, n_ctx=n_ctx, n_seq=n_seq, n_batch=n_batch)

    def fits(self, lm: LoadedModel, n_seq: int, cells: int) -> bool:
        return self.ctx is not None and lm is self.lm and n_seq <= self.n_seq and cells <= self.n_ctx // self.n_seq

    def use_adapter(self, adapter: ResolvedAdapter | None, counters: PoolCounters) -> None:
        want = None if adapter is None else (str(adapter.path), adapter.scale)
        if want != self.adapter:
            self.lm.set_adapter_on(self.ctx, adapter, counters)
            self.adapter = want

    def close(self) -> None:
        if self.ctx is not None:
            _llama_cpp().llama_free(self.ctx)
            self.ctx = None


class _Batch:
    """A ``llama_batch`` filled token by token; remembers which slot carries each sequence's logits."""

    def __init__(self, capacity: int, n_seq: int):
        lc = _llama_cpp()
        self.lc = lc
        self.capacity = capacity
        self.b = lc.llama_batch_init(capacity, 0, n_seq)
        self.n = 0

    def add(self, token: int, pos: int, seqs: tuple[int, ...], logits: bool) -> int:
        b, i = self.b, self.n
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = len(seqs)
        for k, s in enumerate(seqs):
            b.seq_id[i][k] = s
        b.logits[i] = logits
        self.n += 1
        return i

    def decode(self, ctx: Any) -> None:
        self.b.n_tokens = self.n
        rc = self.lc.llama_decode(ctx, self.b)
        self.n = 0
        if rc != 0:
            raise EdgeFSLMError(f"llama_decode failed with code {rc} in a parallel batch — lower --parallel")

    def close(self) -> None:
        self.lc.llama_batch_free(self.b)


def generate_group(
    pctx: ParallelContext, stage: StageSpec, token_lists: list[list[int]], seed: int, prefix: int, chunk: int
) -> list[Generation]:
    """Run one stage for every prompt of the group at once; one Generation per prompt, in order.

    ``prefix`` leading tokens (the same in every prompt) are evaluated once and copied to
    every sequence; the rest of each prompt goes in ``chunk``-token pieces, never split
    between two decodes differently from the sequential path, whose logits it reproduces.
    Seconds are the group's, divided by its size: the prompts ran together, so that is
    what each one cost.
    """
    lc = _llama_cpp()
    lm = pctx.lm
    llm = lm.llm
    n = len(token_lists)
    s = stage.sampling
    mem = lc.llama_get_memory(pctx.ctx)
    lc.llama_memory_clear(mem, False)
    outs = [Generation(prompt_tokens=len(t), cached_prompt_tokens=prefix) for t in token_lists]
    collectors = [TokenCollector(lm, stage) for _ in token_lists]
    batch = _Batch(pctx.n_batch, n)
    llm.set_seed(seed)  # _init_sampler seeds from the Llama, as Llama.generate does
    # one sampler chain per sequence for its whole generation, as Llama.generate keeps one:
    # its repeat-penalty history and its random state carry from token to token
    samplers = [llm._init_sampler(temp=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                                  repeat_penalty=s.repeat_penalty) for _ in token_lists]
    t0 = time.perf_counter()
    tokens = [0] * n  # each sequence's latest sampled token
    waiting: dict[int, int] = {}  # sequence -> batch slot whose logits it samples after the next decode

    def flush() -> None:
        batch.decode(pctx.ctx)
        for k, slot in waiting.items():  # a decode's logits are gone after the next one: sample now
            tokens[k] = lc.llama_sampler_sample(samplers[k].sampler, pctx.ctx, slot)
        waiting.clear()

    try:
        for start in range(0, prefix, chunk):  # the shared prefix, in sequence 0 only, as Llama.eval would
            for p in range(start, min(start + chunk, prefix)):
                batch.add(token_lists[0][p], p, (0,), False)
            flush()
        for k in range(1, n if prefix else 0):
            lc.llama_memory_seq_cp(mem, 0, k, -1, -1)
        pos = [len(t) for t in token_lists]
        for k, toks in enumerate(token_lists):  # each prompt's own rest; logits only for its last token
            for start in range(prefix, len(toks), chunk):
                piece = range(start, min(start + chunk, len(toks)))
                if batch.n + len(piece) > batch.capacity:
                    flush()
                for p in piece:
                    slot = batch.add(toks[p], p, (k,), p == len(toks) - 1)
                if piece[-1] == len(toks) - 1:
                    waiting[k] = slot
        if batch.n:
            flush()
        t_first = time.perf_counter()
        live = list(range(n))
        while True:
            for k in live:
                collectors[k].feed(tokens[k])  # batch mode keeps only the final text, not the pieces
            live = [k for k in live if not collectors[k].done]
            if not live:
                break
            for k in live:
                waiting[k] = batch.add(tokens[k], pos[k], (k,), True)
                pos[k] += 1
            flush()
        t_end = time.perf_counter()
    finally:
        batch.close()
        for smp in samplers:
            smp.close()
    for g, c in zip(outs, collectors):
        c.finish()
        g.text = c.output
        g.stop_reason = c.stop_reason
        g.completion_tokens = c.n
        g.prompt_seconds = (t_first - t0) / n
        g.gen_seconds = (t_end - t_first) / n
    return outs

