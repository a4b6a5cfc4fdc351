"""What each quant type costs on SmolLM2-135M: perplexity, KL vs f16, file size, speed.

Baseline, built in the same run: the only SmolLM2 weights on this machine ship as a Q4_1
GGUF, so the "F16" model is that file dequantized by transformers and converted back with
``edge_fslm.convert`` (f16). Every other type is quantized from that F16 file with
``edge_fslm.convert.quantize``. The numbers are therefore the cost of each type relative to
that F16 model, not to the original bf16 training checkpoint (which is not available offline).
Two more rows say how faithful that reference is: ``F32``, the same dequantized checkpoint
converted to f32 (the shipped Q4_1 weights exactly, so a second reference, "KL vs F32"), and
``Q4_1 (shipped)``, the packaged file itself. Each requantized type's KL vs F32 is what
switching the runtime from the shipped file to that type costs.

Held-out text: the LAST 500 rows of alpaca_5000.json are the held-out set (no other rows are
ever read for scoring); the first ``--examples`` (50) of them are scored. Each example is
rendered with the model's own chat template (instruction + input as the user turn) and only
the assistant's output tokens (and its closing <|im_end|>) are scored:

* perplexity: exp(mean negative log-likelihood of those tokens);
* KL: mean over those positions of KL(p_F16 || p_type) of the next-token distributions (and
  KL(p_F32 || p_type) when F32 is among the types);
* speed: prompt tokens/s (one 128-token prompt, best of 3) and generation tokens/s
  (64 greedy tokens after it, best of 2), each type loaded alone.

    python benchmarks/quant_quality.py [--types F32,Q8_0,Q4_K_M,IQ4_NL] [--examples 50] [--threads 2]

Needs the train extra (torch + transformers) once, to dequantize the GGUF; the work folder
(``--work-dir``, default ~/.cache/edge-fslm/quant-quality) keeps the checkpoint between runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from common import smollm2_path, table, write_result

from edge_fslm.convert import SMOLLM2_PRE_TOKENIZER, convert_hf, dequantize_to_hf, quantize
from edge_fslm.gguf_info import validate_model

TYPES = ["F16", "F32", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_1", "IQ4_NL", "Q4_0", "Q3_K_M", "Q2_K"]
SHIPPED = "Q4_1 (shipped)"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"
HELD_OUT = 500


def build_float(work: Path, outtype: str = "f16") -> Path:
    """SmolLM2 as an fp32 HF checkpoint (dequantized from the packaged GGUF), converted to ``outtype``."""
    out = work / f"smollm2.{outtype.upper()}.gguf"
    if out.is_file():
        return out
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    hf = work / "smollm2-hf"
    if not (hf / "config.json").is_file():
        hf = dequantize_to_hf(smollm2_path(), hf, pre_tokenizer=SMOLLM2_PRE_TOKENIZER)
    convert_hf(hf, out, outtype)
    return out


def build_f16(work: Path) -> Path:
    """The F16 file every other type is quantized from."""
    return build_float(work, "f16")


def held_out_examples(n: int) -> list[dict]:
    rows = json.loads(DATA.read_text(encoding="utf-8"))
    held = rows[-HELD_OUT:]  # the held-out set; rows before it are never scored
    return held[:n]


def render(template: str, example: dict) -> tuple[str, str]:
    """(prompt up to the assistant turn, the text to score) with the model's own chat template."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    user = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    prompt = env.from_string(template).render(messages=[{"role": "user", "content": user}],
                                              add_generation_prompt=True)
    return prompt, example["output"] + "<|im_end|>"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def quality(paths: dict[str, Path], examples: list[dict], threads: int) -> tuple[dict[str, dict], list[int]]:
    """Perplexity and KL vs F16 for every type (models run in lockstep per example), and the speed prompt."""
    import llama_cpp

    models = {q: llama_cpp.Llama(str(p), n_ctx=1024, n_batch=512, logits_all=True, verbose=False,
                                 n_threads=threads, n_threads_batch=threads) for q, p in paths.items()}
    template = validate_model(paths["F16"]).chat_template or ""
    nll = {q: 0.0 for q in paths}
    kl = {q: 0.0 for q in paths}
    kl32 = {q: 0.0 for q in paths}
    n_tokens = 0
    skipped = 0
    base = models["F16"]
    for ex in examples:
        prompt, answer = render(template, ex)
        p_ids = base.tokenize(prompt.encode(), add_bos=True, special=True)
        ids = base.tokenize((prompt + answer).encode(), add_bos=True, special=True)
        if len(ids) > 1024 or ids[: len(p_ids)] != p_ids:
            skipped += 1
            continue
        start = len(p_ids)  # first scored token
        targets = np.array(ids[start:])
        refs: dict[str, np.ndarray] = {}
        for q, llm in models.items():  # F16 first, then F32 if present: the references
            llm.reset()
            llm.eval(ids)
            logp = log_softmax(np.array(llm.scores[start - 1: len(ids) - 1]))
            nll[q] -= float(logp[np.arange(len(targets)), targets].sum())
            if q in ("F16", "F32"):
                refs[q] = logp
            if q != "F16":
                kl[q] += float((np.exp(refs["F16"]) * (refs["F16"] - logp)).sum())
            if "F32" in refs and q != "F32":
                kl32[q] += float((np.exp(refs["F32"]) * (refs["F32"] - logp)).sum())
        n_tokens += len(targets)
    text = " ".join(e["output"] for e in examples)
    prompt_ids = base.tokenize(text.encode(), add_bos=False, special=False)[:128]
    for llm in models.values():
        llm.close()
    return {q: {"ppl": math.exp(nll[q] / n_tokens), "mean_kl": kl[q] / n_tokens,
                "mean_kl_f32": kl32[q] / n_tokens if "F32" in paths else None,
                "scored_tokens": n_tokens, "skipped_examples": skipped} for q in paths}, prompt_ids


def speed(path: Path, prompt_ids: list[int], threads: int, gen: int = 64) -> tuple[float, float]:
    import llama_cpp

    from edge_fslm import llama

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, verbose=False, n_threads=threads,
                          n_threads_batch=threads)
    try:
        n_vocab = llama_cpp.llama_n_vocab(llama_cpp.llama_model_get_vocab(llm._model.model))
        best_prompt = math.inf
        for _ in range(3):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt_ids)
            best_prompt = min(best_prompt, time.perf_counter() - t0)
        best_gen = math.inf
        for _ in range(2):
            llm.reset()
            llm.eval(prompt_ids)
            t0 = time.perf_counter()
            for _ in range(gen):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.context_ptr(llm), -1), shape=(n_vocab,))
                llm.eval([int(logits.argmax())])
            best_gen = min(best_gen, time.perf_counter() - t0)
        return len(prompt_ids) / best_prompt, gen / best_gen
    finally:
        llm.close()


def _kl_f32(row: dict) -> str:
    return "" if row["mean_kl_f32"] is None else f"{row['mean_kl_f32']:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated quant types (F16 is always included)")
    ap.add_argument("--examples", type=int, default=50)
    ap.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "edge-fslm" / "quant-quality")
    args = ap.parse_args()
    if args.examples > HELD_OUT:
        sys.exit(f"--examples: at most {HELD_OUT} (the held-out rows)")
    asked = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    # the references first (quality() reads them before the rest), then the shipped file
    types = ["F16"] + (["F32"] if "F32" in asked else []) + [SHIPPED] + [t for t in asked if t not in ("F16", "F32")]
    args.work_dir.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    f16 = build_f16(args.work_dir)
    paths = {"F16": f16}
    quant_seconds = {"F16": 0.0}
    fallbacks = {"F16": 0}
    if "F32" in types:
        paths["F32"], quant_seconds["F32"], fallbacks["F32"] = build_float(args.work_dir, "f32"), 0.0, 0
    paths[SHIPPED], quant_seconds[SHIPPED], fallbacks[SHIPPED] = smollm2_path(), 0.0, 0
    for q in types[len(paths):]:
        out = args.work_dir / f"smollm2.{q}.gguf"
        rep = quantize(f16, out, q, threads=args.threads)
        paths[q], quant_seconds[q], fallbacks[q] = out, rep.seconds, len(rep.fallbacks)

    examples = held_out_examples(args.examples)
    qual, prompt_ids = quality(paths, examples, args.threads)

    rows = []
    n_params = validate_model(f16).n_params
    for q in types:
        size = paths[q].stat().st_size
        p_tps, g_tps = speed(paths[q], prompt_ids, args.threads)
        rows.append({"qtype": q, "file_size": size, "bits_per_weight": 8 * size / n_params,
                     "ppl": qual[q]["ppl"], "mean_kl": qual[q]["mean_kl"], "mean_kl_f32": qual[q]["mean_kl_f32"],
                     "prompt_tps": p_tps, "gen_tps": g_tps,
                     "quantize_seconds": quant_seconds[q], "fallback_tensors": fallbacks[q]})
    base = rows[0]
    path = write_result("quant_quality", {
        "model": "SmolLM2-135M-Instruct, dequantized from the packaged Q4_1 GGUF, converted to F16 (and F32); "
                 "the packaged file itself as 'Q4_1 (shipped)'",
        "data": {"file": DATA.name, "held_out": f"last {HELD_OUT} rows", "examples": len(examples),
                 "scored_tokens": qual["F16"]["scored_tokens"], "skipped_examples": qual["F16"]["skipped_examples"]},
        "threads": args.threads,
        "results": rows,
        "seconds": time.perf_counter() - t_start,
    })
    print(table([[r["qtype"], f"{r['file_size'] / 1e6:.1f}", f"{r['bits_per_weight']:.2f}", f"{r['ppl']:.3f}",
                  f"{r['mean_kl']:.4f}", _kl_f32(r), f"{r['prompt_tps']:.0f}", f"{r['gen_tps']:.1f}", r["fallback_tensors"]]
                 for r in rows],
                ["type", "MB", "bits/w", "PPL", "KL vs F16", "KL vs F32", "prompt tok/s", "gen tok/s", "fallbacks"]))
    print(f"\n{len(examples)} held-out Alpaca outputs ({qual['F16']['scored_tokens']} tokens), "
          f"{args.threads} threads; results in {path}")
    print("ratios vs F16:")
    print(table([[r["qtype"], f"{r['file_size'] / base['file_size']:.2f}x", f"{r['ppl'] / base['ppl']:.3f}x",
                  f"{r['prompt_tps'] / base['prompt_tps']:.2f}x", f"{r['gen_tps'] / base['gen_tps']:.2f}x"]
                 for r in rows], ["type", "size", "PPL", "prompt speed", "gen speed"]))


if __name__ == "__main__":
    main()
