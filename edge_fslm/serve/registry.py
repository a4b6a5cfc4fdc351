"""The stacks a server serves: resolved at start, loaded on first use, all on one model pool.

Every stack is validated (files found, hash-checked, headers read) when the server starts,
so a typo fails before the port opens. The stacks share one :class:`ModelPool`: two stacks
on the same base GGUF load its weights once, and the pool's residency limit comes from the
same planner as ``edge-fslm run``, applied to the union of every stack's models within the
one ``--budget``. A stack that could never fit that budget stops the server at start.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..api import Stack
from ..plan import ResidencyUnit, plan_units, prepare_stack, residency_units
from ..errors import EdgeFSLMError
from ..manifest import Manifest
from ..memory import Plan, StageRow, parse_budget, process_baseline, require_fit
from ..pool import LoadSettings, ModelPool, ResolvedAdapter, ResolvedModel


class UnknownModel(EdgeFSLMError):
    """A request named a stack this server does not serve."""


@dataclass
class ServedStack:
    """One stack as the server knows it: its manifest now, its loaded Stack once first used."""

    name: str
    ref: str
    manifest: Manifest
    models: dict[str, ResolvedModel]
    adapters: dict[str, ResolvedAdapter]
    plan: Plan
    stack: Stack | None = None


@dataclass
class Registry:
    """Name → stack, one shared pool, and the combined residency plan."""

    stacks: dict[str, ServedStack]
    pool: ModelPool
    plan: Plan
    budget: int | None
    # stack name -> why its last load failed (a probe that crashed, a budget); cleared once it loads
    failed: dict[str, str] = field(default_factory=dict)
    _load_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(
        cls,
        refs: list[str | Path],
        *,
        budget: str | int | None = None,
        ctx_size: int | None = None,
        threads: int | None = None,
        offline: bool | None = None,
    ) -> "Registry":
        """Resolve every stack and plan them together; raise the usual one-line errors."""
        wanted = parse_budget(budget) if budget is not None else None
        served: dict[str, ServedStack] = {}
        units: dict[str, ResidencyUnit] = {}
        rows: list[StageRow] = []
        first_rt = None
        for ref in refs:
            manifest, models, adapters, plan = prepare_stack(ref, budget=wanted, offline=offline, ctx_size=ctx_size,
                                                             threads=threads)
            require_fit(plan)  # a stack that cannot fit alone never fits beside others
            if manifest.name in served:
                raise EdgeFSLMError(f"{ref}: a stack named '{manifest.name}' is already served — serve each stack once")
            first_rt = first_rt or manifest.runtime
            served[manifest.name] = ServedStack(name=manifest.name, ref=str(ref), manifest=manifest, models=models,
                                                adapters=adapters, plan=plan)
            for key, unit in residency_units(manifest, models, adapters).items():
                units[key] = units[key].merged(unit) if key in units else unit
            rows += [StageRow(stage=f"{manifest.name}/{r.stage}", model=r.model, adapter=r.adapter) for r in plan.stages]
        assert first_rt is not None, "at least one stack"
        combined = plan_units("+".join(served), units, rows, first_rt, budget=wanted, baseline=process_baseline())
        # The union need not fit all at once: the pool then keeps as many bases as fit and
        # swaps the rest (every stack alone was checked to fit above).
        settings = replace(LoadSettings.from_runtime(first_rt), adapter_residency=combined.adapter_residency)
        pool = ModelPool(settings, max_resident=combined.max_resident if combined.fits else 1)
        return cls(stacks=served, pool=pool, plan=combined, budget=wanted)

    @property
    def names(self) -> list[str]:
        return list(self.stacks)

    def get(self, name: str) -> Stack:
        """The loaded stack ``name``, loading it (on the shared pool) the first time."""
        served = self.stacks.get(name)
        if served is None:
            raise UnknownModel(f"model '{name}' is not served here — GET /v1/models lists: {', '.join(self.stacks)}")
        with self._load_lock:
            if served.stack is None:
                # resolved and planned at start: loading it now touches no file but the weights
                try:
                    served.stack = Stack.from_prepared(served.manifest, served.models, served.adapters, served.plan,
                                                       pool=self.pool, preload=False)
                except EdgeFSLMError as exc:
                    self.failed[name] = str(exc)
                    raise
                self.failed.pop(name, None)
            return served.stack

    def preload(self) -> None:
        """Load every stack now, and the models that stay resident."""
        for name in self.stacks:
            st = self.get(name)
            with st.exclusive():
                for stage in st.manifest.stages:
                    self.pool.get(st.pipeline.models[stage.model])

    def close(self) -> None:
        with self.pool.run_lock:
            self.pool.close()
