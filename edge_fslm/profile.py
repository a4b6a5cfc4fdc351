"""``edge-fslm profile``: where every millisecond and megabyte of a stack goes.

One RSS sampler (psutil, every 5 ms, plus the kernel's VmHWM) runs across the whole
profile and marks each stage's start, so every stage gets its own peak and the report
holds the full timeline. Per stage we aggregate load time, adapter-swap time, time to
first token, and prompt and generation throughput.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import EdgeFSLMError
from .rss import RssSampler, machine_info
from .units import fmt_bytes

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Give three tips for staying healthy.",
    "Which gas do plants take in from the air to make food?",
    "Write a haiku about the ocean.",
    "How many legs does a spider have?",
    "Explain what a noun is.",
    "Convert 10 kilometers to miles.",
    "Name two renewable sources of energy.",
    "What does a thermometer measure?",
]


@dataclass
class StageProfile:
    name: str
    runs: int = 0
    load_seconds: float = 0.0
    swap_seconds: float = 0.0
    ttft_seconds: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    peak_rss_bytes: int = 0

    def summary(self) -> dict:
        return {
            "name": self.name,
            "runs": self.runs,
            "load_seconds_total": round(self.load_seconds, 4),
            "adapter_swap_seconds_total": round(self.swap_seconds, 6),
            "ttft_seconds_median": round(statistics.median(self.ttft_seconds), 4) if self.ttft_seconds else None,
            "seconds_median": round(statistics.median(self.seconds), 4) if self.seconds else None,
            "prompt_tokens_per_second": round(self.prompt_tokens / self.prompt_seconds, 1) if self.prompt_seconds else None,
            "gen_tokens_per_second": round(self.gen_tokens / self.gen_seconds, 1) if self.gen_seconds else None,
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def read_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a file: JSONL objects with "prompt", or one prompt per line."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeFSLMError(f"{p}: cannot read prompts ({exc}) — one prompt per line, or JSONL with \"prompt\"") from None
    prompts = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                line = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EdgeFSLMError(f"{p}:{n}: expected a JSON object with \"prompt\"") from None
        prompts.append(str(line))
    if not prompts:
        raise EdgeFSLMError(f"{p}: no prompts")
    return prompts


def profile_stack(stack, prompts: list[str], *, interval: float = 0.005) -> dict:
    """Run ``prompts`` through a loaded (not yet preloaded) stack and return the report dict."""
    stages = {s.name: StageProfile(s.name) for s in stack.manifest.stages}
    runs = []
    sampler = RssSampler(interval=interval, keep_timeline=True)
    t0 = time.perf_counter()
    with sampler:
        for i, prompt in enumerate(prompts):
            r = stack.run(prompt, on_stage_start=lambda s, i=i: sampler.mark(f"{i}:{s.name}"))
            sampler.mark(f"{i}:end")
            runs.append({"prompt": prompt, "total_seconds": r.total_seconds, "answer": r.answer})
            for t in r.stages:
                sp = stages[t.name]
                sp.runs += 1
                sp.load_seconds += t.load_seconds
                sp.swap_seconds += t.swap_seconds
                sp.ttft_seconds.append(t.load_seconds + t.swap_seconds + t.prompt_seconds)
                sp.seconds.append(t.seconds)
                sp.prompt_tokens += t.prompt_tokens
                sp.prompt_seconds += t.prompt_seconds
                sp.gen_tokens += max(t.completion_tokens - 1, 0)
                sp.gen_seconds += t.gen_seconds
    wall = time.perf_counter() - t0
    # each stage's peak: the highest sample between its start mark and the next mark
    marks = sampler.marks
    for k, (t_start, label) in enumerate(marks):
        name = label.split(":", 1)[1]
        if name not in stages:
            continue
        t_end = marks[k + 1][0] if k + 1 < len(marks) else float("inf")
        window = [rss for (t, rss) in sampler.timeline if t_start <= t <= t_end]
        if window:
            stages[name].peak_rss_bytes = max(stages[name].peak_rss_bytes, max(window))
    totals = [r["total_seconds"] for r in runs]
    plan = stack.plan
    return {
        "stack": stack.manifest.name,
        "policy": plan.policy if plan else None,
        "budget_bytes": plan.budget if plan else None,
        "predicted_peak_rss_bytes": plan.predicted_peak if plan else None,
        "prompts": len(prompts),
        "stages": [sp.summary() for sp in stages.values()],
        "totals": {
            "wall_seconds": round(wall, 3),
            "per_prompt_seconds_median": round(statistics.median(totals), 4),
            "per_prompt_seconds_max": round(max(totals), 4),
            "peak_rss_bytes": sampler.peak_bytes,
            "start_rss_bytes": sampler.start_rss,
            "loads": stack.pipeline.pool.counters.loads,
            "evictions": stack.pipeline.pool.counters.evictions,
            "adapter_swaps": stack.pipeline.pool.counters.adapter_swaps,
        },
        "machine": machine_info(),
        "settings": asdict(stack.settings),
        "rss_timeline": {"interval_seconds": interval, "samples": [[round(t, 4), rss] for t, rss in sampler.timeline]},
        "marks": [[round(t, 4), label] for t, label in sampler.marks],
        "runs": runs,
    }


def format_report(report: dict) -> str:
    rows = [["stage", "loads s", "swap ms", "TTFT ms", "stage ms", "prompt tok/s", "gen tok/s", "peak RSS MB"]]
    for s in report["stages"]:
        rows.append([
            s["name"], f"{s['load_seconds_total']:.3f}", f"{s['adapter_swap_seconds_total'] * 1e3:.3f}",
            f"{(s['ttft_seconds_median'] or 0) * 1e3:.0f}", f"{(s['seconds_median'] or 0) * 1e3:.0f}",
            f"{s['prompt_tokens_per_second'] or 0:.0f}", f"{s['gen_tokens_per_second'] or 0:.1f}",
            f"{s['peak_rss_bytes'] / 1e6:.1f}",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t, m = report["totals"], report["machine"]
    pred = report["predicted_peak_rss_bytes"]
    lines += [
        "",
        f"{report['prompts']} prompts · median {t['per_prompt_seconds_median']:.2f} s/prompt · wall {t['wall_seconds']:.1f} s",
        f"peak RSS {fmt_bytes(t['peak_rss_bytes'], 1)}" + (f" (predicted {fmt_bytes(pred, 1)})" if pred else "")
        + f" · policy {report['policy']} · {t['loads']} loads, {t['evictions']} evictions, {t['adapter_swaps']} adapter swaps",
        f"machine: {m['cpu']} · {m['physical_cores']} cores · {m['ram_bytes'] / 2**30:.1f} GiB RAM",
        f"llama.cpp: {m['llama_cpp_system_info']}",
    ]
    return "\n".join(lines)


def plot_report(report: dict, path: str | Path) -> Path:
    """RSS timeline with stage boundaries and the budget line, and a latency bar per stage."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgeFSLMError("plotting needs matplotlib — pip install 'edge-fslm[plot]'") from None
    samples = report["rss_timeline"]["samples"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7.5), gridspec_kw={"height_ratios": [3, 2]})
    ts = [s[0] for s in samples]
    mb = [s[1] / 1e6 for s in samples]
    ax1.plot(ts, mb, lw=1.2, color="#1f77b4", label="RSS (psutil, 5 ms)")
    colors = {}
    palette = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#999999"]
    marks = report["marks"]
    for k, (t, label) in enumerate(marks):
        name = label.split(":", 1)[1]
        if name == "end":
            continue
        end = marks[k + 1][0] if k + 1 < len(marks) else (ts[-1] if ts else t)
        first = name not in colors
        c = colors.setdefault(name, palette[len(colors) % len(palette)])
        ax1.axvspan(t, end, color=c, alpha=0.12, lw=0, label=name if first else None)
    if report.get("budget_bytes"):
        ax1.axhline(report["budget_bytes"] / 1e6, color="red", ls="--", lw=1.2, label="budget")
    if report.get("predicted_peak_rss_bytes"):
        ax1.axhline(report["predicted_peak_rss_bytes"] / 1e6, color="gray", ls=":", lw=1.2, label="predicted peak")
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("RSS (MB)")
    ax1.set_ylim(bottom=0)
    ax1.set_title(f"{report['stack']}: RSS over {report['prompts']} prompts (policy {report['policy']})")
    ax1.legend(loc="lower right", fontsize=8, ncol=4)
    names = [s["name"] for s in report["stages"]]
    load = [s["load_seconds_total"] / max(s["runs"], 1) * 1e3 for s in report["stages"]]
    swap = [s["adapter_swap_seconds_total"] / max(s["runs"], 1) * 1e3 for s in report["stages"]]
    ttft = [(s["ttft_seconds_median"] or 0) * 1e3 for s in report["stages"]]
    total = [(s["seconds_median"] or 0) * 1e3 for s in report["stages"]]
    prompt_part = [max(a - b - c, 0) for a, b, c in zip(ttft, load, swap)]
    gen_part = [max(t - a, 0) for t, a in zip(total, ttft)]
    left = [0.0] * len(names)
    for label, part, color in (("load", load, "#7f7f7f"), ("adapter swap", swap, "#bcbd22"),
                               ("prompt (to first token)", prompt_part, "#17becf"), ("generation", gen_part, "#ff7f0e")):
        ax2.barh(names, part, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, part)]
    ax2.invert_yaxis()
    ax2.set_xlabel("milliseconds per prompt (median; load averaged)")
    ax2.set_title("latency breakdown per stage")
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
