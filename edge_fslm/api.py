"""The Python API for apps: ``Stack.load(...)``, ``stack.run(...)``, ``stack.stream(...)``.

Threading model: a ``Stack`` may be shared between threads. Runs are serialised by
one lock (a llama.cpp context holds one sequence's state at a time), and every run
starts each stage from an empty KV cache, so concurrent callers get exactly the
results they would get calling one after another. For parallel throughput, load one
``Stack`` per thread (each holds its own copy of the models) or use batch mode.

A stream holds the lock while it is suspended. A stream its own thread abandoned (a
``break`` out of the loop, an exception while printing a piece) would then block that
thread's next call forever, so a new run, ``close`` or ``exclusive`` on the same thread
first closes it. Another thread's stream is waited for, as any run in progress is.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from .manifest import Manifest, StageSpec
from .memory import Plan, require_fit
from .pipeline import FinalStageSettings, Pipeline, RunResult, StageTrace, TextCallback
from .plan import (  # noqa: F401  (the planning steps were public here first)
    ResidencyUnit, make_plan, prepare_stack, residency_units, resolve_adapters, resolve_models,
)
from .pool import LoadSettings, ModelPool, ResolvedAdapter, ResolvedModel, default_threads  # noqa: F401
from .probe import probe_model, probing_enabled
from .rss import RssSampler


@dataclass
class StreamingRun:
    """Iterate for the final stage's text; ``result`` holds the full trace once iteration ends."""

    _gen: Iterator[str]
    result: RunResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        """Stop the run now and free the stack for the next one."""
        self._gen.close()  # type: ignore[attr-defined]

    def __enter__(self) -> "StreamingRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Stack:
    """A loaded stack, ready to run prompts. Use as a context manager; closing frees the models."""

    manifest: Manifest
    pipeline: Pipeline
    settings: LoadSettings
    measure_rss: bool = True
    plan: Plan | None = None
    owns_pool: bool = True  # False when several stacks share one pool: closing one leaves the models loaded
    _closed: bool = False
    _owner: int | None = field(default=None, repr=False)  # thread id holding _lock
    _active: "weakref.ref | None" = field(default=None, repr=False)  # the run generator holding _lock

    @property
    def _lock(self) -> threading.Lock:
        # the pool's: stacks that share a pool share its models' contexts, so they take turns
        return self.pipeline.pool.run_lock

    @contextlib.contextmanager
    def _locked(self, gen_ref: "weakref.ref | None" = None) -> Iterator[None]:
        """Hold the run lock; close this thread's own abandoned stream first, instead of deadlocking."""
        me = threading.get_ident()
        if self._owner == me and self._active is not None:
            abandoned = self._active()
            if abandoned is not None:
                try:
                    abandoned.close()  # runs its finally: the lock is released
                except ValueError:  # "generator already executing": called from inside a run's callback
                    raise RuntimeError("a Stack cannot be used from inside one of its own run callbacks") from None
        if self._owner == me and self._lock.locked():
            raise RuntimeError("this thread already holds the Stack (a batch or run in progress)")
        self._lock.acquire()
        self._owner, self._active = me, gen_ref
        try:
            yield
        finally:
            self._owner, self._active = None, None
            self._lock.release()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator["Stack"]:
        """Hold the stack for a multi-step job (batch mode) so no other run interleaves with it."""
        with self._locked():
            if self._closed:
                raise RuntimeError("this Stack is closed")
            yield self

    @classmethod
    def load(
        cls,
        stack: str | Path | Manifest = "fslm-smollm2",
        *,
        ctx_size: int | None = None,
        threads: int | None = None,
        batch_size: int | None = None,
        gpu_layers: int | None = None,
        mmap: bool | None = None,
        seed: int | None = None,
        flash_attn: bool | None = None,
        draft_max: int | None = None,
        adapter_residency: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        budget: str | int | None = None,
        policy: str | None = None,
        offline: bool | None = None,
        strict: bool = False,
        verbose: bool = False,
        measure_rss: bool = True,
        preload: bool = True,
        pool: ModelPool | None = None,
        probe: bool | None = None,
    ) -> "Stack":
        """Load a built-in stack by name, a manifest file, or a stack folder.

        Every model and adapter is resolved, hash-checked and validated here, before
        llama.cpp sees any file. The residency plan is made from GGUF metadata before
        anything loads; a ``budget`` ("300MB", "40%") that no policy meets raises
        BudgetError. With ``preload`` the resident models are loaded now too.

        ``pool`` shares an existing pool's loaded models with other stacks (the server
        does this): its settings and residency apply, and closing this stack leaves it open.

        Files from outside the installed packages are first loaded in a child process
        (:mod:`edge_fslm.probe`), once per file and machine, so a file that makes llama.cpp
        abort is refused instead of ending this process; ``probe=False`` (or
        ``EDGE_FSLM_PROBE=0``) skips that.
        """
        manifest, models, adapters, plan = prepare_stack(
            stack, budget=budget, policy=policy, offline=offline, strict=strict, ctx_size=ctx_size, threads=threads,
            batch_size=batch_size, gpu_layers=gpu_layers, mmap=mmap, seed=seed, flash_attn=flash_attn,
            draft_max=draft_max, adapter_residency=adapter_residency, max_tokens=max_tokens, temperature=temperature,
        )
        return cls.from_prepared(manifest, models, adapters, plan, verbose=verbose, measure_rss=measure_rss,
                                 preload=preload, pool=pool, probe=probe)

    @classmethod
    def from_prepared(
        cls,
        manifest: Manifest,
        models: dict[str, ResolvedModel],
        adapters: dict[str, ResolvedAdapter],
        plan: Plan,
        *,
        verbose: bool = False,
        measure_rss: bool = True,
        preload: bool = True,
        pool: ModelPool | None = None,
        probe: bool | None = None,
    ) -> "Stack":
        """A Stack from what :func:`prepare_stack` returned, without resolving its files again
        (the server prepares every stack at start and loads each on its first request)."""
        require_fit(plan)
        settings = replace(LoadSettings.from_runtime(manifest.runtime, verbose=verbose),
                           adapter_residency=plan.adapter_residency)
        if probing_enabled(probe):
            for mid, model in models.items():
                on_it = [adapters[st.name].path for st in manifest.stages if st.model == mid and st.name in adapters]
                probe_model(model.path, list(dict.fromkeys(on_it)), flash_attn=settings.flash_attn)
        owns_pool = pool is None
        if pool is None:
            pool = ModelPool(settings, max_resident=plan.max_resident)
        else:
            settings = pool.settings
        pipeline = Pipeline(manifest=manifest, models=models, adapters=adapters, pool=pool, policy=plan.policy)
        self = cls(manifest=manifest, pipeline=pipeline, settings=settings, measure_rss=measure_rss, plan=plan,
                   owns_pool=owns_pool)
        if preload:
            try:
                for m in list(models.values())[: plan.max_resident or len(models)]:
                    pool.get(m)
            except BaseException:
                if owns_pool:
                    pool.close()
                raise
        return self

    # -- running -----------------------------------------------------------------

    def _execute(
        self,
        prompt: str,
        truncate: bool,
        on_stage_end: Callable[[StageTrace], None] | None,
        holder: "weakref.ref[StreamingRun] | None",
        on_stage_start: Callable[[StageSpec], None] | None = None,
        me: "list[weakref.ref]" = (),  # type: ignore[assignment]
        on_text: TextCallback | None = None,
        final: FinalStageSettings | None = None,
    ) -> Iterator[str]:
        with self._locked(me[0] if me else None):
            if self._closed:
                raise RuntimeError("this Stack is closed")
            sampler = RssSampler() if self.measure_rss else None
            if sampler:
                sampler.start()
            try:
                result = yield from self.pipeline.execute(
                    prompt, truncate=truncate, on_stage_start=on_stage_start, on_stage_end=on_stage_end,
                    on_text=on_text, final=final,
                )
            finally:
                peak = sampler.stop() if sampler else 0
            result.peak_rss_bytes = peak
            if self.plan is not None:
                result.predicted_peak_rss_bytes = self.plan.predicted_peak
                result.extra["budget_bytes"] = self.plan.budget
            h = holder() if holder is not None else None
            if h is not None:
                h.result = result
            return result

    def run(
        self,
        prompt: str,
        *,
        truncate: bool = False,
        on_stage_start: Callable[[StageSpec], None] | None = None,
        on_stage_end: Callable[[StageTrace], None] | None = None,
        on_text: TextCallback | None = None,
        final: FinalStageSettings | None = None,
    ) -> RunResult:
        """Run every stage on ``prompt`` and return the answer with its trace.

        ``on_text(stage, piece)`` sees every stage's text as it is generated; an exception it
        raises stops the run at once. ``final`` sets the last stage's ``max_tokens``,
        ``temperature``, ``seed`` or ``stop`` for this run only.
        """
        me: list = []
        gen = self._execute(prompt, truncate, on_stage_end, None, on_stage_start, me, on_text, final)
        me.append(weakref.ref(gen))
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    def stream(
        self,
        prompt: str,
        *,
        truncate: bool = False,
        on_stage_end: Callable[[StageTrace], None] | None = None,
        final: FinalStageSettings | None = None,
    ) -> StreamingRun:
        """Like :meth:`run`, but yields the final stage's text as it is generated."""
        holder = StreamingRun(iter(()))
        # a weak reference: the generator must not keep its StreamingRun alive, or an abandoned
        # stream would hold the stack's lock until the garbage collector breaks the cycle
        me: list = []
        holder._gen = self._execute(prompt, truncate, on_stage_end, weakref.ref(holder), None, me, None, final)
        me.append(weakref.ref(holder._gen))
        return holder

    # -- lifetime ------------------------------------------------------------------

    def close(self) -> None:
        with self._locked():
            if not self._closed:
                self._closed = True
                if self.owns_pool:
                    self.pipeline.pool.close()

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
