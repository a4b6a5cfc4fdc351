"""Quantize a GGUF with llama.cpp's own quantizer (``llama_model_quantize``).

    from edge_fslm.convert import quantize
    report = quantize("smollm2.f16.gguf", "smollm2.Q4_K_M.gguf", "Q4_K_M")
    report.fallbacks   # tensors llama.cpp had to store in another type

llama.cpp's quantizer has no progress callback and logs to stderr, so it runs
in a worker thread while the calling thread watches the output file grow and
reports ``progress(bytes_written, bytes_expected, qtype)``; its log is silenced
unless ``verbose``.  K-quants (Q*_K) pack 256 values per block, so a tensor
whose rows are not a multiple of 256 (SmolLM2's 576-wide rows) is stored in a
fallback type by llama.cpp; such tensors are listed in the report with the
type they got, so a "Q4_K_M" file that is really mostly Q5_0 does not surprise
anyone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from .. import gguf_info
from .common import ConvertError, Progress, atomic_output, output_path

__all__ = ["QUANT_TYPES", "QuantizeReport", "normalize_qtype", "quantize"]

_QT = gguf.GGMLQuantizationType

#: Supported quant type -> (llama_cpp LLAMA_FTYPE_* constant, ggml type of most weights).
#: Types that need an importance matrix (IQ1/IQ2, Q2_K_S) are left out: the build has no imatrix step.
QUANT_TYPES: dict[str, tuple[str, gguf.GGMLQuantizationType]] = {
    "F32": ("LLAMA_FTYPE_ALL_F32", _QT.F32),
    "F16": ("LLAMA_FTYPE_MOSTLY_F16", _QT.F16),
    "BF16": ("LLAMA_FTYPE_MOSTLY_BF16", _QT.BF16),
    "Q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", _QT.Q8_0),
    "Q6_K": ("LLAMA_FTYPE_MOSTLY_Q6_K", _QT.Q6_K),
    "Q5_K_M": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", _QT.Q5_K),
    "Q5_K_S": ("LLAMA_FTYPE_MOSTLY_Q5_K_S", _QT.Q5_K),
    "Q5_1": ("LLAMA_FTYPE_MOSTLY_Q5_1", _QT.Q5_1),
    "Q5_0": ("LLAMA_FTYPE_MOSTLY_Q5_0", _QT.Q5_0),
    "Q4_K_M": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", _QT.Q4_K),
    "Q4_K_S": ("LLAMA_FTYPE_MOSTLY_Q4_K_S", _QT.Q4_K),
    "Q4_1": ("LLAMA_FTYPE_MOSTLY_Q4_1", _QT.Q4_1),
    "Q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", _QT.Q4_0),
    "IQ4_NL": ("LLAMA_FTYPE_MOSTLY_IQ4_NL", _QT.IQ4_NL),
    "IQ4_XS": ("LLAMA_FTYPE_MOSTLY_IQ4_XS", _QT.IQ4_XS),
    "Q3_K_L": ("LLAMA_FTYPE_MOSTLY_Q3_K_L", _QT.Q3_K),
    "Q3_K_M": ("LLAMA_FTYPE_MOSTLY_Q3_K_M", _QT.Q3_K),
    "Q3_K_S": ("LLAMA_FTYPE_MOSTLY_Q3_K_S", _QT.Q3_K),
    "Q2_K": ("LLAMA_FTYPE_MOSTLY_Q2_K", _QT.Q2_K),
}

_FLOAT_TYPES = ("F32", "F16", "BF16")


def normalize_qtype(qtype: str) -> str:
    """Canonical spelling of a quant type ("q4_k_m" -> "Q4_K_M"), or a ConvertError listing the choices."""
    name = str(qtype).strip().upper().replace("-", "_")
    if name not in QUANT_TYPES:
        import difflib

        hint = difflib.get_close_matches(name, list(QUANT_TYPES), n=1)
        extra = f" (did you mean {hint[0]}?)" if hint else ""
        raise ConvertError(f"unknown quant type {qtype!r}{extra} — choose one of {', '.join(QUANT_TYPES)}")
    return name


@dataclass
class QuantizeReport:
    """What a quantization produced."""

    in_path: Path
    path: Path
    qtype: str
    in_size: int
    file_size: int
    seconds: float
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    #: tensor name -> the type llama.cpp stored it in, for rows that do not fit the type's blocks
    fallbacks: dict[str, str] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.file_size / self.in_size if self.in_size else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["in_path"], d["path"] = str(self.in_path), str(self.path)
        return d


def _estimate(info: gguf_info.GGUFInfo, main: gguf.GGMLQuantizationType) -> int:
    """Rough output size, only for the progress bar."""
    total = info.data_offset
    block, size = gguf.GGML_QUANT_SIZES[main]
    for t in info.tensors.values():
        if len(t.shape) >= 2 and t.shape[0] % block == 0:
            total += t.n_elements // block * size
        elif len(t.shape) >= 2:
            total += t.n_elements  # a fallback type, about 8 bits
        else:
            total += t.n_elements * 4
    return max(total, 1)


def quantize(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: str = "Q4_K_M",
    threads: int = 0,
    progress: Progress | None = None,
    *,
    allow_requantize: bool = False,
    verbose: bool = False,
) -> QuantizeReport:
    """Quantize the F32/F16/BF16 GGUF ``in_path`` to ``qtype``, writing ``out_path`` atomically.

    ``threads=0`` lets llama.cpp use every hardware thread.  Re-quantizing an
    already quantized file loses quality twice, so it needs ``allow_requantize``.
    """
    t0 = time.perf_counter()
    name = normalize_qtype(qtype)
    const, main = QUANT_TYPES[name]
    src = Path(in_path).expanduser()
    info = gguf_info.validate_model(src)
    out = output_path(out_path)
    if out.exists() and out.resolve() == src.resolve():
        raise ConvertError(f"{out}: output would overwrite the input — choose another output path")
    quantized = sorted({t.ggml_type for t in info.tensors.values()
                        if len(t.shape) >= 2 and t.ggml_type not in _FLOAT_TYPES})
    if quantized and not allow_requantize:
        raise ConvertError(f"{src}: is already quantized ({', '.join(quantized)}) — quantize from an F16/F32 GGUF "
                           "(edge-fslm convert), or allow requantizing (quality drops twice)")
    if not isinstance(threads, int) or threads < 0:
        raise ConvertError(f"threads must be 0 (all) or a positive integer, got {threads!r}")

    from ..llama import lib  # deferred: loading llama.cpp costs ~0.2 s

    llama_cpp = lib()

    ftype = getattr(llama_cpp, const, None)
    if ftype is None:
        raise ConvertError(f"quant type {name} is not available in this llama-cpp-python build — choose another")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    expected = _estimate(info, main)

    llama_log = logging.getLogger("llama-cpp-python")  # llama_cpp._logger routes llama.cpp's log through it
    old_level = llama_log.level
    llama_log.setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    try:
        with atomic_output(out) as tmp:
            result: dict[str, Any] = {}

            def work() -> None:
                try:
                    result["rc"] = llama_cpp.llama_model_quantize(
                        os.fsencode(src), os.fsencode(tmp), ctypes.byref(params))
                except BaseException as exc:  # surfaced in the calling thread
                    result["exc"] = exc

            worker = threading.Thread(target=work, name="edge-fslm-quantize", daemon=True)
            worker.start()
            while worker.is_alive():
                worker.join(0.2)
                if progress is not None:
                    try:
                        done = tmp.stat().st_size
                    except OSError:
                        done = 0
                    progress(min(done, expected - 1), expected, name)
            if "exc" in result:
                raise result["exc"]
            if result.get("rc", 1) != 0:
                raise ConvertError(f"{src}: llama.cpp could not quantize it to {name} (error {result.get('rc')}) — "
                                   "run with -v to see llama.cpp's log")
            out_info = gguf_info.validate_model(tmp)
            if progress is not None:
                progress(expected, expected, name)
    finally:
        llama_log.setLevel(old_level)

    block = gguf.GGML_QUANT_SIZES[main][0]
    fallbacks = {
        t.name: out_info.tensors[t.name].ggml_type
        for t in info.tensors.values()
        if len(t.shape) >= 2 and t.shape[0] % block and t.name in out_info.tensors
    }
    return QuantizeReport(
        in_path=src,
        path=out,
        qtype=name,
        in_size=info.file_size,
        file_size=out.stat().st_size,
        seconds=time.perf_counter() - t0,
        bytes_by_type=out_info.bytes_by_type,
        fallbacks=fallbacks,
    )

