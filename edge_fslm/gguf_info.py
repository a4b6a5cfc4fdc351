"""Strict, bounded reader for GGUF headers.

llama.cpp aborts or segfaults on some malformed GGUF files, so the runtime never
hands it a file this module has not walked first. ``gguf.GGUFReader`` is not
used on the load path: it builds a numpy view per vocabulary string, which makes
it far slower (benchmarks/README.md has the figures), and it sizes allocations
from header counts it does not check. This walker reads the header once through
a small window of the file, checks every count and length against the bytes that
are really there before using it, and steps over big string arrays (tokens,
merges) without decoding them. It refuses what llama.cpp's gguf.cpp refuses (and
a little more). Every constant comes from gguf-py, so the rules follow the
installed GGUF spec.

Every problem is a :class:`~edge_fslm.errors.GGUFError` whose message is one
line: ``"<path>: <what is wrong> — <what to do>"``.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import stat
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

import gguf

from .errors import GGUFError
from .units import fmt_bytes

__all__ = [
    "TensorInfo",
    "GGUFInfo",
    "read_gguf",
    "validate_model",
    "validate_adapter",
    "clear_cache",
]

# --------------------------------------------------------------------------
# Constants: from gguf-py wherever gguf-py has them.

_VT = gguf.GGUFValueType
_QT = gguf.GGMLQuantizationType
_MAGIC = struct.pack("<I", gguf.GGUF_MAGIC)  # b"GGUF"
_SUPPORTED_VERSIONS = (2, gguf.GGUF_VERSION)
# GGUFWriter's table of struct codes for fixed-size GGUF value types (present in gguf 0.17-0.19).
_SCALAR_FMT: dict[gguf.GGUFValueType, str] = dict(gguf.GGUFWriter._simple_value_packing)
_SCALAR_SIZE = {vt: struct.calcsize("<" + ch) for vt, ch in _SCALAR_FMT.items()}
_VALUE_TYPES = {int(vt): vt for vt in _VT}
_QUANT_TYPES = {int(qt): qt for qt in _QT if qt in gguf.GGML_QUANT_SIZES}
_KNOWN_ARCHS = frozenset(gguf.MODEL_ARCH_NAMES.values())

# ggml limits that gguf-py does not export (ggml.h: GGML_MAX_DIMS, GGML_MAX_NAME).
_GGML_MAX_DIMS = 4
_GGML_MAX_NAME = 64

# Our own sanity caps, far above any real model.
_MAX_TENSORS = 1_000_000
_MAX_KV = 1_000_000
_MAX_STRING = 16 * 1024 * 1024  # one string; long chat templates fit easily
_MAX_STRING_ARRAY = 16 * 1024 * 1024  # elements; vocabularies are < 1M
_SMALL_ARRAY = 64  # arrays up to this length are kept in metadata
_INT64_MAX = 2**63 - 1

# Smallest possible encodings, used to bound counts by the bytes left.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name len, name, n_dims, 1 dim, type, offset
_FIXED_HEADER = 4 + 4 + 8 + 8  # magic, version, tensor_count, kv_count

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_CHUNK = 1 << 20  # read-ahead per refill

_TRUNCATED = "the file is truncated or corrupt; download it again"
_CORRUPT = "the file is corrupt or was not written by a GGUF tool; download or convert it again"

_K_ARCH = gguf.Keys.General.ARCHITECTURE
_K_TYPE = gguf.Keys.General.TYPE
_K_NAME = gguf.Keys.General.NAME
_K_FILE_TYPE = gguf.Keys.General.FILE_TYPE
_K_ALIGNMENT = gguf.Keys.General.ALIGNMENT
_K_TOKENS = gguf.Keys.Tokenizer.LIST

# LoRA tensor types llama.cpp's convert_lora_to_gguf.py can write (--outtype).
_LORA_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0"})


# --------------------------------------------------------------------------
# Messages


def _clean(text: str) -> str:
    """Keep a message on one line whatever the file or path contains."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _show(value: object, limit: int = 80) -> str:
    """repr() of a value from the file, escaped and shortened for a message."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return _clean(text)


def _error(path: str, what: str, todo: str) -> GGUFError:
    return GGUFError(_clean(f"{path}: {what} — {todo}"))


# --------------------------------------------------------------------------
# Public data


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; enough to size and place it without reading it."""

    name: str
    shape: tuple[int, ...]  # ne[0] first, as gguf-py reports it
    ggml_type: str  # GGMLQuantizationType name, e.g. "Q4_1"
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int
    n_elements: int


@dataclass(frozen=True)
class GGUFInfo:
    """What the runtime needs to know about a GGUF file before llama.cpp sees it.

    ``metadata`` is shared with the read cache: treat it as read-only.
    Arrays longer than 64 items appear there as ``{"array_len": n, "type": T}``.
    Per-layer hyperparameters stored as arrays report their maximum, which is
    the safe figure for memory planning.
    """

    path: str
    file_size: int
    version: int
    architecture: str
    general_type: str
    name: str | None
    file_type: int | None
    file_type_name: str | None
    metadata: dict[str, object]
    tensors: dict[str, TensorInfo]
    context_length: int | None = None
    n_layer: int | None = None
    n_embd: int | None = None
    n_ff: int | None = None
    n_head: int | None = None
    n_head_kv: int | None = None
    head_dim_k: int | None = None
    head_dim_v: int | None = None
    n_vocab: int | None = None
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos_token: bool | None = None
    tokenizer_model: str | None = None
    lora_alpha: float | None = None
    adapter_type: str | None = None
    alignment: int = field(default=gguf.GGUF_DEFAULT_ALIGNMENT, repr=False)
    data_offset: int = field(default=0, repr=False)

    @property
    def n_params(self) -> int:
        """Total number of weights (sum of tensor element counts)."""
        return sum(t.n_elements for t in self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data llama.cpp will map or load."""
        return sum(t.n_bytes for t in self.tensors.values())

    @property
    def bytes_by_type(self) -> dict[str, int]:
        """Tensor bytes per ggml type, largest first."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.ggml_type] = out.get(t.ggml_type, 0) + t.n_bytes
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def is_adapter(self) -> bool:
        """True for LoRA/control adapters (general.type == "adapter")."""
        return self.general_type == "adapter"

    @property
    def n_embd_k_gqa(self) -> int | None:
        """Width of one token's K cache row per layer."""
        if self.head_dim_k is None or self.n_head_kv is None:
            return None
        return self.head_dim_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int | None:
        """Width of one token's V cache row per layer."""
        if self.head_dim_v is None or self.n_head_kv is None:
            return None
        return self.head_dim_v * self.n_head_kv

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (for ``edge-fslm inspect --json``)."""
        out: dict[str, Any] = {
            "path": self.path,
            "file_size": self.file_size,
            "version": self.version,
            "architecture": self.architecture,
            "type": self.general_type,
            "name": self.name,
            "file_type": self.file_type,
            "file_type_name": self.file_type_name,
            "n_params": self.n_params,
            "tensor_bytes": self.tensor_bytes,
            "bytes_by_type": self.bytes_by_type,
            "context_length": self.context_length,
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_ff": self.n_ff,
            "n_head": self.n_head,
            "n_head_kv": self.n_head_kv,
            "head_dim_k": self.head_dim_k,
            "head_dim_v": self.head_dim_v,
            "n_vocab": self.n_vocab,
            "has_chat_template": self.chat_template is not None,
            "tokenizer_model": self.tokenizer_model,
            "n_tensors": len(self.tensors),
        }
        if self.is_adapter:
            out["adapter_type"] = self.adapter_type
            out["lora_alpha"] = self.lora_alpha
        return out

    def format_text(self) -> str:
        """Human-readable report (for ``edge-fslm inspect``)."""

        def opt(v: object) -> str:
            return "-" if v is None else str(v)

        lines = [self.path]
        row = lines.append
        row(f"  architecture    {self.architecture} ({self.general_type})")
        if self.name:
            row(f"  name            {self.name}")
        row(f"  GGUF version    {self.version}, {len(self.tensors)} tensors, "
            f"{fmt_bytes(self.file_size, 1)} on disk")
        row(f"  parameters      {_count(self.n_params)}")
        if self.file_type is not None:
            row(f"  file type       {self.file_type_name or 'unknown'} (general.file_type {self.file_type})")
        else:
            row("  file type       - (no general.file_type)")
        if self.is_adapter:
            row(f"  adapter         {opt(self.adapter_type)}, alpha {opt(self.lora_alpha)}")
        else:
            row(f"  context length  {opt(self.context_length)}")
            row(f"  layers          {opt(self.n_layer)}")
            row(f"  embedding       {opt(self.n_embd)} (feed-forward {opt(self.n_ff)})")
            row(f"  heads           {opt(self.n_head)} query, {opt(self.n_head_kv)} kv, "
                f"head dim k {opt(self.head_dim_k)} / v {opt(self.head_dim_v)}")
            row(f"  vocabulary      {opt(self.n_vocab)} ({opt(self.tokenizer_model)} tokenizer)")
            row(f"  chat template   {'yes' if self.chat_template is not None else 'no'}")
        total = self.tensor_bytes
        row(f"  tensor bytes    {fmt_bytes(total, 1)}")
        for name, n in self.bytes_by_type.items():
            pct = 100.0 * n / total if total else 0.0
            row(f"    {name:<8} {fmt_bytes(n, 1):>12}  {pct:5.1f} %")
        return "\n".join(lines)


def _count(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return str(n)


# --------------------------------------------------------------------------
# The walker


class _Walker:
    """Single pass over the header through a small sliding window of the file.

    Plain reads rather than mmap: a file truncated under a live mapping kills
    the process with SIGBUS, which is exactly what this module exists to avoid.
    The window holds at most one string (<= 16 MiB) plus a chunk, and big
    arrays are skipped with a seek, so memory use does not depend on the file.
    """

    def __init__(self, path: str, f: Any, size: int) -> None:
        self.path = path
        self.f = f
        self.size = size
        self.buf = b""  # file bytes [base, base + len(buf))
        self.base = 0
        self.pos = 0  # absolute read position, always >= base
        self.fpos = 0  # where the OS file position is

    # -- low level ---------------------------------------------------------

    def fail(self, what: str, todo: str = _CORRUPT) -> GGUFError:
        return _error(self.path, what, todo)

    def _refill(self, end: int, what: str) -> None:
        """Re-base the window at ``pos`` and make it cover ``[pos, end)``; ``end <= size``."""
        keep = self.pos - self.base
        buf_end = self.base + len(self.buf)
        parts = [self.buf[keep:]] if keep < len(self.buf) else []
        start = buf_end if parts else self.pos
        target = min(self.size, max(end, self.pos + _CHUNK))
        try:
            if self.fpos != start:
                self.f.seek(start)
                self.fpos = start
            want = target - start
            while want > 0:
                chunk = self.f.read(want)
                if not chunk:
                    break
                parts.append(chunk)
                self.fpos += len(chunk)
                want -= len(chunk)
        except OSError as e:
            raise self.fail(f"could not read the file ({e.strerror or e})",
                            "check the disk and the file, then try again") from None
        self.buf = b"".join(parts)
        self.base = self.pos
        if self.base + len(self.buf) < end:
            raise self.fail(f"the file got shorter while it was being read (while reading {what})",
                            "wait until the download or copy has finished, then try again")

    def need(self, n: int, what: str) -> None:
        """Make sure the next ``n`` bytes are in the window."""
        end = self.pos + n
        if end > self.base + len(self.buf):
            if end > self.size:
                raise self.fail(f"file ends inside the GGUF header while reading {what} "
                                f"(needs bytes {self.pos}..{end}, file is {self.size} bytes)", _TRUNCATED)
            self._refill(end, what)

    def skip(self, n: int, what: str) -> None:
        """Move past ``n`` bytes without reading them."""
        if self.pos + n > self.size:
            raise self.fail(f"file ends inside the GGUF header while reading {what} "
                            f"(needs bytes {self.pos}..{self.pos + n}, file is {self.size} bytes)", _TRUNCATED)
        self.pos += n

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos - self.base)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos - self.base)
        self.pos += 8
        return v

    def unpack(self, fmt: str, n: int, what: str) -> tuple[Any, ...]:
        self.need(n, what)
        vals = struct.unpack_from(fmt, self.buf, self.pos - self.base)
        self.pos += n
        return vals

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        if n > _MAX_STRING:
            raise self.fail(f"{what} claims a length of {n} bytes (limit {_MAX_STRING})")
        if n > self.size - self.pos:
            raise self.fail(f"{what} claims {n} bytes but only {self.size - self.pos} are left in the file",
                            _TRUNCATED)
        self.need(n, what)
        i = self.pos - self.base
        s = self.buf[i:i + n]
        self.pos += n
        return s

    def string(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 (bad byte at position {e.start})") from None

    def skip_string_array(self, n: int, what: str) -> None:
        """Step over ``n`` length-prefixed strings without building them (the hot loop)."""
        buf, base = self.buf, self.base
        have, q = len(buf), self.pos - base
        unpack = _U64.unpack_from
        size, limit = self.size, _MAX_STRING
        for i in range(n):
            if q + 8 > have:
                self.pos = base + q
                self.need(8, f"the length of item {i} of {what}")
                buf, base = self.buf, self.base
                have, q = len(buf), self.pos - base
            (ln,) = unpack(buf, q)
            q += 8
            if ln > limit:
                self.pos = base + q
                raise self.fail(f"item {i} of {what} claims a length of {ln} bytes (limit {limit})")
            q += ln
            if q > have and base + q > size:
                self.pos = base + q - ln
                raise self.fail(f"item {i} of {what} claims {ln} bytes but only {size - self.pos} are left "
                                "in the file", _TRUNCATED)
        self.pos = base + q

    # -- structure -----------------------------------------------------------

    def value_type(self, what: str) -> gguf.GGUFValueType:
        t = self.u32(f"the value type of {what}")
        vt = _VALUE_TYPES.get(t)
        if vt is None:
            raise self.fail(f"{what} has invalid value type {t} (valid: 0..{max(_VALUE_TYPES)})")
        return vt

    def value(self, key: str) -> tuple[gguf.GGUFValueType, object]:
        """(type, value) of one metadata entry; big arrays become a summary."""
        what = f"key {_show(key)}"
        vt = self.value_type(what)
        return vt, self._value(vt, what)

    def _value(self, vt: gguf.GGUFValueType, what: str) -> object:
        if vt == _VT.STRING:
            return self.string(f"the value of {what}")
        if vt != _VT.ARRAY:
            return self.scalar(vt, what)

        et = self.value_type(f"the array elements of {what}")
        n = self.u64(f"the array length of {what}")
        left = self.size - self.pos
        if et == _VT.ARRAY:
            raise self.fail(f"{what} is an array of arrays, which llama.cpp does not accept")
        if et == _VT.STRING:
            if n > _MAX_STRING_ARRAY:
                raise self.fail(f"{what} claims {n} strings (limit {_MAX_STRING_ARRAY})")
            if n * 8 > left:
                raise self.fail(f"{what} claims {n} strings but only {left} bytes are left in the file",
                                _TRUNCATED)
            if n > _SMALL_ARRAY:
                self.skip_string_array(n, what)
                return {"array_len": n, "type": et.name}
            out = []
            for i in range(n):
                raw = self.raw_string(f"item {i} of {what}")
                out.append(raw.decode("utf-8", errors="replace"))
            return out
        size = _SCALAR_SIZE[et]
        if n * size > left:
            raise self.fail(f"{what} claims {n} items of {size} bytes but only {left} bytes are left in the file",
                            _TRUNCATED)
        if n > _SMALL_ARRAY:
            self.skip(n * size, what)
            return {"array_len": n, "type": et.name}
        return list(self.unpack(f"<{n}{_SCALAR_FMT[et]}", n * size, what))

    def scalar(self, vt: gguf.GGUFValueType, what: str) -> object:
        (v,) = self.unpack("<" + _SCALAR_FMT[vt], _SCALAR_SIZE[vt], f"the value of {what}")
        return v

    # -- the whole header ----------------------------------------------------

    def walk(self) -> GGUFInfo:
        path, size = self.path, self.size
        if size < _FIXED_HEADER:
            self.need(min(size, 4), "the magic")
            if bytes(self.buf[:4]) != _MAGIC[: min(size, 4)]:
                raise self.fail(f"not a GGUF file (magic {bytes(self.buf[:4])!r}, expected {_MAGIC!r})",
                                "pass a .gguf model file")
            raise self.fail(f"file is only {size} bytes, smaller than a GGUF header ({_FIXED_HEADER} bytes)",
                            _TRUNCATED)
        self.need(_FIXED_HEADER, "the file header")
        magic = bytes(self.buf[:4])
        if magic != _MAGIC:
            raise self.fail(f"not a GGUF file (magic {magic!r}, expected {_MAGIC!r})", "pass a .gguf model file")
        self.pos = 4
        version = self.u32("the version")
        supported = " and ".join(str(v) for v in _SUPPORTED_VERSIONS)
        if version not in _SUPPORTED_VERSIONS:
            if version and version & 0xFFFF == 0:
                raise self.fail(f"GGUF version field reads {version:#x}: this looks like a big-endian GGUF file",
                                "use the little-endian (normal) build of this model")
            if version == 1:
                raise self.fail("GGUF version 1 is no longer supported (versions "
                                f"{supported} are)", "re-convert the model with a current llama.cpp")
            raise self.fail(f"unsupported GGUF version {version} (this runtime reads versions {supported})",
                            "re-convert the model, or update edge-fslm and llama-cpp-python")
        n_tensors = self.u64("the tensor count")
        n_kv = self.u64("the metadata count")
        left = size - self.pos
        if n_tensors > _MAX_TENSORS:
            raise self.fail(f"header claims {n_tensors} tensors (limit {_MAX_TENSORS})")
        if n_kv > _MAX_KV:
            raise self.fail(f"header claims {n_kv} metadata entries (limit {_MAX_KV})")
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > left:
            raise self.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, which cannot "
                            f"fit in the {left} bytes left in the file", _TRUNCATED)

        # -- key/value metadata
        meta: dict[str, object] = {}
        alignment_type = None
        for i in range(n_kv):
            key = self.string(f"the name of metadata entry {i}")
            if not key:
                raise self.fail(f"metadata entry {i} has an empty name")
            if key in meta:
                raise self.fail(f"metadata key {_show(key)} appears twice")
            vt, meta[key] = self.value(key)
            if key == _K_ALIGNMENT:
                alignment_type = vt

        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        if _K_ALIGNMENT in meta:
            a = meta[_K_ALIGNMENT]
            if alignment_type != _VT.UINT32 or not _is_u32_power_of_two(a):  # type: ignore[arg-type]
                raise self.fail(f"{_K_ALIGNMENT} is {_show(a)}; it must be a power of two (uint32)")
            alignment = a

        # -- tensor infos
        raw_tensors: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType, int, int, int]] = []
        seen: set[str] = set()
        for i in range(n_tensors):
            tname = self.string(f"the name of tensor {i}")
            what = f"tensor {_show(tname)}"
            if len(tname.encode("utf-8")) >= _GGML_MAX_NAME:
                raise self.fail(f"{what} has a name longer than ggml's limit of {_GGML_MAX_NAME - 1} bytes")
            if tname in seen:
                raise self.fail(f"{what} appears twice in the tensor list")
            seen.add(tname)
            n_dims = self.u32(f"the number of dimensions of {what}")
            if not 1 <= n_dims <= _GGML_MAX_DIMS:
                raise self.fail(f"{what} has {n_dims} dimensions (ggml allows 1..{_GGML_MAX_DIMS})")
            shape = self.unpack(f"<{n_dims}Q", 8 * n_dims, f"the shape of {what}")
            n_el = 1
            for d in shape:
                if not 1 <= d <= _INT64_MAX:
                    raise self.fail(f"{what} has an invalid dimension {d} in shape {shape}")
                n_el *= d
            if n_el > _INT64_MAX:
                raise self.fail(f"{what} has shape {shape}, whose element count does not fit in 64 bits")
            tid = self.u32(f"the type of {what}")
            qt = _QUANT_TYPES.get(tid)
            if qt is None:
                raise self.fail(f"{what} has unknown ggml type id {tid}",
                                "the file is corrupt or needs a newer gguf/llama.cpp; update or re-convert")
            block, type_size = gguf.GGML_QUANT_SIZES[qt]
            if shape[0] % block:
                raise self.fail(f"{what} of type {qt.name} has {shape[0]} elements per row, "
                                f"not a multiple of the block size {block}")
            n_bytes = n_el // block * type_size
            rel = self.u64(f"the data offset of {what}")
            raw_tensors.append((tname, shape, qt, rel, n_bytes, n_el))

        # -- data section
        header_end = self.pos
        data_start = -(-header_end // alignment) * alignment if n_tensors else header_end
        if data_start > size:
            raise self.fail(f"the data section would start at byte {data_start} but the file is only "
                            f"{size} bytes", _TRUNCATED)
        tensors: dict[str, TensorInfo] = {}
        expected = 0
        for tname, shape, qt, rel, n_bytes, n_el in raw_tensors:
            what = f"tensor {_show(tname)}"
            if rel % alignment:
                raise self.fail(f"{what} has data offset {rel}, not a multiple of the alignment {alignment}")
            if data_start + rel + n_bytes > size:
                raise self.fail(f"{what} points past the end of the file (offset {data_start + rel}, "
                                f"size {n_bytes}, file is {size} bytes)", _TRUNCATED)
            if rel != expected:
                raise self.fail(f"{what} has data offset {rel} but the tensors before it end at {expected} "
                                "(gaps and overlaps are refused by llama.cpp)")
            expected = rel + -(-n_bytes // alignment) * alignment
            tensors[tname] = TensorInfo(tname, shape, qt.name, data_start + rel, n_bytes, n_el)

        return _build_info(path, size, version, meta, tensors, alignment, data_start)


def _is_u32_power_of_two(a: int) -> bool:
    return 0 < a < 2**32 and a & (a - 1) == 0


# --------------------------------------------------------------------------
# Derived fields


class _Meta:
    """Typed access to metadata; a key with the wrong type is a GGUFError."""

    def __init__(self, path: str, meta: Mapping[str, object], arch: str) -> None:
        self.path, self.meta, self.arch = path, meta, arch

    def key(self, template: str) -> str:
        return template.format(arch=self.arch)

    def _wrong(self, key: str, v: object, expected: str) -> GGUFError:
        return _error(self.path, f"metadata key {_show(key)} is {_show(v, 40)}, expected {expected}", _CORRUPT)

    def get_str(self, template: str) -> str | None:
        key = self.key(template)
        v = self.meta.get(key)
        if v is None or isinstance(v, str):
            return v
        raise self._wrong(key, v, "a string")

    def get_int(self, template: str) -> int | None:
        """An integer; a per-layer array gives its maximum."""
        key = self.key(template)
        v = self.meta.get(key)
        if v is None:
            return None
        if type(v) is int:
            return v
        if isinstance(v, list) and all(type(x) is int for x in v):
            return max(v) if v else None
        if isinstance(v, dict):  # long per-layer array: not summarised
            return None
        raise self._wrong(key, v, "an integer")

    def get_float(self, template: str) -> float | None:
        key = self.key(template)
        v = self.meta.get(key)
        if v is None:
            return None
        if type(v) in (int, float):
            return float(v)
        raise self._wrong(key, v, "a number")

    def get_bool(self, template: str) -> bool | None:
        key = self.key(template)
        v = self.meta.get(key)
        if v is None or type(v) is bool:
            return v
        raise self._wrong(key, v, "a boolean")


def _file_type_name(ft: int | None) -> str | None:
    if ft is None:
        return None
    guessed = int(gguf.LlamaFileType.GUESSED)
    try:
        name = gguf.LlamaFileType(ft & ~guessed if ft != guessed else ft).name
    except ValueError:
        return None
    for prefix in ("MOSTLY_", "ALL_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _build_info(path: str, size: int, version: int, meta: dict[str, object],
                tensors: dict[str, TensorInfo], alignment: int, data_start: int) -> GGUFInfo:
    arch = meta.get(_K_ARCH)
    if arch is None:
        raise _error(path, f"has no {_K_ARCH} key, so llama.cpp cannot load it",
                     "pass a GGUF made by llama.cpp's convert scripts")
    if not isinstance(arch, str):
        raise _error(path, f"{_K_ARCH} is {_show(arch, 40)}, expected a string", _CORRUPT)
    if arch not in _KNOWN_ARCHS:
        some = ", ".join(sorted(_KNOWN_ARCHS)[:12])
        raise _error(path, f"unknown architecture {_show(arch)}; llama.cpp in this version supports "
                           f"{len(_KNOWN_ARCHS)} architectures ({some}, ...)",
                     "use a model of a supported architecture, or update gguf and llama-cpp-python")
    m = _Meta(path, meta, arch)
    K = gguf.Keys
    general_type = m.get_str(_K_TYPE) or "model"
    file_type = m.get_int(_K_FILE_TYPE)
    n_embd = m.get_int(K.LLM.EMBEDDING_LENGTH)
    n_head = m.get_int(K.Attention.HEAD_COUNT)
    n_head_kv = m.get_int(K.Attention.HEAD_COUNT_KV)
    if n_head_kv is None:
        n_head_kv = n_head
    default_head_dim = n_embd // n_head if n_embd is not None and n_head else None
    head_dim_k = m.get_int(K.Attention.KEY_LENGTH)
    head_dim_v = m.get_int(K.Attention.VALUE_LENGTH)
    n_vocab = m.get_int(K.LLM.VOCAB_SIZE)
    if n_vocab is None:
        tokens = meta.get(_K_TOKENS)
        if isinstance(tokens, list):
            n_vocab = len(tokens)
        elif isinstance(tokens, dict):
            n_vocab = int(tokens["array_len"])  # type: ignore[call-overload]
    return GGUFInfo(
        path=path,
        file_size=size,
        version=version,
        architecture=arch,
        general_type=general_type,
        name=m.get_str(_K_NAME),
        file_type=file_type,
        file_type_name=_file_type_name(file_type),
        metadata=meta,
        tensors=tensors,
        context_length=m.get_int(K.LLM.CONTEXT_LENGTH),
        n_layer=m.get_int(K.LLM.BLOCK_COUNT),
        n_embd=n_embd,
        n_ff=m.get_int(K.LLM.FEED_FORWARD_LENGTH),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k if head_dim_k is not None else default_head_dim,
        head_dim_v=head_dim_v if head_dim_v is not None else default_head_dim,
        n_vocab=n_vocab,
        chat_template=m.get_str(K.Tokenizer.CHAT_TEMPLATE),
        bos_token_id=m.get_int(K.Tokenizer.BOS_ID),
        eos_token_id=m.get_int(K.Tokenizer.EOS_ID),
        add_bos_token=m.get_bool(K.Tokenizer.ADD_BOS),
        tokenizer_model=m.get_str(K.Tokenizer.MODEL),
        lora_alpha=m.get_float(K.Adapter.LORA_ALPHA),
        adapter_type=m.get_str(K.Adapter.TYPE),
        alignment=alignment,
        data_offset=data_start,
    )


# --------------------------------------------------------------------------
# Opening the file, and the cache

_CACHE: "OrderedDict[tuple, GGUFInfo]" = OrderedDict()
_CACHE_MAX = 32
_CACHE_LOCK = threading.Lock()
# A file modified this recently may be modified again within the same mtime
# tick (timestamps are coarse), so it is not cached yet -- git's "racy" rule.
_RACY_NS = 2_000_000_000


def clear_cache() -> None:
    """Forget every cached header (tests, or after rewriting files in place)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _stat(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _error(path, "file does not exist", "check the path (or download the model first)") from None
    except NotADirectoryError:
        raise _error(path, "file does not exist (a parent of it is not a directory)", "check the path") from None
    except PermissionError:
        raise _error(path, "cannot access the file (permission denied on the path)",
                     "fix the directory permissions or run as a user who can read it") from None
    except (OSError, ValueError) as e:
        if getattr(e, "errno", None) == errno.ELOOP:
            raise _error(path, "is a symlink loop (or a chain of over 40 links)", "point the link at a real file") from None
        raise _error(path, f"cannot access the file ({getattr(e, 'strerror', None) or e})",
                     "check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise _error(path, "is a directory, not a GGUF file", "pass the path of the .gguf file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise _error(path, "is not a regular file", "pass the path of a .gguf model file")
    if st.st_size == 0:
        raise _error(path, "file is empty (0 bytes)", "the download probably failed; download it again")
    return st


def _read_uncached(path: str) -> GGUFInfo:
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _error(path, "file does not exist", "check the path (or download the model first)") from None
    except IsADirectoryError:
        raise _error(path, "is a directory, not a GGUF file", "pass the path of the .gguf file inside it") from None
    except PermissionError:
        raise _error(path, "file is not readable (permission denied)",
                     "fix its permissions (chmod +r) or run as a user who can read it") from None
    except OSError as e:
        raise _error(path, f"cannot open the file ({e.strerror or e})", "check the path and the disk") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        try:
            st = os.fstat(f.fileno())
        except OSError as e:
            raise _error(path, f"cannot stat the file ({e.strerror or e})", "check the disk") from None
        if not stat.S_ISREG(st.st_mode):
            raise _error(path, "is not a regular file", "pass the path of a .gguf model file")
        if st.st_size == 0:
            raise _error(path, "file is empty (0 bytes)", "the download probably failed; download it again")
        try:
            return _Walker(path, f, st.st_size).walk()
        except GGUFError:
            raise
        except (struct.error, ValueError, OverflowError, IndexError, KeyError, TypeError,
                UnicodeError, MemoryError, RecursionError) as e:
            # Safety net: the walker checks bounds before every read, so
            # reaching this is a bug -- but a user still gets a clean error.
            raise _error(path, f"malformed GGUF header (internal check failed: {type(e).__name__}: {e})",
                         _CORRUPT) from None


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Validate and read a GGUF header. Raises GGUFError on anything unsafe.

    Results are cached per (realpath, inode, size, mtime, ctime), so checking
    the same unchanged file again costs one stat().
    """
    p = os.fsdecode(os.fspath(path))
    st = _stat(p)
    try:
        real = os.path.realpath(p)
    except (OSError, ValueError):
        real = os.path.abspath(p)
    key = (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
    if hit is not None:
        return hit if hit.path == p else dataclasses.replace(hit, path=p)
    info = _read_uncached(p)
    if info.file_size == st.st_size and time.time_ns() - st.st_mtime_ns > _RACY_NS:
        with _CACHE_LOCK:
            _CACHE[key] = info
            while len(_CACHE) > _CACHE_MAX:
                _CACHE.popitem(last=False)
    return info


# --------------------------------------------------------------------------
# Role checks


def validate_model(path: str | os.PathLike[str]) -> GGUFInfo:
    """read_gguf, plus: a base model llama.cpp can build a graph for."""
    info = read_gguf(path)
    p = info.path
    if info.general_type == "adapter":
        raise _error(p, "is a LoRA adapter, not a model",
                     "pass the base model here and the adapter as an adapter of it")
    if info.general_type != "model":
        raise _error(p, f"{_K_TYPE} is {_show(info.general_type)}, not 'model'", "pass a model GGUF file")
    arch = info.architecture
    for value, template in ((info.n_layer, gguf.Keys.LLM.BLOCK_COUNT),
                            (info.n_embd, gguf.Keys.LLM.EMBEDDING_LENGTH)):
        key = template.format(arch=arch)
        if value is None:
            raise _error(p, f"has no {key} key", "re-convert the model with a current convert_hf_to_gguf.py")
        if value < 1:
            raise _error(p, f"{key} is {value}", _CORRUPT)
    if not info.tensors:
        raise _error(p, "contains no tensors (a vocab-only file?)", "pass a full model file")
    embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    if embd not in info.tensors:
        raise _error(p, f"has no {embd} tensor", "pass a complete model file; this one is incomplete")
    _check_hparams(info)
    _check_chat_templates(info)
    return info


# llama.cpp limits (llama-hparams.h) that gguf-py does not export. LLAMA_MAX_EXPERTS was
# measured on the llama.cpp in llama-cpp-python 0.3.36: 1024 experts load, 1025 abort.
_LLAMA_MAX_LAYERS = 512
_LLAMA_MAX_EXPERTS = 1024
# llama_rope_scaling_type_from_string; anything else makes llama.cpp abort.
_ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")


def _check_hparams(info: GGUFInfo) -> None:
    """Refuse hyperparameters that make llama.cpp *abort* (GGML_ASSERT) rather than fail to load.

    llama.cpp turns most bad metadata into a load error, which the runtime reports. These
    are the architecture-independent ones that kill the process instead (load_hparams in
    llama-model.cpp), plus non-finite floats and a negative norm epsilon, which abort at
    the first decode (ggml's rms_norm asserts eps >= 0).
    """
    p, arch = info.path, info.architecture
    m = _Meta(p, info.metadata, arch)
    K = gguf.Keys.LLM

    def bad(key_template: str, what: str) -> GGUFError:
        return _error(p, f"{key_template.format(arch=arch)} {what}", _CORRUPT)

    n_layer = info.n_layer or 0
    if n_layer > _LLAMA_MAX_LAYERS:
        raise bad(K.BLOCK_COUNT, f"is {n_layer}; llama.cpp supports at most {_LLAMA_MAX_LAYERS} layers")
    nextn = m.get_int(K.NEXTN_PREDICT_LAYERS)
    if nextn is not None and nextn > n_layer:
        raise bad(K.NEXTN_PREDICT_LAYERS, f"is {nextn}, more than the {n_layer} layers")
    n_expert = m.get_int(K.EXPERT_COUNT) or 0
    used = m.get_int(K.EXPERT_USED_COUNT) or 0
    groups = m.get_int(K.EXPERT_GROUP_COUNT) or 0
    group_used = m.get_int(K.EXPERT_GROUP_USED_COUNT) or 0
    if n_expert > _LLAMA_MAX_EXPERTS:
        raise bad(K.EXPERT_COUNT, f"is {n_expert}; llama.cpp supports at most {_LLAMA_MAX_EXPERTS} experts")
    if used > n_expert:
        raise bad(K.EXPERT_USED_COUNT, f"is {used}, more than the {n_expert} experts ({K.EXPERT_COUNT.format(arch=arch)})")
    if n_expert > 0:
        if used == 0:
            raise bad(K.EXPERT_USED_COUNT, f"is missing or 0 but the model has {n_expert} experts")
        if groups >= n_expert:
            raise bad(K.EXPERT_GROUP_COUNT, f"is {groups}; it must be less than the {n_expert} experts")
        if groups > 1 and (n_expert % groups or not 0 < group_used < groups):
            raise bad(K.EXPERT_GROUP_COUNT, f"is {groups} with {n_expert} experts and {group_used} groups used;"
                                            " experts must divide into groups and 0 < groups used < groups")
    elif groups:
        raise bad(K.EXPERT_GROUP_COUNT, f"is {groups} but the model has no experts")
    scaling = m.get_str(gguf.Keys.Rope.SCALING_TYPE)
    if scaling is not None and scaling not in _ROPE_SCALING_TYPES:
        raise bad(gguf.Keys.Rope.SCALING_TYPE, f"is {_show(scaling)}; llama.cpp knows {', '.join(_ROPE_SCALING_TYPES)}")
    prefix = arch + "."
    for key, value in info.metadata.items():
        if not key.startswith(prefix):
            continue
        for x in value if isinstance(value, list) else (value,):
            if type(x) is not float:
                continue
            if not math.isfinite(x):
                raise _error(p, f"metadata key {_show(key)} is {x}, not a finite number", _CORRUPT)
            if "epsilon" in key and x < 0:
                raise _error(p, f"metadata key {_show(key)} is {x}; a norm epsilon must not be negative", _CORRUPT)


def _check_chat_templates(info: GGUFInfo) -> None:
    """Parse (never render) every chat template in the file, in the sandbox stages render in.

    One that does not parse is refused here, naming its key, rather than failing a stage
    later. Parsing runs nothing in the template and folds no constants.
    """
    keys = [k for k in info.metadata if k == gguf.Keys.Tokenizer.CHAT_TEMPLATE
            or k.startswith(gguf.Keys.Tokenizer.CHAT_TEMPLATE + ".")]
    if not keys:
        return
    env = _jinja_env()
    for key in keys:
        value = info.metadata[key]
        if isinstance(value, (list, dict)):  # arrays never reach llama-cpp-python's metadata
            continue
        try:
            env.parse(str(value))
        except Exception as e:  # TemplateSyntaxError, RecursionError on absurd nesting, ...
            raise _error(info.path, f"chat template {_show(key)} does not parse ({type(e).__name__}: "
                                    f"{_show(str(e), 120)})",
                         "fix or remove the template in the GGUF, or use a model with a working one") from None


_JINJA_ENV: Any = None


def _jinja_env() -> Any:
    """The sandbox stages render chat templates in (chat_template.py), here only to parse them."""
    global _JINJA_ENV
    if _JINJA_ENV is None:
        from .chat_template import environment

        _JINJA_ENV = environment()
    return _JINJA_ENV


def _lora_parts(name: str) -> tuple[str, str] | None:
    for suffix in (".lora_a", ".lora_b"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix[-1]
    return None


def validate_adapter(path: str | os.PathLike[str], base: GGUFInfo) -> GGUFInfo:
    """read_gguf, plus: a LoRA adapter whose every tensor fits ``base``.

    Mirrors llama.cpp's llama_adapter_lora_init checks, so a mismatch is a
    clear error here rather than a failed (or crashing) load later.
    """
    info = read_gguf(path)
    p = info.path
    base_desc = f"{base.name or 'the base model'} ({base.path})"
    different = f"this adapter was built for a different base model; use an adapter made for {base_desc}"
    if info.general_type != "adapter":
        raise _error(p, f"is not an adapter ({_K_TYPE} is {_show(info.general_type)})",
                     "pass a LoRA adapter GGUF (llama.cpp's convert_lora_to_gguf.py makes them)")
    if info.adapter_type != "lora":
        raise _error(p, f"{gguf.Keys.Adapter.TYPE} is {_show(info.adapter_type)}, expected 'lora'",
                     "only LoRA adapters are supported; re-convert with convert_lora_to_gguf.py")
    if info.lora_alpha is None:
        raise _error(p, f"has no {gguf.Keys.Adapter.LORA_ALPHA} key",
                     "re-convert the adapter with a current convert_lora_to_gguf.py")
    if info.architecture != base.architecture:
        raise _error(p, f"adapter architecture is {_show(info.architecture)} but the base model's is "
                        f"{_show(base.architecture)}", different)

    pairs: dict[str, dict[str, TensorInfo]] = {}
    for t in info.tensors.values():
        parts = _lora_parts(t.name)
        if parts is None:
            if t.name.endswith("_norm.weight"):  # llama.cpp ignores these too
                continue
            raise _error(p, f"tensor {_show(t.name)} is not a LoRA tensor (name must end in .lora_a or .lora_b)",
                         "re-convert the adapter with convert_lora_to_gguf.py")
        if t.ggml_type not in _LORA_TYPES:
            raise _error(p, f"LoRA tensor {_show(t.name)} has type {t.ggml_type}; "
                            f"supported: {', '.join(sorted(_LORA_TYPES))}",
                         "re-convert the adapter with --outtype f16 or f32")
        pairs.setdefault(parts[0], {})[parts[1]] = t
    if not pairs:
        raise _error(p, "contains no LoRA tensors", "pass a LoRA adapter GGUF file")

    token_embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    for target, ab in pairs.items():
        if "a" not in ab or "b" not in ab:
            have, miss = ("lora_a", "lora_b") if "a" in ab else ("lora_b", "lora_a")
            raise _error(p, f"tensor {_show(target + '.' + have)} has no matching {miss}",
                         "the adapter file is incomplete; re-convert it")
        bt = base.tensors.get(target)
        if bt is None:
            raise _error(p, f"LoRA tensors target {_show(target)}, which {base_desc} does not have", different)
        a, b = ab["a"], ab["b"]
        if len(bt.shape) < 2:
            raise _error(p, f"LoRA tensors target {_show(target)}, a {len(bt.shape)}-D tensor of shape "
                            f"{bt.shape} in the base model", different)
        for t in (a, b):
            if len(t.shape) != len(bt.shape):
                raise _error(p, f"LoRA tensor {_show(t.name)} has shape {t.shape} but base tensor "
                                f"{_show(target)} has shape {bt.shape}; their ranks differ", different)
        rest = bt.shape[2:]
        if target == token_embd and output not in base.tensors:
            # A base without output.weight reuses token_embd as its output layer, and llama.cpp
            # applies the adapter there too, as a plain matmul whose shapes cannot agree: every
            # such adapter aborts the process (GGML_ASSERT) at the first decode, whatever its rank.
            raise _error(p, f"has LoRA tensors for {_show(token_embd)}, but {base_desc} ties its output layer "
                            f"to the token embeddings, where llama.cpp cannot apply them (it would abort)",
                         "retrain the adapter without the embedding layer (drop embed_tokens from "
                         "target_modules) and convert it again")
        if target == token_embd:
            # llama.cpp flips A and B for the embedding: A is gathered by token.
            r = a.shape[0]
            want_a = (r, bt.shape[1], *rest)
            want_b = (r, bt.shape[0], *rest)
        else:
            r = a.shape[1]
            want_a = (bt.shape[0], r, *rest)
            want_b = (r, bt.shape[1], *rest)
        for t, want in ((a, want_a), (b, want_b)):
            if t.shape != want:
                raise _error(p, f"LoRA tensor {_show(t.name)} has shape {t.shape} but base tensor "
                                f"{_show(target)} of shape {bt.shape} needs {want} (rank {r})", different)
    return info

