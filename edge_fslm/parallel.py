"""Decode several prompts of one stage together: one ``llama_batch``, several sequences.

Why: generating a token reads every weight once, whether the batch holds one sequence or
eight, so on a CPU a step for eight prompts costs far less than eight steps. Stage-major
batch runs (batch.py) have many prompts waiting at the same stage under the same adapter,
which is exactly the case.

How: a second llama.cpp context on the already-loaded model (weights and adapter handles
are shared; only a KV cache and compute buffers are new) with a KV stream per slot plus
one that keeps the stage's shared prompt prefix, evaluated once and copied into each slot
with ``llama_memory_seq_cp``. Each step decodes one token for every busy slot in one
batch; a prompt that finishes hands its slot to the next (continuous batching).

The context outlives one call: the server keeps it open across request groups. Each prefix
it evaluates is saved (``llama_state_seq_get_data`` of the prefix sequence, as
``lm.prefix_cache`` saves the main context's; the two cannot share states, which record their
context's KV stream count) and put back with ``llama_state_seq_set_data`` when a later call
needs it (bytes copied, so exactly what evaluating it again gives), or left in place when the
prefix sequence still holds it. Stage-major groups alternate stages, so both happen.

Exactness: llama.cpp's logits depend on where a prompt is split between decodes (moving
the split moves logits by up to ~1 on this model), so every prompt is split exactly where
the sequential path splits it (its prefix cache, then ``n_batch`` chunks), and each
prompt's rest gets decodes of its own. With that, a prompt's first token is bit-identical
to a one-at-a-time run (tests/test_parallel.py). Later steps decode one token for each of
several sequences, and two of llama.cpp's CPU kernels then differ from a lone decode
(benchmarks/batch_invariance.py finds them op by op):

* flash attention: a lone query over 512 or more KV cells takes a split-KV kernel (one
  partial softmax per thread, merged), a step with several streams the one-pass kernel;
* llamafile's sgemm takes any matmul of two or more rows (the F16 LoRA adapters), where one
  row takes ggml's dot product, which sums in another order.

scripts/install.sh builds llama.cpp without llamafile, and a slot that a lone decode would
send down the split-KV kernel is decoded alone (``LONE_FROM``), so every answer is identical
to a one-at-a-time run (tests/test_parallel.py). With ``flash_attn = false`` there is no
such kernel, and every step batches every slot. That covers the Q4_1 file the built-in
stacks run. On K-quant weights (Q4_K_M) two more kernels take a batch of rows another way
than one row, llama.cpp's tiled matmul and its repacked weights, so there a batched answer
may still differ (``benchmarks/batch_invariance.py --model gemma``). The KV streams are kept separate
(``kv_unified = false``): a unified cache drifted from the first token. Sampling uses
llama-cpp-python's own sampler construction (``Llama._init_sampler``, the pinned 0.3.36
API) and stop rules the same :class:`~edge_fslm.stage.TokenCollector` as the sequential
path. Sampled stages (temperature > 0) are not batched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import llama
from .errors import EdgeFSLMError
from .manifest import StageSpec
from .pool import LoadedModel, LoadSettings, PoolCounters, ResolvedAdapter
from .stage import Generation, TokenCollector

PARALLEL_HINT = "in a parallel batch — lower parallel"

CTX_ROUND = 256  # KV cells are allocated in steps, so stages of similar length reuse one context
# A slot at or past LONE_FROM is decoded alone, as the sequential path decodes it, so it takes the
# same flash-attention kernel; shorter ones are decoded together.
LONE_FROM = llama.LONE_FROM


def chunk_size(settings: LoadSettings) -> int:
    """Tokens per decode in the main context (``Llama``'s n_batch), which the parallel path copies."""
    return min(settings.batch_size, settings.ctx_size)


def seq_cells(token_lists: list[list[int]], max_tokens: int) -> int:
    """KV cells each slot needs: the longest prompt plus a full answer."""
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
    flash_attn: bool = True
    adapter: tuple[str, float] | None | str = "unset"
    # (adapter, prefix tokens) -> (sequence state, bytes): every prefix evaluated in this context
    prefixes: dict[tuple, tuple[Any, int]] = field(default_factory=dict)
    holding: tuple | None = None  # the key of what the prefix sequence holds now, if anything

    @property
    def prefix_bytes(self) -> int:
        """What the saved prefix states take, on top of the context itself."""
        return sum(n for _, n in self.prefixes.values())

    @classmethod
    def open(cls, lm: LoadedModel, settings: LoadSettings, n_seq: int, cells: int, kv_type: str) -> "ParallelContext":
        """A context of ``n_seq`` sequences with ``cells`` KV cells each, batching like the main one."""
        lc = llama.lib()
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
        p.type_k = llama.GGML_TYPES[kv_type]
        p.type_v = llama.GGML_TYPES[kv_type]
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lc.llama_init_from_model(llama.model_ptr(lm.llm), p)
        if not ctx:
            raise EdgeFSLMError(
                f"{lm.model.path}: llama.cpp could not create a {n_seq}-sequence context of {cells} tokens each"
                " — lower parallel"
            )
        return cls(lm=lm, ctx=ctx, n_ctx=n_ctx, n_seq=n_seq, n_batch=n_batch, flash_attn=settings.flash_attn)

    def fits(self, lm: LoadedModel, n_seq: int, cells: int) -> bool:
        """Reusable for ``n_seq`` sequences of ``cells`` each. A wider one does too: a group fills
        the slots it needs and leaves the rest empty (the prefix sits in the last sequence, which
        :func:`generate_group` takes from the context itself)."""
        return self.ctx is not None and lm is self.lm and n_seq <= self.n_seq and cells <= self.n_ctx // self.n_seq

    def use_adapter(self, adapter: ResolvedAdapter | None, counters: PoolCounters) -> None:
        want = None if adapter is None else (str(adapter.path), adapter.scale)
        if want != self.adapter:
            if not self.lm.keep_adapters and isinstance(self.adapter, tuple):
                self.lm.set_adapter_on(self.ctx, None, counters)  # as LoadedModel.activate: free before reading
                self.adapter = None
                self.lm.release_adapters(keep=want[0] if want else None)
            self.lm.set_adapter_on(self.ctx, adapter, counters)
            self.adapter = want

    def load_prefix(self, tokens: list[int], chunk: int, batch: "llama.Batch", counters: PoolCounters) -> None:
        """Empty every slot and leave ``tokens`` (a stage's shared prefix, maybe none) in the prefix
        sequence: kept when it already holds them, else restored from a saved state, else evaluated
        in ``chunk``-token decodes (where the sequential path splits) and saved for next time."""
        lc = llama.lib()
        mem = lc.llama_get_memory(self.ctx)
        keep = self.n_seq - 1
        key = (self.adapter, tuple(tokens))
        if tokens and key == self.holding:
            for seq in range(keep):
                lc.llama_memory_seq_rm(mem, seq, -1, -1)
            counters.parallel_prefix_reuses += 1
            return
        lc.llama_memory_clear(mem, False)  # the prefix goes back where it was evaluated: cell 0 on
        self.holding = None
        if not tokens:
            return
        saved = self.prefixes.get(key)
        if saved is not None and llama.restore_sequence(self.ctx, saved[0], saved[1], keep):
            self.holding = key
            counters.parallel_prefix_reuses += 1
            return
        lc.llama_memory_clear(mem, False)
        batch.decode_from(self.ctx, tokens, 0, keep, chunk, PARALLEL_HINT, logits_last=False)
        counters.parallel_prefix_evals += 1
        buf, written = llama.save_sequence(self.ctx, keep)
        if written:
            self.prefixes[key] = (buf, written)
        self.holding = key

    def close(self) -> None:
        if self.ctx is not None:
            llama.lib().llama_free(self.ctx)
            self.ctx = None
        self.prefixes.clear()
        self.holding = None


def generate_group(
    pctx: ParallelContext,
    stage: StageSpec,
    token_lists: list[list[int]],
    seed: int,
    prefix: int,
    chunk: int,
    on_done: Callable[[int, Generation], None] | None = None,
    counters: PoolCounters | None = None,
    on_piece: Callable[[int, str], None] | None = None,
    dropped: Callable[[int], bool] | None = None,
) -> list[Generation]:
    """Run one stage for every prompt in ``token_lists``, up to ``pctx.n_seq - 1`` at a time.

    Continuous batching: each step decodes one token for every prompt in a slot, and a
    prompt that finishes hands its slot to the next one at once, so the batch stays full
    until the queue runs dry (fixed groups would wait for their longest answer).

    ``prefix`` leading tokens (the same in every prompt) are evaluated once into the last
    sequence, which keeps them (:meth:`ParallelContext.load_prefix`: across calls too), and
    copied into a slot for each new prompt; the rest of
    each prompt goes in ``chunk``-token decodes of its own, as ``Llama.eval`` would. Packing
    several prompts' rests into one decode would be faster (a longer decode runs at more
    tokens a second; benchmarks/README.md has the figures) but not exact: llama.cpp splits a
    multi-stream batch into ubatches with equal tokens per sequence, which moves each
    prompt's split points and so its logits.

    ``on_piece(index, text)``, when given, hears each prompt's text as it is decoded, in the
    pieces the sequential path yields (the same :class:`~edge_fslm.stage.TokenCollector`
    holds back split UTF-8 and possible stop strings), so a server can stream a grouped
    request token by token; it only listens, so the tokens are the same with or without it.
    ``on_done(index, generation)`` is called as each prompt finishes. A Generation's
    seconds are its own span, from entering a slot to its last token, shared with the
    prompts it ran beside.

    ``dropped(index)``, when given, is asked before every step: a prompt it names (a server
    request whose client went away) leaves its slot at once, without ``on_done``, and its
    Generation keeps what it had with ``stop_reason`` "cancelled". Its KV stream is cleared and
    the slot goes to the next prompt, so a hang-up costs the group no further decode. Wherever
    grouped answers equal one-at-a-time ones (above), the others' tokens do not change.
    """
    lc = llama.lib()
    lm = pctx.lm
    llm = lm.llm
    width = pctx.n_seq - 1  # the last sequence holds the shared prefix
    keep = width
    s = stage.sampling
    mem = lc.llama_get_memory(pctx.ctx)
    outs = [Generation(prompt_tokens=len(t), cached_prompt_tokens=prefix) for t in token_lists]
    batch = llama.Batch(pctx.n_batch, pctx.n_seq)
    queue = list(range(len(token_lists)))
    queue.reverse()  # pop() takes them in order
    slots: dict[int, _Slot] = {}  # sequence id -> the prompt in it

    def sample(slot: "_Slot", idx: int) -> None:
        slot.token = lc.llama_sampler_sample(slot.sampler.sampler, pctx.ctx, idx)

    def admit(seq: int, k: int) -> None:
        """Put prompt ``k`` into sequence ``seq``: copy the prefix, evaluate its rest, sample."""
        llm.set_seed(seed)  # _init_sampler seeds from the Llama, as Llama.generate does
        # one sampler chain per prompt for its whole generation, as Llama.generate keeps one:
        # its repeat-penalty history and random state carry from token to token
        sampler = llama.sampler_chain(llm, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                      min_p=s.min_p, repeat_penalty=s.repeat_penalty)
        slot = _Slot(k, TokenCollector(lm, stage), sampler, pos=len(token_lists[k]), t0=time.perf_counter())
        slots[seq] = slot
        lc.llama_memory_seq_rm(mem, seq, -1, -1)
        if prefix:
            lc.llama_memory_seq_cp(mem, keep, seq, -1, -1)
        sample(slot, batch.decode_from(pctx.ctx, token_lists[k], prefix, seq, chunk, PARALLEL_HINT))
        slot.t_first = time.perf_counter()

    def retire(seq: int) -> None:
        slot = slots.pop(seq)
        slot.sampler.close()
        c, g = slot.collector, outs[slot.k]
        rest = c.finish()
        if rest and on_piece:
            on_piece(slot.k, rest)
        g.text, g.stop_reason, g.completion_tokens = c.output, c.stop_reason, c.n
        end = time.perf_counter()
        g.prompt_seconds = slot.t_first - slot.t0
        g.gen_seconds = end - slot.t_first
        if on_done:
            on_done(slot.k, g)

    def drop(seq: int) -> None:
        """Free the slot of a prompt nobody waits for any more; no on_done, no last piece."""
        slot = slots.pop(seq)
        slot.sampler.close()
        lc.llama_memory_seq_rm(mem, seq, -1, -1)
        g = outs[slot.k]
        g.text, g.stop_reason, g.completion_tokens = slot.collector.output, "cancelled", slot.collector.n
        if counters is not None:
            counters.parallel_drops += 1

    def gone(k: int) -> bool:
        if dropped is not None and dropped(k):
            outs[k].stop_reason = "cancelled"
            return True
        return False

    def took(seq: int) -> None:
        """The slot sampled a token: keep it, or finish the prompt and free the slot."""
        slot = slots[seq]
        piece = slot.collector.feed(slot.token)
        if piece and on_piece:
            on_piece(slot.k, piece)
        if slot.collector.done:
            retire(seq)

    def compact() -> None:
        """Move the last busy slots into the free ones below them (a KV stream copy each), so the
        busy sequence ids stay consecutive once the queue has run dry."""
        while True:
            free = [q for q in range(width) if q not in slots]
            if not free or not slots or max(slots) < free[0]:
                return
            src, dst = max(slots), free[0]
            lc.llama_memory_seq_rm(mem, dst, -1, -1)
            lc.llama_memory_seq_cp(mem, src, dst, -1, -1)
            lc.llama_memory_seq_rm(mem, src, -1, -1)
            slots[dst] = slots.pop(src)

    try:
        pctx.load_prefix(token_lists[0][:prefix], chunk, batch, counters if counters is not None else PoolCounters())
        while True:
            # refill every free slot before the next step: llama.cpp splits a step whose sequence
            # ids are not consecutive into several ubatches, which costs nearly a decode each
            for seq in [q for q in slots if gone(slots[q].k)]:
                drop(seq)
            for seq in range(width):
                while seq not in slots and queue:
                    k = queue.pop()
                    if gone(k):
                        continue
                    admit(seq, k)
                    took(seq)
            if not slots:
                break
            if not queue:
                compact()
            together = [q for q in sorted(slots) if not (pctx.flash_attn and slots[q].pos >= LONE_FROM)]
            alone = [[q] for q in sorted(slots) if q not in together]
            for group in ([together] if together else []) + alone:
                waiting = {}
                for seq in group:
                    slot = slots[seq]
                    waiting[seq] = batch.add(slot.token, slot.pos, (seq,), True)
                    slot.pos += 1
                batch.decode(pctx.ctx, PARALLEL_HINT)
                for seq, idx in waiting.items():
                    sample(slots[seq], idx)
                    took(seq)
    finally:
        batch.close()
        for slot in slots.values():
            slot.sampler.close()
    return outs


@dataclass
class _Slot:
    """One prompt occupying a sequence of the context."""

    k: int
    collector: TokenCollector
    sampler: Any
    pos: int
    t0: float
    token: int = 0
    t_first: float = 0.0
