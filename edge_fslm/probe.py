"""Load an untrusted model and its adapters in a child process first, so a llama.cpp abort ends the child.

The header validator (gguf_info.py) refuses every crash we know of, but llama.cpp still has
per-architecture ``GGML_ASSERT``s that a crafted or merely odd file can reach (a llama whose
head count is not a multiple of its KV head count aborts while building the graph). An abort
cannot be caught in-process: it would end a user's script, or a server and every request in it.
So before a file from outside the installed packages is loaded here, a child process loads it
the same way (the model with a small context, one decode, then each adapter set and one decode
again). If the child dies, the file is refused with one line naming it and llama.cpp's reason.

A file that passed is remembered by its identity (path, inode, size, mtime), the llama.cpp
binding's version and the settings that shape the graph, in ``probed.json`` of edge-fslm's
cache folder, so each file costs one probe per machine. A file that crashed its probe is
remembered the same way in this process only, and refused again at once until it changes: a
server asked for a broken stack again and again forks no child per request. Files inside
site-packages and edge-fslm's model cache are trusted (SECURITY.md) and never probed. ``EDGE_FSLM_PROBE=0``
or ``Stack.load(..., probe=False)`` turns probing off.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Iterable

from .chunks import cache_dir  # at import, not at the first probe: its imports belong in a plan's baseline
from .errors import GGUFError

PROBE_TIMEOUT_S = 120  # a child that has not loaded the files by then is refused
PROBE_CTX = 64
RECORD_KEEP = 1000  # passed probes remembered; the oldest are forgotten (and probed again if seen)

# Crashed probes of this process: key -> the error. Not written to disk, so a new process (or a
# new llama.cpp) tries the file again; a timeout, which load on the machine can cause, is not kept.
_crashed: dict[str, str] = {}


def probing_enabled(probe: bool | None) -> bool:
    """``probe`` if given, else on unless ``EDGE_FSLM_PROBE=0``."""
    if probe is not None:
        return probe
    return os.environ.get("EDGE_FSLM_PROBE", "1").strip().lower() not in ("0", "false", "no", "off")


def _trusted_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = {paths.get("purelib"), paths.get("platlib"), str(Path(__file__).resolve().parent)}
    roots.add(str(cache_dir() / "models"))
    return [Path(r).resolve() for r in roots if r]


def trusted(path: Path) -> bool:
    """Inside the installed packages or edge-fslm's assembled-model cache (trusted, as SECURITY.md says)."""
    real = Path(path).resolve()
    return any(real.is_relative_to(root) for root in _trusted_roots())


def _identity(path: Path) -> list:
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns]


def probe_key(model: Path, adapters: Iterable[Path], *, flash_attn: bool) -> str:
    """What a passed probe vouches for: these files as they are now, this binding, these graph settings."""
    from importlib.metadata import version

    doc = [version("llama-cpp-python"), flash_attn, _identity(model), sorted(_identity(a) for a in adapters)]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


def _record_path() -> Path:
    return cache_dir() / "probed.json"


def _passed() -> list[str]:
    try:
        keys = json.loads(_record_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # no record yet, or an unreadable one: probe again, never fail for it
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def _remember(key: str) -> None:
    path = _record_path()
    keys = ([k for k in _passed() if k != key] + [key])[-RECORD_KEEP:]  # oldest first, bounded
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(keys), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs another probe next time


def probe_model(model: Path, adapters: list[Path], *, flash_attn: bool = True,
                timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Load ``model`` and each of ``adapters`` on it in a child process; GGUFError if the child crashes.

    Returns True when a child ran, False when the files were trusted or had passed before. A
    file llama.cpp merely refuses (a clean load error) passes here: the real load reports it.
    """
    if trusted(model) and all(trusted(a) for a in adapters):
        return False
    key = probe_key(model, adapters, flash_attn=flash_attn)
    if key in _crashed:
        raise GGUFError(_crashed[key])
    if key in _passed():
        return False
    job = {"model": str(model), "adapters": [str(a) for a in adapters], "flash_attn": flash_attn}
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "edge_fslm.probe"], input=json.dumps(job), capture_output=True,
                              text=True, errors="replace", timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        culprit = _last_file(exc.stdout) or model
        raise GGUFError(f"{culprit}: llama.cpp did not finish loading it within {timeout:.0f} s in a probe"
                        " process — the file may be malformed; set EDGE_FSLM_PROBE=0 to load it anyway") from None
    if proc.returncode in (0, 3):  # loaded, or refused cleanly (the in-process load will say why)
        if proc.returncode == 0:
            _remember(key)
        return True
    culprit = _last_file(proc.stdout) or model
    message = (f"{culprit}: llama.cpp crashed loading it ({_how(proc.returncode)}{_reason(proc.stderr)})"
               " in a probe process, so nothing else was affected — the file is malformed or made for"
               " another llama.cpp version")
    if len(_crashed) >= RECORD_KEEP:
        _crashed.pop(next(iter(_crashed), None), None)  # the oldest
    _crashed[key] = message
    raise GGUFError(message)


def _last_file(stdout: str | bytes | None) -> str | None:
    if isinstance(stdout, bytes):
        stdout = stdout.decode("utf-8", "replace")
    lines = [ln.split(" ", 1)[1] for ln in (stdout or "").splitlines() if ln.startswith(("model ", "adapter "))]
    return lines[-1] if lines else None


def _how(rc: int) -> str:
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else None
    if sig:
        try:
            return signal.Signals(sig).name
        except ValueError:
            pass
    return f"exit code {rc}"


def _reason(stderr: str) -> str:
    """llama.cpp's own last words (a GGML_ASSERT line), shortened, or nothing."""
    lines = [ln.strip() for ln in (stderr or "").splitlines() if "GGML_ASSERT" in ln or "error" in ln.lower()]
    if not lines:
        return ""
    text = lines[-1]
    if "GGML_ASSERT" in text:
        text = text[text.index("GGML_ASSERT"):]
    return ": " + (text if len(text) <= 160 else text[:157] + "...")


def _child() -> int:
    """The probe itself: load, decode one token, then the same under each adapter. Exit 3 on a clean refusal."""
    from . import llama

    job = json.loads(sys.stdin.read())
    llama.lib()
    from llama_cpp import Llama

    print("model", job["model"], flush=True)
    try:
        with llama.without_chat_handlers():
            llm = Llama(model_path=job["model"], n_ctx=PROBE_CTX, n_batch=PROBE_CTX, n_ubatch=PROBE_CTX,
                        n_threads=1, n_threads_batch=1, flash_attn=job["flash_attn"], verbose=False)
    except (ValueError, RuntimeError, UnicodeDecodeError):
        return 3
    first = [llm.token_bos() if llm.token_bos() >= 0 else 0]
    llm.eval(first)
    ctx = llama.context_ptr(llm)
    for path in job["adapters"]:
        print("adapter", path, flush=True)
        handle = llama.load_adapter(llm, path)
        if handle is None:
            return 3
        if llama.set_adapter(ctx, handle, 1.0) != 0:
            return 3
        llm.reset()
        llama.clear_memory(ctx)
        llm.eval(first)
        llama.set_adapter(ctx, None, 1.0)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
