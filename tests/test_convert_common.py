"""Tests of the conversion's small pieces: atomic output, the safetensors reader, the TOML writer, GGUF -> HF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_fslm.convert.common import ConvertError, atomic_output
from edge_fslm.convert.checkpoint import SafetensorsFile
from edge_fslm.convert.toml_writer import dumps_manifest, toml_value


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.gguf"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]
    assert target.stat().st_mode & 0o044, "finished files get normal permissions, not mkstemp's 0600"


def test_safetensors_reader_checks_bounds(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 10)  # 54 bytes short
    with pytest.raises(ConvertError, match="truncated or corrupt"):
        SafetensorsFile(p)
    p.write_bytes(b"\x01\x02")
    with pytest.raises(ConvertError, match="too short"):
        SafetensorsFile(p)


def test_safetensors_reader_widens_bf16(tmp_path: Path) -> None:
    vals = np.array([1.0, -2.5, 3.140625, 0.0], dtype=np.float32)
    bits = (vals.view(np.uint32) >> 16).astype("<u2")
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    p = tmp_path / "model.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + bits.tobytes())
    got = SafetensorsFile(p).read("w")
    assert got.dtype == np.float32 and np.array_equal(got, vals.reshape(2, 2))


def test_toml_writer_round_trips_awkward_strings() -> None:
    import tomllib

    awkward = 'quote " backslash \\ tab \t newline \n del \x7f bell \x07 unicode é 🙂 {input}'
    doc = {
        "stack": {"name": "s", "schema": 1},
        "runtime": {"ctx_size": 64, "mmap": True, "budget": "1GB"},
        "models": {"m-1": {"source": "models/m.gguf", "sha256": "0" * 64}},
        "stages": [{"name": "a", "messages": [{"role": "user", "content": awkward}], "stop": ["\n", "]"],
                    "temperature": 0.5, "adapter": {"source": "a b.gguf", "scale": 0.25}}],
    }
    assert tomllib.loads(dumps_manifest(doc, comment="line 1\nline 2")) == doc
    with pytest.raises(ValueError):
        toml_value(float("nan"))


def test_dequantize_to_hf_refuses_before_loading_anything(tmp_path: Path) -> None:
    from edge_fslm.convert.gguf_to_hf import SMOLLM2_PRE_TOKENIZER, dequantize_to_hf

    g = tmp_path / "m.gguf"  # never read: every refusal comes first
    with pytest.raises(ConvertError, match="nothing to write"):
        dequantize_to_hf(g, tmp_path / "hf", weights=False, tokenizer=False)
    with pytest.raises(ConvertError, match="tokenizer=True"):
        dequantize_to_hf(g, tmp_path / "hf", tokenizer=tmp_path, pre_tokenizer=SMOLLM2_PRE_TOKENIZER)
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(ConvertError, match="not a complete checkpoint"):
        dequantize_to_hf(g, half)  # weights but no tokenizer: an interrupted writer's folder
    assert dequantize_to_hf(g, half, tokenizer=False) == half  # complete for what is asked: returned as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half"]
