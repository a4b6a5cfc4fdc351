"""PEFT LoRA adapter folder -> llama.cpp LoRA GGUF (or a merged model GGUF).

    from edge_fslm.convert import convert_lora
    convert_lora("adapters/keywords/", "SmolLM2-135M-Instruct/", "keywords.gguf")

A stack's stages share one base in memory and swap ~1 MB adapters, so adapters
stay separate files: llama.cpp adds ``scale * alpha / r * B @ A`` to a weight
at run time.  The file layout is the one llama.cpp's own tooling writes:
``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``,
and for every adapted weight ``<gguf name>.lora_a`` (gguf shape ``[n_in, r]``)
and ``<gguf name>.lora_b`` (``[r, n_out]``).

B's rows are output features, so B gets exactly the row rearrangement its base
weight got (llama q/k permutation, gpt_neox qkv regrouping); A is untouched.
PEFT's per-module scale (``alpha_pattern``, rsLoRA's ``alpha / sqrt(r)``) is
folded into B, because llama.cpp has a single alpha per adapter and divides by
each tensor's own rank.

``merge=True`` (or :func:`merge_lora`) instead folds the adapter into the base
with peft's ``merge_and_unload`` and converts the result as a full model; that
needs the train extra (torch, transformers, peft).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .. import gguf_info
from .common import ConvertError, Progress, atomic_output, output_path
from .checkpoint import SafetensorsFile, open_checkpoint, read_json
from .hf_to_gguf import ConvertReport, arch_for, convert_hf

__all__ = ["LORA_OUTTYPES", "AdapterConfig", "LoraReport", "read_adapter_config", "convert_lora", "merge_lora"]

_QT = gguf.GGMLQuantizationType
LORA_OUTTYPES: dict[str, gguf.GGMLQuantizationType] = {"f16": _QT.F16, "f32": _QT.F32}

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of adapter_config.json that decide how the adapter is applied."""

    path: Path
    r: int
    alpha: float
    use_rslora: bool
    alpha_pattern: dict[str, float]
    target_modules: Any
    base_model: str | None

    def scale_for(self, module: str, rank: int) -> float:
        """PEFT's scaling for one module: alpha / r (or / sqrt(r) with rsLoRA)."""
        alpha = self.alpha
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def read_adapter_config(peft_dir: str | os.PathLike[str]) -> AdapterConfig:
    """Read and check adapter_config.json; refuse what llama.cpp's LoRA cannot express."""
    folder = Path(peft_dir).expanduser()
    if not folder.is_dir():
        raise ConvertError(f"{folder}: no such folder — pass the folder PeftModel.save_pretrained() wrote")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{folder}: not a PEFT adapter folder (no adapter_config.json) — "
                           "pass the folder PeftModel.save_pretrained() wrote")
    cfg = read_json(cfg_path, "save the adapter with PeftModel.save_pretrained()")
    where = f"{cfg_path}:"
    ptype = cfg.get("peft_type")
    if ptype != "LORA":
        raise ConvertError(f"{where} peft_type is {ptype!r} — only LoRA adapters can be converted")
    if cfg.get("use_dora"):
        raise ConvertError(f"{where} use_dora is true — llama.cpp cannot apply DoRA at run time; "
                           "convert with merge=True to bake it into the weights")
    if cfg.get("fan_in_fan_out"):
        raise ConvertError(f"{where} fan_in_fan_out is true (GPT-2 style Conv1D) — not used by the supported "
                           "architectures; convert with merge=True")
    if cfg.get("bias", "none") not in (None, "none") or cfg.get("lora_bias"):
        raise ConvertError(f"{where} the adapter trains biases (bias={cfg.get('bias')!r}) — llama.cpp LoRA "
                           "files carry no biases; convert with merge=True")
    if cfg.get("modules_to_save"):
        raise ConvertError(f"{where} modules_to_save {cfg['modules_to_save']} are fully trained copies, not LoRA "
                           "— llama.cpp adapters cannot carry them; convert with merge=True")
    r = cfg.get("r")
    alpha = cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConvertError(f"{where} r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ConvertError(f"{where} lora_alpha must be a positive number, got {alpha!r}")
    ap = cfg.get("alpha_pattern") or {}
    if not isinstance(ap, dict):
        raise ConvertError(f"{where} alpha_pattern must be an object, got {type(ap).__name__}")
    base = cfg.get("base_model_name_or_path")
    return AdapterConfig(path=cfg_path, r=r, alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora")),
                         alpha_pattern={str(k): float(v) for k, v in ap.items()},
                         target_modules=cfg.get("target_modules"), base_model=base if isinstance(base, str) else None)


def _adapter_tensors(folder: Path) -> tuple[dict[str, np.ndarray], Path]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        f = SafetensorsFile(st)
        return {name: f.read(name) for name in f.entries}, st
    bin_ = folder / "adapter_model.bin"
    if bin_.is_file():
        try:
            import torch
        except ImportError:
            raise ConvertError(f"{bin_}: reading .bin adapters needs torch — install the train extra or "
                               "re-save the adapter with safe_serialization=True") from None
        try:
            state = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConvertError(f"{bin_}: torch cannot load it ({type(exc).__name__}) — re-save the adapter") from None
        return {k: v.float().numpy() for k, v in state.items()}, bin_
    raise ConvertError(f"{folder}: no adapter_model.safetensors or adapter_model.bin — the adapter folder is incomplete")


@dataclass
class LoraReport:
    """What an adapter conversion produced."""

    path: Path
    architecture: str
    outtype: str
    alpha: float
    ranks: list[int]
    n_modules: int
    modules: list[str]  # module kinds, e.g. ["q_proj", "v_proj"]
    file_size: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


def convert_lora(
    peft_dir: str | os.PathLike[str],
    base_hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = "f16",
    *,
    merge: bool = False,
    base_gguf: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> LoraReport | ConvertReport:
    """Convert a PEFT LoRA folder to a llama.cpp LoRA GGUF for the base in ``base_hf_dir``.

    The base checkpoint supplies the architecture and head counts (for the
    row layout) and is used to check every adapted weight exists with the
    right shape.  With ``base_gguf`` the output is also checked by
    :func:`gguf_info.validate_adapter` against that converted base.
    ``merge=True`` writes a full merged model instead (see :func:`merge_lora`).
    """
    if merge:
        return merge_lora(peft_dir, base_hf_dir, out_path, outtype, progress=progress)
    t0 = time.perf_counter()
    if outtype not in LORA_OUTTYPES:
        raise ConvertError(f"adapter outtype {outtype!r} is not supported — choose one of {', '.join(LORA_OUTTYPES)}")
    out = output_path(out_path)
    acfg = read_adapter_config(peft_dir)
    folder = acfg.path.parent
    base = open_checkpoint(base_hf_dir, what="base model")
    spec = arch_for(base.config, base.path)
    hp = spec.hparams(base.config, base.path)
    tensors, weights_file = _adapter_tensors(folder)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        if "lora_embedding_" in key:
            raise ConvertError(f"{weights_file}: LoRA on embeddings ({key}) is not supported — "
                               "convert with merge=True")
        m = _KEY.match(key)
        if m is None:
            raise ConvertError(f"{weights_file}: tensor {key!r} is not a LoRA A/B matrix — the adapter holds "
                               "other trained weights; convert with merge=True")
        pairs.setdefault(m.group("module"), {})[m.group("ab")] = arr
    if not pairs:
        raise ConvertError(f"{weights_file}: contains no LoRA tensors — the adapter folder is empty or corrupt")

    name_map = gguf.get_tensor_name_map(spec.gguf_arch, hp.n_layer)
    planned: list[tuple[str, np.ndarray, np.ndarray]] = []
    warnings: list[str] = []
    ranks: set[int] = set()
    kinds: set[str] = set()
    for module in sorted(pairs, key=_natural):
        ab = pairs[module]
        if "A" not in ab or "B" not in ab:
            raise ConvertError(f"{weights_file}: {module} has lora_{'A' if 'A' in ab else 'B'} but not "
                               f"lora_{'B' if 'A' in ab else 'A'} — the adapter is incomplete")
        a, b = ab["A"], ab["B"]
        base_name = module + ".weight"
        ref = base.refs.get(base_name)
        if ref is None:
            raise ConvertError(f"{weights_file}: adapts {module}, which the base model {base.path} has no weight "
                               "for — this adapter was trained on a different base")
        if base_name == spec.lm_head and hp.tied_embeddings:
            raise ConvertError(f"{weights_file}: adapts {module}, but the base ties it to the token embedding, which "
                               "llama.cpp cannot adapt separately — convert with merge=True")
        if len(ref.shape) != 2 or a.ndim != 2 or b.ndim != 2:
            raise ConvertError(f"{weights_file}: {module} is not a 2-D linear layer — convert with merge=True")
        n_out, n_in = ref.shape
        r = a.shape[0]
        if a.shape != (r, n_in) or b.shape != (n_out, r):
            raise ConvertError(f"{weights_file}: {module} has A {a.shape} and B {b.shape}, but the base weight is "
                               f"{ref.shape} — this adapter was trained on a different base")
        gname = name_map.get_name(base_name, try_suffixes=(".weight",))
        if gname is None:
            raise ConvertError(f"{weights_file}: {module} has no llama.cpp {spec.gguf_name} tensor — cannot adapt it")
        factor = acfg.scale_for(module, r) / (acfg.alpha / r)
        b = spec.rows(base_name, b, hp)
        if not math.isclose(factor, 1.0, rel_tol=1e-7):
            b = b * np.float32(factor)
        planned.append((gname, a, b))
        ranks.add(r)
        kinds.add(module.rsplit(".", 1)[-1])
    if acfg.use_rslora:
        warnings.append("rsLoRA scale alpha/sqrt(r) folded into lora_b")
    if acfg.alpha_pattern:
        warnings.append("per-module alpha_pattern folded into lora_b")

    qtype = LORA_OUTTYPES[outtype]
    np_type = np.float16 if qtype == _QT.F16 else np.float32
    gguf_log = logging.getLogger("gguf")
    old = gguf_log.level
    gguf_log.setLevel(logging.ERROR)
    try:
        with atomic_output(out) as tmp:
            w = gguf.GGUFWriter(tmp, spec.gguf_name)
            try:
                w.add_type(gguf.GGUFType.ADAPTER)
                w.add_string(gguf.Keys.Adapter.TYPE, "lora")
                w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, acfg.alpha)
                w.add_name(f"{folder.resolve().name} (LoRA of {hp.name})")
                for gname, a, b in planned:
                    w.add_tensor(gname + ".lora_a", np.ascontiguousarray(a, dtype=np_type))
                    w.add_tensor(gname + ".lora_b", np.ascontiguousarray(b, dtype=np_type))
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_tensors_to_file()
            finally:
                w.close()
            if base_gguf is not None:
                gguf_info.validate_adapter(tmp, gguf_info.validate_model(base_gguf))
            else:
                gguf_info.read_gguf(tmp)
            if progress is not None:
                size = tmp.stat().st_size
                progress(size, size, "adapter")
    finally:
        gguf_log.setLevel(old)
    return LoraReport(
        path=out,
        architecture=spec.hf_name,
        outtype=outtype,
        alpha=acfg.alpha,
        ranks=sorted(ranks),
        n_modules=len(planned),
        modules=sorted(kinds),
        file_size=out.stat().st_size,
        seconds=time.perf_counter() - t0,
        warnings=warnings,
    )


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# Files of an HF folder that are weights or describe weights; everything else (tokenizer,
# chat template, generation config) is copied next to a merged model.
_WEIGHT_FILES = re.compile(r"^(model.*\.safetensors|pytorch_model.*\.bin|.*\.index\.json|config\.json)$")


def merge_lora(
    peft_dir: str | os.PathLike[str],
    base_hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = "f16",
    *,
    progress: Progress | None = None,
) -> ConvertReport:
    """Fold the adapter into the base weights (peft merge_and_unload) and convert the merged model.

    For adapters llama.cpp cannot apply at run time (DoRA, trained biases,
    modules_to_save), or to run one stage without adapter swapping.
    """
    out = output_path(out_path)
    folder = Path(peft_dir).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise ConvertError(f"{folder}: not a PEFT adapter folder (no adapter_config.json) — "
                           "pass the folder PeftModel.save_pretrained() wrote")
    base = open_checkpoint(base_hf_dir, what="base model")
    arch_for(base.config, base.path)  # fail fast on an unsupported base, before loading torch
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise ConvertError(f"merge_lora (merge=True) needs torch, transformers and peft ({exc.name} is missing) — "
                           "pip install 'edge-fslm[train]'") from None
    for name in ("transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    except Exception as exc:  # peft/transformers raise many kinds for a mismatched adapter
        raise ConvertError(f"{folder}: peft could not merge it into {base.path} "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}) — is it an adapter of this base?") from None
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=out.parent) as td:
        model.save_pretrained(td)
        del model
        for f in base.path.iterdir():
            if f.is_file() and not _WEIGHT_FILES.match(f.name):
                shutil.copy2(f, Path(td) / f.name)
        return convert_hf(td, out, outtype, name=f"{base.path.resolve().name} + {folder.resolve().name}", progress=progress)
