"""Conversion: HF checkpoint -> GGUF, PEFT LoRA -> GGUF, quantization, stack builds, GGUF -> HF checkpoint.

    from edge_fslm.convert import convert_hf, convert_lora, quantize, build_stack

    convert_hf("SmolLM2-135M-Instruct/", "smollm2.f16.gguf", outtype="f16")
    quantize("smollm2.f16.gguf", "smollm2.Q4_K_M.gguf", "Q4_K_M")
    convert_lora("adapters/keywords/", "SmolLM2-135M-Instruct/", "keywords.gguf")
    build_stack("source.toml", "pi4-2gb", "build/pi4/")

Installed as ``edge_fslm.convert``.  Most names are imported lazily, so importing
one piece (``profiles`` needs the quant type table) does not load the rest.
"""

from __future__ import annotations

from typing import Any

# Eager: the submodule is also called ``quantize``, and a lazily exported function would be
# shadowed by the submodule as soon as anything imported ``edge_fslm.convert.quantize``.
from .quantize import QUANT_TYPES, QuantizeReport, quantize

__all__ = [
    "ConvertError",
    "convert_hf",
    "ConvertReport",
    "SUPPORTED_ARCHITECTURES",
    "convert_lora",
    "merge_lora",
    "LoraReport",
    "quantize",
    "QuantizeReport",
    "QUANT_TYPES",
    "build_stack",
    "BuildReport",
    "dequantize_to_hf",
    "SMOLLM2_PRE_TOKENIZER",
]

_WHERE = {
    "ConvertError": "common",
    "convert_hf": "hf_to_gguf",
    "ConvertReport": "hf_to_gguf",
    "SUPPORTED_ARCHITECTURES": "hf_to_gguf",
    "convert_lora": "lora_to_gguf",
    "merge_lora": "lora_to_gguf",
    "LoraReport": "lora_to_gguf",
    "build_stack": "build",
    "BuildReport": "build",
    "dequantize_to_hf": "gguf_to_hf",
    "SMOLLM2_PRE_TOKENIZER": "gguf_to_hf",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f".{mod}", __name__), name)
