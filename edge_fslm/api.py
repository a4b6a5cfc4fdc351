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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psutil

from . import gguf_info, sources
from .errors import SourceError
from .manifest import Manifest, StageSpec, load_stack
from .memory import Footprint, Plan, StageRow, footprint, parse_budget, plan_residency, process_baseline, require_fit
from .pipeline import FinalStageSettings, Pipeline, RunResult, StageTrace, TextCallback
from .pool import LoadSettings, ModelPool, ResolvedAdapter, ResolvedModel
from .rss import RssSampler


def default_threads() -> int:
    """One thread per physical core: llama.cpp gains nothing from hyper-threads."""
    return max(1, psutil.cpu_count(logical=False) or psutil.cpu_count() or 1)


def _with_field(manifest: Manifest, field: str, resolve):
    """Run ``resolve``; a SourceError gains the manifest and field it came from."""
    try:
        return resolve()
    except SourceError as exc:
        where = manifest.path or f"<built-in {manifest.name}>"
        raise SourceError(f"{where}: {field}: {exc}") from None


def resolve_models(manifest: Manifest, *, offline: bool | None = None) -> dict[str, ResolvedModel]:
    """Find, hash-check and validate every model the stack's stages use."""
    used = {s.model for s in manifest.stages}
    out: dict[str, ResolvedModel] = {}
    for mid in sorted(used):
        spec = manifest.models[mid]
        path = _with_field(manifest, f"models.{mid}.source", lambda: sources.resolve(
            spec.source,
            base_dir=manifest.base_dir,
            sha256=spec.sha256,
            offline=offline,
            allow_absolute=manifest.trusted,
        ))
        out[mid] = ResolvedModel(id=mid, path=Path(path), info=gguf_info.validate_model(path))
    return out


def resolve_adapters(
    manifest: Manifest, models: dict[str, ResolvedModel], *, offline: bool | None = None
) -> dict[str, ResolvedAdapter]:
    """Find and validate each stage's LoRA adapter against the base it will run on."""
    out: dict[str, ResolvedAdapter] = {}
    for stage in manifest.stages:
        if stage.adapter is None:
            continue
        path = _with_field(manifest, f"stage {stage.name}: adapter", lambda: sources.resolve(
            stage.adapter.source,
            base_dir=manifest.base_dir,
            sha256=stage.adapter.sha256,
            offline=offline,
            allow_absolute=manifest.trusted,
        ))
        info = gguf_info.validate_adapter(path, models[stage.model].info)
        out[stage.name] = ResolvedAdapter(path=Path(path), info=info, scale=stage.adapter.scale)
    return out


@dataclass
class ResidencyUnit:
    """One base model file and everything that rides on it: its adapters and saved prompt prefixes."""

    model: ResolvedModel
    adapters: dict[str, gguf_info.GGUFInfo]  # adapter path -> info
    prefix_tokens: int

    def footprint(self, rt) -> "Footprint":
        return footprint(self.model.id, self.model.info, ctx_size=rt.ctx_size, batch_size=rt.batch_size,
                         adapters=list(self.adapters.values()), prefix_tokens=self.prefix_tokens,
                         kv_cache_type=rt.kv_cache_type)

    def merged(self, other: "ResidencyUnit") -> "ResidencyUnit":
        """The same file used by another stack: loaded once, carrying both stacks' adapters."""
        return ResidencyUnit(self.model, {**self.adapters, **other.adapters}, self.prefix_tokens + other.prefix_tokens)


def residency_units(
    manifest: Manifest, models: dict[str, ResolvedModel], adapters: dict[str, ResolvedAdapter]
) -> dict[str, ResidencyUnit]:
    """Stages that name the same model file form one unit: the base loads once for all of them."""
    by_key: dict[str, list[str]] = {}
    for stage in manifest.stages:
        by_key.setdefault(models[stage.model].key, []).append(stage.name)
    units = {}
    for key, stage_names in by_key.items():
        model = next(m for m in models.values() if m.key == key)
        infos = {str(adapters[n].path): adapters[n].info for n in stage_names if n in adapters}
        # one saved prefix per (stage, adapter); at least 1 token per 3 characters, plus chat markup
        prefix_tokens = (sum(manifest.stage(n).static_prefix_chars // 3 + 16 for n in stage_names)
                         if manifest.runtime.prefix_cache else 0)
        units[key] = ResidencyUnit(model, infos, prefix_tokens)
    return units


def make_plan(
    manifest: Manifest,
    models: dict[str, ResolvedModel],
    adapters: dict[str, ResolvedAdapter],
    *,
    budget: int | None,
    policy: str = "auto",
    baseline: int | None = None,
) -> Plan:
    """Predict each base model's footprint from GGUF metadata and choose a residency policy.

    Stages that name the same model file form one residency unit: the base is loaded once
    and carries every adapter its stages use.
    """
    rt = manifest.runtime
    units = {key: unit.footprint(rt) for key, unit in residency_units(manifest, models, adapters).items()}
    rows = [StageRow(stage=s.name, model=models[s.model].key,
                     adapter=adapters[s.name].path.name if s.name in adapters else None) for s in manifest.stages]
    shared = len(units) == 1
    plan = plan_residency(
        stack=manifest.name, units=units, stages=rows, shared=shared, ctx_size=rt.ctx_size,
        batch_size=rt.batch_size, budget=budget, baseline=process_baseline() if baseline is None else baseline,
        policy=policy,
    )
    # show model ids, not file paths, to people
    names = {m.key: m.id for m in models.values()}
    plan.footprints = {names[k]: v for k, v in plan.footprints.items()}
    for r in plan.stages:
        r.model = names[r.model]
    return plan


def prepare_stack(
    stack: str | Path | Manifest,
    *,
    budget: str | int | None = None,
    policy: str | None = None,
    offline: bool | None = None,
    strict: bool = False,
    **runtime: object,
) -> tuple[Manifest, dict[str, ResolvedModel], dict[str, ResolvedAdapter], Plan]:
    """Everything up to loading: manifest, overrides, resolved files, and the residency plan.

    ``strict`` refuses hf:// models and adapters not pinned to a commit and a sha256.
    """
    manifest = stack if isinstance(stack, Manifest) else load_stack(stack)
    if strict:
        sources.check_strict(manifest)
    stage_overrides = {k: runtime.pop(k) for k in ("max_tokens", "temperature") if k in runtime}
    manifest = manifest.with_runtime(**runtime)
    manifest = manifest.with_stage_overrides(**stage_overrides)
    models = resolve_models(manifest, offline=offline)
    adapters = resolve_adapters(manifest, models, offline=offline)
    wanted_budget = parse_budget(budget if budget is not None else manifest.runtime.budget)
    wanted_policy = policy or manifest.runtime.policy
    plan = make_plan(manifest, models, adapters, budget=wanted_budget, policy=wanted_policy)
    return manifest, models, adapters, plan


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
    ) -> "Stack":
        """Load a built-in stack by name, a manifest file, or a stack folder.

        Every model and adapter is resolved, hash-checked and validated here, before
        llama.cpp sees any file. The residency plan is made from GGUF metadata before
        anything loads; a ``budget`` ("300MB", "40%") that no policy meets raises
        BudgetError. With ``preload`` the resident models are loaded now too.

        ``pool`` shares an existing pool's loaded models with other stacks (the server
        does this): its settings and residency apply, and closing this stack leaves it open.
        """
        manifest, models, adapters, plan = prepare_stack(
            stack, budget=budget, policy=policy, offline=offline, strict=strict, ctx_size=ctx_size, threads=threads,
            batch_size=batch_size, gpu_layers=gpu_layers, mmap=mmap, seed=seed, max_tokens=max_tokens,
            temperature=temperature,
        )
        require_fit(plan)
        rt = manifest.runtime
        settings = LoadSettings(
            ctx_size=rt.ctx_size,
            threads=rt.threads or default_threads(),
            batch_size=rt.batch_size,
            gpu_layers=rt.gpu_layers,
            mmap=rt.mmap,
            seed=rt.seed,
            verbose=verbose,
            prefix_cache=rt.prefix_cache,
            kv_cache_type=rt.kv_cache_type,
        )
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
