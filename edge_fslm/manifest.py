"""Stack manifests: the TOML file a user writes to describe a stack.

A manifest names its models, then its stages in run order. Each stage says which
model (and optional LoRA adapter) runs it, how its prompt is built from the user's
input and earlier stages' outputs, and how long it may generate.

Validation collects every problem and reports each on its own line as
``FILE: FIELD: what is wrong — what to do``, so a user fixes a manifest in one pass.
Nothing in a manifest is ever executed: templates are parsed by :mod:`templates`,
and TOML has no code.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import ManifestError
from .templates import Template, TemplateSyntaxError, parse_template

STACK_FILE = "stack.toml"
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
ROLES = ("system", "user", "assistant")
POLICIES = ("auto", "all", "lru", "sequential", "shared-base")
MAX_CTX = 1 << 20
MAX_TOKENS = 1 << 16
RESERVED_FIELDS = ("input",)


@dataclass(frozen=True)
class ModelSpec:
    """A base model the stack loads: where it comes from and its expected hash."""

    id: str
    source: str
    sha256: str | None = None


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter GGUF applied on top of a stage's model."""

    source: str
    sha256: str | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class Message:
    role: str
    content: Template


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; temperature 0 means greedy, so runs are reproducible."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0


@dataclass(frozen=True)
class StageSpec:
    name: str
    model: str
    adapter: AdapterSpec | None
    messages: tuple[Message, ...] | None
    template: Template | None
    max_tokens: int
    stop: tuple[str, ...]
    sampling: Sampling
    description: str = ""

    @property
    def reads(self) -> tuple[str, ...]:
        """The fields (``input`` and stage names) this stage's prompt uses, in order."""
        seen: dict[str, None] = {}
        templates = [m.content for m in self.messages] if self.messages else [self.template]
        for t in templates:
            for f in t.fields:  # type: ignore[union-attr]
                seen.setdefault(f, None)
        return tuple(seen)


@dataclass(frozen=True)
class RuntimeSpec:
    """Runtime defaults; the CLI and the Python API may override each one."""

    ctx_size: int = 2048
    threads: int = 0  # 0 = let the runtime pick (physical cores)
    batch_size: int = 512
    gpu_layers: int = 0
    mmap: bool = True
    seed: int = 0
    policy: str = "auto"
    budget: str | None = None


@dataclass(frozen=True)
class Manifest:
    name: str
    description: str
    models: dict[str, ModelSpec]
    stages: tuple[StageSpec, ...]
    runtime: RuntimeSpec
    path: Path | None = None
    base_dir: Path | None = None
    trusted: bool = True
    builtin: bool = False

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def with_runtime(self, **overrides: Any) -> "Manifest":
        """A copy with some runtime fields overridden (None values are ignored)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self
        problems: list[str] = []
        runtime = _check_runtime({**_runtime_dict(self.runtime), **changes}, "override", problems)
        if problems:
            raise ManifestError("\n".join(problems))
        for s in self.stages:
            if s.max_tokens >= runtime.ctx_size:
                raise ManifestError(
                    f"--ctx-size {runtime.ctx_size}: stage '{s.name}' may generate {s.max_tokens} tokens,"
                    " which leaves no room for its prompt — raise --ctx-size or lower --max-tokens"
                )
        return replace(self, runtime=runtime)

    def with_stage_overrides(self, **overrides: Any) -> "Manifest":
        """Override max_tokens and sampling fields on every stage (None values are ignored)."""
        max_tokens = overrides.pop("max_tokens", None)
        sampling = {k: v for k, v in overrides.items() if v is not None}
        if max_tokens is not None and not (1 <= max_tokens < self.runtime.ctx_size):
            raise ManifestError(
                f"--max-tokens {max_tokens}: must be between 1 and ctx size - 1 ({self.runtime.ctx_size - 1})"
            )
        stages = tuple(
            replace(
                s,
                max_tokens=max_tokens if max_tokens is not None else s.max_tokens,
                sampling=replace(s.sampling, **sampling),
            )
            for s in self.stages
        )
        return replace(self, stages=stages)


def _runtime_dict(rt: RuntimeSpec) -> dict[str, Any]:
    return {k: getattr(rt, k) for k in RuntimeSpec.__dataclass_fields__}


# --------------------------------------------------------------------------- loading


def builtin_names() -> list[str]:
    """Names of the stacks shipped inside the package."""
    folder = resources.files("edge_fslm.stacks")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_builtin(name: str) -> Manifest:
    folder = resources.files("edge_fslm.stacks")
    res = folder / f"{name}.toml"
    if not res.is_file():
        raise ManifestError(f"no built-in stack named '{name}' — built-in stacks: {', '.join(builtin_names())}")
    return parse_manifest(res.read_text(encoding="utf-8"), origin=f"<built-in {name}>", trusted=True, builtin=True)


def load_stack(name_or_path: str | Path) -> Manifest:
    """Load a built-in stack by name, a manifest file, or a stack folder holding stack.toml.

    A manifest *file* is taken as the user's own (it may name absolute paths). A stack
    *folder* is a package someone else made (built or pulled): it is untrusted and may
    only reference files inside itself.
    """
    text = str(name_or_path)
    p = Path(text).expanduser()
    if p.is_dir():
        stack_file = p / STACK_FILE
        if not stack_file.is_file():
            raise ManifestError(f"{p}: stack folder has no {STACK_FILE} — build one with `edge-fslm build` or pass a manifest file")
        return load_manifest(stack_file, trusted=False)
    if p.exists() or text.endswith(".toml") or "/" in text or "\\" in text:
        return load_manifest(p, trusted=True)
    if text in builtin_names():
        return load_builtin(text)
    hint = difflib.get_close_matches(text, builtin_names(), n=1)
    extra = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ManifestError(
        f"'{text}' is neither a manifest file, a stack folder nor a built-in stack{extra} — built-in stacks: {', '.join(builtin_names())}"
    )


def load_manifest(path: str | Path, *, trusted: bool = True) -> Manifest:
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            raise ManifestError(f"{p}: is a directory — pass the manifest file, or use --stack with the folder")
        data = p.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{p}: no such manifest file") from None
    except PermissionError:
        raise ManifestError(f"{p}: permission denied reading the manifest") from None
    except OSError as exc:
        raise ManifestError(f"{p}: cannot read manifest ({exc.strerror})") from None
    if len(data) > 4 << 20:
        raise ManifestError(f"{p}: manifest is {len(data)} bytes; a stack manifest is a small text file (limit 4 MiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{p}: not UTF-8 text (byte {exc.start}) — save the manifest as UTF-8") from None
    return parse_manifest(text, origin=str(p), base_dir=p.resolve().parent, path=p, trusted=trusted)


def parse_manifest(
    text: str,
    *,
    origin: str = "<manifest>",
    base_dir: Path | None = None,
    path: Path | None = None,
    trusted: bool = True,
    builtin: bool = False,
) -> Manifest:
    """Parse and validate manifest text; raise one ManifestError listing every problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{origin}: not valid TOML: {exc}") from None
    problems: list[str] = []
    v = _Validator(origin, problems)
    manifest = v.manifest(doc)
    if problems:
        raise ManifestError("\n".join(problems))
    assert manifest is not None
    return replace(manifest, path=path, base_dir=base_dir, trusted=trusted, builtin=builtin)


# --------------------------------------------------------------------------- validation

TOP_KEYS = ("stack", "runtime", "models", "stages")
STACK_KEYS = ("name", "description", "schema")
MODEL_KEYS = ("source", "sha256")
ADAPTER_KEYS = ("source", "sha256", "scale")
STAGE_KEYS = (
    "name", "description", "model", "adapter", "messages", "template", "max_tokens", "stop",
    "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
)
MESSAGE_KEYS = ("role", "content")


def _check_runtime(rt: dict[str, Any], where: str, problems: list[str]) -> RuntimeSpec:
    out = RuntimeSpec()
    bounds = {
        "ctx_size": (16, MAX_CTX),
        "threads": (0, 1024),
        "batch_size": (1, MAX_CTX),
        "gpu_layers": (-1, 100000),
        "seed": (0, 2**32 - 1),
    }
    values: dict[str, Any] = {}
    for key, (lo, hi) in bounds.items():
        if key in rt:
            val = rt[key]
            if not _is_int(val) or not lo <= val <= hi:
                problems.append(f"{where}: {key}: expected an integer from {lo} to {hi}, got {val!r}")
            else:
                values[key] = val
    if "mmap" in rt:
        if not isinstance(rt["mmap"], bool):
            problems.append(f"{where}: mmap: expected true or false, got {rt['mmap']!r}")
        else:
            values["mmap"] = rt["mmap"]
    if "policy" in rt:
        if rt["policy"] not in POLICIES:
            problems.append(f"{where}: policy: expected one of {', '.join(POLICIES)}, got {rt['policy']!r}")
        else:
            values["policy"] = rt["policy"]
    if "budget" in rt and rt["budget"] is not None:
        if not isinstance(rt["budget"], str):
            problems.append(f"{where}: budget: expected a string like \"300MB\" or \"40%\", got {rt['budget']!r}")
        else:
            values["budget"] = rt["budget"]
    return replace(out, **values)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Validator:
    def __init__(self, origin: str, problems: list[str]):
        self.origin = origin
        self.problems = problems

    def err(self, where: str, msg: str) -> None:
        self.problems.append(f"{self.origin}: {where}: {msg}")

    def unknown_keys(self, table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                self.err(f"{where}{key}", f"unknown key{extra} — allowed: {', '.join(allowed)}")

    def table(self, doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        val = doc.get(key, {})
        if not isinstance(val, dict):
            self.err(where + key, f"expected a table, got {type(val).__name__}")
            return {}
        return val

    def string(self, t: dict[str, Any], key: str, where: str, *, required: bool = False, default: str = "") -> str:
        if key not in t:
            if required:
                self.err(where + key, "missing (required)")
            return default
        if not isinstance(t[key], str):
            self.err(where + key, f"expected a string, got {type(t[key]).__name__} {t[key]!r}")
            return default
        return t[key]

    def sha(self, t: dict[str, Any], where: str) -> str | None:
        if "sha256" not in t:
            return None
        val = t["sha256"]
        if not isinstance(val, str) or not SHA256.match(val):
            self.err(where + "sha256", f"expected 64 hex characters, got {val!r}")
            return None
        return val.lower()

    def manifest(self, doc: dict[str, Any]) -> Manifest | None:
        self.unknown_keys(doc, TOP_KEYS, "")
        stack = self.table(doc, "stack", "")
        self.unknown_keys(stack, STACK_KEYS, "stack.")
        name = self.string(stack, "name", "stack.", required=True)
        if name and not NAME.match(name):
            self.err("stack.name", f"{name!r} is not a valid name — use letters, digits, '_' or '-' (max 64)")
        if "schema" in stack and stack["schema"] != 1:
            self.err("stack.schema", f"unsupported schema {stack['schema']!r} — this edge-fslm reads schema 1")
        description = self.string(stack, "description", "stack.")

        rt_table = self.table(doc, "runtime", "")
        self.unknown_keys(rt_table, tuple(RuntimeSpec.__dataclass_fields__), "runtime.")
        runtime = _check_runtime(rt_table, f"{self.origin}: runtime", self.problems)

        models: dict[str, ModelSpec] = {}
        model_tables = self.table(doc, "models", "")
        if not model_tables:
            self.err("models", "no models — add a [models.NAME] table with a source")
        for mid, mt in model_tables.items():
            where = f"models.{mid}."
            if not NAME.match(mid):
                self.err(f"models.{mid}", "not a valid model id — use letters, digits, '_' or '-'")
            if not isinstance(mt, dict):
                self.err(f"models.{mid}", f"expected a table with a source, got {type(mt).__name__}")
                continue
            self.unknown_keys(mt, MODEL_KEYS, where)
            source = self.string(mt, "source", where, required=True)
            if "source" in mt and isinstance(mt["source"], str) and not source.strip():
                self.err(where + "source", "empty — give a path, pkg://DIST/FILE or hf://OWNER/REPO/FILE")
            models[mid] = ModelSpec(id=mid, source=source, sha256=self.sha(mt, where))

        stages_raw = doc.get("stages", [])
        if not isinstance(stages_raw, list) or not all(isinstance(s, dict) for s in stages_raw):
            self.err("stages", "expected an array of tables ([[stages]])")
            stages_raw = []
        elif not stages_raw:
            self.err("stages", "no stages — add at least one [[stages]] table")
        all_names = [s.get("name") for s in stages_raw]
        stages: list[StageSpec] = []
        for i, st in enumerate(stages_raw):
            earlier = [n for n in all_names[:i] if isinstance(n, str)]
            spec = self.stage(st, i, models, earlier, all_names, runtime)
            if spec is not None:
                stages.append(spec)
        if self.problems:
            return None
        return Manifest(name=name, description=description, models=models, stages=tuple(stages), runtime=runtime)

    def stage(
        self,
        st: dict[str, Any],
        i: int,
        models: dict[str, ModelSpec],
        earlier: list[str],
        all_names: list[Any],
        runtime: RuntimeSpec,
    ) -> StageSpec | None:
        label = f"stages[{i}]"
        name = st.get("name")
        if isinstance(name, str):
            label = f"stages[{i}] ({name})"
        where = label + "."
        before = len(self.problems)
        self.unknown_keys(st, STAGE_KEYS, where)
        name = self.string(st, "name", where, required=True)
        if name:
            if not NAME.match(name):
                self.err(where + "name", f"{name!r} is not a valid name — use letters, digits, '_' or '-'")
            elif name in RESERVED_FIELDS:
                self.err(where + "name", f"'{name}' is reserved for the user's prompt — choose another stage name")
            elif name in earlier:
                self.err(where + "name", f"duplicate stage name '{name}' — stage names must be unique")
        model = self.string(st, "model", where, required=len(models) != 1)
        if not model and len(models) == 1:
            model = next(iter(models))
        if model and model not in models:
            hint = difflib.get_close_matches(model, list(models), n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            self.err(where + "model", f"unknown model '{model}'{extra} — defined models: {', '.join(models) or 'none'}")

        adapter = None
        if "adapter" in st:
            a = st["adapter"]
            if isinstance(a, str):
                a = {"source": a}
            if not isinstance(a, dict):
                self.err(where + "adapter", f"expected a path string or a table with source, got {type(a).__name__}")
            else:
                self.unknown_keys(a, ADAPTER_KEYS, where + "adapter.")
                source = self.string(a, "source", where + "adapter.", required=True)
                scale = a.get("scale", 1.0)
                if not _is_num(scale) or not -16.0 <= scale <= 16.0:
                    self.err(where + "adapter.scale", f"expected a number from -16 to 16, got {scale!r}")
                    scale = 1.0
                adapter = AdapterSpec(source=source, sha256=self.sha(a, where + "adapter."), scale=float(scale))

        known = list(RESERVED_FIELDS) + earlier

        def check_fields(t: Template, at: str) -> None:
            for f in t.fields:
                if f in known:
                    continue
                if f == name:
                    self.err(at, f"stage '{name}' reads its own output {{{f}}} — a stage reads {{input}} and earlier stages only")
                elif f in all_names:
                    self.err(
                        at,
                        f"reads {{{f}}}, which runs after this stage — a stage reads {{input}} and earlier stages only;"
                        " reorder the [[stages]]",
                    )
                else:
                    hint = difflib.get_close_matches(f, known, n=1)
                    extra = f" (did you mean {{{hint[0]}}}?)" if hint else ""
                    self.err(at, f"unknown field {{{f}}}{extra} — known fields here: {', '.join('{' + k + '}' for k in known)}")

        def template_of(raw: Any, at: str) -> Template | None:
            if not isinstance(raw, str):
                self.err(at, f"expected a string, got {type(raw).__name__}")
                return None
            try:
                t = parse_template(raw)
            except TemplateSyntaxError as exc:
                self.err(at, str(exc))
                return None
            check_fields(t, at)
            return t

        messages: tuple[Message, ...] | None = None
        template: Template | None = None
        has_m, has_t = "messages" in st, "template" in st
        if has_m == has_t:
            self.err(where + "messages", "give exactly one of `messages` (chat) or `template` (raw prompt)")
        elif has_m:
            raw = st["messages"]
            if not isinstance(raw, list) or not raw:
                self.err(where + "messages", "expected a non-empty array of {role, content} tables")
            else:
                out = []
                for j, m in enumerate(raw):
                    at = f"{where}messages[{j}]"
                    if not isinstance(m, dict):
                        self.err(at, "expected a table {role = ..., content = ...}")
                        continue
                    self.unknown_keys(m, MESSAGE_KEYS, at + ".")
                    role = self.string(m, "role", at + ".", required=True)
                    if role and role not in ROLES:
                        self.err(at + ".role", f"expected one of {', '.join(ROLES)}, got {role!r}")
                    if "content" not in m:
                        self.err(at + ".content", "missing (required)")
                        continue
                    t = template_of(m["content"], at + ".content")
                    if t is not None:
                        out.append(Message(role=role, content=t))
                messages = tuple(out)
                if out and out[-1].role == "assistant":
                    self.err(where + "messages", "the last message is from the assistant — end with a user message; the stage writes the reply")
        else:
            template = template_of(st["template"], where + "template")

        max_tokens = st.get("max_tokens", 128)
        if not _is_int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS:
            self.err(where + "max_tokens", f"expected an integer from 1 to {MAX_TOKENS}, got {max_tokens!r}")
            max_tokens = 1
        elif max_tokens >= runtime.ctx_size:
            self.err(
                where + "max_tokens",
                f"{max_tokens} leaves no room for the prompt in ctx_size {runtime.ctx_size} — lower it or raise runtime.ctx_size",
            )

        stop = st.get("stop", [])
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
            self.err(where + "stop", "expected up to 16 non-empty strings")
            stop = []

        sampling = Sampling()
        sampling_values: dict[str, Any] = {}
        for key, lo, hi, want_int in (
            ("temperature", 0.0, 5.0, False),
            ("top_k", 0, 100000, True),
            ("top_p", 0.0, 1.0, False),
            ("min_p", 0.0, 1.0, False),
            ("repeat_penalty", 0.0, 5.0, False),
        ):
            if key in st:
                val = st[key]
                ok = _is_int(val) if want_int else _is_num(val)
                if not ok or not lo <= val <= hi:
                    kind = "an integer" if want_int else "a number"
                    self.err(where + key, f"expected {kind} from {lo} to {hi}, got {val!r}")
                else:
                    sampling_values[key] = val if want_int else float(val)
        sampling = replace(sampling, **sampling_values)
        description = self.string(st, "description", where)

        if len(self.problems) > before:
            return None
        return StageSpec(
            name=name,
            model=model,
            adapter=adapter,
            messages=messages,
            template=template,
            max_tokens=max_tokens,
            stop=tuple(stop),
            sampling=sampling,
            description=description,
        )


__all__ = [
    "Manifest",
    "ModelSpec",
    "AdapterSpec",
    "StageSpec",
    "RuntimeSpec",
    "Sampling",
    "Message",
    "load_stack",
    "load_manifest",
    "load_builtin",
    "parse_manifest",
    "builtin_names",
    "STACK_FILE",
]
