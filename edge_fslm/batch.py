"""Batch runs: many prompts, stage-major, resumable after a kill at any point.

Stage-major means stage 1 runs for every prompt, then stage 2 for every prompt, and so
on. Under a tight budget each model is then loaded once per batch instead of once per
prompt, and on a shared base each adapter is swapped in once per batch.

Nothing is lost and nothing is duplicated, whatever kills the process:

* ``OUTPUT`` (JSONL) gets one line per prompt, appended, flushed and fsync'd when the
  prompt finishes its last stage. It is the only record of completion.
* ``OUTPUT.state.jsonl`` checkpoints every finished (prompt, stage) step the same way.
* A kill can leave at most one torn (partial) last line in either file. On resume the
  torn tail is cut off (jsonl.py's rule), completed ids are skipped, and checkpointed
  steps are reused. A file whose other lines are not ours is refused, untouched.
* The state file is deleted once every prompt is in ``OUTPUT``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import EdgeFSLMError, PromptError
from .jsonl import Appender, lines, read_records, regular_file
from .pipeline import StageTrace, clean_prompt


@dataclass
class BatchItem:
    id: str
    prompt: str
    values: dict[str, str] = field(default_factory=dict)
    traces: dict[str, dict] = field(default_factory=dict)
    line: int = 0  # where it is in the input file


@dataclass
class BatchReport:
    total: int
    already_done: int
    completed: int
    resumed_steps: int
    seconds: float
    load_seconds: float
    loads: int
    evictions: int
    adapter_swaps: int
    output: str
    failed: list[str] = field(default_factory=list)  # one line per prompt that could not run (too long, ...)


MAX_PARALLEL = 64


def _spare_bytes(stack) -> int | None:
    """What the memory budget leaves beyond the plan's predicted peak (None: no budget)."""
    plan = stack.plan
    if plan is None or plan.budget is None:
        return None
    return max(plan.budget - plan.predicted_peak, 0)


def read_inputs(path: str | Path) -> list[BatchItem]:
    """Read ``{"id", "prompt"}`` lines; every problem names the file and line."""
    p = Path(path)
    if not regular_file(p, "batch input"):
        raise EdgeFSLMError(f"{p}: no such input file")
    items: list[BatchItem] = []
    seen: set[str] = set()
    for n, line, _ in lines(p, "batch input"):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise PromptError(f"{where}: not UTF-8 — save the input as UTF-8") from None
        except json.JSONDecodeError as exc:
            raise EdgeFSLMError(f"{where}: not valid JSON ({exc.msg}) — one {{\"id\", \"prompt\"}} object per line") from None
        if not isinstance(obj, dict) or "prompt" not in obj or "id" not in obj:
            raise EdgeFSLMError(f"{where}: expected an object with \"id\" and \"prompt\"")
        if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
            raise EdgeFSLMError(f"{where}: \"id\" must be a string or an integer")
        if not isinstance(obj["prompt"], str):
            raise EdgeFSLMError(f"{where}: \"prompt\" must be a string")
        item_id = str(obj["id"])
        if item_id in seen:
            raise EdgeFSLMError(f"{where}: duplicate id {item_id!r} — ids must be unique")
        seen.add(item_id)
        try:
            prompt = clean_prompt(obj["prompt"])
        except PromptError as exc:
            raise PromptError(f"{where}: {exc}") from None
        items.append(BatchItem(id=item_id, prompt=prompt, line=n))
    if not items:
        raise EdgeFSLMError(f"{p}: no prompts — expected one {{\"id\", \"prompt\"}} object per line")
    return items


# What every line of a file we append to holds; a file without them is someone else's.
_RESULT_KEYS = ("id", "answer", "stack")
_STATE_KEYS = ("id", "stage", "stack", "trace")


def check_paths(input_path: Path, out: Path) -> None:
    """Refuse an output that would overwrite the input or cannot be created, before any work."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise EdgeFSLMError(f"{out}: folder {parent} does not exist — create it first")
    try:
        same = out.exists() and os.path.samefile(out, input_path)
    except OSError:
        same = False
    if same:
        raise EdgeFSLMError(f"{out}: is the input file — choose another output path")


def run_batch(
    stack,
    input_path: str | Path,
    output_path: str | Path,
    *,
    truncate: bool = False,
    parallel: int = 1,
    on_step: Callable[[BatchItem, StageTrace], None] | None = None,
    steps_hint: Callable[[int, int], None] | None = None,
) -> BatchReport:
    """Run every prompt of ``input_path`` through ``stack`` stage-major, appending to ``output_path``.

    With ``parallel`` > 1, up to that many prompts of a stage are decoded together
    (parallel.py) while the memory budget leaves room for the extra context: faster, but
    an answer can differ slightly from a one-at-a-time run. Re-running the same command
    after a kill resumes where it stopped.
    """
    if not isinstance(parallel, int) or isinstance(parallel, bool) or not 1 <= parallel <= MAX_PARALLEL:
        raise EdgeFSLMError(f"parallel={parallel}: expected an integer from 1 to {MAX_PARALLEL}")
    items = read_inputs(input_path)
    out = Path(output_path)
    state = out.with_name(out.name + ".state.jsonl")
    check_paths(Path(input_path), out)
    for path, what in ((out, "batch results"), (state, "batch state")):
        regular_file(path, what)  # before opening: opening a FIFO to write blocks
    results = Appender(out)  # the lock is taken first, so only one run reads and cuts these files
    checkpoints = None
    try:
        finished = read_records(out, _RESULT_KEYS, "batch results")
        steps = read_records(state, _STATE_KEYS, "batch state")
        checkpoints = Appender(state)
        return _run_locked(stack, items, str(input_path), out, state, finished, steps, results, checkpoints,
                           truncate, parallel, on_step, steps_hint)
    finally:
        results.close()
        if checkpoints is not None:
            checkpoints.close()


def run_items(
    stack,
    items: list[BatchItem],
    *,
    truncate: bool = False,
    parallel: int = 1,
    where: str = "",
    on_result: Callable[[dict], None],
    on_checkpoint: Callable[[BatchItem, str, dict], None] | None = None,
    on_step: Callable[[BatchItem, StageTrace], None] | None = None,
) -> tuple[int, dict[str, str]]:
    """Run ``items`` through ``stack`` stage-major; the engine under batch mode and the Ray workers.

    Steps already in ``item.traces`` (resumed from a checkpoint) are not run again. Each
    finished prompt's result record goes to ``on_result`` at once, and every earlier step to
    ``on_checkpoint``. Returns how many prompts finished, and ``id -> why`` for the prompts that
    could not run (too long for the context); the others go on.
    """
    stage_names = [s.name for s in stack.manifest.stages]
    last = len(stage_names) - 1
    completed = 0
    failed: dict[str, str] = {}

    def record(item: BatchItem, i: int, trace: StageTrace) -> None:
        nonlocal completed
        name = stage_names[i]
        item.values[name] = trace.output
        item.traces[name] = trace.to_dict()
        if i < last:
            if on_checkpoint:
                on_checkpoint(item, name, item.traces[name])
        else:
            stages = [item.traces[n] for n in stage_names]
            on_result({"id": item.id, "prompt": item.prompt, "answer": trace.output,
                       "stages": stages, "stack": stack.manifest.name})
            completed += 1
        if on_step:
            on_step(item, trace)

    def skip(k: int, exc: PromptError) -> None:
        failed[items[k].id] = f"{where}:{items[k].line}: id {items[k].id!r}: {exc}"

    try:
        with stack.exclusive():
            stack.pipeline.run_stage_major(
                [{"input": item.prompt, **item.values} for item in items], width=parallel, truncate=truncate,
                spare_bytes=_spare_bytes(stack),
                before=lambda k, i: stage_names[i] not in items[k].traces,  # steps resumed from a checkpoint
                on_trace=lambda k, i, trace: record(items[k], i, trace),  # saved as each prompt finishes
                on_error=skip)
    finally:
        stack.pipeline.pool.close_parallel()
    return completed, failed


def _run_locked(stack, items, input_name, out, state, finished, steps, results, checkpoints, truncate, parallel,
                on_step, steps_hint) -> BatchReport:
    done = {str(r.get("id")) for r in finished}
    pending = [it for it in items if it.id not in done]
    resumed = 0
    stage_names = [s.name for s in stack.manifest.stages]
    by_id = {it.id: it for it in pending}
    for rec in steps:
        item = by_id.get(str(rec.get("id")))
        if (item is None or rec.get("stage") not in stage_names or rec.get("stack") != stack.manifest.name
                or not isinstance(rec["trace"], dict) or not isinstance(rec["trace"].get("output"), str)):
            continue
        item.values[rec["stage"]] = rec["trace"]["output"]
        item.traces[rec["stage"]] = rec["trace"]
        resumed += 1
    if steps_hint:
        steps_hint(len(pending) * len(stage_names) - resumed, resumed)

    pool = stack.pipeline.pool
    before = pool.counters.snapshot()
    t0 = time.perf_counter()
    name = stack.manifest.name
    completed, failed = run_items(
        stack, pending, truncate=truncate, parallel=parallel, where=input_name, on_result=results.write,
        on_checkpoint=lambda item, stage, trace: checkpoints.write(
            {"stack": name, "id": item.id, "stage": stage, "trace": trace}),
        on_step=on_step)
    if completed == len(pending) and state.exists():
        state.unlink()
    spent = pool.counters.since(before)
    return BatchReport(
        total=len(items), already_done=len(items) - len(pending), completed=completed, resumed_steps=resumed,
        seconds=time.perf_counter() - t0, load_seconds=spent.load_seconds, loads=spent.loads,
        evictions=spent.evictions, adapter_swaps=spent.adapter_swaps, output=str(out),
        failed=list(failed.values()),
    )
