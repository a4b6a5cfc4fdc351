"""Loaded models: load, evict, and hot-swap LoRA adapters on a shared base.

This is the heart of the runtime. Stages that name the same base GGUF share one
``llama_model`` and one ``llama_context``; each stage's LoRA adapter is loaded once
with ``llama_adapter_lora_init`` and made active with ``llama_set_adapters_lora``,
which replaces the whole active set in well under a millisecond. The high-level
``Llama`` class cannot switch adapters (llama-cpp-python issue 1302), so we keep
``Llama`` for loading, tokenizing and sampling and reach its raw handles
(``llm._model.model``, ``llm._ctx.ctx``) for the adapter calls.

Invariants the pipeline relies on:

* A context's KV cache only ever holds tokens evaluated under the adapter set that is
  active now: every adapter change (and every stage) starts from an empty cache.
* Adapters belong to their model: llama.cpp frees them with it, so evicting a model
  forgets its adapter handles.
* Every file reaches llama.cpp only after :mod:`gguf_info` validated it.
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
    # the typical case (measured: +6 MiB vs +35 MiB without it, full 2048-token eval).
    flash_attn: bool = True
    # Save each stage's fixed prompt prefix (system prompt, few-shot turns) as KV state
    # once, and restore it on every later run instead of evaluating it again.
    prefix_cache: bool = True
    kv_cache_type: str = "f16"


@dataclass
class PoolCounters:
    """Counts for the trace: what the pool did and what it cost."""

    loads: int = 0
    evictions: int = 0
    adapter_loads: int = 0
    adapter_swaps: int = 0
    prefetches: int = 0
    load_seconds: float = 0.0
    swap_seconds: float = 0.0

    def snapshot(self) -> "PoolCounters":
        return PoolCounters(**self.__dict__)

    def since(self, before: "PoolCounters") -> "PoolCounters":
        return PoolCounters(**{k: getattr(self, k) - getattr(before, k) for k in self.__dict__})


_LOG = {"verbose": False, "callback": None}
GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type ids, as llama.cpp's --cache-type-k/-v take them


def llama_cpp_lib():
    """The ``llama_cpp`` module, imported once with edge-fslm's log routing: the one way in.

    Modules that need llama.cpp's low-level API (scoring, parallel decoding) call this
    instead of importing ``llama_cpp`` themselves, so the log stays quiet and the backtrace
    guard is set before the library loads.
    """
    # On an abort, ggml forks gdb for a backtrace; an orphaned gdb can hang the caller's pipeline.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    import llama_cpp  # deferred: importing it costs ~0.1 s and `inspect`/`plan` never need it

    if _LOG["callback"] is None:
        # llama-cpp-python's own callback lets some warnings through even with verbose=False;
        # ours prints llama.cpp's log only under -v, so a normal run's stderr stays clean.
        @llama_cpp.llama_log_callback
        def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if _LOG["verbose"]:
                sys.stderr.write(text.decode("utf-8", errors="replace"))
                sys.stderr.flush()

        _LOG["callback"] = _log  # keep a reference: llama.cpp holds a raw pointer to it
        llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    return llama_cpp


def set_verbose(verbose: bool) -> None:
    """Show (or hide) llama.cpp's own log for this process."""
    _LOG["verbose"] = verbose


def malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc only) so RSS drops after an eviction."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
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
    prefix_cache_enabled: bool = True
    prefix_cache: dict = field(default_factory=dict)  # stage.prefix_key -> stage.PrefixState
    parallel: Any = None  # parallel.ParallelContext: a multi-sequence context on this model, for batch runs

    @property
    def vocab(self) -> Any:
        return llama_cpp_lib().llama_model_get_vocab(self.llm._model.model)

    def clear_kv(self) -> None:
        """Forget every evaluated token, so the next stage starts from an empty cache."""
        lc = llama_cpp_lib()
        self.llm.reset()
        mem = lc.llama_get_memory(self.llm._ctx.ctx)
        if mem is not None:
            lc.llama_memory_clear(mem, False)  # cells marked empty; zeroing 47 MB of KV data buys nothing

    def _adapter_handle(self, adapter: ResolvedAdapter, counters: PoolCounters) -> Any:
        key = str(adapter.path)
        handle = self.adapters.get(key)
        if handle is None:
            lc = llama_cpp_lib()
            handle = lc.llama_adapter_lora_init(self.llm._model.model, key.encode())
            if not handle:
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
        lc = llama_cpp_lib()
        if adapter is None:
            rc = lc.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            handle = self._adapter_handle(adapter, counters)
            arr = (lc.llama_adapter_lora_p_ctypes * 1)(handle)
            scales = (ctypes.c_float * 1)(adapter.scale)
            rc = lc.llama_set_adapters_lora(ctx, arr, 1, scales)
        if rc != 0:
            name = adapter.path if adapter else "(none)"
            raise EdgeFSLMError(f"{name}: llama.cpp could not set the adapter (code {rc}) — run with -v for details")

    def activate(self, adapter: ResolvedAdapter | None, counters: PoolCounters) -> bool:
        """Make ``adapter`` (or the bare base) the active set. Returns True when it changed."""
        want = None if adapter is None else (str(adapter.path), adapter.scale)
        if want == self.active:
            return False
        t0 = time.perf_counter()
        self.set_adapter_on(self.llm._ctx.ctx, adapter, counters)
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
        llama_cpp_lib()
        from llama_cpp import Llama

        from .memory import effective_kv_type

        s = self.settings
        set_verbose(s.verbose)
        kv_type = effective_kv_type(model.info, s.kv_cache_type)
        t0 = time.perf_counter()
        try:
            llm = Llama(
                model_path=str(model.path),
                n_ctx=s.ctx_size,
                n_batch=min(s.batch_size, s.ctx_size),
                n_ubatch=min(s.batch_size, s.ctx_size),
                flash_attn=s.flash_attn,
                type_k=GGML_TYPES[kv_type],
                type_v=GGML_TYPES[kv_type],
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
        return LoadedModel(model=model, llm=llm, prefix_cache_enabled=s.prefix_cache)

    def close_parallel(self, keep: LoadedModel | None = None) -> None:
        """Free the multi-sequence contexts of every loaded model but ``keep``: the budget
        allows for one at a time, and a batch run leaves none behind."""
        for lm in self._loaded.values():
            if lm is not keep and lm.parallel is not None:
                lm.parallel.close()
                lm.parallel = None

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
