"""Hugging Face checkpoint folder -> GGUF that llama.cpp loads.

    from edge_fslm.convert import convert_hf
    report = convert_hf("SmolLM2-135M-Instruct/", "smollm2.f16.gguf", outtype="f16")

Two architectures are supported, because they are the ones FSLM stacks use:
``LlamaForCausalLM`` (SmolLM2, Llama) and ``GPTNeoXForCausalLM`` (Pythia, the
FSLM paper's base).  Each is an :class:`ArchSpec`: how to read its
hyper-parameters, how to write them as GGUF keys, and how to rearrange the
tensors whose layout llama.cpp expects differently from transformers:

* llama: q/k projection rows are permuted.  transformers rotates the two
  halves of each head ("rotate_half"); llama.cpp's llama graph rotates
  adjacent pairs, so each head's rows are interleaved to match.
* gpt_neox: the fused query_key_value weight is stored per head as
  [q_h; k_h; v_h]; llama.cpp splits it as [all q; all k; all v], so the rows
  are regrouped.  (Its RoPE is already the rotate-half kind.)

The same row transforms are applied to a LoRA's B matrix (its output side) by
:mod:`lora_to_gguf`, which is why they work on any array whose first axis is the
output axis.

Tensor names come from gguf-py's ``TensorNameMap``; unknown tensors are an
error rather than silently dropped.  Tensors are read and written one at a
time (the header is planned from shapes alone), and the file only appears
under its final name once it is complete and validates.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from .. import gguf_info
from .common import ConvertError, Progress, atomic_output, output_path
from .checkpoint import Checkpoint, open_checkpoint
from .vocab import add_vocab

__all__ = [
    "OUTTYPES",
    "SUPPORTED_ARCHITECTURES",
    "ConvertReport",
    "HParams",
    "ArchSpec",
    "arch_for",
    "convert_hf",
    "tensor_plan",
]

_QT = gguf.GGMLQuantizationType

#: outtype -> (ggml type of 2-D weights, general.file_type)
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, int]] = {
    "f32": (_QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (_QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (_QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (_QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


# --------------------------------------------------------------------------- hyper-parameters


@dataclass(frozen=True)
class HParams:
    """The hyper-parameters llama.cpp needs, normalised across config.json spellings."""

    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_theta: float
    rope_dim: int
    norm_eps: float
    tied_embeddings: bool
    parallel_residual: bool = False
    rope_linear_factor: float | None = None
    name: str = ""
    #: config.json names head_dim itself (llama.cpp's converter then writes key/value_length, so we do too)
    explicit_head_dim: bool = False


def _cfg(config: dict[str, Any], folder: Path, *keys: str, default: Any = None, kind: type = int) -> Any:
    for k in keys:
        if k in config and config[k] is not None:
            v = config[k]
            if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ConvertError(f"{folder / 'config.json'}: {k} must be a positive integer, got {v!r} — fix config.json")
            if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise ConvertError(f"{folder / 'config.json'}: {k} must be a number, got {v!r} — fix config.json")
            return kind(v)
    if default is None:
        raise ConvertError(f"{folder / 'config.json'}: missing {keys[0]} — this config.json is incomplete")
    return default


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 keeps rope settings in rope_parameters; older configs use rope_scaling + rope_theta."""
    rp = config.get("rope_parameters")
    if isinstance(rp, dict):
        # A per-layer-type mapping ({"full_attention": {...}}) is not used by these architectures.
        return rp
    out: dict[str, Any] = {}
    rs = config.get("rope_scaling")
    if isinstance(rs, dict):
        out.update(rs)
        out.setdefault("rope_type", rs.get("type", "default"))
    return out


def _model_name(config: dict[str, Any], folder: Path) -> str:
    for k in ("_name_or_path", "_model_name_or_path"):
        v = config.get(k)
        if isinstance(v, str) and v.strip():
            return Path(v.strip()).name or v.strip()
    return folder.resolve().name


def _rope_linear(config: dict[str, Any], folder: Path) -> float | None:
    rope = _rope(config)
    rtype = rope.get("rope_type") or rope.get("type") or "default"
    if rtype == "default":
        return None
    if rtype == "linear" and isinstance(rope.get("factor"), (int, float)):
        return float(rope["factor"])
    raise ConvertError(f"{folder / 'config.json'}: rope scaling type {rtype!r} is not supported by this converter "
                       "(only default and linear) — use llama.cpp's convert_hf_to_gguf.py for this model")


def _llama_hparams(config: dict[str, Any], folder: Path) -> HParams:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"{folder / 'config.json'}: hidden_act {act!r} — llama.cpp's llama graph uses silu")
    n_embd = _cfg(config, folder, "hidden_size")
    n_head = _cfg(config, folder, "num_attention_heads")
    n_head_kv = _cfg(config, folder, "num_key_value_heads", default=n_head)
    head_dim = _cfg(config, folder, "head_dim", default=n_embd // n_head)
    if n_head % n_head_kv:
        raise ConvertError(f"{folder / 'config.json'}: num_attention_heads {n_head} is not a multiple of "
                           f"num_key_value_heads {n_head_kv} — fix config.json")
    if head_dim % 2:
        raise ConvertError(f"{folder / 'config.json'}: head_dim {head_dim} is odd — RoPE needs an even head size")
    theta = _rope(config).get("rope_theta", config.get("rope_theta", 10000.0))
    return HParams(
        **_shared_hparams(config, folder),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        rope_theta=float(theta),
        rope_dim=head_dim,
        norm_eps=_cfg(config, folder, "rms_norm_eps", default=1e-6, kind=float),
        explicit_head_dim=isinstance(config.get("head_dim"), int),
    )


def _shared_hparams(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The hyperparameters every architecture reads from the same config.json keys."""
    return {
        "n_vocab": _cfg(config, folder, "vocab_size"),
        "n_ff": _cfg(config, folder, "intermediate_size"),
        "n_layer": _cfg(config, folder, "num_hidden_layers"),
        "n_ctx": _cfg(config, folder, "max_position_embeddings", default=2048),
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
        "rope_linear_factor": _rope_linear(config, folder),
        "name": _model_name(config, folder),
    }


_NEOX_ACTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")


def _neox_hparams(config: dict[str, Any], folder: Path) -> HParams:
    act = config.get("hidden_act", "gelu")
    if act not in _NEOX_ACTS:
        raise ConvertError(f"{folder / 'config.json'}: hidden_act {act!r} — llama.cpp's gptneox graph uses gelu")
    n_embd = _cfg(config, folder, "hidden_size")
    n_head = _cfg(config, folder, "num_attention_heads")
    if n_embd % n_head:
        raise ConvertError(f"{folder / 'config.json'}: hidden_size {n_embd} is not a multiple of "
                           f"num_attention_heads {n_head} — fix config.json")
    head_dim = n_embd // n_head
    rope = _rope(config)
    pct = rope.get("partial_rotary_factor", config.get("rotary_pct", config.get("partial_rotary_factor", 1.0)))
    theta = rope.get("rope_theta", config.get("rotary_emb_base", config.get("rope_theta", 10000.0)))
    rope_dim = int(float(pct) * head_dim)
    if rope_dim <= 0 or rope_dim % 2:
        raise ConvertError(f"{folder / 'config.json'}: rotary dimension {rope_dim} (rotary_pct {pct} of head size "
                           f"{head_dim}) must be even and positive — fix config.json")
    return HParams(
        **_shared_hparams(config, folder),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head,
        head_dim=head_dim,
        rope_theta=float(theta),
        rope_dim=rope_dim,
        norm_eps=_cfg(config, folder, "layer_norm_eps", default=1e-5, kind=float),
        parallel_residual=bool(config.get("use_parallel_residual", True)),
    )


# --------------------------------------------------------------------------- GGUF keys


def _shared_keys(w: gguf.GGUFWriter, hp: HParams) -> None:
    """The keys every architecture writes first, in llama.cpp's converter's order (the bytes depend on it)."""
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_dimension_count(hp.rope_dim)


def _llama_keys(w: gguf.GGUFWriter, hp: HParams) -> None:
    _shared_keys(w, hp)
    if hp.explicit_head_dim or hp.head_dim != hp.n_embd // hp.n_head:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.norm_eps)
    w.add_vocab_size(hp.n_vocab)


def _neox_keys(w: gguf.GGUFWriter, hp: HParams) -> None:
    _shared_keys(w, hp)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_parallel_residual(hp.parallel_residual)
    w.add_layer_norm_eps(hp.norm_eps)
    w.add_vocab_size(hp.n_vocab)


# --------------------------------------------------------------------------- tensor layout


def llama_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from rotate-half order to llama.cpp's adjacent-pair order."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _llama_rows(hf_name: str, rows: np.ndarray, hp: HParams) -> np.ndarray:
    if re.search(r"\.q_proj\.(weight|bias)$", hf_name) or hf_name.endswith(".q_proj"):
        return llama_permute(rows, hp.n_head)
    if re.search(r"\.k_proj\.(weight|bias)$", hf_name) or hf_name.endswith(".k_proj"):
        return llama_permute(rows, hp.n_head_kv)
    return rows


def neox_regroup_qkv(rows: np.ndarray, n_head: int) -> np.ndarray:
    """[q_0 k_0 v_0 q_1 k_1 v_1 ...] per head -> [q_all; k_all; v_all], along axis 0."""
    shape = rows.shape
    per_head = rows.reshape(n_head, 3, shape[0] // n_head // 3, *shape[1:])
    return np.concatenate([per_head[:, i].reshape(-1, *shape[1:]) for i in range(3)], axis=0)


def _neox_rows(hf_name: str, rows: np.ndarray, hp: HParams) -> np.ndarray:
    if re.search(r"\.query_key_value(\.(weight|bias))?$", hf_name):
        return neox_regroup_qkv(rows, hp.n_head)
    return rows


@dataclass(frozen=True)
class ArchSpec:
    """Everything architecture-specific about converting one HF model class."""

    hf_name: str
    gguf_arch: gguf.MODEL_ARCH
    hparams: Callable[[dict[str, Any], Path], HParams]
    write_keys: Callable[[gguf.GGUFWriter, HParams], None]
    #: rearrange a tensor's rows (axis 0 = output features) into llama.cpp's layout
    rows: Callable[[str, np.ndarray, HParams], np.ndarray]
    #: HF tensors that are buffers, not weights
    skip: tuple[str, ...] = ()
    #: the HF name of the output projection (dropped when embeddings are tied)
    lm_head: str = "lm_head.weight"

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


_ARCHS: dict[str, ArchSpec] = {
    a.hf_name: a
    for a in (
        ArchSpec(
            hf_name="LlamaForCausalLM",
            gguf_arch=gguf.MODEL_ARCH.LLAMA,
            hparams=_llama_hparams,
            write_keys=_llama_keys,
            rows=_llama_rows,
            skip=(r"\.rotary_emb\.inv_freq$",),
        ),
        ArchSpec(
            hf_name="GPTNeoXForCausalLM",
            gguf_arch=gguf.MODEL_ARCH.GPTNEOX,
            hparams=_neox_hparams,
            write_keys=_neox_keys,
            rows=_neox_rows,
            skip=(r"\.rotary_emb\.inv_freq$", r"\.attention\.bias$", r"\.attention\.masked_bias$"),
            lm_head="embed_out.weight",
        ),
    )
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHS)


def arch_for(config: dict[str, Any], folder: Path) -> ArchSpec:
    """The ArchSpec for a config.json, or a ConvertError naming what is supported."""
    archs = config.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if name is None:
        mt = config.get("model_type")
        name = {"llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}.get(mt) if isinstance(mt, str) else None
        if name is None:
            raise ConvertError(f"{folder / 'config.json'}: no architectures entry (model_type {mt!r}) — "
                               f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    spec = _ARCHS.get(name)
    if spec is None:
        raise ConvertError(f"{folder / 'config.json'}: architecture {name} is not supported — "
                           f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return spec


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # numpy order
    ggml_type: gguf.GGMLQuantizationType

    @property
    def n_bytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        return math.prod(self.shape) // block * size


def _out_type(shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """1-D tensors (norms, biases) stay F32, as llama.cpp's converter does."""
    main = OUTTYPES[outtype][0]
    if len(shape) < 2 or main == _QT.F32:
        return _QT.F32
    if main == _QT.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[_QT.Q8_0][0]:
        return _QT.F16  # row not a whole number of blocks
    return main


def _order(gname: str) -> tuple[int, int, str]:
    m = re.match(r"blk\.(\d+)\.", gname)
    if m:
        return (1, int(m.group(1)), gname)
    return (0 if gname.startswith("token_embd") else 2, 0, gname)


def tensor_plan(ckpt: Checkpoint, spec: ArchSpec, hp: HParams, outtype: str) -> list[PlannedTensor]:
    """Map every checkpoint tensor to its GGUF name and type; refuse unknown tensors."""
    name_map = gguf.get_tensor_name_map(spec.gguf_arch, hp.n_layer)
    plan: list[PlannedTensor] = []
    for ref in ckpt.refs.values():
        if any(re.search(p, ref.name) for p in spec.skip):
            continue
        if ref.name == spec.lm_head and hp.tied_embeddings:
            continue
        gname = name_map.get_name(ref.name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ConvertError(f"{ckpt.path}: tensor {ref.name!r} has no llama.cpp {spec.gguf_name} equivalent — "
                               "the checkpoint has parts this converter does not know; was it modified?")
        if ref.dtype not in ("F32", "F16", "BF16", "F64", "FLOAT32", "FLOAT16", "BFLOAT16", "FLOAT64"):
            raise ConvertError(f"{ckpt.path}: tensor {ref.name!r} has dtype {ref.dtype} — only unquantized float "
                               "checkpoints can be converted; dequantize it first")
        plan.append(PlannedTensor(ref.name, gname, ref.shape, _out_type(ref.shape, outtype)))
    names = {p.gguf_name for p in plan}
    token_embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    if token_embd not in names:
        raise ConvertError(f"{ckpt.path}: no token embedding tensor — the checkpoint is incomplete")
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    if output not in names and not hp.tied_embeddings:
        raise ConvertError(f"{ckpt.path}: no output projection ({spec.lm_head}) and tie_word_embeddings is false — "
                           "the checkpoint is incomplete")
    for i in range(hp.n_layer):
        if not any(n.startswith(f"blk.{i}.") for n in names):
            raise ConvertError(f"{ckpt.path}: no tensors for layer {i} of {hp.n_layer} — the checkpoint is incomplete")
    plan.sort(key=lambda p: _order(p.gguf_name))
    return plan


def _encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == _QT.F32:
        return data
    if qtype == _QT.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


# --------------------------------------------------------------------------- the conversion


@dataclass
class ConvertReport:
    """What a conversion produced."""

    path: Path
    architecture: str  # HF class name
    gguf_architecture: str
    outtype: str
    n_tensors: int
    n_params: int
    file_size: int
    seconds: float
    tokenizer_pre: str
    tensor_types: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: GGUF tokenizer model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokenizer_model: str = "gpt2"

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


def convert_hf(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = "f16",
    *,
    pre_tokenizer: str | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> ConvertReport:
    """Convert an HF checkpoint folder to one GGUF file.

    ``outtype`` sets the type of 2-D weights (f32, f16, bf16 or q8_0; q8_0 rows
    that are not a multiple of 32 fall back to f16); norms and biases stay
    f32.  ``pre_tokenizer`` overrides the detected llama.cpp pre-tokenizer of a byte-level BPE
    tokenizer (SentencePiece tokenizers have none);
    ``name`` sets general.name (default: config.json's name or the folder name).
    ``progress(done_bytes, total_bytes, tensor_name)`` is called after each tensor.
    """
    t0 = time.perf_counter()
    if outtype not in OUTTYPES:
        raise ConvertError(f"outtype {outtype!r} is not supported — choose one of {', '.join(OUTTYPES)}")
    out = output_path(out_path)
    ckpt = open_checkpoint(hf_dir)
    spec = arch_for(ckpt.config, ckpt.path)
    hp = spec.hparams(ckpt.config, ckpt.path)
    plan = tensor_plan(ckpt, spec, hp, outtype)
    embd = next(p for p in plan if p.gguf_name.startswith("token_embd"))
    if embd.shape[0] != hp.n_vocab:
        raise ConvertError(f"{ckpt.path}: embedding has {embd.shape[0]} rows but config.json vocab_size is "
                           f"{hp.n_vocab} — fix config.json")
    total = sum(p.n_bytes for p in plan)
    ggml_main, file_type = OUTTYPES[outtype]

    gguf_log = logging.getLogger("gguf")
    old_level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)  # gguf-py logs every step at INFO; the project is quiet unless -v
    try:
        with atomic_output(out) as tmp:
            w = gguf.GGUFWriter(tmp, spec.gguf_name)
            try:
                w.add_type(gguf.GGUFType.MODEL)
                w.add_name(name or hp.name)
                w.add_size_label(gguf.size_label(sum(math.prod(p.shape) for p in plan), 0, 0, 0))
                spec.write_keys(w, hp)
                if hp.rope_linear_factor is not None:
                    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                    w.add_rope_scaling_factor(hp.rope_linear_factor)
                w.add_file_type(int(file_type))
                w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # every file, as llama.cpp's converter does
                vocab = add_vocab(w, ckpt.path, hp.n_vocab, pre_tokenizer)
                for p in plan:
                    w.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.n_bytes, raw_dtype=p.ggml_type)
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                done = 0
                for p in plan:
                    data = spec.rows(p.hf_name, ckpt.read(p.hf_name), hp)
                    w.write_tensor_data(_encode(data, p.ggml_type))
                    del data
                    done += p.n_bytes
                    if progress is not None:
                        progress(done, total, p.gguf_name)
            finally:
                w.close()
            gguf_info.validate_model(tmp)
    finally:
        gguf_log.setLevel(old_level)

    types: dict[str, int] = {}
    for p in plan:
        types[p.ggml_type.name] = types.get(p.ggml_type.name, 0) + 1
    warnings = list(vocab.warnings)
    if outtype == "q8_0" and types.get("F16"):
        warnings.append(f"{types['F16']} tensors kept in F16: their rows are not a multiple of 32")
    return ConvertReport(
        path=out,
        architecture=spec.hf_name,
        gguf_architecture=spec.gguf_name,
        outtype=outtype,
        n_tensors=len(plan),
        n_params=sum(math.prod(p.shape) for p in plan),
        file_size=out.stat().st_size,
        seconds=time.perf_counter() - t0,
        tokenizer_pre=vocab.pre,
        tokenizer_model=vocab.model,
        tensor_types=types,
        warnings=warnings,
    )
