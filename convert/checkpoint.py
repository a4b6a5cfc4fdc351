"""Reading Hugging Face checkpoints one tensor at a time.

A converter must not hold a 1B-parameter model twice in memory, so tensors are
listed from the file headers first (names, shapes, dtypes: no data) and read
one by one when they are written.

Safetensors are read with a small reader of our own rather than
``safetensors.safe_open``: its numpy backend cannot return bfloat16 (the dtype
most checkpoints ship in) and the torch backend would make torch a dependency
of plain conversion.  The format is an 8-byte header length, a JSON header and
raw little-endian data, so the reader is short; it checks every offset against
the file size before reading.  ``pytorch_model.bin`` files need torch, which is
loaded with ``mmap=True`` so that tensors stay on disk until they are read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .common import ConvertError

__all__ = ["TensorRef", "Checkpoint", "open_checkpoint", "read_json", "SafetensorsFile"]

_MAX_HEADER = 100 * 1024 * 1024

# safetensors dtype -> (numpy dtype read from disk, bytes per element)
_ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),  # widened to float32 on read
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "BOOL": ("?", 1),
}


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, turning every failure into a one-line ConvertError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path}: not found — {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: cannot read it ({exc}) — check the file") from None
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}) — re-save the checkpoint") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(data).__name__} — re-save the checkpoint")
    return data


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) to float32: bfloat16 is the top half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives, known from a header before its data is read."""

    name: str
    shape: tuple[int, ...]  # numpy order (rows first), as the checkpoint stores it
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    file: Path

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SafetensorsFile:
    """Header-first reader for one ``.safetensors`` file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ConvertError(f"{path}: too short to be a safetensors file — the download is incomplete")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise ConvertError(f"{path}: header length {n} is impossible for a {size}-byte file — "
                                       "the file is truncated or not a safetensors file")
                header = f.read(n)
        except OSError as exc:
            raise ConvertError(f"{path}: cannot read it ({exc.strerror or exc}) — check the file") from None
        try:
            meta = json.loads(header)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConvertError(f"{path}: header is not JSON — the file is corrupt; download it again") from None
        if not isinstance(meta, dict):
            raise ConvertError(f"{path}: header is not a JSON object — the file is corrupt; download it again")
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in meta.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ConvertError(f"{path}: tensor {name!r} has a malformed header entry — the file is corrupt") from None
            if dtype not in _ST_DTYPES:
                raise ConvertError(f"{path}: tensor {name!r} has dtype {dtype}, which the converter cannot read — "
                                   f"re-save the checkpoint in float32, float16 or bfloat16")
            count = 1
            for d in shape:
                count *= d
            if end - begin != count * _ST_DTYPES[dtype][1] or begin < 0 or self.data_start + end > size:
                raise ConvertError(f"{path}: tensor {name!r} points outside the file or has the wrong size — "
                                   "the file is truncated or corrupt; download it again")
            self.entries[name] = (dtype, shape, begin, end)

    def refs(self) -> Iterator[TensorRef]:
        for name, (dtype, shape, _, _) in self.entries.items():
            yield TensorRef(name=name, shape=shape, dtype=dtype, file=self.path)

    def read(self, name: str) -> np.ndarray:
        """One tensor as float32 (or its integer type), read with plain file I/O, not mmap.

        Plain reads because a file truncated under a live mapping kills the
        process with SIGBUS; here it is an error message.
        """
        dtype, shape, begin, end = self.entries[name]
        np_dtype, _ = _ST_DTYPES[dtype]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != len(buf):
                raise ConvertError(f"{self.path}: tensor {name!r} is cut short — the file is truncated; download it again")
        arr = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
        if dtype == "BF16":
            return bf16_to_f32(arr)
        if arr.dtype.kind == "f":
            return arr.astype(np.float32, copy=False)
        return arr


@dataclass
class Checkpoint:
    """A Hugging Face model folder: its config and a lazily read set of tensors."""

    path: Path
    config: dict[str, Any]
    refs: dict[str, TensorRef]
    _readers: dict[Path, Callable[[str], np.ndarray]] = field(default_factory=dict, repr=False)

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array (floats as float32)."""
        ref = self.refs[name]
        return self._readers[ref.file](name)

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures")
        if isinstance(archs, list) and archs and isinstance(archs[0], str):
            return archs[0]
        return None


def _weight_files(folder: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", files), following an index.json if the checkpoint is sharded."""
    for kind, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / index).is_file():
            idx = read_json(folder / index, "the shard index is missing")
            wm = idx.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise ConvertError(f"{folder / index}: has no weight_map — re-save the checkpoint")
            files = sorted({folder / str(v) for v in wm.values()})
            for f in files:
                if not f.is_file():
                    raise ConvertError(f"{f}: shard listed in {index} is missing — download the whole checkpoint")
            return kind, files
        if (folder / single).is_file():
            return kind, [folder / single]
    raise ConvertError(
        f"{folder}: no model weights (model.safetensors, pytorch_model.bin or a sharded index) — "
        "save the model with save_pretrained() into this folder"
    )


def _load_bin(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{path}: reading pytorch_model.bin needs torch — "
                           "install the train extra (pip install 'edge-fslm[train]') or re-save as safetensors") from None
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ConvertError(f"{path}: torch cannot load it ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}) — "
                           "re-save the checkpoint") from None


def _bin_reader(state: dict[str, Any]) -> Callable[[str], np.ndarray]:
    def read(name: str) -> np.ndarray:
        t = state[name]
        if t.is_floating_point():
            return t.float().numpy()
        return t.numpy()

    return read


def open_checkpoint(hf_dir: str | os.PathLike[str], what: str = "checkpoint") -> Checkpoint:
    """Open an HF folder: config.json plus the headers of its weight files (no tensor data yet)."""
    folder = Path(hf_dir).expanduser()
    if not folder.exists():
        raise ConvertError(f"{folder}: no such folder — pass the Hugging Face {what} folder")
    if not folder.is_dir():
        raise ConvertError(f"{folder}: is a file, not a folder — pass the Hugging Face {what} folder (save_pretrained output)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{folder}: no config.json — this is not a Hugging Face model folder; "
                           "save the model with save_pretrained() or download the whole repository")
    config = read_json(config_path, "save the model with save_pretrained()")
    kind, files = _weight_files(folder)
    refs: dict[str, TensorRef] = {}
    readers: dict[Path, Callable[[str], np.ndarray]] = {}
    for f in files:
        if kind == "safetensors":
            st = SafetensorsFile(f)
            readers[f] = st.read
            new = list(st.refs())
        else:
            state = _load_bin(f)
            readers[f] = _bin_reader(state)
            new = [TensorRef(name=k, shape=tuple(v.shape), dtype=str(v.dtype).replace("torch.", "").upper(), file=f)
                   for k, v in state.items() if hasattr(v, "shape")]
        for r in new:
            refs[r.name] = r
    return Checkpoint(path=folder, config=config, refs=refs, _readers=readers)
