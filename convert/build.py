"""Build a runnable stack folder from a source manifest and a device profile.

    from edge_fslm.convert import build_stack
    report = build_stack("my-stack/source.toml", "pi4-2gb", "build/pi4/")
    # then: edge-fslm run --stack build/pi4/ "Why is the sky blue?"

The source manifest has the stack schema, but its ``[models.X].source`` entries
are Hugging Face checkpoint folders and its stage adapters are PEFT folders,
both relative to the manifest.  The build

1. converts each base to a temporary F16 GGUF and quantizes it to the profile's
   type (a stage with a per-stage override gets its own copy of the base),
2. converts each stage adapter to a llama.cpp LoRA GGUF, checked against the
   base it will run on,
3. writes ``stack.toml`` (the same stages, sources pointing at the built files
   by relative path, a sha256 for every artifact, the runtime settings from the
   profile) and ``build_report.json`` (sizes, times, quant types, fallbacks).

Re-running skips an artifact whose inputs (file sizes and mtimes), settings and
converter version match the last report and whose output is unchanged.  Every
file is written to a temp file and renamed, so an interrupted build leaves the
previous artifacts intact and never a half-written one.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .. import __version__, gguf_info, sources
from ..errors import EdgeFSLMError, ManifestError
from ..manifest import STACK_FILE, Manifest, RuntimeSpec, parse_manifest
from .device_profile import Profile, load_profile
from .common import ConvertError, Progress, atomic_output
from .hf_to_gguf import convert_hf
from .lora_to_gguf import convert_lora
from .quantize import normalize_qtype, quantize
from .toml_writer import dumps_manifest

__all__ = ["CONVERTER_VERSION", "REPORT_FILE", "Artifact", "BuildReport", "build_stack"]

#: Bump when converter output changes, so old builds are redone rather than reused.
CONVERTER_VERSION = 1
REPORT_FILE = "build_report.json"
_TMP_DIR = ".build-tmp"
_DIRECT = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # written by the converter, no quantize step


@dataclass
class Artifact:
    """One built file and what it was built from."""

    key: str
    kind: str  # "model" or "adapter"
    path: str  # relative to the build folder
    qtype: str
    fingerprint: dict[str, Any]
    sha256: str = ""
    size: int = 0
    mtime_ns: int = 0
    seconds: float = 0.0
    skipped: bool = False
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildReport:
    """What a build did; also written as build_report.json."""

    out_dir: Path
    stack_file: Path
    profile: str
    source: Path
    artifacts: list[Artifact]
    seconds: float
    runtime: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def built(self) -> int:
        return sum(not a.skipped for a in self.artifacts)

    @property
    def skipped(self) -> int:
        return sum(a.skipped for a in self.artifacts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "edge_fslm_version": __version__,
            "converter_version": CONVERTER_VERSION,
            "profile": self.profile,
            "source": str(self.source),
            "stack_file": self.stack_file.name,
            "seconds": round(self.seconds, 3),
            "built": self.built,
            "skipped": self.skipped,
            "runtime": self.runtime,
            "warnings": self.warnings,
            "artifacts": [a.__dict__ for a in self.artifacts],
        }


# --------------------------------------------------------------------------- inputs


def _fingerprint_dir(folder: Path) -> list[list[Any]]:
    """(name, size, mtime_ns) of every visible file: cheap, and changes whenever a file is rewritten."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            p = Path(root) / f
            st = p.stat()
            out.append([str(p.relative_to(folder)), st.st_size, st.st_mtime_ns])
    return out


def _fingerprint_file(path: Path) -> list[Any]:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def _local_dir(raw: str, base_dir: Path, where: str, marker: str, what: str) -> Path:
    if "://" in raw:
        raise ConvertError(f"{where}: {raw!r} is not a local folder — the build converts a local {what} folder; "
                           "download it first (huggingface-cli download ... --local-dir DIR)")
    p = Path(raw).expanduser()
    p = p if p.is_absolute() else base_dir / p
    if not p.exists():
        raise ConvertError(f"{where}: {p} does not exist — check the path (relative paths start at the manifest's folder)")
    if not p.is_dir():
        raise ConvertError(f"{where}: {p} is a file, not a {what} folder — point at the folder that holds {marker}")
    if not (p / marker).is_file():
        raise ConvertError(f"{where}: {p} has no {marker} — it is not a {what} folder")
    return p.resolve()


def _read_source(source_manifest: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], Manifest]:
    p = Path(source_manifest).expanduser()
    if p.is_dir():
        p = p / STACK_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{p}: no such source manifest — pass the .toml that names the HF checkpoints") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{p}: cannot read the source manifest ({exc})") from None
    manifest = parse_manifest(text, origin=str(p), base_dir=p.resolve().parent, path=p)
    return p.resolve(), tomllib.loads(text), manifest


# --------------------------------------------------------------------------- planning


@dataclass
class _ModelJob:
    art: Artifact
    model_id: str  # id in the source manifest
    out_id: str  # id in the built manifest
    hf_dir: Path


@dataclass
class _AdapterJob:
    art: Artifact
    peft_dir: Path
    base: _ModelJob
    stages: list[str]


def _model_out_id(mid: str, qtype: str, default: str, taken: set[str]) -> str:
    if qtype == default:
        return mid
    out = f"{mid}-{qtype.lower()}"[:64]
    while out in taken:
        out = out[:-1] + "x"
    return out


def _plan(manifest: Manifest, base_dir: Path, profile: Profile, warnings: list[str]
          ) -> tuple[list[_ModelJob], list[_AdapterJob], dict[str, _ModelJob], dict[str, _AdapterJob]]:
    stage_names = {s.name for s in manifest.stages}
    for stage in profile.stage_quants:
        if stage not in stage_names:
            warnings.append(f"profile {profile.name}: quant override for stage '{stage}', which this stack does not have")
    for s in manifest.stages:
        if s.max_tokens >= profile.ctx_size:
            raise ConvertError(f"profile {profile.name}: ctx_size {profile.ctx_size} leaves no room for stage "
                               f"'{s.name}' (max_tokens {s.max_tokens}) — lower its max_tokens or use a profile "
                               "with a larger context")
    models: dict[tuple[str, str], _ModelJob] = {}
    stage_model: dict[str, _ModelJob] = {}
    taken = set(manifest.models)
    for s in manifest.stages:
        q = normalize_qtype(profile.quant_for(s.name))
        key = (s.model, q)
        if key not in models:
            spec = manifest.models[s.model]
            hf_dir = _local_dir(spec.source, base_dir, f"models.{s.model}.source", "config.json", "Hugging Face checkpoint")
            out_id = _model_out_id(s.model, q, normalize_qtype(profile.quant), taken)
            taken.add(out_id)
            art = Artifact(
                key=f"model:{s.model}:{q}",
                kind="model",
                path=f"models/{s.model}.{q}.gguf",
                qtype=q,
                fingerprint={"inputs": _fingerprint_dir(hf_dir), "source": str(hf_dir), "qtype": q,
                             "converter": CONVERTER_VERSION},
            )
            models[key] = _ModelJob(art=art, model_id=s.model, out_id=out_id, hf_dir=hf_dir)
        stage_model[s.name] = models[key]

    adapters: dict[tuple[Path, str], _AdapterJob] = {}
    stage_adapter: dict[str, _AdapterJob] = {}
    for s in manifest.stages:
        if s.adapter is None:
            continue
        peft_dir = _local_dir(s.adapter.source, base_dir, f"stages.{s.name}.adapter", "adapter_config.json",
                              "PEFT adapter")
        base = stage_model[s.name]
        key = (peft_dir, base.art.key)
        if key not in adapters:
            art = Artifact(
                key=f"adapter:{s.name}:{base.out_id}",
                kind="adapter",
                path=f"adapters/{s.name}.{base.out_id}.gguf",
                qtype=profile.adapter_type,
                fingerprint={"inputs": _fingerprint_dir(peft_dir), "source": str(peft_dir),
                             "base_config": _fingerprint_file(base.hf_dir / "config.json"),
                             "outtype": profile.adapter_type, "converter": CONVERTER_VERSION},
            )
            adapters[key] = _AdapterJob(art=art, peft_dir=peft_dir, base=base, stages=[])
        adapters[key].stages.append(s.name)
        stage_adapter[s.name] = adapters[key]
    return list(models.values()), list(adapters.values()), stage_model, stage_adapter


def _previous(out_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((out_dir / REPORT_FILE).read_text(encoding="utf-8"))
        return {a["key"]: a for a in data.get("artifacts", []) if isinstance(a, dict) and "key" in a}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _up_to_date(art: Artifact, prev: dict[str, Any] | None, out_dir: Path) -> bool:
    """Same inputs and settings as last time, and the output untouched since."""
    if prev is None or prev.get("fingerprint") != art.fingerprint:
        return False
    try:
        st = (out_dir / art.path).stat()
    except OSError:
        return False
    return st.st_size == prev.get("size") and st.st_mtime_ns == prev.get("mtime_ns") and bool(prev.get("sha256"))


def _finish(art: Artifact, out_dir: Path, t0: float) -> None:
    p = out_dir / art.path
    st = p.stat()
    art.size, art.mtime_ns = st.st_size, st.st_mtime_ns
    art.sha256 = sources.sha256_file(p)
    art.seconds = round(time.perf_counter() - t0, 3)


# --------------------------------------------------------------------------- the build


def build_stack(
    source_manifest: str | os.PathLike[str],
    profile: str | os.PathLike[str] | Profile,
    out_dir: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    force: bool = False,
    threads: int = 0,
) -> BuildReport:
    """Convert, quantize and package a stack for one device profile into ``out_dir``.

    ``log(line)`` gets one line per step; ``progress(done, total, what)``
    reports bytes within the current conversion or quantization.  ``force``
    rebuilds everything; ``threads`` is passed to llama.cpp's quantizer.
    """
    t_start = time.perf_counter()
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    src_path, raw, manifest = _read_source(source_manifest)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a folder — choose a build folder")
    if out.resolve() == src_path.parent:
        raise ConvertError(f"{out}: is the source manifest's own folder — build into a separate folder")
    warnings: list[str] = []
    model_jobs, adapter_jobs, stage_model, stage_adapter = _plan(manifest, src_path.parent, prof, warnings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    if adapter_jobs:
        (out / "adapters").mkdir(exist_ok=True)
    previous = _previous(out)
    prev = {} if force else previous
    say = log or (lambda line: None)
    tmp_dir = out / _TMP_DIR
    f16_cache: dict[Path, Path] = {}

    def make_model(job: _ModelJob, label: str) -> None:
        art = job.art
        dest = out / art.path
        if art.qtype in _DIRECT:
            say(f"{label}: converting {job.hf_dir.name}")
            rep = convert_hf(job.hf_dir, dest, _DIRECT[art.qtype], progress=progress)
            art.details = {"tensor_types": rep.tensor_types, "warnings": rep.warnings}
            return
        f16 = f16_cache.get(job.hf_dir)
        if f16 is None:
            tmp_dir.mkdir(exist_ok=True)
            f16 = tmp_dir / f"{job.model_id}.f16.gguf"
            say(f"{label}: converting {job.hf_dir.name} to F16")
            rep = convert_hf(job.hf_dir, f16, "f16", progress=progress)
            art.details["convert_warnings"] = rep.warnings
            f16_cache[job.hf_dir] = f16
        say(f"{label}: quantizing")
        qrep = quantize(f16, dest, art.qtype, threads=threads, progress=progress)
        art.details.update({"bytes_by_type": qrep.bytes_by_type, "f16_size": qrep.in_size,
                            "fallbacks": qrep.fallbacks})

    def make_adapter(ajob: _AdapterJob, label: str) -> None:
        art = ajob.art
        say(f"{label}: converting LoRA ({art.qtype})")
        rep = convert_lora(ajob.peft_dir, ajob.base.hf_dir, out / art.path, art.qtype,
                           base_gguf=out / ajob.base.art.path, progress=progress)
        art.details = {"ranks": rep.ranks, "alpha": rep.alpha, "modules": rep.modules,  # type: ignore[union-attr]
                       "warnings": rep.warnings}

    # models first: an adapter is checked against its base's built GGUF
    steps: list[tuple[Artifact, str, Callable[[str], None]]] = [
        (job.art, f"model {job.model_id} -> {job.art.qtype}", functools.partial(make_model, job))
        for job in model_jobs
    ] + [
        (ajob.art, f"adapter {', '.join(ajob.stages)} ({ajob.peft_dir.name})", functools.partial(make_adapter, ajob))
        for ajob in adapter_jobs
    ]
    try:
        for step, (art, what, make) in enumerate(steps, 1):
            label = f"[{step}/{len(steps)}] {what}"
            if _up_to_date(art, prev.get(art.key), out):
                _reuse(art, prev[art.key])
                say(f"{label}: up to date, skipped")
                continue
            t0 = time.perf_counter()
            make(label)
            _finish(art, out, t0)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    for job in model_jobs:
        n = len(job.art.details.get("fallbacks") or {})
        if n:
            warnings.append(f"{job.art.path}: {n} tensors have rows that do not fit {job.art.qtype} blocks and "
                            "were stored as other types (see fallbacks in the report)")
    runtime, dropped = _runtime(raw.get("runtime", {}), prof)
    if dropped:
        warnings.append(f"profile settings {', '.join(sorted(dropped))} are not stack manifest fields yet; "
                        "recorded in build_report.json only")
    doc = _built_doc(raw, manifest, prof, runtime, stage_model, stage_adapter)
    stack_file = out / STACK_FILE
    text = dumps_manifest(doc, comment=f"Built by edge-fslm {__version__} from {src_path.name} "
                                       f"with profile {prof.name}.\nDo not edit: `edge-fslm build` rewrites it.")
    try:
        parse_manifest(text, origin=str(stack_file), base_dir=out.resolve(), path=stack_file)
    except EdgeFSLMError as exc:  # a bug in the build, but say which field
        raise ConvertError(f"{stack_file}: the built manifest does not validate ({str(exc).splitlines()[0]})") from None
    _write_text(stack_file, text)
    # The adapters must fit the models they were built against; check again now that all files are final.
    for ajob in adapter_jobs:
        gguf_info.validate_adapter(out / ajob.art.path, gguf_info.validate_model(out / ajob.base.art.path))

    report = BuildReport(
        out_dir=out,
        stack_file=stack_file,
        profile=prof.name,
        source=src_path,
        artifacts=[j.art for j in model_jobs] + [j.art for j in adapter_jobs],
        seconds=time.perf_counter() - t_start,
        runtime={**runtime, **{k: v for k, v in prof.runtime().items() if k in dropped}},
        warnings=warnings,
    )
    _write_text(out / REPORT_FILE, json.dumps(report.to_dict(), indent=2) + "\n")
    _remove_stale(out, previous, {a.path for a in report.artifacts})
    return report


def _remove_stale(out: Path, previous: dict[str, dict[str, Any]], current: set[str]) -> None:
    """Delete artifacts an earlier build of this folder wrote and this one no longer uses.

    Only files the previous report lists, inside models/ or adapters/, are touched.
    """
    for art in previous.values():
        rel = art.get("path")
        if not isinstance(rel, str) or rel in current or not rel.endswith(".gguf"):
            continue
        parts = Path(rel).parts
        if len(parts) == 2 and parts[0] in ("models", "adapters") and parts[1] not in ("", ".", ".."):
            (out / rel).unlink(missing_ok=True)


def _reuse(art: Artifact, prev: dict[str, Any]) -> None:
    art.sha256, art.size, art.mtime_ns = prev["sha256"], prev["size"], prev["mtime_ns"]
    art.details = prev.get("details", {})
    art.seconds = 0.0
    art.skipped = True


def _runtime(src_runtime: dict[str, Any], prof: Profile) -> tuple[dict[str, Any], set[str]]:
    """The source's runtime table overridden by the profile, limited to what manifests accept."""
    allowed = set(RuntimeSpec.__dataclass_fields__)
    merged = {**src_runtime, **prof.runtime()}
    dropped = {k for k in merged if k not in allowed}
    return {k: v for k, v in merged.items() if k in allowed}, dropped


def _built_doc(raw: dict[str, Any], manifest: Manifest, prof: Profile, runtime: dict[str, Any],
               stage_model: dict[str, _ModelJob], stage_adapter: dict[str, _AdapterJob]) -> dict[str, Any]:
    stack = dict(raw.get("stack", {}))
    stack["schema"] = 1
    desc = stack.get("description") or manifest.description or manifest.name
    stack["description"] = f"{desc} [built for {prof.name}: {prof.quant}]"
    models: dict[str, Any] = {}
    for job in stage_model.values():
        models[job.out_id] = {"source": job.art.path, "sha256": job.art.sha256}
    stages = []
    for st_raw, st in zip(raw.get("stages", []), manifest.stages):
        st_out = dict(st_raw)
        st_out["model"] = stage_model[st.name].out_id
        if st.name in stage_adapter:
            a = stage_adapter[st.name].art
            entry: dict[str, Any] = {"source": a.path, "sha256": a.sha256}
            if st.adapter is not None and st.adapter.scale != 1.0:
                entry["scale"] = st.adapter.scale
            st_out["adapter"] = entry
        stages.append(st_out)
    return {"stack": stack, "runtime": runtime, "models": models, "stages": stages}


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
