"""Loaded models: load, evict, and hot-swap LoRA adapters on a shared base.

This is the heart of the runtime. Stages that name the same base GGUF share one
``llama_model`` and one ``llama_context``; each stage's LoRA adapter is loaded once
with ``llama_adapter_lora_init`` and made active with ``llama_set_adapters_lora``,
which replaces the whole active set in well under a millisecond. The high-level
``Llama`` class cannot switch adapters (llama-cpp-python issue 1302), so we keep
``Llama`` for loading, tokenizing and sampling and make the adapter calls on its raw
handles through :mod:`edge_fslm.llama`. Under a tight budget (adapter residency
``active``) only the adapter a context has set stays loaded: a swap frees the old one
before it reads the next from its file, so the stack holds one adapter's bytes, not all.

Invariants the pipeline relies on:

* A context's KV cache only ever holds tokens evaluated under the adapter set that is
  active now: every adapter change (and every stage) starts from an empty cache.
* Adapters belong to their model: llama.cpp frees them with it, so evicting a model
  forgets its adapter handles.
* Every file reaches llama.cpp only after :mod:`gguf_info` validated it, and an adapter
  read again later must still be the file that was validated (same inode, size, mtime).
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import llama, lookup
from .errors import EdgeFSLMError, GGUFError
from .gguf_info import GGUFInfo

if TYPE_CHECKING:  # pragma: no cover
    from llama_cpp import Llama


@dataclass(frozen=True)
class ResolvedModel:
    """A base model whose file was found, hash-checked and validated."""

    id: str
    path: Path
    info: GGUFInfo

    @property
    def key(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class ResolvedAdapter:
    """A LoRA adapter file validated against the base it will be applied to."""

    path: Path
    info: GGUFInfo
    scale: float = 1.0
    file_mark: tuple[int, int, int] | None = None  # file_mark(path) when it was validated


def file_mark(path: Path) -> tuple[int, int, int]:
    """What tells a file apart from one swapped in or rewritten since: inode, size, mtime."""
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def default_threads() -> int:
    """One thread per physical core: llama.cpp gains nothing from hyper-threads."""
    import psutil

    return max(1, psutil.cpu_count(logical=False) or psutil.cpu_count() or 1)


@dataclass(frozen=True)
class LoadSettings:
    """How llama.cpp contexts are created; one set per stack run."""

    ctx_size: int = 2048
    threads: int = 1
    batch_size: int = 512
    gpu_layers: int = 0
    mmap: bool = True
    seed: int = 0
    verbose: bool = False
    # Flash attention never materialises the full KQ matrix, so a long prompt touches
    # almost no compute memory beyond a short one: the budget's worst case stays close to
    # the typical case. RuntimeSpec.flash_attn says what turning it off changes.
    flash_attn: bool = True
    # Save each stage's fixed prompt prefix (system prompt, few-shot turns) as KV state
    # once, and restore it on every later run instead of evaluating it again.
    prefix_cache: bool = True
    kv_cache_type: str = "f16"
    # "all": an adapter stays loaded once used, so a swap is one llama.cpp call; "active": only
    # the adapters a context has set stay loaded (the plan resolves the manifest's "auto").
    adapter_residency: str = "all"
    # Verify up to this many prompt-lookup guesses per decode (lookup.py; llama.cpp's --draft-max).
    draft_max: int = 0

    @classmethod
    def from_runtime(cls, rt, *, verbose: bool = False) -> "LoadSettings":
        """The settings a manifest's ``[runtime]`` table (a RuntimeSpec) asks for; threads 0 = one per core."""
        return cls(ctx_size=rt.ctx_size, threads=rt.threads or default_threads(), batch_size=rt.batch_size,
                   gpu_layers=rt.gpu_layers, mmap=rt.mmap, seed=rt.seed, verbose=verbose,
                   prefix_cache=rt.prefix_cache, kv_cache_type=rt.kv_cache_type, flash_attn=rt.flash_attn,
                   adapter_residency="all" if rt.adapter_residency == "auto" else rt.adapter_residency,
                   draft_max=rt.draft_max)


@dataclass
class PoolCounters:
    """Counts for the trace: what the pool did and what it cost."""

    loads: int = 0
    evictions: int = 0
    adapter_loads: int = 0
    adapter_swaps: int = 0
    prefetches: int = 0
    parallel_opens: int = 0  # multi-sequence contexts created (parallel.py)
    parallel_prefix_evals: int = 0  # shared prefixes evaluated in one
    parallel_prefix_reuses: int = 0  # ... and kept or restored from a saved state instead
    parallel_drops: int = 0  # sequences that left their slot mid-stage (their client went away)
    load_seconds: float = 0.0
    swap_seconds: float = 0.0

    def snapshot(self) -> "PoolCounters":
        return PoolCounters(**self.__dict__)

    def since(self, before: "PoolCounters") -> "PoolCounters":
        return PoolCounters(**{k: getattr(self, k) - getattr(before, k) for k in self.__dict__})


def malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc only) so RSS drops after an eviction."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value
_heap_fixed = False


def fix_mmap_threshold() -> None:
    """Keep glibc serving large blocks (adapters, token buffers) by mmap, so freeing them returns the pages.

    By default glibc raises its mmap threshold each time a large mmapped block is freed; after
    the first adapter swap, later multi-megabyte buffers come from the heap, and the holes they
    leave when freed are not given back, so a long run's RSS creeps upward with every swap
    (benchmarks/README.md, the "heap growth" row). Setting the threshold once turns that adjustment
    off. A user's own ``MALLOC_MMAP_THRESHOLD_`` wins; other C libraries are left alone.
    """
    global _heap_fixed
    if _heap_fixed or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _heap_fixed = True
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


@dataclass
class LoadedModel:
    """One resident ``Llama`` plus the adapters loaded onto its model."""

    model: ResolvedModel
    llm: "Llama"
    adapters: dict[str, Any] = field(default_factory=dict)  # adapter path -> llama_adapter_lora*
    active: tuple[str, float] | None = None
    pinned: bool = False
    keep_adapters: bool = True  # False: adapter residency "active"
    prefix_cache_enabled: bool = True
    prefix_cache: dict = field(default_factory=dict)  # stage.prefix_key -> stage.PrefixState
    parallel: Any = None  # parallel.ParallelContext: a multi-sequence context on this model, for batch runs
    chat_formatter: Any = None  # the model's Jinja chat template, compiled once (stage.render_prompt)
    vocab_facts: Any = None  # stage.VocabFacts: the longest token piece and the control tokens, read once
    draft_max: int = 0  # prompt-lookup guesses verified per decode (lookup.py); 0 = one token a decode
    lone_from: int | None = None  # the first position a guess may not reach (flash attention), or None

    @property
    def vocab(self) -> Any:
        return llama.vocab(self.llm)

    @property
    def ctx(self) -> Any:
        """The ``llama_context*`` of the model's own (single-sequence) context."""
        return llama.context_ptr(self.llm)

    def clear_kv(self) -> None:
        """Forget every evaluated token, so the next stage starts from an empty cache."""
        self.llm.reset()
        llama.clear_memory(self.ctx)

    def _adapter_handle(self, adapter: ResolvedAdapter, counters: PoolCounters) -> Any:
        key = str(adapter.path)
        handle = self.adapters.get(key)
        if handle is None:
            if adapter.file_mark is not None and file_mark(adapter.path) != adapter.file_mark:
                raise GGUFError(f"{adapter.path}: the file changed on disk after it was validated"
                                " — load the stack again")
            handle = llama.load_adapter(self.llm, key)
            if handle is None:
                raise GGUFError(
                    f"{adapter.path}: llama.cpp refused this LoRA adapter for base {self.model.path.name}"
                    " — rebuild it with `edge-fslm convert-lora` against this base (run with -v for llama.cpp's reason)"
                )
            self.adapters[key] = handle
            counters.adapter_loads += 1
        return handle

    def set_adapter_on(self, ctx: Any, adapter: ResolvedAdapter | None, counters: PoolCounters) -> None:
        """Make ``adapter`` (or none) the active set of ``ctx``, a context of this model.
        Adapter handles belong to the model, so every context of it can share them."""
        if adapter is None:
            rc = llama.set_adapter(ctx, None, 1.0)
        else:
            rc = llama.set_adapter(ctx, self._adapter_handle(adapter, counters), adapter.scale)
        if rc != 0:
            name = adapter.path if adapter else "(none)"
            raise EdgeFSLMError(f"{name}: llama.cpp could not set the adapter (code {rc}) — run with -v for details")

    def release_adapters(self, keep: str | None = None) -> None:
        """Free every loaded adapter but ``keep`` that no context of this model has set.

        Adapter residency "active" calls this before each swap, so the old adapter's bytes
        are back before the next one's are read."""
        used = {keep}
        if self.active is not None:
            used.add(self.active[0])
        held = getattr(self.parallel, "adapter", None)
        if isinstance(held, tuple):
            used.add(held[0])
        for key in [k for k in self.adapters if k not in used]:
            llama.free_adapter(self.adapters.pop(key))

    def activate(self, adapter: ResolvedAdapter | None, counters: PoolCounters) -> bool:
        """Make ``adapter`` (or the bare base) the active set. Returns True when it changed."""
        want = None if adapter is None else (str(adapter.path), adapter.scale)
        if want == self.active:
            return False
        t0 = time.perf_counter()
        if not self.keep_adapters and self.active is not None:
            self.set_adapter_on(self.ctx, None, counters)  # nothing may point at an adapter that is freed
            self.active = None
            self.release_adapters(keep=want[0] if want else None)
        self.set_adapter_on(self.ctx, adapter, counters)
        self.active = want
        self.clear_kv()  # cached tokens were computed under the previous adapter set
        counters.adapter_swaps += 1
        counters.swap_seconds += time.perf_counter() - t0
        return True

    def close(self) -> None:
        if self.parallel is not None:  # a context of this model: free it before the model goes
            self.parallel.close()
            self.parallel = None
        self.prefix_cache.clear()
        self.adapters.clear()  # freed by llama.cpp together with the model
        self.llm.close()


class ModelPool:
    """Keeps at most ``max_resident`` base models loaded, evicting the least recently used.

    ``max_resident=None`` keeps everything. The pool is not thread-safe: the owner
    (:class:`edge_fslm.api.Stack`) serialises runs.
    """

    def __init__(self, settings: LoadSettings, *, max_resident: int | None = None):
        fix_mmap_threshold()
        self.settings = settings
        self.max_resident = max_resident
        self.counters = PoolCounters()
        self._loaded: "OrderedDict[str, LoadedModel]" = OrderedDict()
        # held by whoever runs a stage on this pool's models: every Stack built on the pool
        # (a server serves several stacks on one pool) takes it for a whole run
        self.run_lock = threading.Lock()

    @property
    def resident(self) -> list[str]:
        return list(self._loaded)

    @property
    def loaded(self) -> list[LoadedModel]:
        """The loaded models, least recently used first."""
        return list(self._loaded.values())

    def get(self, model: ResolvedModel) -> LoadedModel:
        """The loaded model for ``model``, loading (and evicting others) if needed."""
        lm = self._loaded.get(model.key)
        if lm is not None:
            self._loaded.move_to_end(model.key)
            return lm
        if self.max_resident is not None:
            while len(self._loaded) >= self.max_resident:
                victim = next((k for k, v in self._loaded.items() if not v.pinned), None)
                if victim is None:
                    break
                self.evict(victim)
        lm = self._load(model)
        self._loaded[model.key] = lm
        return lm

    def _load(self, model: ResolvedModel) -> LoadedModel:
        llama.lib()
        from llama_cpp import Llama

        from .memory import effective_kv_type

        s = self.settings
        llama.set_verbose(s.verbose)
        kv_type = effective_kv_type(model.info, s.kv_cache_type)
        t0 = time.perf_counter()
        try:
            with llama.without_chat_handlers():
                llm = Llama(
                    model_path=str(model.path),
                    n_ctx=s.ctx_size,
                    n_batch=min(s.batch_size, s.ctx_size),
                    n_ubatch=min(s.batch_size, s.ctx_size),
                    flash_attn=s.flash_attn,
                    type_k=llama.GGML_TYPES[kv_type],
                    type_v=llama.GGML_TYPES[kv_type],
                    n_threads=s.threads,
                    n_threads_batch=s.threads,
                    n_gpu_layers=s.gpu_layers,
                    use_mmap=s.mmap,
                    seed=s.seed,
                    verbose=s.verbose,
                )
        except (ValueError, RuntimeError, UnicodeDecodeError) as exc:  # llama-cpp-python: ValueError on NULL
            raise GGUFError(
                f"{model.path}: llama.cpp could not load this model ({exc}) — run with -v for llama.cpp's log"
            ) from None
        self.counters.loads += 1
        self.counters.load_seconds += time.perf_counter() - t0
        return LoadedModel(model=model, llm=llm, prefix_cache_enabled=s.prefix_cache,
                           keep_adapters=s.adapter_residency != "active",
                           draft_max=lookup.effective_draft_max(model.info, s.draft_max),
                           lone_from=llama.LONE_FROM if s.flash_attn else None)

    def close_parallel(self, keep: LoadedModel | None = None) -> None:
        """Free the multi-sequence contexts of every loaded model but ``keep``: the budget
        allows for one at a time, and a batch run leaves none behind (the server keeps one
        across request groups, serve/scheduler.py)."""
        for lm in self._loaded.values():
            if lm is not keep and lm.parallel is not None:
                lm.parallel.close()
                lm.parallel = None

    def park_parallel(self) -> None:
        """Keep the multi-sequence contexts for the next group, but under adapter residency
        "active" without their adapter: until then the main context's is the only one resident."""
        for lm in self._loaded.values():
            if lm.parallel is not None and not lm.keep_adapters:
                lm.parallel.use_adapter(None, self.counters)

    def prefetch(self, model: ResolvedModel) -> bool:
        """Ask the kernel to start reading ``model``'s file into the page cache, if it is not loaded.

        Used when the policy swaps whole models: the next stage's weights stream in from
        disk while the current stage computes. The kernel does the I/O; nothing blocks.
        """
        if model.key in self._loaded or not hasattr(os, "posix_fadvise"):
            return False
        try:
            fd = os.open(model.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            return False
        finally:
            os.close(fd)
        self.counters.prefetches += 1
        return True

    def evict(self, key: str) -> None:
        lm = self._loaded.pop(key, None)
        if lm is None:
            return
        lm.close()
        del lm
        gc.collect()
        malloc_trim()
        self.counters.evictions += 1

    def close(self) -> None:
        for key in list(self._loaded):
            lm = self._loaded.pop(key)
            lm.close()
        gc.collect()
        malloc_trim()
