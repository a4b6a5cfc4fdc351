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
import reprlib
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
RESIDENCY_POLICIES = ("all", "lru", "sequential", "shared-base")  # what the planner can choose
POLICIES = ("auto", *RESIDENCY_POLICIES)  # what a manifest, a profile or --policy may name
KV_CACHE_TYPES = ("f16", "q8_0", "f32")
# What stays loaded of a shared base's LoRA adapters: "all" once used (a swap is one llama.cpp
# call), or only the "active" one (a swap reads the next adapter's file again). "auto" keeps
# them all unless the memory budget needs the room.
ADAPTER_RESIDENCIES = ("all", "active")
MAX_CTX = 1 << 20
# The integer [runtime] settings and their bounds, for stack manifests and device profiles alike.
RUNTIME_INT_BOUNDS = {
    "ctx_size": (16, MAX_CTX),
    "threads": (0, 1024),
    "batch_size": (1, MAX_CTX),
    "gpu_layers": (-1, 100000),
    "seed": (0, 2**32 - 1),
    "draft_max": (0, 64),
}
MAX_TOKENS = 1 << 16
RESERVED_FIELDS = ("input",)
# Bounds on what a manifest may ask of the parser and validator. A stack manifest is a small
# text file; these stop a hostile one from exhausting memory or CPU before validation can
# say what is wrong (tomllib nests recursively, and a long dotted key costs it quadratic memory).
MAX_MANIFEST_BYTES = 1 << 20
MAX_NESTING = 32  # [ and { open at once
MAX_OPENINGS = 20_000  # [ and { in the whole document
MAX_DOTS_PER_LINE = 32  # dotted-key separators (and decimal points) outside strings, per line
MAX_DOTS = 4096
MAX_STAGES = 256
MAX_MODELS = 64
MAX_PROBLEMS = 50
# (low, high, integer?) for each sampling field, in a stage or as a CLI/API override
SAMPLING_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 5.0, False),
    "top_k": (0, 100000, True),
    "top_p": (0.0, 1.0, False),
    "min_p": (0.0, 1.0, False),
    "repeat_penalty": (0.0, 5.0, False),
}


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
    def static_prefix_chars(self) -> int:
        """Characters of literal prompt text before the first field: what the prefix cache saves."""
        parts = [m.content for m in self.messages] if self.messages else [self.template]
        total = 0
        for t in parts:
            for literal, f in t.parts:  # type: ignore[union-attr]
                total += len(literal)
                if f is not None:
                    return total
        return total

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
    prefix_cache: bool = True
    kv_cache_type: str = "f16"  # f16 | q8_0 | f32 (llama.cpp --cache-type-k/-v)
    # llama.cpp's --flash-attn. On: a long prompt touches little compute memory, and a --parallel
    # slot past position 256 decodes alone (the CPU kernel for a lone query changes there; see
    # parallel.py). Off: the KQ scores take memory per KV cell, and every --parallel step batches.
    flash_attn: bool = True
    adapter_residency: str = "auto"  # auto | all | active (ADAPTER_RESIDENCIES)
    # Prompt-lookup decoding (lookup.py): guesses copied from the prompt, verified up to this many
    # per decode, with output identical to one token a decode. 0 = off. llama.cpp's --draft-max.
    draft_max: int = 0


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
                    f"ctx_size {runtime.ctx_size}: stage '{s.name}' may generate {s.max_tokens} tokens,"
                    " which leaves no room for its prompt — raise ctx_size or lower max_tokens"
                )
        return replace(self, runtime=runtime)

    def with_stage_overrides(self, **overrides: Any) -> "Manifest":
        """Override max_tokens and sampling fields on every stage (None values are ignored)."""
        max_tokens = overrides.pop("max_tokens", None)
        sampling = {k: v for k, v in overrides.items() if v is not None}
        for key, val in sampling.items():
            bounds = SAMPLING_BOUNDS.get(key)
            if bounds is None:
                raise ManifestError(f"unknown sampling override {_name(key)} — known: {', '.join(SAMPLING_BOUNDS)}")
            lo, hi, want_int = bounds
            ok = _is_int(val) if want_int else _is_num(val)
            if not ok or not lo <= val <= hi:  # NaN fails every comparison
                kind = "an integer" if want_int else "a number"
                raise ManifestError(f"{key}={_show(val)}: expected {kind} from {lo} to {hi}")
            if not want_int:
                sampling[key] = float(val)
        if max_tokens is not None and (not _is_int(max_tokens) or not 1 <= max_tokens < self.runtime.ctx_size):
            raise ManifestError(
                f"max_tokens={max_tokens}: must be between 1 and ctx size - 1 ({self.runtime.ctx_size - 1})"
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
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir()
                  if p.name.endswith(".toml") and not p.name.endswith(".recipe.toml"))  # recipes: see recipe.py


def load_builtin(name: str) -> Manifest:
    folder = resources.files("edge_fslm.stacks")
    res = folder / f"{name}.toml"
    if not res.is_file():
        raise ManifestError(f"no built-in stack named '{name}' — built-in stacks: {', '.join(builtin_names())}")
    # a built-in stack's relative paths (its shipped adapters) are read from the package folder
    base = Path(str(folder)) if isinstance(folder, Path) or Path(str(folder)).is_dir() else None
    return parse_manifest(res.read_text(encoding="utf-8"), origin=f"<built-in {name}>", base_dir=base,
                          trusted=True, builtin=True)


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
            raise ManifestError(f"{p}: is a directory — pass the manifest file, or load the folder as a stack")
        data = p.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{p}: no such manifest file") from None
    except PermissionError:
        raise ManifestError(f"{p}: permission denied reading the manifest") from None
    except OSError as exc:
        raise ManifestError(f"{p}: cannot read manifest ({exc.strerror})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{p}: manifest is {len(data)} bytes; a stack manifest is a small text file (limit {MAX_MANIFEST_BYTES} bytes)"
        )
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
    doc = load_toml(text, origin)
    problems: list[str] = []
    v = _Validator(origin, problems)
    try:
        manifest = v.manifest(doc)
    except _TooManyProblems:
        manifest = None
        problems[MAX_PROBLEMS:] = [f"{origin}: stopped after {MAX_PROBLEMS} problems — fix these first"]
    if problems:
        raise ManifestError("\n".join(problems))
    assert manifest is not None
    return replace(manifest, path=path, base_dir=base_dir, trusted=trusted, builtin=builtin)


def load_toml(text: str, origin: str) -> dict[str, Any]:
    """``tomllib.loads`` with bounds: any document, however hostile, ends in a dict or a ManifestError."""
    if not isinstance(text, str):
        raise ManifestError(f"{origin}: expected manifest text, got {type(text).__name__}")
    if len(text) > MAX_MANIFEST_BYTES:  # characters; the file check counts bytes
        raise ManifestError(
            f"{origin}: manifest is {len(text)} characters; a stack manifest is a small text file"
            f" (limit {MAX_MANIFEST_BYTES})"
        )
    problem = _toml_shape_problem(text)
    if problem:
        raise ManifestError(f"{origin}: {problem} — a stack manifest needs nothing like this; simplify it")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{origin}: not valid TOML: {_clean(str(exc))}") from None
    except (RecursionError, MemoryError):  # the shape check should make these unreachable
        raise ManifestError(f"{origin}: TOML is nested too deeply to read — simplify it") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ManifestError(f"{origin}: not valid TOML: {_name(exc, 120)} — simplify the value") from None
    return doc


_SIGNIFICANT = re.compile(r"[\n#\"'\[\]{}.]")


def _toml_shape_problem(text: str) -> str | None:
    """Scan TOML text outside strings and comments for nesting and dotted keys that tomllib handles badly.

    tomllib parses nested arrays and inline tables recursively (RecursionError at ~1000 levels),
    keeps every prefix of a dotted key (quadratic memory: a 200 KB key needs tens of GB), and builds
    a dict per table header. Real manifests nest 3 deep and use 2-3 part keys.
    """
    depth = openings = dots = line_dots = 0
    line = 1
    i, n = 0, len(text)
    find = text.find
    search = _SIGNIFICANT.search
    while True:
        m = search(text, i)
        if m is None:
            break
        i = m.start()
        c = text[i]
        if c == "\n":
            line += 1
            line_dots = 0
        elif c == "#":
            j = find("\n", i)
            i = n if j < 0 else j
            continue
        elif c == '"' or c == "'":
            triple = text.startswith(c * 3, i)
            quote = c * 3 if triple else c
            j = i + len(quote)
            stop = -1
            while True:
                k = find(quote, j)
                if k < 0:
                    return None  # unterminated string: tomllib will say where
                if not triple:
                    nl = find("\n", j, k)
                    if nl >= 0:  # unterminated one-line string: resume at the newline, tomllib will complain
                        stop = nl
                        break
                if c == '"':
                    esc = find("\\", j, k)
                    if esc >= 0:
                        j = esc + 2
                        continue
                stop = k + len(quote)
                if triple:  # a closing run may hold up to two more quotes (TOML allows """a"""")
                    while stop < n and text[stop] == c and stop - k < 5:
                        stop += 1
                break
            line += text.count("\n", i, stop)
            i = stop
            continue
        elif c == "[" or c == "{":
            depth += 1
            openings += 1
            if depth > MAX_NESTING:
                return f"line {line}: arrays and tables nested more than {MAX_NESTING} deep"
            if openings > MAX_OPENINGS:
                return f"line {line}: more than {MAX_OPENINGS} arrays and tables"
        elif c == "]" or c == "}":
            depth = max(0, depth - 1)
        elif c == ".":
            dots += 1
            line_dots += 1
            if line_dots > MAX_DOTS_PER_LINE:
                return f"line {line}: a key with more than {MAX_DOTS_PER_LINE} dotted parts"
            if dots > MAX_DOTS:
                return f"line {line}: more than {MAX_DOTS} dotted keys and decimal points"
        i += 1
    return None


_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 6
_REPR.maxlevel = 3


def _clean(text: str) -> str:
    """One printable line, whatever a manifest put in a key or value."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _show(value: Any) -> str:
    """A value from the manifest as it may appear in a message: repr, escaped, shortened."""
    return _clean(_REPR.repr(value))


def _name(text: Any, limit: int = 64) -> str:
    """A key or name from the manifest, shown bare: escaped and shortened."""
    text = _clean(str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _TooManyProblems(Exception):
    pass


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
    values: dict[str, Any] = {}
    for key, (lo, hi) in RUNTIME_INT_BOUNDS.items():
        if key in rt:
            val = rt[key]
            if not _is_int(val) or not lo <= val <= hi:
                problems.append(f"{where}: {key}: expected an integer from {lo} to {hi}, got {_show(val)}")
            else:
                values[key] = val
    for key in ("mmap", "prefix_cache", "flash_attn"):
        if key in rt:
            if not isinstance(rt[key], bool):
                problems.append(f"{where}: {key}: expected true or false, got {_show(rt[key])}")
            else:
                values[key] = rt[key]
    if "kv_cache_type" in rt:
        if rt["kv_cache_type"] not in KV_CACHE_TYPES:
            problems.append(f"{where}: kv_cache_type: expected one of {', '.join(KV_CACHE_TYPES)}, got {rt['kv_cache_type']!r}")
        else:
            values["kv_cache_type"] = rt["kv_cache_type"]
    if values.get("kv_cache_type", out.kv_cache_type) == "q8_0" and values.get("flash_attn", out.flash_attn) is False:
        problems.append(f"{where}: kv_cache_type: q8_0 needs flash_attn = true (llama.cpp quantizes the V cache"
                        " only under flash attention); use f16, or turn flash attention on")
    if "policy" in rt:
        if rt["policy"] not in POLICIES:
            problems.append(f"{where}: policy: expected one of {', '.join(POLICIES)}, got {_show(rt['policy'])}")
        else:
            values["policy"] = rt["policy"]
    if "adapter_residency" in rt:
        if rt["adapter_residency"] not in ("auto", *ADAPTER_RESIDENCIES):
            problems.append(f"{where}: adapter_residency: expected one of auto, {', '.join(ADAPTER_RESIDENCIES)},"
                            f" got {_show(rt['adapter_residency'])}")
        else:
            values["adapter_residency"] = rt["adapter_residency"]
    if "budget" in rt and rt["budget"] is not None:
        if not isinstance(rt["budget"], str):
            problems.append(f"{where}: budget: expected a string like \"300MB\" or \"40%\", got {_show(rt['budget'])}")
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
        self.problems.append(_clean(f"{self.origin}: {where}: {msg}"))
        if len(self.problems) > MAX_PROBLEMS:
            raise _TooManyProblems

    def unknown_keys(self, table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                self.err(f"{where}{_name(key)}", f"unknown key{extra} — allowed: {', '.join(allowed)}")

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
            self.err(where + key, f"expected a string, got {type(t[key]).__name__} {_show(t[key])}")
            return default
        return t[key]

    def sha(self, t: dict[str, Any], where: str) -> str | None:
        if "sha256" not in t:
            return None
        val = t["sha256"]
        if not isinstance(val, str) or not SHA256.match(val):
            self.err(where + "sha256", f"expected 64 hex characters, got {_show(val)}")
            return None
        return val.lower()

    def manifest(self, doc: dict[str, Any]) -> Manifest | None:
        self.unknown_keys(doc, TOP_KEYS, "")
        stack = self.table(doc, "stack", "")
        self.unknown_keys(stack, STACK_KEYS, "stack.")
        name = self.string(stack, "name", "stack.", required=True)
        if name and not NAME.match(name):
            self.err("stack.name", f"{_show(name)} is not a valid name — use letters, digits, '_' or '-' (max 64)")
        if "schema" in stack and stack["schema"] != 1:
            self.err("stack.schema", f"unsupported schema {_show(stack['schema'])} — this edge-fslm reads schema 1")
        description = self.string(stack, "description", "stack.")

        rt_table = self.table(doc, "runtime", "")
        self.unknown_keys(rt_table, tuple(RuntimeSpec.__dataclass_fields__), "runtime.")
        runtime = _check_runtime(rt_table, f"{self.origin}: runtime", self.problems)

        models: dict[str, ModelSpec] = {}
        model_tables = self.table(doc, "models", "")
        if not model_tables:
            self.err("models", "no models — add a [models.NAME] table with a source")
        if len(model_tables) > MAX_MODELS:
            self.err("models", f"{len(model_tables)} models; a stack may name at most {MAX_MODELS}")
            model_tables = {}
        for mid, mt in model_tables.items():
            where = f"models.{_name(mid)}."
            if not NAME.match(mid):
                self.err(f"models.{_name(mid)}", "not a valid model id — use letters, digits, '_' or '-'")
            if not isinstance(mt, dict):
                self.err(f"models.{_name(mid)}", f"expected a table with a source, got {type(mt).__name__}")
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
        elif len(stages_raw) > MAX_STAGES:
            self.err("stages", f"{len(stages_raw)} stages; a stack may have at most {MAX_STAGES}")
            stages_raw = []
        all_names = [s.get("name") for s in stages_raw]
        stages: list[StageSpec] = []
        for i, st in enumerate(stages_raw):
            earlier = [n for n in all_names[:i] if isinstance(n, str) and NAME.match(n)]
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
            label = f"stages[{i}] ({_name(name)})"
        where = label + "."
        before = len(self.problems)
        self.unknown_keys(st, STAGE_KEYS, where)
        name = self.string(st, "name", where, required=True)
        if name:
            if not NAME.match(name):
                self.err(where + "name", f"{_show(name)} is not a valid name — use letters, digits, '_' or '-'")
            elif name in RESERVED_FIELDS:
                self.err(where + "name", f"'{name}' is reserved for the user's prompt — choose another stage name")
            elif name in earlier:
                self.err(where + "name", f"duplicate stage name '{_name(name)}' — stage names must be unique")
        model = self.string(st, "model", where, required=len(models) != 1)
        if not model and len(models) == 1:
            model = next(iter(models))
        if model and model not in models:
            hint = difflib.get_close_matches(model, list(models), n=1)
            extra = f" (did you mean '{_name(hint[0])}'?)" if hint else ""
            shown = [_name(m) for m in list(models)[:8]] + (["…"] if len(models) > 8 else [])
            self.err(where + "model", f"unknown model '{_name(model)}'{extra} — defined models: {', '.join(shown) or 'none'}")

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
                    self.err(where + "adapter.scale", f"expected a number from -16 to 16, got {_show(scale)}")
                    scale = 1.0
                adapter = AdapterSpec(source=source, sha256=self.sha(a, where + "adapter."), scale=float(scale))

        known = list(RESERVED_FIELDS) + earlier

        def check_fields(t: Template, at: str) -> None:
            for f in t.fields:
                if f in known:
                    continue
                if f == name:
                    self.err(at, f"stage '{_name(name)}' reads its own output {{{_name(f)}}} — a stage reads {{input}} and earlier stages only")
                elif f in all_names:
                    self.err(
                        at,
                        f"reads {{{_name(f)}}}, which runs after this stage — a stage reads {{input}} and earlier stages only;"
                        " reorder the [[stages]]",
                    )
                else:
                    hint = difflib.get_close_matches(f, known, n=1)
                    extra = f" (did you mean {{{hint[0]}}}?)" if hint else ""
                    shown = ", ".join("{" + k + "}" for k in known[:12]) + (", …" if len(known) > 12 else "")
                    self.err(at, f"unknown field {{{_name(f)}}}{extra} — known fields here: {shown}")

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
                        self.err(at + ".role", f"expected one of {', '.join(ROLES)}, got {_show(role)}")
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
            self.err(where + "max_tokens", f"expected an integer from 1 to {MAX_TOKENS}, got {_show(max_tokens)}")
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
        for key, (lo, hi, want_int) in SAMPLING_BOUNDS.items():
            if key in st:
                val = st[key]
                ok = _is_int(val) if want_int else _is_num(val)
                if not ok or not lo <= val <= hi:
                    kind = "an integer" if want_int else "a number"
                    self.err(where + key, f"expected {kind} from {lo} to {hi}, got {_show(val)}")
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
