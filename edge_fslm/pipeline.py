"""Running a stack: stages in order, plain text between them, and a trace of every step.

The pipeline owns no models: it asks the pool for each stage's model, activates the
stage's adapter, and records what each step read, wrote and cost. ``execute`` is a
generator that yields the final stage's text as it is produced and *returns* the
:class:`RunResult`, so streaming and non-streaming runs share one code path.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Collection, Generator

from .errors import PromptError
from .manifest import Manifest, StageSpec
from .pool import ModelPool, PoolCounters, ResolvedAdapter, ResolvedModel
from .stage import Generation, generate, prefix_split, prepare


@dataclass
class StageTrace:
    """One stage's step: its output and what it cost."""

    name: str
    output: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    model: str = ""
    adapter: str | None = None
    stop_reason: str = ""
    load_seconds: float = 0.0
    swap_seconds: float = 0.0
    prompt_seconds: float = 0.0
    gen_seconds: float = 0.0
    truncated_input_tokens: int = 0
    cached_prompt_tokens: int = 0
    draft_n: int = 0  # prompt-lookup guesses verified (llama.cpp server's timings name them so)
    draft_n_accepted: int = 0  # ... that the model produced itself: tokens that cost no decode of their own

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def gen_tokens_per_second(self) -> float:
        # the first token comes with the prompt evaluation; the rest are pure decode steps
        n = self.completion_tokens - 1
        return n / self.gen_seconds if n > 0 and self.gen_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompt_tokens_per_second"] = round(self.prompt_tokens_per_second, 2)
        d["gen_tokens_per_second"] = round(self.gen_tokens_per_second, 2)
        return d


@dataclass
class RunResult:
    """The answer and the full trace of one run; ``to_dict`` is the ``--json`` format."""

    prompt: str
    answer: str
    stages: list[StageTrace]
    total_seconds: float
    peak_rss_bytes: int = 0
    stack: str = ""
    policy: str = ""
    loads: int = 0
    evictions: int = 0
    adapter_swaps: int = 0
    adapter_loads: int = 0  # adapter files read: once each, or on every swap with adapter_residency "active"
    predicted_peak_rss_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "stages": [s.to_dict() for s in self.stages],
            "total_seconds": round(self.total_seconds, 4),
            "peak_rss_bytes": self.peak_rss_bytes,
            "stack": self.stack,
            "policy": self.policy,
            "loads": self.loads,
            "evictions": self.evictions,
            "adapter_swaps": self.adapter_swaps,
            "adapter_loads": self.adapter_loads,
            "predicted_peak_rss_bytes": self.predicted_peak_rss_bytes,
            **self.extra,
        }


StageCallback = Callable[[StageSpec], None]
TraceCallback = Callable[[StageTrace], None]
TextCallback = Callable[[StageSpec, str], None]


@dataclass(frozen=True)
class FinalStageSettings:
    """What one request may change about the final stage: how long, how random, where to stop.

    The intermediate stages keep their manifest settings, since their adapters were trained
    for them; only the answer is the caller's to shape (OpenAI's ``max_tokens``,
    ``temperature``, ``seed`` and ``stop``). ``None`` keeps the manifest's value.
    """

    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None

    def apply(self, stage: StageSpec) -> StageSpec:
        changes: dict = {}
        if self.max_tokens is not None:
            changes["max_tokens"] = self.max_tokens
        if self.stop is not None:
            changes["stop"] = tuple(self.stop)
        if self.temperature is not None:
            changes["sampling"] = dataclasses.replace(stage.sampling, temperature=self.temperature)
        return dataclasses.replace(stage, **changes) if changes else stage


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0 and C1 controls but tab, LF, CR
_SURROGATE = re.compile("[\ud800-\udfff]")  # what str.encode("utf-8") would refuse


def clean_prompt(prompt: str) -> str:
    """Refuse empty prompts; drop control characters other than tab and newlines."""
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be text, got {type(prompt).__name__}")
    # No step here copies the whole prompt unless it must (a control character to drop): a
    # 50 MB prompt held twice or three times at once is what the memory budget cannot see.
    lone = None if prompt.isascii() else _SURROGATE.search(prompt)
    if lone:  # lone surrogates: bytes that were not UTF-8 on the command line
        raise PromptError(
            f"prompt is not valid text (lone surrogate at character {lone.start()}, e.g. bytes that are not UTF-8"
            " on the command line) — pass the prompt as UTF-8"
        )
    cleaned = _CONTROL.sub("", prompt)  # the same object when there is nothing to drop
    if not cleaned or cleaned.isspace():
        raise PromptError("prompt is empty — give the request as text")
    return cleaned


@dataclass
class Pipeline:
    """A validated manifest bound to resolved model files and a pool to run them in."""

    manifest: Manifest
    models: dict[str, ResolvedModel]
    adapters: dict[str, ResolvedAdapter]  # stage name -> adapter
    pool: ModelPool
    policy: str = "all"

    def run_stage(
        self, i: int, values: dict[str, str], *, truncate: bool = False, final: FinalStageSettings | None = None
    ) -> Generator[str, None, StageTrace]:
        """Run stage ``i`` on ``values`` (``input`` plus earlier outputs), yielding its text as generated.

        ``final`` changes this stage's length, temperature, seed or stops for this run only.
        """
        stage = self.manifest.stages[i]
        seed = self.pool.settings.seed + i
        if final is not None:
            stage = final.apply(stage)
            seed = final.seed if final.seed is not None else seed
        t0 = time.perf_counter()
        c0 = self.pool.counters.snapshot()
        lm = self.pool.get(self.models[stage.model])
        if self.pool.max_resident is not None and i + 1 < len(self.manifest.stages):
            self.pool.prefetch(self.models[self.manifest.stages[i + 1].model])
        adapter = self.adapters.get(stage.name)
        lm.activate(adapter, self.pool.counters)
        tokens, dropped = prepare(lm, stage, values, self.pool.settings.ctx_size, truncate=truncate)
        gen = Generation(truncated_input_tokens=dropped)
        yield from generate(lm, stage, tokens, seed, gen)
        return _trace(stage, gen, adapter, time.perf_counter() - t0, self.pool.counters.since(c0))

    def finish_stage(
        self, i: int, values: dict[str, str], *, truncate: bool = False, final: FinalStageSettings | None = None,
        on_piece: Callable[[str], None] | None = None, dropped: Callable[[], bool] | None = None,
    ) -> StageTrace | None:
        """Run stage ``i`` to the end and return its trace; ``on_piece`` hears its text as generated.

        ``dropped()``, asked after every piece, stops the stage there (None: nobody waits for it).
        """
        steps = self.run_stage(i, values, truncate=truncate, final=final)
        while True:
            try:
                piece = next(steps)
            except StopIteration as done:
                return done.value
            if on_piece:
                on_piece(piece)
            if dropped is not None and dropped():
                steps.close()
                return None

    def finish_stage_group(
        self,
        i: int,
        group: list[dict[str, str]],
        *,
        width: int,
        truncate: bool = False,
        spare_bytes: int | None = None,
        on_trace: Callable[[int, StageTrace], None] | None = None,
        on_error: Callable[[int, PromptError], None] | None = None,
        final: FinalStageSettings | None = None,
        on_piece: Callable[[int, str], None] | None = None,
        dropped: Callable[[int], bool] | None = None,
    ) -> list[StageTrace]:
        """Run stage ``i`` for every prompt's ``values`` in ``group``, ``width`` decoded together.

        ``spare_bytes`` is what the memory budget leaves for the extra multi-sequence
        context; a width that would need more is halved, down to one prompt at a time (the
        ordinary path). ``on_trace(index, trace)`` is called as each prompt finishes, so a
        caller can save it at once. Sampled stages (temperature > 0) always go one at a
        time. Greedy answers can differ slightly from one-at-a-time runs (see parallel.py).
        With ``on_error(index, error)``, a prompt that cannot run (too long for the context)
        is reported and skipped instead of failing the whole group. ``final`` applies to every
        prompt of the group, as in :meth:`run_stage`. ``on_piece(index, text)`` hears each
        prompt's text as it is generated, in the pieces :meth:`run_stage` yields, whichever way
        the group runs (the server streams grouped requests with it). ``dropped(index)``, asked
        before every decode step, names prompts nobody waits for any more (a server request
        whose client hung up): each leaves its slot at once and gets no trace.
        """
        from .memory import compute_bytes, effective_kv_type, kv_cache_bytes
        from .parallel import ParallelContext, chunk_size, generate_group, seq_cells

        stage = self.manifest.stages[i]
        if final is not None:
            stage = final.apply(stage)

        def one_by_one(skip: Collection[int] = ()) -> list[StageTrace]:
            traces = []
            for j, v in enumerate(group):
                if j in skip or (dropped is not None and dropped(j)):
                    continue
                heard = None if on_piece is None else functools.partial(on_piece, j)
                gone = None if dropped is None else functools.partial(dropped, j)
                try:
                    trace = self.finish_stage(i, v, truncate=truncate, final=final, on_piece=heard, dropped=gone)
                except PromptError as exc:
                    if on_error is None:
                        raise
                    on_error(j, exc)
                    continue
                if trace is None:
                    continue
                traces.append(trace)
                if on_trace:
                    on_trace(j, trace)
            return traces

        if min(width, len(group)) < 2 or stage.sampling.temperature > 0:
            return one_by_one()
        c0 = self.pool.counters.snapshot()
        lm = self.pool.get(self.models[stage.model])
        prepared: dict[int, tuple[list[int], int]] = {}
        for j, v in enumerate(group):
            try:
                prepared[j] = prepare(lm, stage, v, self.pool.settings.ctx_size, truncate=truncate)
            except PromptError as exc:
                if on_error is None:
                    raise
                on_error(j, exc)
        if not prepared:
            return []
        token_lists = {j: t for j, (t, _) in prepared.items()}
        first_j = next(iter(token_lists))
        first = token_lists[first_j]
        adapter = self.adapters.get(stage.name)
        # split every prompt where the sequential path would: at its saved prefix (or the one the
        # first prompt would save) when the prompt starts with it, else nowhere
        active = None if adapter is None else (str(adapter.path), adapter.scale)
        n = prefix_split(lm, stage, first, active)
        saved = first[:n]
        with_prefix = [j for j, t in token_lists.items() if n and t[:n] == saved]
        without = sorted(set(token_lists) - set(with_prefix))
        cells = seq_cells(list(token_lists.values()), stage.max_tokens)
        info = lm.model.info
        kv_type = effective_kv_type(info, self.pool.settings.kv_cache_type)
        asked = width  # a new context gets every slot asked for, so the fuller groups after this one fit it
        width = min(width, len(group))

        def kept() -> "ParallelContext | None":
            """The context this model kept from an earlier group (the server's), when it will do."""
            return lm.parallel if lm.parallel is not None and lm.parallel.fits(lm, width + 1, cells) else None

        def extra(w: int) -> int:
            """The context that runs ``w`` slots (a kept one as it is), with the prefix states it has
            saved (parallel.py) and this stage's: they stay while it does."""
            k = kept() if w == width else None
            n_ctx, attn = (k.n_ctx, k.n_ctx // k.n_seq) if k else (cells * (w + 1), cells)
            held = lm.parallel.prefix_bytes if lm.parallel is not None else 0
            return kv_cache_bytes(info, n_ctx, kv_type) + compute_bytes(
                info, self.pool.settings.batch_size, n_ctx, flash_attn=self.pool.settings.flash_attn,
                attn_cells=attn) + held + kv_cache_bytes(info, n, kv_type)

        if spare_bytes is not None and extra(width) > spare_bytes:
            self.pool.close_parallel()  # a context kept from earlier groups gives its room back first
        while spare_bytes is not None and width >= 2 and extra(width) > spare_bytes:
            width //= 2
        if width < 2:
            return one_by_one(skip=set(range(len(group))) - set(prepared))
        self.pool.close_parallel(keep=lm)
        if kept() is None:
            self.pool.close_parallel()
            if asked > width and (spare_bytes is None or extra(asked) <= spare_bytes):
                width = asked
            lm.parallel = ParallelContext.open(lm, self.pool.settings, width + 1, cells, kv_type)
            self.pool.counters.parallel_opens += 1
        lm.parallel.use_adapter(adapter, self.pool.counters)
        setup = self.pool.counters.since(c0)
        traces: list[StageTrace | None] = [None] * len(group)

        def done(j: int, gen: Generation) -> None:
            gen.truncated_input_tokens = prepared[j][1]
            cost = setup if j == first_j else PoolCounters()  # loads and swaps are charged to the first prompt
            traces[j] = _trace(stage, gen, adapter, gen.prompt_seconds + gen.gen_seconds, cost)
            if on_trace:
                on_trace(j, traces[j])

        for part, prefix in ((with_prefix, n), (without, 0)):
            if part:
                generate_group(lm.parallel, stage, [token_lists[j] for j in part], self.pool.settings.seed + i,
                               prefix, chunk_size(self.pool.settings), on_done=lambda k, g, part=part: done(part[k], g),
                               counters=self.pool.counters,
                               on_piece=None if on_piece is None else lambda k, t, part=part: on_piece(part[k], t),
                               dropped=None if dropped is None else lambda k, part=part: dropped(part[k]))
        return [t for t in traces if t is not None]

    def run_stage_major(
        self,
        rows: list[dict[str, str]],
        *,
        width: int,
        on_trace: Callable[[int, int, StageTrace], None],
        on_error: Callable[[int, PromptError], None],
        before: Callable[[int, int], bool] | None = None,
        truncate: bool = False,
        spare_bytes: int | None = None,
        final: FinalStageSettings | None = None,
        on_piece: Callable[[int, int, str], None] | None = None,
        dropped: Callable[[int], bool] | None = None,
    ) -> None:
        """Every stage for every row of values, stage by stage, ``width`` decoded together.

        The one loop under batch mode, the Ray workers and the server's request groups. Each
        stage's output is written into its row for the stages after it; ``on_trace(row, stage,
        trace)`` hears it as each row finishes a stage. A row that cannot run (too long for the
        context) goes to ``on_error`` and drops out; the others go on. ``before(row, stage)``,
        when given, is asked first and can drop a row from a stage (already done when resumed,
        cancelled). ``final`` applies to the last stage only. ``on_piece(row, stage, text)``, when
        given, hears each row's text as it is generated. ``dropped(row)``, asked before every
        decode step, takes a row out mid-stage (its slot freed at once, no trace) and out of
        every later stage.
        """
        failed: set[int] = set()
        last = len(self.manifest.stages) - 1
        for i in range(last + 1):
            todo = [k for k in range(len(rows)) if k not in failed and (before is None or before(k, i))
                    and not (dropped is not None and dropped(k))]
            if not todo:
                continue

            def traced(j: int, trace: StageTrace, todo=todo, i=i) -> None:
                rows[todo[j]][trace.name] = trace.output
                on_trace(todo[j], i, trace)

            def errored(j: int, exc: PromptError, todo=todo) -> None:
                failed.add(todo[j])
                on_error(todo[j], exc)

            def piece(j: int, text: str, todo=todo, i=i) -> None:
                on_piece(todo[j], i, text)  # type: ignore[misc]

            self.finish_stage_group(i, [rows[k] for k in todo], width=width, truncate=truncate,
                                    spare_bytes=spare_bytes, on_trace=traced, on_error=errored,
                                    final=final if i == last else None, on_piece=piece if on_piece else None,
                                    dropped=None if dropped is None else lambda j, todo=todo: dropped(todo[j]))

    def execute(
        self,
        prompt: str,
        *,
        truncate: bool = False,
        on_stage_start: StageCallback | None = None,
        on_stage_end: TraceCallback | None = None,
        on_text: TextCallback | None = None,
        final: FinalStageSettings | None = None,
    ) -> Generator[str, None, RunResult]:
        """Yield the final stage's text as generated; return the whole trace.

        ``on_text`` sees every stage's text as it is generated, not only the final one's (a
        callback that raises stops the run there). ``final`` applies to the last stage only.
        """
        prompt = clean_prompt(prompt)
        values: dict[str, str] = {"input": prompt}
        traces: list[StageTrace] = []
        before = self.pool.counters.snapshot()
        t_run = time.perf_counter()
        last = len(self.manifest.stages) - 1
        for i, stage in enumerate(self.manifest.stages):
            if on_stage_start:
                on_stage_start(stage)
            steps = self.run_stage(i, values, truncate=truncate, final=final if i == last else None)
            while True:
                try:
                    piece = next(steps)
                except StopIteration as done:
                    trace = done.value
                    break
                if on_text:
                    on_text(stage, piece)
                if i == last:
                    yield piece
            traces.append(trace)
            values[stage.name] = trace.output
            if on_stage_end:
                on_stage_end(trace)
        return self.result(prompt, traces, time.perf_counter() - t_run, self.pool.counters.since(before))

    def result(self, prompt: str, traces: list[StageTrace], seconds: float, spent: PoolCounters) -> RunResult:
        return RunResult(
            prompt=prompt,
            answer=traces[-1].output,
            stages=traces,
            total_seconds=seconds,
            stack=self.manifest.name,
            policy=self.policy,
            loads=spent.loads,
            evictions=spent.evictions,
            adapter_swaps=spent.adapter_swaps,
            adapter_loads=spent.adapter_loads,
        )


def _trace(stage: StageSpec, gen: Generation, adapter: ResolvedAdapter | None, seconds: float,
           cost: PoolCounters) -> StageTrace:
    return StageTrace(
        name=stage.name,
        output=gen.text,
        prompt_tokens=gen.prompt_tokens,
        completion_tokens=gen.completion_tokens,
        seconds=seconds,
        model=stage.model,
        adapter=str(adapter.path.name) if adapter else None,
        stop_reason=gen.stop_reason,
        load_seconds=cost.load_seconds,
        swap_seconds=cost.swap_seconds,
        prompt_seconds=gen.prompt_seconds,
        gen_seconds=gen.gen_seconds,
        truncated_input_tokens=gen.truncated_input_tokens,
        cached_prompt_tokens=gen.cached_prompt_tokens,
        draft_n=gen.lookup.drafted if gen.lookup else 0,
        draft_n_accepted=gen.lookup.accepted if gen.lookup else 0,
    )
