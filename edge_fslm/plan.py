"""Everything before loading: find and validate a stack's files, and plan its memory.

``prepare_stack`` is what ``Stack.load``, ``edge-fslm plan`` and the server share: the
manifest with its overrides, every model and adapter resolved (found, hash-checked, its
GGUF header validated before llama.cpp sees it), and the residency plan made from GGUF
metadata alone. :mod:`edge_fslm.memory` holds the estimates the plan is made of.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import gguf_info, lookup, sources
from .errors import SourceError
from .manifest import ADAPTER_RESIDENCIES, Manifest, load_stack
from .memory import Footprint, Plan, StageRow, footprint, parse_budget, plan_residency, process_baseline
from .pool import ResolvedAdapter, ResolvedModel, file_mark


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
        out[stage.name] = ResolvedAdapter(path=Path(path), info=info, scale=stage.adapter.scale,
                                          file_mark=file_mark(Path(path)))
    return out


@dataclass
class ResidencyUnit:
    """One base model file and everything that rides on it: its adapters and saved prompt prefixes."""

    model: ResolvedModel
    adapters: dict[str, gguf_info.GGUFInfo]  # adapter path -> info
    prefix_tokens: int

    def footprint(self, rt, adapter_residency: str = "all") -> "Footprint":
        return footprint(self.model.id, self.model.info, ctx_size=rt.ctx_size, batch_size=rt.batch_size,
                         adapters=list(self.adapters.values()), prefix_tokens=self.prefix_tokens,
                         kv_cache_type=rt.kv_cache_type, flash_attn=rt.flash_attn,
                         adapter_residency=adapter_residency,
                         draft_max=lookup.effective_draft_max(self.model.info, rt.draft_max))

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


def plan_units(name: str, units: dict[str, ResidencyUnit], rows: list[StageRow], rt, *, budget: int | None,
               baseline: int, policy: str = "auto") -> Plan:
    """The residency plan for ``units``: all adapters loaded if that fits (or ``rt`` says so),
    else one adapter at a time; the last plan tried names the smallest budget that fits."""
    for residency in ADAPTER_RESIDENCIES if rt.adapter_residency == "auto" else (rt.adapter_residency,):
        footprints = {key: unit.footprint(rt, residency) for key, unit in units.items()}
        plan = plan_residency(
            stack=name, units=footprints, stages=rows, shared=len(footprints) == 1, ctx_size=rt.ctx_size,
            batch_size=rt.batch_size, budget=budget, baseline=baseline, policy=policy,
        )
        plan.adapter_residency = residency
        if plan.fits:
            break
    return plan


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
    and carries every adapter its stages use, all of them loaded at once, or (adapter
    residency "active", which "auto" falls back to when the budget needs it) one at a time.
    """
    rows = [StageRow(stage=s.name, model=models[s.model].key,
                     adapter=adapters[s.name].path.name if s.name in adapters else None) for s in manifest.stages]
    plan = plan_units(manifest.name, residency_units(manifest, models, adapters), rows, manifest.runtime,
                      budget=budget, policy=policy, baseline=process_baseline() if baseline is None else baseline)
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
