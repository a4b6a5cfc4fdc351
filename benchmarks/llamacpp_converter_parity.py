"""Our HF -> GGUF converter against llama.cpp's own convert_hf_to_gguf.py, on the same checkpoints.

The reference is llama.cpp's converter exactly as vendored in the llama-cpp-python sdist on PyPI
(``--version``, default 0.3.36, the runtime this project pins): the script fetches it with
``pip download --no-binary :all:`` into ``--cache-dir`` once, checks its sha256, and runs
``vendor/llama.cpp/convert_hf_to_gguf.py`` with the vendored ``gguf-py`` on PYTHONPATH.

Checkpoints (both built offline and cached in ``--work-dir``):

* ``SmolLM2-135M-Instruct``: the real model, dequantized to fp32 by transformers from the
  packaged Q4_1 GGUF (``edge_fslm.train.finetune.hf_base``), with its real tokenizer (digits split:
  llama.cpp's "smollm" pre-tokenizer);
* ``tiny-llama-gqa``: a random 2-layer Llama with what SmolLM2 does not have: an untied output
  matrix, grouped-query attention with 4 query / 2 kv heads and a head_dim (32) that is not
  hidden_size / heads (16). Same tokenizer (llama.cpp's converter only accepts tokenizers whose
  hash it knows).

For each checkpoint and ``--outtypes`` (f32, f16, bf16, q8_0) both converters write a file, and
the files are compared:

* tensor by tensor (gguf-py's reader): names, shapes, ggml types, whether the stored bytes are
  identical, and the max |difference| of the dequantized values;
* every KV metadata key: present in one file only, or present in both with different values.
  Naming keys (general.name, basename, finetune) are expected to differ: each converter derives
  them its own way. Anything else counts as a parity failure, except ``tokenizer.ggml.add_eos_token
  = false``, which we write explicitly and llama.cpp leaves to its default (false for BPE vocabs);
* logits in llama.cpp (llama-cpp-python, F32 KV cache, every position) on 20 prompts that stress
  the tokenizer: llama.cpp's tokenization of each prompt with either file, max |delta logit| over
  every position and over the next-token position, and top-1 agreement. Target: 1e-3.

    python benchmarks/llamacpp_converter_parity.py [--outtypes f32,f16,bf16,q8_0] [--threads 1] [--keep]

Exits 1 when any comparison fails. Needs the train extra (torch, transformers) and
sentencepiece, which llama.cpp's Llama converter imports even for BPE tokenizers.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import smollm2_path, table, write_result  # noqa: E402

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

# The conversion tests' 20 prompts: digits, runs of spaces, newlines, tabs, accents, CJK, emoji
# and the chat template's special tokens.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_convert_common import PROMPTS, llama_logits  # noqa: E402

_SMOLLM2_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
]}


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
    out = work / "smollm2-tokenizer"
    if not (out / "tokenizer.json").is_file():
        _quiet_hf()
        from transformers import AutoTokenizer

        g = smollm2_path()
        tmp = work / "smollm2-tokenizer.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name).save_pretrained(tmp)
        tj = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
        tj["pre_tokenizer"] = _SMOLLM2_PRE  # transformers' GGUF loader drops the Digits step
        (tmp / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        tmp.rename(out)
    return out


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


# --------------------------------------------------------------------------- the run


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("llama-cpp-python", "gguf", "transformers", "torch", "numpy", "safetensors", "sentencepiece"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outtypes", default=",".join(OUTTYPES), help="comma-separated: f32, f16, bf16, q8_0")
    ap.add_argument("--version", default=VERSION, help="llama-cpp-python sdist whose converter is the reference")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads for the logits")
    ap.add_argument("--cache-dir", type=Path, default=CACHE / "llamacpp-converter",
                    help="where the sdist and the extracted converter are kept")
    ap.add_argument("--work-dir", type=Path, default=CACHE / "converter-parity",
                    help="HF checkpoints (kept) and converted files (deleted after comparing unless --keep)")
    ap.add_argument("--checkpoints", default="smollm2,tiny-llama-gqa")
    ap.add_argument("--keep", action="store_true", help="keep the converted files (work-dir/gguf, ~2.5 GB)")
    args = ap.parse_args()
    outtypes = [t.strip() for t in args.outtypes.split(",") if t.strip()]
    bad = [t for t in outtypes if t not in OUTTYPES]
    if bad:
        print(f"error: unknown outtype {bad[0]!r}; choose from {', '.join(OUTTYPES)}", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    try:
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            raise ParityError("llama.cpp's Llama converter imports sentencepiece: pip install sentencepiece") from None
        conv = fetch_converter(args.version, args.cache_dir)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        builders = {"smollm2": smollm2_checkpoint, "tiny-llama-gqa": tiny_llama_checkpoint}
        checkpoints = {name: builders[name](args.work_dir) for name in args.checkpoints.split(",")}
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from edge_fslm.convert import convert_hf

    out_dir = args.work_dir / "gguf"
    out_dir.mkdir(exist_ok=True)
    rows = []
    for name, hf_dir in checkpoints.items():
        for t in outtypes:
            ours, ref = out_dir / f"{name}.{t}.ours.gguf", out_dir / f"{name}.{t}.llamacpp.gguf"
            for p in (ours, ref):
                p.unlink(missing_ok=True)
            t0 = time.perf_counter()
            convert_hf(hf_dir, ours, t)
            ours_s = time.perf_counter() - t0
            try:
                ref_s = run_reference(conv["dir"], hf_dir, ref, t)
            except ParityError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            row = {"checkpoint": name, "outtype": t, "ours_seconds": ours_s, "llama_cpp_seconds": ref_s,
                   "file_size": [ours.stat().st_size, ref.stat().st_size],
                   "tensors": compare_tensors(ours, ref), "metadata": compare_kv(ours, ref),
                   "logits": compare_logits(ours, ref, args.threads)}
            tz, md_, lg = row["tensors"], row["metadata"], row["logits"]
            row["pass"] = (not tz["only_ours"] and not tz["only_llama_cpp"] and not tz["shape_or_type_mismatch"]
                           and tz["max_abs_diff"] == 0.0 and not md_["unexpected"]
                           and not lg["tokenization_mismatches"] and lg["max_abs_dlogit"] <= LOGIT_TARGET
                           and lg["top1_agree"] == lg["positions"])
            rows.append(row)
            if not args.keep:
                for p in (ours, ref):
                    p.unlink()
            print(f"{name} {t}: {tz['identical_bytes']}/{tz['n_tensors'][1]} tensors byte-identical, "
                  f"max|dlogit| {lg['max_abs_dlogit']:.3g}, unexpected keys {md_['unexpected'] or 'none'}",
                  file=sys.stderr, flush=True)

    path = write_result("llamacpp_converter_parity", {
        "reference": {k: (str(v) if isinstance(v, Path) else v) for k, v in conv.items() if k != "dir"}
        | {"version": args.version},
        "versions": _versions(),
        "checkpoints": {"smollm2": "SmolLM2-135M-Instruct, fp32, dequantized from the packaged Q4_1 GGUF",
                        "tiny-llama-gqa": "random 2-layer Llama: untied output, 4 q / 2 kv heads, head_dim 32, "
                                          "SmolLM2's tokenizer"},
        "logits": {"prompts": len(PROMPTS), "kv_cache": "F32", "threads": args.threads, "target": LOGIT_TARGET},
        "expected_differences": {"naming_keys": list(NAMING_KEYS), "explicit_defaults": EXPLICIT_DEFAULTS},
        "results": rows,
        "pass": all(r["pass"] for r in rows),
        "seconds": time.perf_counter() - t_start,
    })

    print(table([[r["checkpoint"], r["outtype"],
                  f"{r['tensors']['n_tensors'][0]}/{r['tensors']['n_tensors'][1]}",
                  f"{r['tensors']['identical_bytes']}/{r['tensors']['compared']}",
                  f"{r['tensors']['max_abs_diff']:.3g}",
                  ", ".join(list(r["metadata"]["only_ours"]) + list(r["metadata"]["differ"])) or "-",
                  ", ".join(r["metadata"]["only_llama_cpp"]) or "-",
                  len(r["logits"]["tokenization_mismatches"]),
                  f"{r['logits']['max_abs_dlogit']:.3g}", f"{r['logits']['max_abs_dlogit_next_token']:.3g}",
                  f"{r['logits']['top1_agree']}/{r['logits']['positions']}",
                  "yes" if r["pass"] else "NO"] for r in rows],
                ["checkpoint", "type", "tensors", "same bytes", "max|dw|", "keys ours only / differing",
                 "keys llama.cpp only", "tok diff", "max|dlogit|", "next-token", "top-1", "pass"]))
    print(f"\nreference: {conv['source']} (llama.cpp {str(conv['llama_cpp_commit'])[:10]}, gguf-py "
          f"{conv['gguf_py_version']}); {len(PROMPTS)} prompts, F32 KV cache; results in {path}")
    print("ratios, ours / llama.cpp's converter:")
    print(table([[r["checkpoint"], r["outtype"],
                  f"{r['file_size'][0] / r['file_size'][1]:.6f}x ({r['file_size'][0] - r['file_size'][1]:+d} B)",
                  "yes" if r["tensors"]["same_order"] else "no",
                  f"{r['ours_seconds'] / r['llama_cpp_seconds']:.2f}x "
                  f"({r['ours_seconds']:.1f} s vs {r['llama_cpp_seconds']:.1f} s)"] for r in rows],
                ["checkpoint", "type", "file size", "same tensor order",
                 "conversion time (theirs includes starting Python + importing torch)"]))
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
