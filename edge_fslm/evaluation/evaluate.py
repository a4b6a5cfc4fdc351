"""Evaluating a stack: ARC multiple choice by log-likelihood, Alpaca instructions by text overlap.

ARC, stack mode: every stage but the last writes its notes on the question, exactly as in
a run; the last stage's prompt (its chat template ending at the assistant turn) is the
context, and each choice's text is scored as its continuation. Single mode scores a bare
model with lm-evaluation-harness's own ARC prompt (``Question: ...\\nAnswer:`` and
`` <choice>``), so its numbers compare with published lm-eval results. ``acc`` picks the
most likely choice, ``acc_norm`` the most likely per character (lm-eval's acc_norm).

Instructions: each held-out Alpaca row runs through the stack (or the bare model as a
one-stage chat stack) and the answer is compared with the reference (:mod:`metrics`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import gguf_info, sources
from ..api import Stack
from ..train.data import load_alpaca, load_arc
from ..errors import DataError
from ..manifest import Manifest, load_stack, parse_manifest
from .metrics import text_scores
from ..pipeline import StageTrace, clean_prompt
from ..pool import LoadedModel
from ..rss import RssSampler
from .scoring import encode, encode_pair, loglikelihood
from ..stage import prepare
from ..units import fmt_bytes

Progress = Callable[[int, int], None]  # (done, total), called after each item


@dataclass(frozen=True)
class RayEval:
    """Where and how an evaluation fans out over a Ray cluster (``eval ... --ray``)."""

    address: str = "auto"
    actors: int | None = None
    shard_size: int = 16
ARC_CONTEXT = "Question: {question}\nAnswer:"  # lm-evaluation-harness's arc_easy / arc_challenge prompt
SINGLE_REPEAT_PENALTY = 1.1


# --------------------------------------------------------------------------- loading


def single_manifest(source: str, *, chat: bool, max_tokens: int) -> Manifest:
    """A one-stage stack around a bare model: a chat turn holding the input, or the raw input."""
    from ..convert.toml_writer import dumps_manifest  # deferred: edge_fslm.convert loads its quantizer on import

    path = sources.resolve(source, base_dir=Path.cwd(), allow_absolute=True, confine=False)
    gguf_info.validate_model(path)
    stage: dict = {"name": "answer", "model": "model", "max_tokens": max_tokens,
                   "repeat_penalty": SINGLE_REPEAT_PENALTY}
    if chat:
        stage["messages"] = [{"role": "user", "content": "{input}"}]
    else:
        stage["template"] = "{input}"
    doc = {
        "stack": {"name": "single", "description": f"the bare model {source}", "schema": 1},
        "models": {"model": {"source": str(path)}},
        "stages": [stage],
    }
    return parse_manifest(dumps_manifest(doc), origin=f"<--single {source}>", trusted=True)


def load_eval_stack(
    stack: str | Path | Manifest,
    single: str | None,
    *,
    chat: bool,
    threads: int | None = None,
    ctx_size: int | None = None,
    max_tokens: int | None = None,
    verbose: bool = False,
    adapter_residency: str | None = None,
) -> Stack:
    """The stack to evaluate, or with ``single`` the bare model as a one-stage stack.

    A single model generates as many tokens as the stack's final stage would, so the two
    are compared on equal terms.
    """
    if single is not None:
        if max_tokens is None:
            max_tokens = (stack if isinstance(stack, Manifest) else load_stack(stack)).stages[-1].max_tokens
        stack = single_manifest(single, chat=chat, max_tokens=max_tokens)
    return Stack.load(stack, threads=threads, ctx_size=ctx_size, max_tokens=max_tokens, verbose=verbose,
                      adapter_residency=adapter_residency, measure_rss=False)


# --------------------------------------------------------------------------- stack steps


def stage_output(stack: Stack, i: int, values: dict[str, str]) -> StageTrace:
    """Run stage ``i`` to the end and return its trace."""
    return stack.pipeline.finish_stage(i, values, truncate=True)


def notes_for(stack: Stack, text: str) -> dict[str, str]:
    """``input`` plus the output of every stage but the last: what the final stage reads."""
    values = {"input": clean_prompt(text)}
    for i, stage in enumerate(stack.manifest.stages[:-1]):
        values[stage.name] = stage_output(stack, i, values).output
    return values


def final_stage_model(stack: Stack) -> LoadedModel:
    """The final stage's model with its adapter active."""
    p = stack.pipeline
    final = stack.manifest.stages[-1]
    lm = p.pool.get(p.models[final.model])
    lm.activate(p.adapters.get(final.name), p.pool.counters)
    return lm


def final_prompt(stack: Stack, values: dict[str, str]) -> tuple[LoadedModel, list[int]]:
    """The final stage's model and prompt tokens for ``values``: the context its answer continues."""
    lm = final_stage_model(stack)
    tokens, _ = prepare(lm, stack.manifest.stages[-1], values, stack.settings.ctx_size, truncate=True)
    return lm, tokens


def score_in_stack(
    stack: Stack, text: str, continuations: list[str]
) -> tuple[list[tuple[float, bool]], dict[str, str]]:
    """Earlier stages make notes on ``text``; the final stage scores each continuation after its prompt."""
    values = notes_for(stack, text)
    lm, context = final_prompt(stack, values)
    conts = [encode(lm, c) for c in continuations]
    notes = {k: v for k, v in values.items() if k != "input"}
    return loglikelihood(lm, context, conts, truncate=True), notes


def score_single(stack: Stack, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
    """The bare model scores each continuation of the raw ``context`` (lm-eval's tokenization)."""
    lm = final_stage_model(stack)
    pairs = [encode_pair(lm, context, c) for c in continuations]  # the context's tokens are the same in each
    return loglikelihood(lm, pairs[0][0], [cont for _, cont in pairs], truncate=True)


# --------------------------------------------------------------------------- reports


def _stderr(values: list[float]) -> float | None:
    """Standard error of a mean (sample standard deviation / sqrt n), as lm-eval reports it."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def _table(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"  {k.ljust(width)}  {v}" for k, v in rows]


def _pm(mean: float, err: float | None) -> str:
    return f"{mean:.4f}" + (f" ± {err:.4f}" if err is not None else "")


class _Report:
    """What every evaluation report shares: its JSON form and the cost rows of its text form."""

    mean_seconds: float
    load_seconds: float
    peak_rss_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass

    def _cost_rows(self, per: str) -> list[tuple[str, str]]:
        return [
            (f"s/{per}", f"{self.mean_seconds:.3f}"),
            ("load s", f"{self.load_seconds:.3f}"),
            ("peak RSS", fmt_bytes(self.peak_rss_bytes, 1)),
        ]


@dataclass
class ArcRecord:
    """One question: the choices' log-likelihoods and what was picked."""

    id: str
    gold: int
    predicted: int
    predicted_norm: int
    logliks: list[float]
    greedy: list[bool]
    seconds: float
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class ArcReport(_Report):
    """ARC accuracy of a stack (or a bare model), with cost and every question's record."""

    stack: str
    mode: str  # "stack" | "single"
    data: str
    n: int
    acc: float
    acc_norm: float
    acc_stderr: float | None
    acc_norm_stderr: float | None
    mean_seconds: float
    load_seconds: float
    peak_rss_bytes: int
    records: list[ArcRecord]

    def format_text(self) -> str:
        return "\n".join([
            f"ARC · {self.stack} ({self.mode}) · {Path(self.data).name} · {self.n} questions",
            *_table([
                ("acc", _pm(self.acc, self.acc_stderr)),
                ("acc_norm", _pm(self.acc_norm, self.acc_norm_stderr)),
                *self._cost_rows("question"),
            ]),
        ])


@dataclass
class InstructRecord:
    """One instruction: the answer, the reference and their scores."""

    id: str
    input: str
    reference: str
    answer: str
    exact_match: float
    rouge1: float
    rougeL: float
    levenshtein: float
    seconds: float


@dataclass
class InstructReport(_Report):
    """Mean text-overlap scores of a stack's (or a bare model's) answers, with cost and every row."""

    stack: str
    mode: str
    data: str
    split: str
    n: int
    exact_match: float
    rouge1: float
    rougeL: float
    levenshtein: float
    mean_seconds: float
    load_seconds: float
    peak_rss_bytes: int
    records: list[InstructRecord]

    def format_text(self) -> str:
        return "\n".join([
            f"Instructions · {self.stack} ({self.mode}) · {Path(self.data).name} [{self.split}] · {self.n} prompts",
            *_table([
                ("exact match", f"{self.exact_match:.4f}"),
                ("ROUGE-1 F1", f"{self.rouge1:.4f}"),
                ("ROUGE-L F1", f"{self.rougeL:.4f}"),
                ("Levenshtein sim", f"{self.levenshtein:.4f}"),
                *self._cost_rows("prompt"),
            ]),
        ])


def _limited(rows: list, limit: int | None, path: str | Path) -> list:
    if limit is not None:
        if limit < 1:
            raise DataError(f"{path}: limit={limit}: give a positive number of rows")
        rows = rows[:limit]
    return rows


def _label(stack: str | Path | Manifest, single: str | None) -> str:
    if single is not None:
        return single
    return stack.name if isinstance(stack, Manifest) else str(stack)


# --------------------------------------------------------------------------- evaluations


def arc_record(st: Stack, q, single: bool) -> ArcRecord:
    """Score one ARC question's choices: after the stack's notes, or (``single``) with lm-eval's prompt."""
    t = time.perf_counter()
    if not single:
        scores, notes = score_in_stack(st, q.question, list(q.choices))
    else:
        scores, notes = score_single(st, ARC_CONTEXT.format(question=q.question), [" " + c for c in q.choices]), {}
    lls = [s for s, _ in scores]
    per_char = [ll / max(len(c), 1) for ll, c in zip(lls, q.choices)]
    return ArcRecord(id=q.id, gold=q.answer, predicted=int(np.argmax(lls)), predicted_norm=int(np.argmax(per_char)),
                     logliks=lls, greedy=[g for _, g in scores], seconds=time.perf_counter() - t, notes=notes)


def arc_report(records: list[ArcRecord], *, label: str, single: bool, data_path: str | Path, load_seconds: float,
               peak_rss_bytes: int) -> ArcReport:
    acc = [float(r.predicted == r.gold) for r in records]
    acc_norm = [float(r.predicted_norm == r.gold) for r in records]
    return ArcReport(
        stack=label, mode="single" if single else "stack", data=str(data_path), n=len(records),
        acc=float(np.mean(acc)), acc_norm=float(np.mean(acc_norm)), acc_stderr=_stderr(acc),
        acc_norm_stderr=_stderr(acc_norm), mean_seconds=float(np.mean([r.seconds for r in records])),
        load_seconds=load_seconds, peak_rss_bytes=peak_rss_bytes, records=records,
    )


def instruct_record(st: Stack, ex) -> InstructRecord:
    """Answer one Alpaca row and score the answer against its reference."""
    result = st.run(ex.input, truncate=True)
    scores = text_scores(result.answer, ex.output)
    return InstructRecord(id=ex.id, input=ex.input, reference=ex.output, answer=result.answer,
                          seconds=result.total_seconds, **scores)


def instruct_report(records: list[InstructRecord], *, label: str, single: bool, data_path: str | Path, split: str,
                    load_seconds: float, peak_rss_bytes: int) -> InstructReport:
    def mean(key: str) -> float:
        return float(np.mean([getattr(r, key) for r in records]))

    return InstructReport(
        stack=label, mode="single" if single else "stack", data=str(data_path), split=split,
        n=len(records), exact_match=mean("exact_match"), rouge1=mean("rouge1"), rougeL=mean("rougeL"),
        levenshtein=mean("levenshtein"), mean_seconds=mean("seconds"), load_seconds=load_seconds,
        peak_rss_bytes=peak_rss_bytes, records=records,
    )


def load_for(kind: str, stack: str | Path | Manifest, single: str | None, *, threads: int | None = None,
             ctx_size: int | None = None, max_tokens: int | None = None, verbose: bool = False,
             adapter_residency: str | None = None) -> Stack:
    """The stack ``eval arc|instruct`` scores on, here or on a Ray actor.

    ARC loads its final model now, so load time is not counted against the first question.
    """
    st = load_eval_stack(stack, single, chat=kind == "instruct", threads=threads, ctx_size=ctx_size,
                         max_tokens=max_tokens, verbose=verbose, adapter_residency=adapter_residency)
    if kind == "arc":
        try:
            final_stage_model(st)
        except BaseException:
            st.close()
            raise
    return st


def record_for(kind: str, st: Stack, item, single: bool) -> ArcRecord | InstructRecord:
    """One ARC question scored, or one Alpaca row answered and scored."""
    return arc_record(st, item, single) if kind == "arc" else instruct_record(st, item)


def _score_all(kind: str, stack: str | Path | Manifest, single: str | None, items: list, *, ray: "RayEval | None",
               threads: int | None, ctx_size: int | None, max_tokens: int | None, verbose: bool,
               adapter_residency: str | None, progress: Progress | None) -> tuple[list, float, int]:
    """Every item's record in order, the load seconds and the peak RSS: on a Ray cluster or in this process."""
    if ray is not None:
        from ..ray import evaluate_on_ray

        return evaluate_on_ray(kind, stack, single, items, ray, threads=threads, ctx_size=ctx_size,
                               max_tokens=max_tokens, adapter_residency=adapter_residency, progress=progress)
    records = []
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        with load_for(kind, stack, single, threads=threads, ctx_size=ctx_size, max_tokens=max_tokens,
                      verbose=verbose, adapter_residency=adapter_residency) as st:
            load_seconds = time.perf_counter() - t0
            for done, item in enumerate(items, 1):
                records.append(record_for(kind, st, item, single is not None))
                if progress:
                    progress(done, len(items))
    return records, load_seconds, sampler.peak_bytes


def evaluate_arc(
    stack: str | Path | Manifest,
    data_path: str | Path,
    *,
    limit: int | None = None,
    single: str | None = None,
    threads: int | None = None,
    ctx_size: int | None = None,
    max_tokens: int | None = None,
    progress: Progress | None = None,
    verbose: bool = False,
    ray: "RayEval | None" = None,
    adapter_residency: str | None = None,
) -> ArcReport:
    """ARC accuracy by log-likelihood of each choice; ``limit`` takes the first N questions.

    ``max_tokens`` caps what the note-writing stages generate (stack mode). With ``ray``,
    shards of the questions are scored on a Ray cluster's actors (one stack each) and the
    report is the same, in question order; its peak RSS is the largest actor's.
    """
    questions = _limited(load_arc(data_path), limit, data_path)
    records, load_seconds, peak = _score_all("arc", stack, single, questions, ray=ray, threads=threads,
                                             ctx_size=ctx_size, max_tokens=max_tokens, verbose=verbose,
                                             adapter_residency=adapter_residency, progress=progress)
    return arc_report(records, label=_label(stack, single), single=single is not None, data_path=data_path,
                      load_seconds=load_seconds, peak_rss_bytes=peak)


def evaluate_instruct(
    stack: str | Path | Manifest,
    data_path: str | Path,
    *,
    split: str = "heldout",
    limit: int | None = None,
    single: str | None = None,
    threads: int | None = None,
    ctx_size: int | None = None,
    max_tokens: int | None = None,
    progress: Progress | None = None,
    verbose: bool = False,
    ray: "RayEval | None" = None,
    adapter_residency: str | None = None,
) -> InstructReport:
    """Answer Alpaca rows (by default the held-out last 500) and score them against the references.

    Single mode runs the bare model as one greedy chat turn with the final stage's token limit.
    ``ray`` shards the rows over a Ray cluster, as in :func:`evaluate_arc`.
    """
    examples = _limited(load_alpaca(data_path, split), limit, data_path)
    records, load_seconds, peak = _score_all("instruct", stack, single, examples, ray=ray, threads=threads,
                                             ctx_size=ctx_size, max_tokens=max_tokens, verbose=verbose,
                                             adapter_residency=adapter_residency, progress=progress)
    return instruct_report(records, label=_label(stack, single), single=single is not None, data_path=data_path,
                           split=split, load_seconds=load_seconds, peak_rss_bytes=peak)
