"""Device profiles: how to build and run a stack for one kind of device.

A profile is a small TOML file (the built-in ones live in ``quant_profiles/``,
installed as ``edge_fslm.quant_profiles``) that answers the questions a build
has to settle for a device: which quant type for the weights (with per-stage
overrides), which type for adapters, and the runtime settings the built stack
starts with (context, threads, batch, KV cache type, mmap, GPU layers, memory
budget, residency policy).  Keeping them as data lets a user copy one, change
a line, and pass the file to ``edge-fslm build --profile my.toml``.

    [profile]
    description = "Raspberry Pi 4 (2 GB RAM): ..."
    [quant]
    default = "Q4_K_M"
    adapter = "f16"
    [quant.stages]
    answer = "Q5_K_M"
    [runtime]
    ctx_size = 1024
    threads = 4
    batch_size = 128
    kv_cache_type = "q8_0"
    mmap = true
    gpu_layers = 0
    budget = "1GB"
    policy = "shared-base"

Validation reports every problem at once, one ``FILE: FIELD: what — what to do``
line each, as :class:`~edge_fslm.errors.ManifestError`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .quantize import QUANT_TYPES
from ..errors import BudgetError, ManifestError
from ..manifest import KV_CACHE_TYPES, NAME, POLICIES, RUNTIME_INT_BOUNDS
from ..memory import parse_budget

__all__ = [
    "Profile",
    "KV_CACHE_TYPES",
    "ADAPTER_TYPES",
    "load_profile",
    "parse_profile",
    "list_profiles",
    "profile_names",
]

ADAPTER_TYPES = ("f16", "f32")

_TOP = ("profile", "quant", "runtime")
_PROFILE = ("name", "description")
_QUANT = ("default", "adapter", "stages")
_RUNTIME = ("ctx_size", "threads", "batch_size", "kv_cache_type", "mmap", "gpu_layers", "budget", "policy", "seed")


@dataclass(frozen=True)
class Profile:
    """One device profile; ``runtime()`` is what goes into a built stack's [runtime] table."""

    name: str
    description: str
    quant: str
    adapter_type: str = "f16"
    stage_quants: Mapping[str, str] = field(default_factory=dict)
    ctx_size: int = 2048
    threads: int = 0
    batch_size: int = 512
    kv_cache_type: str = "f16"
    mmap: bool = True
    gpu_layers: int = 0
    budget: str | None = None
    policy: str = "auto"
    seed: int | None = None
    path: Path | None = None
    builtin: bool = False

    def quant_for(self, stage: str) -> str:
        """The weight quant type for ``stage``: its override, else the profile default."""
        return self.stage_quants.get(stage, self.quant)

    def runtime(self) -> dict[str, Any]:
        """Runtime settings, keyed as in a stack manifest's [runtime] table (None values left out)."""
        rt: dict[str, Any] = {
            "ctx_size": self.ctx_size,
            "threads": self.threads,
            "batch_size": self.batch_size,
            "kv_cache_type": self.kv_cache_type,
            "mmap": self.mmap,
            "gpu_layers": self.gpu_layers,
            "budget": self.budget,
            "policy": self.policy,
            "seed": self.seed,
        }
        return {k: v for k, v in rt.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "quant": self.quant,
            "adapter_type": self.adapter_type,
            "stage_quants": dict(self.stage_quants),
            "runtime": self.runtime(),
            "path": str(self.path) if self.path else None,
            "builtin": self.builtin,
        }


# --------------------------------------------------------------------------- loading


def profile_names() -> list[str]:
    """Names of the profiles shipped inside the package."""
    folder = resources.files("edge_fslm.quant_profiles")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def list_profiles() -> list[Profile]:
    """Every built-in profile, loaded and validated."""
    return [load_profile(n) for n in profile_names()]


def load_profile(name_or_path: str | Path) -> Profile:
    """A built-in profile by name (``"pi4-2gb"``) or a profile TOML file by path."""
    text = str(name_or_path)
    p = Path(text).expanduser()
    if isinstance(name_or_path, Path) or p.exists() or text.endswith(".toml") or "/" in text or "\\" in text:
        return _load_file(p)
    names = profile_names()
    if text in names:
        res = resources.files("edge_fslm.quant_profiles") / f"{text}.toml"
        return parse_profile(res.read_text(encoding="utf-8"), origin=f"<built-in profile {text}>",
                             default_name=text, builtin=True)
    hint = difflib.get_close_matches(text, names, n=1)
    extra = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ManifestError(f"'{text}' is neither a profile file nor a built-in profile{extra} — "
                        f"built-in profiles: {', '.join(names)}")


def _load_file(p: Path) -> Profile:
    try:
        if p.is_dir():
            raise ManifestError(f"{p}: is a directory — pass a profile .toml file")
        data = p.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{p}: no such profile file — check the path, or use a built-in profile "
                            f"({', '.join(profile_names())})") from None
    except OSError as exc:
        raise ManifestError(f"{p}: cannot read the profile ({exc.strerror or exc})") from None
    if len(data) > 1 << 20:
        raise ManifestError(f"{p}: {len(data)} bytes is far too big for a profile (limit 1 MiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{p}: not UTF-8 text (byte {exc.start}) — save the profile as UTF-8") from None
    return replace(parse_profile(text, origin=str(p), default_name=p.stem), path=p)


def parse_profile(text: str, *, origin: str = "<profile>", default_name: str = "custom",
                  builtin: bool = False) -> Profile:
    """Parse and validate profile TOML; one ManifestError lists every problem."""
    from ..manifest import load_toml  # bounded: nesting, dotted keys and size are checked first

    doc = load_toml(text, origin)
    problems: list[str] = []

    def err(where: str, msg: str) -> None:
        problems.append(f"{origin}: {where}: {msg}")

    def unknown(table: dict[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                err(prefix + key, f"unknown key{extra} — allowed: {', '.join(allowed)}")

    def table(parent: dict[str, Any], key: str, prefix: str, required: bool = False) -> dict[str, Any]:
        if key not in parent:
            if required:
                err(prefix + key, f"missing [{prefix + key}] table")
            return {}
        val = parent[key]
        if not isinstance(val, dict):
            err(prefix + key, f"expected a table, got {type(val).__name__}")
            return {}
        return val

    def quant_type(val: Any, where: str) -> str | None:
        if not isinstance(val, str):
            err(where, f"expected a quant type string, got {val!r}")
            return None
        canon = val.strip().upper()
        if canon not in QUANT_TYPES:
            hint = difflib.get_close_matches(canon, list(QUANT_TYPES), n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            err(where, f"unknown quant type {val!r}{extra} — choose one of {', '.join(QUANT_TYPES)}")
            return None
        return canon

    unknown(doc, _TOP, "")
    prof = table(doc, "profile", "")
    unknown(prof, _PROFILE, "profile.")
    name = prof.get("name", default_name)
    if not isinstance(name, str) or not NAME.match(name):
        err("profile.name", f"{name!r} is not a valid name — use letters, digits, '_' or '-' (max 64)")
        name = default_name
    description = prof.get("description", "")
    if not isinstance(description, str):
        err("profile.description", f"expected a string, got {type(description).__name__}")
        description = ""
    elif not description.strip():
        err("profile.description", "missing — say in one line which device the profile is for")

    q = table(doc, "quant", "", required=True)
    unknown(q, _QUANT, "quant.")
    default = quant_type(q["default"], "quant.default") if "default" in q else None
    if "default" not in q and "quant" in doc:
        err("quant.default", "missing — name the weight quant type, e.g. \"Q4_K_M\"")
    adapter = q.get("adapter", "f16")
    if adapter not in ADAPTER_TYPES:
        err("quant.adapter", f"expected one of {', '.join(ADAPTER_TYPES)}, got {adapter!r}")
        adapter = "f16"
    stages: dict[str, str] = {}
    for stage, val in table(q, "stages", "quant.").items():
        if not NAME.match(stage):
            err(f"quant.stages.{stage}", "not a valid stage name")
            continue
        t = quant_type(val, f"quant.stages.{stage}")
        if t is not None:
            stages[stage] = t

    rt = table(doc, "runtime", "")
    unknown(rt, _RUNTIME, "runtime.")
    values: dict[str, Any] = {}
    for key, (lo, hi) in RUNTIME_INT_BOUNDS.items():
        if key in rt:
            v = rt[key]
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                err(f"runtime.{key}", f"expected an integer from {lo} to {hi}, got {v!r}")
            else:
                values[key] = v
    if "mmap" in rt:
        if not isinstance(rt["mmap"], bool):
            err("runtime.mmap", f"expected true or false, got {rt['mmap']!r}")
        else:
            values["mmap"] = rt["mmap"]
    if "kv_cache_type" in rt:
        kv = rt["kv_cache_type"]
        if not isinstance(kv, str) or kv.lower() not in KV_CACHE_TYPES:
            err("runtime.kv_cache_type", f"expected one of {', '.join(KV_CACHE_TYPES)}, got {kv!r}")
        else:
            values["kv_cache_type"] = kv.lower()
    if "policy" in rt:
        if rt["policy"] not in POLICIES:
            err("runtime.policy", f"expected one of {', '.join(POLICIES)}, got {rt['policy']!r}")
        else:
            values["policy"] = rt["policy"]
    if "budget" in rt:
        b = rt["budget"]
        if not isinstance(b, str):
            err("runtime.budget", f"expected a string like \"300MB\" or \"40%\", got {b!r}")
        else:
            try:
                parse_budget(b, available=1 << 40)  # the same parser the runtime uses; RAM is not asked
            except BudgetError as exc:
                err("runtime.budget", str(exc))
            else:
                values["budget"] = b.strip()
    if "batch_size" in values and "ctx_size" in values and values["batch_size"] > values["ctx_size"]:
        err("runtime.batch_size", f"{values['batch_size']} is larger than ctx_size {values['ctx_size']} — "
                                  "a batch cannot exceed the context")

    if problems:
        raise ManifestError("\n".join(problems))
    assert default is not None
    return Profile(name=name, description=description.strip(), quant=default, adapter_type=adapter,
                   stage_quants=stages, builtin=builtin, **values)
