"""A GGUF back into a float Hugging Face checkpoint, dequantized by transformers' GGUF loader.

    from edge_fslm.convert import SMOLLM2_PRE_TOKENIZER, dequantize_to_hf

    dequantize_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf/", pre_tokenizer=SMOLLM2_PRE_TOKENIZER)

Fine-tuning needs it (LoRA trains on exactly the weights llama.cpp will run, and the LoRA
converter maps the adapter onto an HF checkpoint), and so do the tests and benchmarks that
convert SmolLM2, whose only weights here ship as a quantized GGUF.  Needs the train extra
(torch, transformers); callers quiet transformers' logging as they see fit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .common import ConvertError

__all__ = ["SMOLLM2_PRE_TOKENIZER", "dequantize_to_hf"]

#: SmolLM2's real pre-tokenizer (llama.cpp calls it "smollm"): digits split one by one before the
#: byte-level step.  transformers' GGUF loader rebuilds a plain byte-level one and drops the Digits step.
SMOLLM2_PRE_TOKENIZER: dict[str, Any] = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
]}


def dequantize_to_hf(
    gguf_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    weights: bool = True,
    tokenizer: bool | str | os.PathLike[str] = True,
    pre_tokenizer: dict[str, Any] | None = None,
) -> Path:
    """Write the GGUF as an fp32 HF checkpoint folder ``out``; return ``out``.

    ``weights``: the model (config, generation config, safetensors), dequantized.  ``tokenizer``:
    True saves the GGUF's tokenizer as transformers rebuilds it, a folder saves the HF tokenizer in
    that folder instead, False saves none.  ``pre_tokenizer`` (a tokenizer.json ``pre_tokenizer``
    object, e.g. :data:`SMOLLM2_PRE_TOKENIZER`) replaces the one transformers rebuilt from the GGUF.

    The folder is written as ``out.partial`` and renamed, so ``out`` is complete or absent; an
    ``out`` that is already complete is returned as it is.
    """
    gguf_path, out = Path(gguf_path), Path(out)
    if not weights and tokenizer is False:
        raise ConvertError("dequantize_to_hf: nothing to write — pass weights=True or a tokenizer")
    if pre_tokenizer is not None and tokenizer is not True:
        raise ConvertError("dequantize_to_hf: pre_tokenizer applies to the GGUF's own tokenizer (tokenizer=True)")
    wanted = (["config.json"] if weights else []) + (["tokenizer_config.json"] if tokenizer is not False else [])
    if out.exists():
        if all((out / name).is_file() for name in wanted):
            return out
        raise ConvertError(f"{out}: exists but is not a complete checkpoint — delete it or choose another folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if weights:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        del model
    if tokenizer is True:
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)
        if pre_tokenizer is not None:
            tj_path = tmp / "tokenizer.json"
            tj = json.loads(tj_path.read_text(encoding="utf-8"))
            tj["pre_tokenizer"] = pre_tokenizer
            tj_path.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    elif tokenizer is not False:
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(tmp)
    tmp.rename(out)
    return out
