"""Batch invariance probe: is one sequence's logit vector the same alone and in a batch of N?

The question behind exact ``--parallel`` decoding. One model, two llama.cpp contexts:

* *alone*: one sequence, decoded one token a step, as the sequential path decodes;
* *batched*: ``--width`` sequences in separate KV streams (``kv_unified = false``, as
  edge_fslm/parallel.py opens them), each prompt decoded in a decode of its own, then one
  token for every sequence per step.

Sequence 0 gets the same prompt and, step by step, the same tokens in both (teacher-forced
from the alone run), so its logits can be compared bit for bit at every step. The other
sequences get prompts of other lengths (``--others different``) or the same prompt
(``--others same``). With ``--ops``, a graph callback records every tensor whose rows are
the batch's tokens, and the first one whose row for sequence 0 differs names the op.

Each configuration runs in a fresh process, since llama.cpp reads its environment switches
once: ``GGML_CPU_TILED_MM=0`` (no tiled K-quant matmul), repacked weights off
(``use_extra_bufts``), flash attention on or off, an adapter or none.

    python benchmarks/batch_invariance.py [--width 16] [--steps 48] [--ops] [--other-build DIR]
    python benchmarks/batch_invariance.py --model gemma     # a K-quant file: Gemma 3 270M Q4_K_M

``--model`` takes ``gemma`` (the Gemma 3 270M Q4_K_M package), a model source
(``chunks://qwen2.5-coder-1.5b-instruct``, ``pkg://...``) or a path; with another model than
SmolLM2 no adapter is used, and the results go to ``batch_invariance_<model>.json``. The probe
text is the same ChatML text for every model: identity does not need the model's own markup.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

from common import gemma_path, smollm2_path, table, write_result

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = ROOT / "edge_fslm" / "stacks" / "fslm-smollm2" / "answer.gguf"

BASE_TEXT = ("Photosynthesis turns light into chemical energy stored in sugar. Plants, algae and some "
             "bacteria do it, and nearly every food web rests on them. ")


def prompts(width: int, others: str, reps: int = 8) -> list[str]:
    """Sequence 0's prompt (``reps`` 8) sits past llama.cpp's 256-cell KV padding, where a lone
    sequence's attention takes another kernel; the others are shorter and longer, so a step
    holds sequences at different lengths."""
    def chat(reps: int) -> str:
        return ("<|im_start|>system\nAnswer in a short paragraph.<|im_end|>\n<|im_start|>user\n"
                + BASE_TEXT * reps + "Why do food webs depend on plants?<|im_end|>\n<|im_start|>assistant\n")
    if others == "same":
        return [chat(reps)] * width
    return [chat(reps)] + [chat(1 + (3 * i) % 14) for i in range(1, width)]


# --- the child: one configuration ---------------------------------------------------------------

class GGMLTensor(ctypes.Structure):
    """ggml.h's ``struct ggml_tensor`` (GGML_MAX_DIMS 4, GGML_MAX_SRC 10, 64-byte op params and name)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


class Recorder:
    """A ``cb_eval`` that keeps, for every F32 tensor with one row per batch token, the row of
    the batch's first token (sequence 0), in graph order."""

    def __init__(self, lc) -> None:
        base = Path(lc.__file__).parent / "lib" / "libggml-base.so"
        ggml = ctypes.CDLL(str(base))
        ggml.ggml_op_desc.restype = ctypes.c_char_p
        ggml.ggml_op_desc.argtypes = [ctypes.c_void_p]
        self.rows: list[tuple[str, bytes]] = []
        self.n_tokens = 1
        self.on = False

        @lc.ggml_backend_sched_eval_callback
        def cb(t, ask, user_data):
            if ask:
                return True
            if not self.on:
                return True
            x = ctypes.cast(t, ctypes.POINTER(GGMLTensor)).contents
            if (x.type == 0 and x.ne[1] == self.n_tokens and x.ne[2] == 1 and x.ne[3] == 1
                    and x.nb[0] == 4 and x.data):
                self.rows.append((self.label(t, 3), ctypes.string_at(x.data, 4 * x.ne[0])))
            return True

        self.cb = cb
        self.ggml = ggml

    def label(self, t, depth: int) -> str:
        """A tensor's name, or for llama.cpp's unnamed nodes (``node_N``, numbered per graph, so
        not comparable across graphs) its op over its sources' labels."""
        x = ctypes.cast(t, ctypes.POINTER(GGMLTensor)).contents
        name = x.name.decode(errors="replace")
        if not name.startswith("node_") or depth == 0:
            return name
        srcs = [self.label(x.src[i], depth - 1) for i in range(2) if x.src[i]]
        return f"{self.ggml.ggml_op_desc(t).decode()}({', '.join(srcs)})"


def child(cfg: dict) -> dict:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from edge_fslm import llama

    lc = llama.lib()
    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = cfg["repack"]
    model = lc.llama_model_load_from_file(cfg["model"].encode(), mp)
    vocab = lc.llama_model_get_vocab(model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    adapter = lc.llama_adapter_lora_init(model, cfg["adapter"].encode()) if cfg["adapter"] else None

    def tokenize(text: str) -> list[int]:
        raw = text.encode()
        buf = (ctypes.c_int32 * (len(raw) + 8))()
        n = lc.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, True)
        return list(buf[:n])

    width, steps, cells = cfg["width"], cfg["steps"], 1024
    recorders = {}

    def context(n_seq: int, name: str):
        p = lc.llama_context_default_params()
        p.n_ctx = n_seq * cells
        p.n_batch = p.n_ubatch = 512
        p.n_seq_max = n_seq
        p.kv_unified = False
        p.n_threads = p.n_threads_batch = cfg["threads"]
        p.type_k = p.type_v = llama.GGML_TYPES["f16"]
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if cfg["flash_attn"] else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if cfg["ops"]:
            rec = recorders[name] = Recorder(lc)
            p.cb_eval = rec.cb
            p.cb_eval_user_data = None
        ctx = lc.llama_init_from_model(model, p)
        llama.set_adapter(ctx, adapter, 1.0)  # None: no adapter
        return ctx

    alone, batched = context(1, "alone"), context(width, "batched")
    toks = [tokenize(p) for p in prompts(width, cfg["others"], cfg["reps"])]
    batch = llama.Batch(512, width)

    def logits(ctx, i: int):
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()

    def prefill(ctx, seq: int, t: list[int]):
        for start in range(0, len(t), 512):
            for p in range(start, min(start + 512, len(t))):
                idx = batch.add(t[p], p, (seq,), p == len(t) - 1)
            batch.decode(ctx, "probe")
        return logits(ctx, idx)

    la = prefill(alone, 0, toks[0])
    lb = [prefill(batched, s, t) for s, t in enumerate(toks)]
    pos = [len(t) for t in toks]
    nxt = [int(np.argmax(x)) for x in lb]
    nxt[0] = int(np.argmax(la))
    per_step = [float(np.max(np.abs(la - lb[0])))]
    first_op = None
    for step in range(steps):
        for name, rec in recorders.items():
            rec.rows, rec.on = [], True
            rec.n_tokens = 1 if name == "alone" else width
        batch.add(nxt[0], pos[0], (0,), True)
        batch.decode(alone, "probe")
        la = logits(alone, 0)
        for s in range(width):
            batch.add(nxt[s], pos[s], (s,), True)
        batch.decode(batched, "probe")
        lb = [logits(batched, s) for s in range(width)]
        diff = float(np.max(np.abs(la - lb[0])))
        per_step.append(diff)
        if recorders and first_op is None:  # the first step where any recorded row differs
            # align by name, in graph order: a tensor whose second dimension is 1 alone may be
            # recorded in one graph only (a broadcast), so the two lists need not zip; and a label
            # may name tensors of several widths (Gemma's heads and rows), so the width is in the key
            later: dict[tuple[str, int], list[bytes]] = {}
            for nb, xb in recorders["batched"].rows:
                later.setdefault((nb, len(xb)), []).append(xb)
            for na, xa in recorders["alone"].rows:
                if not later.get((na, len(xa))):
                    continue
                xb = later[(na, len(xa))].pop(0)
                if xa != xb:
                    a, b = np.frombuffer(xa, np.float32), np.frombuffer(xb, np.float32)
                    first_op = {"step": step + 1, "tensor": na, "max_abs_diff": float(np.max(np.abs(a - b))),
                                "logits_differ": diff > 0}
                    break
        pos = [p + 1 for p in pos]
        nxt = [int(np.argmax(x)) for x in lb]
        nxt[0] = int(np.argmax(la))
    for rec in recorders.values():
        rec.on = False
    speed = None if cfg["ops"] else single_speed(lc, alone, batch, toks[0], repeats=cfg["repeats"])
    batch.close()
    lc.llama_free(alone)
    lc.llama_free(batched)
    return {"system_info": llama.system_info(), "prompt_tokens": len(toks[0]),
            "first_step_differs": next((i for i, d in enumerate(per_step) if d > 0), None),
            "steps_identical": sum(d == 0 for d in per_step), "steps": len(per_step),
            "max_abs_diff": max(per_step), "per_step": per_step, "first_op": first_op, "speed": speed}


def single_speed(lc, ctx, batch, prompt: list[int], gen: int = 64, repeats: int = 3) -> dict:
    """What a configuration costs one sequence: prompt and generation tokens/s, median of ``repeats``."""
    import statistics
    import time

    pp, tg = [], []
    mem = lc.llama_get_memory(ctx)
    for _ in range(repeats):
        lc.llama_memory_clear(mem, False)
        t0 = time.perf_counter()
        for p, t in enumerate(prompt):
            batch.add(t, p, (0,), p == len(prompt) - 1)
        batch.decode(ctx, "speed")
        t1 = time.perf_counter()
        for i in range(gen):
            batch.add(prompt[i % len(prompt)], len(prompt) + i, (0,), True)
            batch.decode(ctx, "speed")
        t2 = time.perf_counter()
        pp.append(len(prompt) / (t1 - t0))
        tg.append(gen / (t2 - t1))
    return {"prompt_tokens": len(prompt), "prompt_tok_s": statistics.median(pp), "gen_tokens": gen,
            "gen_tok_s": statistics.median(tg)}


# --- the parent: every configuration in its own process ----------------------------------------

def run(cfg: dict, env: dict[str, str]) -> dict:
    env = dict(env)
    if cfg.get("llama_cpp"):  # another build of llama-cpp-python, installed with pip --target
        env["PYTHONPATH"] = cfg["llama_cpp"] + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed: {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


CONFIGS = [
    # name, env, overrides; "this build" is the llama-cpp-python installed here (scripts/install.sh
    # builds it with -DGGML_LLAMAFILE=OFF), "other build" the one given with --other-build
    ("this build", {}, {}),
    ("others same length", {}, {"others": "same"}),
    ("sequence 0 under 256 tokens", {}, {"reps": 2}),
    ("no adapter", {}, {"adapter": ""}),
    ("flash attention off", {}, {"flash_attn": False}),
    ("flash attention off, no adapter", {}, {"flash_attn": False, "adapter": ""}),
    ("flash attention off, GGML_CPU_TILED_MM=0", {"GGML_CPU_TILED_MM": "0"}, {"flash_attn": False}),
    ("flash attention off, no repacked weights", {}, {"flash_attn": False, "repack": False}),
    ("flash attention off, no tiled matmul, no repacked weights", {"GGML_CPU_TILED_MM": "0"},
     {"flash_attn": False, "repack": False}),
    ("other build", {}, {"build": "other"}),
    ("other build, flash attention off", {}, {"build": "other", "flash_attn": False}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="single-sequence speed: median of this many")
    ap.add_argument("--model", help="gemma, a model source or a path (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--adapter", help="a LoRA adapter GGUF (default: the answer adapter on SmolLM2, none on another model)")
    ap.add_argument("--ops", action="store_true", help="name the first tensor that differs (slower)")
    ap.add_argument("--only", help="configuration names, separated by ;")
    ap.add_argument("--other-build", metavar="DIR",
                    help="another llama-cpp-python (for example one built with llamafile), from pip install --target DIR")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    model, label = resolve_model(a.model)
    adapter = a.adapter if a.adapter is not None else str(ADAPTER) if label == "smollm2" else ""
    base = {"model": str(model), "width": a.width, "steps": a.steps, "threads": a.threads, "adapter": adapter,
            "others": "different",
            "flash_attn": True, "repack": True, "ops": a.ops, "reps": 8, "repeats": a.repeats}
    results = {}
    rows = []
    for name, env, over in CONFIGS:
        if a.only and name not in a.only.split(";"):
            continue
        if "adapter" in over and not adapter:
            continue  # the same as the configuration without the word "no adapter"
        if over.get("build") and not a.other_build:
            continue
        if over.get("build"):
            over = {**over, "llama_cpp": a.other_build}
        r = results[name] = {"env": env, "config": {**base, **over}, **run({**base, **over}, env)}
        op = r["first_op"] or {}
        sp = r["speed"] or {}
        rows.append([name, f"{r['steps_identical']}/{r['steps']}", r["first_step_differs"], f"{r['max_abs_diff']:.3g}",
                     f"{sp['prompt_tok_s']:.0f}" if sp else "-", f"{sp['gen_tok_s']:.0f}" if sp else "-",
                     op.get("tensor", "-") if a.ops else "-"])
        print(rows[-1], flush=True)
    print(table(rows, ["configuration", "identical steps", "first differing step", "max |Δlogit|",
                       "prompt tok/s", "gen tok/s", "first op"]))
    ref = results.get("this build", {}).get("speed")
    if ref:
        print("\nspeed against this build, flash attention on (ratios, same run):")
        print(table([[n, f"{r['speed']['prompt_tok_s'] / ref['prompt_tok_s']:.2f}x",
                      f"{r['speed']['gen_tok_s'] / ref['gen_tok_s']:.2f}x"] for n, r in results.items() if r["speed"]],
                    ["configuration", "prompt", "generation"]))
    # the op search slows every step (a callback per tensor), so it has its own results file
    name = "batch_invariance" + ("_ops" if a.ops else "") + ("" if label == "smollm2" else f"_{label}")
    write_result(name, {"model": str(model), "width": a.width, "steps": a.steps, "results": results})


def resolve_model(spec: str | None) -> tuple[Path, str]:
    """The model file to probe and a short name for its results file."""
    if spec is None:
        return smollm2_path(), "smollm2"
    if spec == "gemma":
        return gemma_path(), "gemma"
    sys.path.insert(0, str(ROOT))
    from edge_fslm import sources

    path = sources.resolve(spec, base_dir=Path.cwd(), allow_absolute=True, confine=False)
    return path, "".join(c if c.isalnum() else "-" for c in path.stem.lower())


if __name__ == "__main__":
    main()
