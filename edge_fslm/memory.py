"""Memory footprints, budgets and residency plans, decided before anything is loaded.

What a budget bounds: the **peak resident set size (RSS) of the whole process**, as the
kernel counts it. That includes the Python interpreter and its imports, and
file-backed pages of mmap'd weights once they are touched (a forward pass touches them
all). It does not include the page cache, which the kernel can drop.

A loaded model costs, from GGUF metadata alone:

* weights: the sum of its tensor bytes (with or without mmap: every page is touched);
* KV cache: ``n_ctx × n_layer × (n_embd_k_gqa + n_embd_v_gqa) × 2`` bytes (f16 cache),
  all touched when llama.cpp clears it at load;
* compute: llama.cpp *reserves* a worst-case graph buffer (logits for a whole batch:
  ``n_ubatch × n_vocab × 4``, 98 MiB for SmolLM2), but with flash attention and one
  output row per step only a small, near-constant part is ever touched. We model the
  touched part as a per-model constant plus a term in ``n_ubatch × (n_embd + n_ff)``,
  calibrated against psutil/VmHWM measurements (see benchmarks/memory.py), plus the attention
  mask at the width of the whole context and a term per adapter switch;
* each LoRA adapter: its tensor bytes;
* the prefix cache: each stage's fixed prompt prefix saved as KV state (same bytes per
  token as the KV cache), estimated from the manifest's literal template text.

The baseline is the process's own RSS before loading (interpreter, numpy, llama_cpp).
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field

import psutil

from .errors import BudgetError
from .gguf_info import GGUFInfo
from .units import fmt_bytes  # noqa: F401  (callers import it from here too)

MiB = 1 << 20
# Calibrated on x86-64 Linux, llama.cpp via llama-cpp-python 0.3.36, flash attention on,
# from VmHWM peaks of single-stage runs (residual = peak - baseline - weights - KV):
#   SmolLM2-135M (vocab 49k):  24.8 MiB with a 16-token prompt, 38.6 MiB at 506 tokens (saturates at n_ubatch)
#   Gemma-3-270M (vocab 262k): 68.7 MiB with a 17-token prompt, 87.0 MiB at 507 tokens
# The fixed part grows with the vocabulary (llama.cpp's token tables, the sampler's arrays);
# the compute part with the tokens of one micro-batch. We predict the worst case (a full
# micro-batch), so the budget holds for any prompt. benchmarks/memory.py re-checks this.
# Long prompts, bare Llama, SmolLM2 at ctx 2048: growth over a 16-token eval 14.0 MiB at 512
# tokens, 15.0 at 2,040 (ctx 4096: 16.5 at 3,640); Gemma-3-270M 19.1 at 512, 20.2 at 1,840: the
# f16 mask. The default stack (4 adapters) with a 1,840-token prompt peaked 7.2 MiB over the plan
# before the mask and adapter-switch terms below; each switched-to stage grew 2.4-4.5 MiB beyond
# its adapter's bytes (the saved prefix is 1.2 of that), with short and long prompts alike.
MODEL_OVERHEAD = int(14.7 * MiB)
OVERHEAD_PER_VOCAB = 216  # bytes per vocabulary entry
COMPUTE_PER_UBATCH_DIM = 14  # bytes per n_ubatch × (n_embd + n_ff), touched by a full micro-batch
LLAMA_CPP_IMPORT = 9 * MiB  # what `import llama_cpp` adds to a process that has not done it
# Without flash attention llama.cpp fills a KQ score per micro-batch token, visible KV cell and
# head. SmolLM2 with 940-, 1,840- and 3,640-token prompts at ctx 2048 and 4096, peak above the same
# run with flash attention on: 3.7, 4.6 and 5.4 bytes per cell and head.
KQ_BYTES_PER_CELL_HEAD = 6
# Per KV cell, with flash attention on or off, llama.cpp fills the attention mask: one value per
# micro-batch token and visible cell (f16 with flash attention; its tiled scratch does not grow with
# the cells, and K/V are views of the cache). COMPUTE_PER_UBATCH_DIM was fit with one-micro-batch
# prompts, whose mask (n_ubatch cells wide) it already holds, so only the cells beyond that are added.
KQ_MASK_BYTES_PER_CELL = 2  # bytes per micro-batch token and KV cell beyond the first micro-batch
# llama_set_adapters_lora makes llama.cpp rebuild its scheduler and compute buffer (sched_reserve);
# the first micro-batch after each adapter switch touches fresh pages the plan otherwise misses.
# The default stack at ctx 512 and 2048, 45- to 1,840-token prompts: RSS after each stage past the
# first grew 1.4-2.9 MiB with one adapter held at a time, and 2.9-4.5 MiB beyond the adapter's own
# bytes with every adapter kept (each load leaves its own pages too).
ADAPTER_SWITCH_BYTES = 2 * MiB  # per stage that switches the adapter, past the first
ADAPTER_LOAD_BYTES = int(1.5 * MiB)  # per adapter kept loaded, beyond its tensors
# A base model evicted to make room for the next (policies "sequential" and "lru") leaves pages
# behind: llama.cpp's code its kernels touched (file-backed, another quant type's kernels are other
# pages) and anonymous mappings llama.cpp does not give back. SmolLM2-135M Q4_1 run with a
# context-filling prompt, then evicted before Gemma 3 270M Q4_K_M, x86-64 with AVX-512: RSS after
# the eviction stood 4.8 / 5.1 / 6.0 MiB above RSS before its load at ctx 512 / 2048 / 8192
# (2.6 MiB of it code pages), and Gemma's load then took 3.7 MiB more than in a fresh process
# while its run took 2.1 less: 7.6 MiB in all at ctx 8192. 200 load/evict cycles add nothing
# more, so it is once per model; 9 MiB leaves room for the run-to-run spread (about 0.5 MiB).
EVICTED_MODEL_BYTES = 9 * MiB  # per base model that can run and be evicted before the peak
# A prompt that fills the context lives in the process as Python token lists (the rendered
# prompt's, the cut one's, llama-cpp-python's input ids) beside the model's own buffers: Gemma 3
# at ctx 8192 peaked 0.4 MiB over its footprint, with the plan's baseline measured before them.
PROMPT_BYTES_PER_TOKEN = 96  # per context cell
# Prompt-lookup decoding (lookup.py) asks for logits at every guessed position, so llama.cpp's
# output buffer grows from one row of n_vocab floats to 1 + draft_max rows.
LOGITS_BYTES_PER_VOCAB = 4


def parse_budget(text: str | int | None, *, available: int | None = None) -> int | None:
    """'300MB', '1.5GiB', '512M', '40%' (of RAM available now), or bytes. None means no budget."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise BudgetError(f"budget {text}: must be positive")
        return text
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", s)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise BudgetError(f"budget {s}: a percentage must be between 0 and 100")
        avail = available if available is not None else psutil.virtual_memory().available
        return int(avail * pct / 100)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?", s, flags=re.IGNORECASE)
    if not m:
        raise BudgetError(f"budget {s!r}: expected a size like 300MB, 1.5GiB or 40% (of available RAM)")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    value = int(num * base ** "_KMGT".index(unit or "_")) if unit else int(num)
    if value <= 0:
        raise BudgetError(f"budget {s}: must be positive")
    return value


@dataclass(frozen=True)
class Footprint:
    """The predicted resident cost of one loaded base model (plus its adapters)."""

    model: str
    weights: int
    kv_cache: int
    compute: int
    adapters: int
    overhead: int
    prefix_cache: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.adapters + self.overhead + self.prefix_cache

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


KV_BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 values in 34 bytes
KV_BLOCK = {"f32": 1, "f16": 1, "q8_0": 32}


def effective_kv_type(info: GGUFInfo, requested: str) -> str:
    """The KV cache type llama.cpp can use for this model: a quantized cache needs head dims
    divisible by its block size (llama.cpp refuses to create the context otherwise), so such
    models fall back to f16. The pool and the planner both use this, so they agree."""
    block = KV_BLOCK[requested]
    dims = [d for d in (info.head_dim_k, info.head_dim_v) if d]
    return requested if all(d % block == 0 for d in dims) else "f16"


def kv_cache_bytes(info: GGUFInfo, ctx_size: int, kv_cache_type: str = "f16") -> int:
    n_layer = info.n_layer or 0
    k = info.n_embd_k_gqa or info.n_embd or 0
    v = info.n_embd_v_gqa or info.n_embd or 0
    return int(ctx_size * n_layer * (k + v) * KV_BYTES_PER_ELEMENT[kv_cache_type])


def attention_masks(info: GGUFInfo) -> int:
    """How many attention masks as wide as the context a micro-batch fills: a model with
    sliding-window layers (Gemma 3's ``<arch>.attention.sliding_window``) gets two KV caches in
    llama.cpp (``llama_kv_cache_iswa``), one for its sliding-window layers and one for the rest,
    and a mask for each."""
    return 2 if info.metadata.get(f"{info.architecture}.attention.sliding_window") else 1


def compute_bytes(info: GGUFInfo, batch_size: int, ctx_size: int, *, flash_attn: bool = True,
                  attn_cells: int | None = None) -> int:
    """Compute memory a full micro-batch touches, with the attention mask as wide as the whole
    context. Without flash attention llama.cpp also fills the KQ matrix: a score per query token,
    visible KV cell (``attn_cells``, by default the whole context) and head."""
    ubatch = min(batch_size, ctx_size)
    out = ubatch * ((info.n_embd or 0) + (info.n_ff or 0)) * COMPUTE_PER_UBATCH_DIM
    out += attention_masks(info) * ubatch * (ctx_size - ubatch) * KQ_MASK_BYTES_PER_CELL
    if not flash_attn:
        out += ubatch * min(attn_cells or ctx_size, ctx_size) * (info.n_head or 0) * KQ_BYTES_PER_CELL_HEAD
    return out


def footprint(model_id: str, info: GGUFInfo, *, ctx_size: int, batch_size: int,
              adapters: list[GGUFInfo] | None = None, prefix_tokens: int = 0,
              kv_cache_type: str = "f16", flash_attn: bool = True, adapter_residency: str = "all",
              draft_max: int = 0) -> Footprint:
    """``adapter_residency`` "active" holds one adapter at a time: the largest is what it costs.
    ``draft_max`` guesses verified per decode each add a row of logits."""
    adapter_bytes = [a.tensor_bytes for a in adapters or []]
    # Each stage after the first leaves a scheduler rebuild's fresh pages behind. Holding one
    # adapter at a time, a new adapter reuses the pages the last one freed; kept, each adds its own.
    n = len(adapter_bytes)
    switching = ADAPTER_SWITCH_BYTES * (max(n - 1, 1) if n else 0)
    if adapter_residency == "all":
        switching += ADAPTER_LOAD_BYTES * n
    return Footprint(
        model=model_id,
        weights=info.tensor_bytes,
        kv_cache=kv_cache_bytes(info, ctx_size, effective_kv_type(info, kv_cache_type)),
        compute=compute_bytes(info, batch_size, ctx_size, flash_attn=flash_attn)
        + switching + draft_max * (info.n_vocab or 0) * LOGITS_BYTES_PER_VOCAB,
        adapters=sum(adapter_bytes) if adapter_residency == "all" else max(adapter_bytes, default=0),
        overhead=MODEL_OVERHEAD + OVERHEAD_PER_VOCAB * (info.n_vocab or 0),
        prefix_cache=kv_cache_bytes(info, min(prefix_tokens, ctx_size), effective_kv_type(info, kv_cache_type)),
    )


def process_baseline() -> int:
    """This process's RSS now, plus what importing llama_cpp will add if it has not happened yet."""
    rss = psutil.Process().memory_info().rss
    return rss if "llama_cpp" in sys.modules else rss + LLAMA_CPP_IMPORT


@dataclass
class StageRow:
    stage: str
    model: str
    adapter: str | None


@dataclass
class Plan:
    """A residency plan: which policy, how many models stay loaded, and the predicted peak."""

    stack: str
    policy: str
    max_resident: int | None  # None = every model stays loaded
    ctx_size: int
    batch_size: int
    baseline: int
    footprints: dict[str, Footprint]
    stages: list[StageRow]
    budget: int | None
    predicted_peak: int
    fits: bool
    minimum: tuple[str, int]  # the cheapest policy and its predicted peak
    alternatives: dict[str, int] = field(default_factory=dict)  # policy -> predicted peak
    adapter_residency: str = "all"  # "all" adapters stay loaded, or only the "active" one
    process_extra: int = 0  # beyond the models and the baseline: the prompt, evicted models' leftovers

    def to_dict(self) -> dict:
        return {
            "stack": self.stack,
            "policy": self.policy,
            "adapter_residency": self.adapter_residency,
            "max_resident": self.max_resident,
            "ctx_size": self.ctx_size,
            "batch_size": self.batch_size,
            "baseline_bytes": self.baseline,
            "process_extra_bytes": self.process_extra,
            "models": {k: v.to_dict() for k, v in self.footprints.items()},
            "stages": [asdict(s) for s in self.stages],
            "budget_bytes": self.budget,
            "predicted_peak_bytes": self.predicted_peak,
            "fits": self.fits,
            "minimum": {"policy": self.minimum[0], "predicted_peak_bytes": self.minimum[1]},
            "alternatives": self.alternatives,
        }

    def format_text(self) -> str:
        lines = [f"stack {self.stack} · ctx {self.ctx_size} · batch {self.batch_size}", ""]
        lines.append(f"  {'stage':<14}{'model':<14}{'adapter'}")
        for s in self.stages:
            lines.append(f"  {s.stage:<14}{s.model:<14}{s.adapter or '-'}")
        lines.append("")
        lines.append(f"  {'model':<14}{'weights':>10}{'KV cache':>10}{'compute':>10}{'runtime':>10}{'adapters':>10}"
                     f"{'prefixes':>10}{'total':>10}")
        for name, f in self.footprints.items():
            lines.append(
                f"  {name:<14}{fmt_bytes(f.weights):>10}{fmt_bytes(f.kv_cache):>10}{fmt_bytes(f.compute):>10}"
                f"{fmt_bytes(f.overhead):>10}{fmt_bytes(f.adapters):>10}{fmt_bytes(f.prefix_cache):>10}{fmt_bytes(f.total):>10}"
            )
        lines.append(f"  {'process baseline (interpreter, imports)':<68}{fmt_bytes(self.baseline):>16}")
        lines.append(f"  {'prompt tokens, pages evicted models leave':<68}{fmt_bytes(self.process_extra):>16}")
        lines.append("")
        for name, peak in self.alternatives.items():
            shown = name.replace(":", " keeps ")
            mark = "→" if (name == self.policy or name == f"lru:{self.max_resident}" and self.policy == "lru") else " "
            lines.append(f"{mark} {shown:<22} predicted peak RSS {fmt_bytes(peak)}")
        budget = "none" if self.budget is None else fmt_bytes(self.budget)
        verdict = "fits" if self.fits else "does NOT fit"
        if self.adapter_residency == "active":
            lines.append("adapters: one at a time (adapter_residency active; each swap reads the next file again)")
        lines.append(f"policy {self.policy}: predicted peak RSS {fmt_bytes(self.predicted_peak)}; budget {budget} — {verdict}")
        return "\n".join(lines)


def plan_residency(
    *,
    stack: str,
    units: dict[str, Footprint],
    stages: list[StageRow],
    shared: bool,
    ctx_size: int,
    batch_size: int,
    budget: int | None,
    baseline: int,
    policy: str = "auto",
) -> Plan:
    """Choose how many base models stay resident so the predicted peak fits ``budget``.

    ``units`` has one footprint per distinct base model (with its adapters). With one unit
    the only sensible plan is ``shared-base``: one model, adapters swapped per stage. With
    several, ``all`` beats ``lru`` (as many as fit) beats ``sequential`` (one at a time).
    """
    sizes = sorted((f.total for f in units.values()), reverse=True)
    n = len(sizes)

    def resident_of(name: str) -> int | None:
        if name in ("all", "shared-base"):
            return None
        if name == "sequential":
            return 1
        return int(name.split(":")[1])

    # best first: all/shared-base, lru:n-1 … lru:2, sequential
    names = ["shared-base"] if shared and n == 1 else ["all", *(f"lru:{k}" for k in range(n - 1, 1, -1)), "sequential"]
    # beyond the models: the prompt, and what each model not resident at the peak may have left
    extra = {k: PROMPT_BYTES_PER_TOKEN * ctx_size + (n - (resident_of(k) or n)) * EVICTED_MODEL_BYTES for k in names}
    peaks = {k: baseline + sum(sizes[:resident_of(k) or n]) + extra[k] for k in names}
    cheapest = min(peaks.items(), key=lambda kv: kv[1])

    if policy != "auto":
        wanted = {"shared-base": "shared-base" if "shared-base" in peaks else "all"}.get(policy, policy)
        if wanted == "lru":
            options = [k for k in peaks if k.startswith("lru:")] or ["sequential"]
            fitting = [k for k in options if budget is None or peaks[k] <= budget]
            wanted = fitting[0] if fitting else options[-1]
        if wanted not in peaks:
            wanted = "shared-base" if "shared-base" in peaks else "sequential"
        chosen = wanted
    else:
        order = list(peaks)  # best first: all/shared-base, lru:n-1 … lru:2, sequential
        chosen = next((k for k in order if budget is None or peaks[k] <= budget), cheapest[0])
    peak = peaks[chosen]
    fits = budget is None or peak <= budget
    name = "lru" if chosen.startswith("lru:") else chosen
    return Plan(
        stack=stack,
        policy=name,
        max_resident=resident_of(chosen),
        ctx_size=ctx_size,
        batch_size=batch_size,
        baseline=baseline,
        process_extra=extra[chosen],
        footprints=units,
        stages=stages,
        budget=budget,
        predicted_peak=peak,
        fits=fits,
        minimum=("lru" if cheapest[0].startswith("lru:") else cheapest[0], cheapest[1]),
        alternatives=peaks,
    )


def require_fit(plan: Plan) -> None:
    """Raise the one-line error users see when no policy fits the budget."""
    if plan.fits:
        return
    pol, need = plan.minimum
    raise BudgetError(
        f"stack {plan.stack} needs at least {fmt_bytes(need)} (policy: {pol}, ctx {plan.ctx_size});"
        f" budget is {fmt_bytes(plan.budget)} — lower ctx_size or use a smaller quant profile"
    )
