"""Fuzzing the three parsers that read untrusted input, with hypothesis (run by default).

* the manifest loader, ``parse_manifest``: random text, mutated real manifests, and
  structured documents (dicts serialized to TOML by a tiny emitter below) -- only
  ManifestError may come out, fast, whatever the input;
* the GGUF validator, on the REAL SmolLM2 header (1.8 MB: the vocabulary lives there),
  mutated in place in a sparse full-size copy -- only GGUFError, one line naming the file;
* the template parser -- only TemplateSyntaxError, and a parsed template renders.

tests/test_gguf_info.py fuzzes a small synthetic GGUF (2,000 cases); the counts here add
MANIFEST_* + REAL_GGUF + TEMPLATE cases (2,900 by default; EDGE_FSLM_FUZZ_SCALE multiplies them).
"""

from __future__ import annotations

import collections
import math
import os
import struct
import time
from importlib import resources

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_fslm import gguf_info
from edge_fslm.errors import GGUFError, ManifestError
from edge_fslm.manifest import MESSAGE_KEYS, STAGE_KEYS, TOP_KEYS, parse_manifest
from edge_fslm.templates import TemplateSyntaxError, parse_template
from edge_fslm.testing.hostile import real_header, sparse_copy

SCALE = float(os.environ.get("EDGE_FSLM_FUZZ_SCALE", "1"))
MANIFEST_TEXT = int(600 * SCALE)
MANIFEST_MUTATED = int(600 * SCALE)
MANIFEST_STRUCTURED = int(700 * SCALE)
REAL_GGUF = int(500 * SCALE)
TEMPLATE = int(500 * SCALE)
SLOW = 2.0  # seconds; any single parse slower than this is a failure (a near-hang)
OUTCOMES: collections.Counter = collections.Counter()  # "<parser>:ok" / "<parser>:refused", for the benchmark
# benchmarks/reliability.py runs this file and reads the counts and outcomes from this file
REPORT = os.environ.get("EDGE_FSLM_FUZZ_REPORT")

DEFAULT = (resources.files("edge_fslm.stacks") / "fslm-smollm2.toml").read_text()
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def check_manifest(text: str) -> None:
    t0 = time.perf_counter()
    try:
        m = parse_manifest(text, origin="fuzz.toml")
    except ManifestError as exc:
        OUTCOMES["manifest:refused"] += 1
        msg = str(exc)
        assert msg, "empty ManifestError"
        for line in msg.splitlines():
            assert line.startswith("fuzz.toml: ") or line.startswith("override") or line.startswith("--"), line
            assert line.isprintable() and len(line) < 2000, line[:300]
    else:
        OUTCOMES["manifest:ok"] += 1
        assert m.stages, "a manifest without stages validated"
        names = set()
        for s in m.stages:
            assert set(s.reads) <= {"input"} | names, (s.name, s.reads)
            names.add(s.name)
            assert 1 <= s.max_tokens < m.runtime.ctx_size
    took = time.perf_counter() - t0
    assert took < SLOW, f"parse took {took:.2f} s"


# --------------------------------------------------------------------------- manifests: random text

TOML_ALPHABET = st.sampled_from(list('[]{}="\'.,#\n \t\\abcdefgimnorstuxyz0123456789_-+:') + ["\x00", "é", "\u202e"])


@settings(FUZZ, max_examples=MANIFEST_TEXT)
@given(st.text(alphabet=TOML_ALPHABET, max_size=400) | st.text(max_size=200))
def test_fuzz_manifest_random_text(text):
    check_manifest(text)


# --------------------------------------------------------------------------- manifests: mutated real manifests

@st.composite
def mutated_default(draw):
    text = DEFAULT
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "dup", "bomb"]))
        if kind == "insert":
            text = text[:pos] + draw(st.text(alphabet=TOML_ALPHABET, min_size=1, max_size=8)) + text[pos:]
        elif kind == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 40)):]
        elif kind == "replace":
            text = text[:pos] + draw(st.sampled_from(["{", "}", "[[stages]]\n", '"', "{input.x}", "{keywords}",
                                                      "{answer}", "-1", "1e999", "nan", "true", "[", "{{", "}}",
                                                      "max_tokens = 99999\n", "\\u0000", "[runtime]\n"])) + text[pos + 1:]
        elif kind == "dup":
            n = draw(st.integers(1, 200))
            text = text[:pos] + text[pos:pos + n] * draw(st.integers(2, 5)) + text[pos + n:]
        else:  # nesting or dotted-key bombs
            text = text[:pos] + draw(st.sampled_from(["[" * 200, "{a=" * 100, "a" + ".a" * 60 + " = 1\n",
                                                      "9" * 5000, "x = " + "[" * 40 + "]" * 40 + "\n"])) + text[pos:]
    return text


@settings(FUZZ, max_examples=MANIFEST_MUTATED)
@given(mutated_default())
def test_fuzz_manifest_mutated_default(text):
    check_manifest(text)


# --------------------------------------------------------------------------- manifests: structured documents


def toml_value(v) -> str:
    """A tiny TOML emitter: inline values only (enough for any document, as dotted/inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        out = ['"']
        for c in v:
            if c in '"\\':
                out.append("\\" + c)
            elif ord(c) < 32 or ord(c) == 127:
                out.append(f"\\u{ord(c):04x}")
            elif 0xD800 <= ord(c) <= 0xDFFF:
                out.append("?")
            else:
                out.append(c)
        return "".join(out) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(doc: dict) -> str:
    return "".join(f"{toml_value(str(k))} = {toml_value(v)}\n" for k, v in doc.items())


KEYS = list(TOP_KEYS) + list(STAGE_KEYS) + list(MESSAGE_KEYS) + [
    "source", "sha256", "scale", "ctx_size", "threads", "batch_size", "gpu_layers", "seed", "policy", "budget", "mmap",
    "schema", "max_token", "temprature", "sourc", "input", "", " ", "a.b", "é"]
scalars = (st.integers(-2**63, 2**63 - 1) | st.sampled_from([0, 1, 16, 64, 127, 2048, 65536, 65537, -1])
           | st.floats(allow_nan=True, allow_infinity=True) | st.booleans()
           | st.text(max_size=30) | st.sampled_from(["{input}", "{input.__class__}", "{a}", "{b}", "{{x}}", "user",
                                                     "system", "assistant", "m", "model.gguf", "hf://o/r/f.gguf",
                                                     "pkg://x/y", "../../etc/passwd", "auto", "lru", "300MB", "a" * 64]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5), max_leaves=20)


@st.composite
def structured(draw):
    """Mostly-valid documents with perturbations, so validation gets deep, not just to the first key."""
    n = draw(st.integers(0, 4))
    stage_names = draw(st.lists(st.sampled_from(["a", "b", "c", "input", "a b", "x" * 70, ""]), min_size=n, max_size=n))
    stages = []
    for name in stage_names:
        stage = {"name": name, "max_tokens": draw(st.sampled_from([1, 4, 128, 0, 70000, "4", 4.0]))}
        if draw(st.booleans()):
            stage["template"] = draw(st.sampled_from(["{input}", "{a} {b}", "{c}", "x{{y}}z", "{input", "{0}"]))
        else:
            stage["messages"] = draw(st.lists(st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "system", "robot"]),
                 "content": st.sampled_from(["{input}", "{a}", "hi", "{b}{c}", 3])}), max_size=3))
        extra = draw(st.dictionaries(st.sampled_from(KEYS), values, max_size=2))
        stage.update(extra)
        stages.append(stage)
    doc = {
        "stack": {"name": draw(st.sampled_from(["ok", "", "bad name", 3]))},
        "models": draw(st.sampled_from([{"m": {"source": "model.gguf"}}, {}, {"m": "x"},
                                        {"m": {"source": "a.gguf"}, "n": {"source": "b.gguf", "sha256": "0" * 64}}])),
        "stages": stages,
    }
    if draw(st.booleans()):
        doc["runtime"] = draw(st.dictionaries(st.sampled_from(["ctx_size", "threads", "seed", "policy", "mmap", "budget",
                                                               "nope"]), scalars, max_size=3))
    doc.update(draw(st.dictionaries(st.sampled_from(KEYS), values, max_size=2)))
    return doc


@settings(FUZZ, max_examples=MANIFEST_STRUCTURED)
@given(structured())
def test_fuzz_manifest_structured(doc):
    check_manifest(to_toml(doc))


def test_emitter_round_trips():
    import tomllib

    doc = {"stack": {"name": "x\"\\\n\x01é"}, "n": [1, 2.5, True, {"a b": []}]}
    assert tomllib.loads(to_toml(doc)) == doc


# --------------------------------------------------------------------------- GGUF: the real header, mutated


@pytest.fixture(scope="module")
def real_copy(tmp_path_factory):
    head, size, lay = real_header()
    path = sparse_copy(tmp_path_factory.mktemp("realfuzz") / "real.gguf", head, size)
    hot = [0, 4, 8, 16, 24]  # version, counts, first key
    for start, vt in lay.kv.values():
        hot += [start, vt, vt + 4, vt + 8]
    for t in lay.tensors:
        hot += list(t.values())
    return path, head, size, sorted(set(hot))


@st.composite
def header_mutations(draw, head_len: int, hot: list[int]):
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        near = draw(st.sampled_from(hot)) + draw(st.integers(-2, 12))
        pos = max(0, min(head_len - 1, draw(st.integers(0, head_len - 1)) if draw(st.booleans()) else near))
        kind = draw(st.sampled_from(["bytes", "u64", "u32", "truncate"]))
        if kind == "bytes":
            val = draw(st.binary(min_size=1, max_size=4))
        elif kind == "u64":
            val = struct.pack("<Q", draw(st.sampled_from([0, 1, 7, 2**31, 2**32, 2**40, 2**63, 2**64 - 1])
                                         | st.integers(0, 2**64 - 1)))
        elif kind == "u32":
            val = struct.pack("<I", draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 99, 2**32 - 1])))
        else:
            val = b""
        ops.append((kind, pos, val))
    return ops


@settings(FUZZ, max_examples=REAL_GGUF)
@given(st.data())
def test_fuzz_real_header_mutations(real_copy, data):
    path, head, size, hot = real_copy
    ops = data.draw(header_mutations(len(head), hot))
    fd = os.open(path, os.O_RDWR)
    try:
        new_size = size
        for kind, pos, val in ops:
            if kind == "truncate":
                new_size = min(new_size, pos)
                os.ftruncate(fd, new_size)
            elif pos < new_size:
                os.pwrite(fd, val[: new_size - pos], pos)
        gguf_info.clear_cache()
        t0 = time.perf_counter()
        try:
            info = gguf_info.validate_model(path)
        except GGUFError as exc:
            OUTCOMES["gguf:refused"] += 1
            msg = str(exc)
            assert msg.startswith(f"{path}: ") and " — " in msg and len(msg.splitlines()) == 1, msg
            assert "internal check failed" not in msg, msg  # the walker's safety net must never be needed
        else:
            OUTCOMES["gguf:ok"] += 1
            assert info.n_layer and info.tensors
        assert time.perf_counter() - t0 < SLOW
    finally:  # restore the pristine header for the next example
        os.ftruncate(fd, 0)
        os.pwrite(fd, head, 0)
        os.ftruncate(fd, size)
        os.close(fd)


# --------------------------------------------------------------------------- templates


@settings(FUZZ, max_examples=TEMPLATE)
@given(st.lists(st.sampled_from(list("{}!:.[]ab_-0 \n") + ["input", "é", "\x00", "{{", "}}", "{input}"]),
                max_size=30).map("".join)
       | st.text(max_size=40))
def test_fuzz_template_parser(source):
    try:
        t = parse_template(source)
    except TemplateSyntaxError as exc:
        OUTCOMES["template:refused"] += 1
        assert str(exc) and "\n" not in str(exc) and len(str(exc)) < 500
        return
    OUTCOMES["template:ok"] += 1
    values = {f: f"<{f}>" for f in t.fields}
    out = t.render(values)
    # every field is a plain name; with no fields, the output is the source with {{ }} unescaped
    assert all(f and "." not in f and "[" not in f for f in t.fields)
    if not t.fields:
        assert out == source.replace("{{", "{").replace("}}", "}")


def test_zz_fuzz_reached_both_outcomes():
    """The fuzzers are not all refusals: some inputs validate, so the checks behind the first error run too."""
    if not OUTCOMES:
        pytest.skip("run with the fuzz tests")
    if REPORT:
        import json

        cases = {"test_fuzz_manifest_random_text": MANIFEST_TEXT, "test_fuzz_manifest_mutated_default": MANIFEST_MUTATED,
                 "test_fuzz_manifest_structured": MANIFEST_STRUCTURED, "test_fuzz_real_header_mutations": REAL_GGUF,
                 "test_fuzz_template_parser": TEMPLATE}
        with open(REPORT, "w", encoding="utf-8") as f:
            json.dump({"cases": cases, "outcomes": dict(OUTCOMES)}, f)
    for parser in ("manifest", "template"):
        assert OUTCOMES[f"{parser}:ok"] > 0 and OUTCOMES[f"{parser}:refused"] > 0, dict(OUTCOMES)
    assert OUTCOMES["gguf:refused"] > 0, dict(OUTCOMES)
