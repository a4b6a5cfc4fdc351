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
import importlib.metadata as md
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_result  # noqa: E402

from edge_fslm.convert.llamacpp_parity import (  # noqa: E402
    CACHE, EXPLICIT_DEFAULTS, LOGIT_TARGET, NAMING_KEYS, OUTTYPES, PROMPTS, VERSION, ParityError, compare_kv,
    compare_logits, compare_tensors, fetch_converter, run_reference, smollm2_checkpoint, tiny_llama_checkpoint,
)

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
