"""Model references: turn what a manifest names into a verified local file.

A stack manifest never embeds weights; it names each model and adapter by
reference, and this module is the one place that turns a reference into a path.
Three forms exist, so that a stack written on a laptop runs unchanged on a
device with no network:

``models/x.gguf`` or ``/abs/x.gguf``
    A local file. Relative paths are resolved against the stack folder and, for
    stacks someone else made, must stay inside it (symlinks included), so a
    pulled stack cannot make edge-fslm read arbitrary files.
``pkg://DIST/RESOURCE``
    A file shipped inside an installed Python distribution (a "model wheel"),
    found through :mod:`importlib.metadata` *without importing the package*:
    model wheels often have heavy or missing import-time dependencies.
``hf://OWNER/NAME/FILE[@REVISION]``
    A file in a Hugging Face repo, resolved through the standard Hugging Face
    cache, so ``edge-fslm pull`` on a connected machine and ``edge-fslm run``
    offline find the very same file. A 40-hex commit revision pins it.
``chunks://NAME``
    A model shipped as ordered chunk packages, assembled into the local cache by
    ``edge-fslm assemble NAME`` (see :mod:`edge_fslm.chunks`); pinned by the sha256
    in its chunk spec, which is checked on every load.

Every failure is a :class:`~edge_fslm.errors.SourceError` with one line naming
the reference, what is wrong and what to do; nothing else escapes.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError

__all__ = [
    "SourceRef",
    "parse_source",
    "resolve",
    "fetch",
    "sha256_file",
    "forget_digests",
    "hf_offline_env",
    "verify_sha256",
    "strict_problem",
    "check_strict",
]

PKG_SCHEME = "pkg://"
HF_SCHEME = "hf://"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# PEP 508 distribution names.
_DIST = re.compile(r"^([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9])$")
# Hugging Face repo id parts: 1-96 of [A-Za-z0-9_.-], not starting or ending with '-' or '.'.
_HF_PART = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
_REVISION = re.compile(r"^[A-Za-z0-9_./-]{1,255}$")
_CHUNK = 1 << 20
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class SourceRef:
    """A parsed model reference; which fields are set depends on ``kind``.

    Kept separate from resolution so a manifest can be validated (and its
    pinning checked) without touching the disk or the network.
    """

    raw: str
    kind: str  # "path" | "pkg" | "hf" | "chunks"
    path: str | None = None  # kind == "path"; the model's name for kind == "chunks"
    dist: str | None = None  # kind == "pkg"
    resource: str | None = None  # kind == "pkg"
    repo_id: str | None = None  # kind == "hf"
    filename: str | None = None  # kind == "hf"
    revision: str | None = None  # kind == "hf"; None means the repo's default branch

    @property
    def is_pinned(self) -> bool:
        """Whether the reference always names the same bytes.

        A branch like ``main`` can move, so only an ``hf://`` reference at a
        40-hex commit counts; local and packaged files are fixed by what is
        installed (and by ``sha256`` when the manifest gives one).
        """
        if self.kind == "hf":
            return self.revision is not None and bool(_COMMIT.fullmatch(self.revision))
        return True

    def __str__(self) -> str:
        return self.raw


def _bad(raw: object, what: str) -> SourceError:
    return SourceError(f"{raw}: {what}")


def _split_parts(raw: str, rest: str, what: str) -> list[str]:
    """Split a '/'-separated in-package or in-repo path, refusing anything that could escape it."""
    if not rest:
        raise _bad(raw, f"no {what} given — add the file's path after the distribution or repository name")
    if "\\" in rest or "\x00" in rest:
        raise _bad(raw, f"{what} {rest!r} contains a backslash or NUL — use '/' to separate folders")
    if rest.startswith("/"):
        raise _bad(raw, f"{what} {rest!r} is absolute — write it relative to the package or repository root")
    parts = rest.split("/")
    if any(p == ".." for p in parts):
        raise _bad(raw, f"{what} {rest!r} contains '..' — references may not leave their package or repository")
    if any(p in ("", ".") for p in parts):
        raise _bad(raw, f"{what} {rest!r} has an empty or '.' path component — remove the extra '/' or './'")
    return parts


def parse_source(raw: str) -> SourceRef:
    """Parse a reference string without touching the disk or the network.

    Raises SourceError for empty references, unknown schemes (``s3://`` …),
    and ``pkg://`` / ``hf://`` references that do not name a file.
    """
    if isinstance(raw, SourceRef):
        return raw
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if not isinstance(raw, str):
        raise SourceError(
            f"{raw!r}: a model reference must be a string (a path, pkg://DIST/FILE or hf://OWNER/NAME/FILE), "
            f"not {type(raw).__name__} — quote it in the manifest"
        )
    if not raw.strip():
        raise SourceError(
            "empty model reference — give a path, pkg://DIST/FILE or hf://OWNER/NAME/FILE[@REVISION]"
        )
    if "\x00" in raw or "\n" in raw or "\r" in raw:
        raise SourceError(f"{raw!r}: model reference contains a NUL or newline — write it on one line")

    m = _SCHEME.match(raw)
    if m is None:
        return SourceRef(raw=raw, kind="path", path=raw)
    scheme = m.group(1).lower()
    rest = raw[m.end():]

    if scheme == "pkg":
        dist, _, resource = rest.partition("/")
        if not dist or not _DIST.fullmatch(dist):
            raise _bad(raw, f"{dist!r} is not a valid distribution name — write pkg://DIST/PATH/IN/DIST")
        parts = _split_parts(raw, resource, "resource")
        return SourceRef(raw=raw, kind="pkg", dist=dist, resource="/".join(parts))

    if scheme == "hf":
        revision: str | None = None
        if "@" in rest:
            rest, _, revision = rest.rpartition("@")
            if not revision or not _REVISION.fullmatch(revision) or ".." in revision:
                raise _bad(
                    raw,
                    f"revision {revision!r} is not a branch, tag or commit — write "
                    "hf://OWNER/NAME/FILE@main or @<40-hex commit>",
                )
        pieces = rest.split("/", 2)
        if len(pieces) < 3 or not pieces[2]:
            raise _bad(raw, "an hf:// reference needs OWNER/NAME/FILE — add the file's path inside the repository")
        owner, name, filename = pieces
        for part in (owner, name):
            if not _HF_PART.fullmatch(part) or "--" in part or ".." in part:
                raise _bad(
                    raw,
                    f"{part!r} is not a valid Hugging Face owner or repo name — use letters, digits, '-', '_', '.'",
                )
        if name.endswith(".git"):
            raise _bad(raw, f"repo name {name!r} must not end in .git — drop the suffix")
        parts = _split_parts(raw, filename, "file name")
        return SourceRef(
            raw=raw, kind="hf", repo_id=f"{owner}/{name}", filename="/".join(parts), revision=revision
        )

    if scheme == "chunks":
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", rest):
            raise _bad(raw, "a chunks:// reference is chunks://NAME, a model `edge-fslm assemble` knows")
        return SourceRef(raw=raw, kind="chunks", path=rest)

    raise _bad(raw, f"unknown scheme {scheme}:// — use a local path, pkg://DIST/FILE, hf://OWNER/NAME/FILE"
                    " or chunks://NAME")


# --------------------------------------------------------------------------- hashing

_digests: dict[tuple[str, int, int], str] = {}
_digests_lock = threading.Lock()


def _stat_key(real: str) -> tuple[str, int, int]:
    st = os.stat(real)
    return (real, st.st_size, st.st_mtime_ns)


def forget_digests() -> None:
    """Drop the in-process hash cache: the next :func:`sha256_file` reads every file again."""
    with _digests_lock:
        _digests.clear()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks.

    Cached in-process by (realpath, size, mtime_ns): a long-lived process that
    reloads a stack must not re-hash hundreds of MB every time.
    """
    try:
        real = os.path.realpath(os.fspath(path))
        key = _stat_key(real)
        with _digests_lock:
            hit = _digests.get(key)
        if hit is not None:
            return hit
        h = hashlib.sha256()
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        with open(real, "rb") as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
        digest = h.hexdigest()
        # Only remember the digest if the file did not change while it was read.
        if _stat_key(real) == key:
            with _digests_lock:
                _digests[key] = digest
        return digest
    except OSError as exc:
        raise SourceError(
            f"{os.fspath(path)}: cannot read it to check its sha256 ({exc.strerror or exc}) — "
            "check the file's permissions"
        ) from None


def _check_sha256_format(expected: object, ref: str) -> str:
    """Validate a manifest sha256 field before any slow work; return it lower-cased."""
    if not isinstance(expected, str) or not _SHA256.fullmatch(expected.strip()):
        raise SourceError(
            f"{ref}: sha256 {expected!r} is not 64 hex characters — fix the sha256 field "
            "(`sha256sum FILE` prints the right value)"
        )
    return expected.strip().lower()


def verify_sha256(path: str | os.PathLike[str], expected: str, ref: str) -> None:
    """Check *path* against the manifest's sha256 for *ref*.

    The hash is what makes an unpinned or local reference safe to trust: a
    truncated download or a swapped file is caught before llama.cpp reads it.
    """
    want = _check_sha256_format(expected, ref)
    got = sha256_file(path)
    if got != want:
        raise SourceError(
            f"{os.fspath(path)}: sha256 mismatch — expected {want}, got {got} (from {ref}); "
            "the file is corrupt or not the one the stack was made for"
        )


# --------------------------------------------------------------------------- local and pkg


def _check_file(raw: str, p: str) -> Path:
    """Return *p* if it is an existing regular file (after symlinks), else raise."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise _bad(raw, f"{p} does not exist — check the path, or fetch the file first") from None
    except NotADirectoryError:
        raise _bad(raw, f"{p} does not exist (a parent is not a folder) — check the path") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _bad(raw, f"{p} is a symlink loop (or a chain of over 40 links) — point the link at a real file") from None
        raise _bad(raw, f"cannot access {p} ({exc.strerror or exc}) — check its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise _bad(raw, f"{p} is a directory, not a file — name the model file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise _bad(raw, f"{p} is not a regular file — reference a .gguf file, not a device or pipe")
    return Path(p)


def _within(child: str, parent: str) -> bool:
    try:
        return os.path.commonpath([child, parent]) == parent
    except ValueError:  # different drives (Windows)
        return False


def _resolve_path(ref: SourceRef, base_dir: str | Path | None, allow_absolute: bool, confine: bool) -> Path:
    raw = ref.raw
    p = ref.path or raw
    if p.startswith("~"):
        if not allow_absolute:
            raise _bad(
                raw,
                "home-relative paths are not allowed in a pulled or built stack — "
                "reference a file inside the stack folder with a relative path",
            )
        p = os.path.expanduser(p)
    if os.path.isabs(p):
        if not allow_absolute:
            raise _bad(
                raw,
                "absolute paths are not allowed in a pulled or built stack — "
                "reference a file inside the stack folder with a relative path",
            )
        return _check_file(raw, os.path.realpath(p))

    try:
        base = os.path.abspath(os.fspath(base_dir)) if base_dir is not None else os.getcwd()
    except OSError as exc:
        raise _bad(raw, f"cannot find the folder to resolve it against ({exc}) — pass an absolute path") from None
    joined = os.path.normpath(os.path.join(base, p))
    real = os.path.realpath(joined)
    if confine:
        # A relative path may never climb out with "..". In an untrusted stack (one that
        # may not name absolute paths) a symlink may not lead out either; the user's own
        # manifest may symlink to models elsewhere, as it could name them directly.
        escaped = joined if not _within(joined, os.path.normpath(base)) else None
        real_base = os.path.realpath(base)
        if escaped is None and not allow_absolute and not _within(real, real_base):
            escaped = real
        if escaped is not None:
            # a relative path always means "inside this folder"; the user's own manifest
            # names a file elsewhere by its absolute path, which says so on its face
            hint = (" — stacks may only reference files inside their own folder; in your own manifest,"
                    f" write the absolute path ({escaped}) to use a file outside it") if allow_absolute else \
                " — stacks may only reference files inside their own folder"
            raise _bad(raw, f"resolves to {escaped}, which escapes the stack folder {real_base}{hint}")
    return _check_file(raw, real)


def _resolve_pkg(ref: SourceRef) -> Path:
    raw, dist_name, resource = ref.raw, ref.dist or "", ref.resource or ""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise _bad(
            raw, f"distribution {dist_name!r} is not installed — run `pip install --no-deps {dist_name}`"
        ) from None
    except (OSError, ValueError) as exc:
        raise _bad(raw, f"cannot read the metadata of {dist_name!r} ({exc}) — reinstall it") from None
    try:
        located = dist.locate_file(resource)
    except Exception as exc:  # custom Distribution finders may raise anything
        raise _bad(raw, f"cannot locate {resource!r} in {dist_name!r} ({exc}) — reinstall it") from None
    p = os.path.realpath(os.fspath(located))
    try:
        present = os.path.lexists(p)
    except OSError:
        present = False
    if not present:
        raise _bad(
            raw,
            f"{dist_name!r} is installed but has no file {resource!r} (looked at {p}) — "
            f"check the path, or reinstall with `pip install --no-deps --force-reinstall {dist_name}`",
        )
    return _check_file(raw, p)


# --------------------------------------------------------------------------- hf


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in _TRUE


def hf_offline_env() -> bool:
    """True when the environment (now, or when huggingface_hub was imported) asks for offline mode.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, into
    ``huggingface_hub.constants.HF_HUB_OFFLINE``; setting the variable later
    does not reach it, so both are consulted.
    """
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
    except Exception:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hf_cache_dir() -> tuple[str, str]:
    """The hub cache folder and how to describe it, read from the environment *now*.

    huggingface_hub derives its cache folder from HF_HUB_CACHE / HF_HOME at
    import time only; reading them per call keeps a process that changes them
    (tests, a CLI --cache flag) consistent. Same precedence as huggingface_hub.
    """
    env = os.environ

    def expand(v: str) -> str:
        return os.path.expandvars(os.path.expanduser(v))

    if env.get("HF_HUB_CACHE"):
        d = expand(env["HF_HUB_CACHE"])
        return d, f"HF_HUB_CACHE={d}"
    if env.get("HUGGINGFACE_HUB_CACHE"):
        d = expand(env["HUGGINGFACE_HUB_CACHE"])
        return d, f"HUGGINGFACE_HUB_CACHE={d}"
    if env.get("HF_HOME"):
        home = expand(env["HF_HOME"])
    else:
        xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = expand(os.path.join(xdg, "huggingface"))
    return os.path.join(home, "hub"), f"HF_HOME={home}"


def _hf_endpoint() -> str | None:
    """HF_ENDPOINT as set now (huggingface_hub only reads it at import); None means its default."""
    v = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return v or None


def _http_status(exc: BaseException | None) -> tuple[int | None, str | None]:
    """Find an HTTP status and URL in an exception or its causes."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        resp = getattr(exc, "response", None)
        code = getattr(resp, "status_code", None)
        if isinstance(code, int):
            url = None
            try:
                url = str(resp.url)  # type: ignore[union-attr]
            except Exception:
                pass
            return code, url
        exc = exc.__cause__ or exc.__context__
    return None, None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve_hf(ref: SourceRef, *, offline: bool, cache_first: bool, pulling: bool = False) -> Path:
    """Resolve an hf:// reference through the Hugging Face cache, downloading unless *offline*.

    *cache_first* returns a cached copy without asking the Hub; otherwise (pull)
    huggingface_hub checks a branch revision for a newer commit when it can.
    """
    raw = ref.raw
    assert ref.repo_id is not None and ref.filename is not None
    cache_dir, cache_desc = _hf_cache_dir()
    endpoint = _hf_endpoint()
    revision = ref.revision or "main"
    where = endpoint or "the Hugging Face Hub"
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import hf_hub_download
    except Exception as exc:  # missing, or older than huggingface_hub.errors
        raise _bad(
            raw, f"huggingface_hub is not usable ({_first_line(exc)}) — run `pip install 'huggingface-hub>=0.24'`"
        ) from None
    local_missing = hf_errors.LocalEntryNotFoundError
    remote_missing = getattr(hf_errors, "RemoteEntryNotFoundError", hf_errors.EntryNotFoundError)
    offline_refused = hf_errors.OfflineModeIsEnabled
    metadata_error = getattr(hf_errors, "FileMetadataError", OSError)

    def not_cached() -> SourceError:
        env_offline = hf_offline_env()
        why = "HF_HUB_OFFLINE is set" if env_offline else "offline mode was requested"
        if pulling and env_offline:
            todo = "unset HF_HUB_OFFLINE (or set it to 0) to download it"
        else:
            todo = "run `edge-fslm pull <stack>` where a network exists"
        return _bad(raw, f"not in the local Hugging Face cache ({cache_desc}) and {why} — {todo}")

    def download(local_only: bool) -> str:
        return hf_hub_download(
            ref.repo_id,
            ref.filename,
            revision=revision,
            cache_dir=cache_dir,
            endpoint=endpoint,
            local_files_only=local_only,
        )

    try:
        got = None
        if cache_first and not offline:
            # A run must not depend on (or wait for) the network once the file is cached, nor pick up
            # a newer commit of a moving branch behind `edge-fslm pull`'s back.
            try:
                got = download(True)
            except local_missing:
                got = None
        if got is None:
            got = download(offline)
    except local_missing as exc:
        # Not in the cache, and the Hub could not be asked (offline) or did not answer usefully.
        if offline or hf_offline_env() or isinstance(exc.__cause__, offline_refused):
            raise not_cached() from None
        code, url = _http_status(exc)
        if code is not None:
            raise _bad(
                raw,
                f"HTTP {code} from {url or where} and not in the local Hugging Face cache ({cache_desc}) — "
                "check the repo id, file name, revision and HF_ENDPOINT",
            ) from None
        if isinstance(exc.__cause__, metadata_error):
            raise _bad(
                raw,
                f"{where} did not answer like a Hugging Face Hub ({_first_line(exc.__cause__)[:120]}) and the file "
                f"is not in the local Hugging Face cache ({cache_desc}) — check HF_ENDPOINT, proxy or captive portal",
            ) from None
        raise _bad(
            raw,
            f"cannot reach {where} and the file is not in the local Hugging Face cache ({cache_desc}) — "
            "check the network or HF_ENDPOINT, or run `edge-fslm pull <stack>` where a network exists",
        ) from None
    except offline_refused:
        raise not_cached() from None
    except hf_errors.GatedRepoError:
        raise _bad(
            raw, f"{ref.repo_id} on {where} is gated — accept its terms on the Hub, set HF_TOKEN, then pull again"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise _bad(
            raw,
            f"repository {ref.repo_id} not found on {where} (or it is private) — check the repo id, or set HF_TOKEN",
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise _bad(
            raw, f"revision {revision!r} not found in {ref.repo_id} — check the branch, tag or commit"
        ) from None
    except remote_missing:
        raise _bad(
            raw, f"no file {ref.filename!r} in {ref.repo_id} at revision {revision!r} — check the file name"
        ) from None
    except hf_errors.HfHubHTTPError as exc:
        code, url = _http_status(exc)
        raise _bad(raw, f"HTTP {code} from {url or where} — check the reference, HF_ENDPOINT and HF_TOKEN") from None
    except OSError as exc:
        raise _bad(
            raw,
            f"download into {cache_dir} failed ({_first_line(exc)}) — check free space and permissions, then retry",
        ) from None
    except ValueError as exc:
        raise _bad(raw, f"huggingface_hub rejected it ({_first_line(exc)}) — fix the reference") from None
    except Exception as exc:  # network-layer errors (httpx/requests) and anything else from the hub client
        raise _bad(
            raw, f"download from {where} failed ({type(exc).__name__}: {_first_line(exc)}) — check the network, retry"
        ) from None
    return _check_file(raw, os.fspath(got))


# --------------------------------------------------------------------------- public entry points


def _as_ref(raw_or_ref: str | SourceRef | os.PathLike[str]) -> SourceRef:
    return raw_or_ref if isinstance(raw_or_ref, SourceRef) else parse_source(raw_or_ref)  # type: ignore[arg-type]


def strict_problem(raw_or_ref: str | SourceRef, sha256: str | None) -> str | None:
    """Why *raw_or_ref* is not acceptable in strict mode, or None when it is.

    Strict mode is for stacks someone else wrote: a download must name exact bytes. An
    ``hf://`` reference needs both a 40-hex commit (a branch or tag can move) and a
    sha256 (a commit pins the repo, the hash pins the file as it lands on this disk).
    Local and ``pkg://`` files are whatever is installed here, so strict mode accepts them.
    """
    ref = _as_ref(raw_or_ref)
    if ref.kind != "hf":
        return None
    missing = []
    if not ref.is_pinned:
        missing.append("a 40-hex commit revision (hf://OWNER/NAME/FILE@<commit>)")
    if sha256 is None:
        missing.append('a sha256 = "<64 hex>" next to the source')
    if not missing:
        return None
    return f"{ref.raw}: strict mode refuses an hf:// file without {' and '.join(missing)} — pin it in the manifest"


def check_strict(manifest: object) -> None:
    """Refuse a manifest whose hf:// models or adapters are not pinned by commit and sha256.

    Checks the whole manifest before anything is resolved, so nothing is downloaded, and
    reports every offending reference on its own line. ``manifest`` is an
    :class:`edge_fslm.manifest.Manifest` (duck-typed, so this module need not import it).
    """
    origin = str(getattr(manifest, "path", None) or getattr(manifest, "name", "<manifest>"))
    problems: list[str] = []
    refs = [(f"models.{mid}", spec.source, spec.sha256) for mid, spec in getattr(manifest, "models", {}).items()]
    refs += [
        (f"stages ({stage.name}).adapter", stage.adapter.source, stage.adapter.sha256)
        for stage in getattr(manifest, "stages", ())
        if getattr(stage, "adapter", None) is not None
    ]
    for where, source, sha in refs:
        try:
            problem = strict_problem(source, sha)
        except SourceError as exc:
            problem = str(exc)
        if problem:
            problems.append(f"{origin}: {where}: {problem}")
    if problems:
        raise SourceError("\n".join(problems))


def _finish(ref: SourceRef, path: Path, sha256: str | None) -> Path:
    if sha256 is not None:
        verify_sha256(path, sha256, ref.raw)
    return path


def resolve(
    raw_or_ref: str | SourceRef,
    *,
    base_dir: str | Path | None = None,
    sha256: str | None = None,
    offline: bool | None = None,
    allow_absolute: bool = True,
    confine: bool = True,
    strict: bool = False,
) -> Path:
    """Turn a reference into an existing regular file, checking *sha256* when given.

    ``base_dir`` is the stack folder relative paths are read from (the current
    directory when None); ``confine`` keeps them inside it and
    ``allow_absolute=False`` refuses absolute and ``~`` paths, for stacks that
    someone else made. For ``hf://`` a cached copy is used without asking the
    Hub; if none is cached, offline mode (``offline=True``, HF_HUB_OFFLINE, or
    huggingface_hub's own setting) fails with a hint to pull, and otherwise the
    file is downloaded into the cache. ``strict`` refuses an ``hf://`` reference that
    is not pinned to a commit *and* a sha256 (see :func:`strict_problem`).
    """
    ref = _as_ref(raw_or_ref)
    if sha256 is not None:
        _check_sha256_format(sha256, ref.raw)
    if strict:
        problem = strict_problem(ref, sha256)
        if problem:
            raise SourceError(problem)
    if ref.kind == "path":
        path = _resolve_path(ref, base_dir, allow_absolute, confine)
    elif ref.kind == "pkg":
        path = _resolve_pkg(ref)
    elif ref.kind == "chunks":
        from . import chunks

        path = chunks.resolve(ref.path or "")
    else:
        path = _resolve_hf(ref, offline=bool(offline) or hf_offline_env(), cache_first=True)
    return _finish(ref, path, sha256)


def fetch(
    raw_or_ref: str | SourceRef,
    *,
    base_dir: str | Path | None = None,
    sha256: str | None = None,
    allow_absolute: bool = True,
    confine: bool = True,
    strict: bool = False,
) -> Path:
    """Like :func:`resolve`, for ``edge-fslm pull``: an ``hf://`` file is downloaded if not cached.

    HF_HUB_OFFLINE still wins (huggingface_hub itself refuses every request
    when it was set at import), and the error then says to unset it.
    """
    ref = _as_ref(raw_or_ref)
    if ref.kind != "hf":
        return resolve(ref, base_dir=base_dir, sha256=sha256, allow_absolute=allow_absolute, confine=confine)
    if sha256 is not None:
        _check_sha256_format(sha256, ref.raw)
    if strict:
        problem = strict_problem(ref, sha256)
        if problem:
            raise SourceError(problem)
    path = _resolve_hf(ref, offline=hf_offline_env(), cache_first=False, pulling=True)
    return _finish(ref, path, sha256)
