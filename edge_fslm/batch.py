"""Batch runs: many prompts, stage-major, resumable after a kill at any point.

Stage-major means stage 1 runs for every prompt, then stage 2 for every prompt, and so
on. Under a tight budget each model is then loaded once per batch instead of once per
prompt, and on a shared base each adapter is swapped in once per batch.

Nothing is lost and nothing is duplicated, whatever kills the process:

* ``OUTPUT`` (JSONL) gets one line per prompt, appended, flushed and fsync'd when the
  prompt finishes its last stage. It is the only record of completion.
* ``OUTPUT.state.jsonl`` checkpoints every finished (prompt, stage) step the same way.
* A kill can leave at most one torn (partial) last line in either file. On resume the
  torn tail is cut off, completed ids are skipped, and checkpointed steps are reused.
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
from .pipeline import StageTrace, clean_prompt


@dataclass
class BatchItem:
    id: str
    prompt: str
    values: dict[str, str] = field(default_factory=dict)
    traces: dict[str, dict] = field(default_factory=dict)


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
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise EdgeFSLMError(f"{p}: no such input file") from None
    except IsADirectoryError:
        raise EdgeFSLMError(f"{p}: is a directory — pass a JSONL file of {{\"id\", \"prompt\"}} lines") from None
    except OSError as exc:
        raise EdgeFSLMError(f"{p}: cannot read ({exc.strerror})") from None
    items: list[BatchItem] = []
    seen: set[str] = set()
    for n, line in enumerate(raw.split(b"\n"), start=1):
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
        items.append(BatchItem(id=item_id, prompt=prompt))
    if not items:
        raise EdgeFSLMError(f"{p}: no prompts — expected one {{\"id\", \"prompt\"}} object per line")
    return items


def _recover_jsonl(path: Path) -> list[dict]:
    """Every complete JSON line of ``path``; a torn last line (from a kill) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    good = 0
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break  # no newline: the write was cut short
        try:
            records.append(json.loads(data[pos:end]))
        except json.JSONDecodeError:
            break
        pos = end + 1
        good = pos
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return records


class _Appender:
    """Append one JSON line and make it durable before returning."""

    def __init__(self, path: Path):
        self.f = open(path, "ab")

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


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
        raise EdgeFSLMError(f"--parallel {parallel}: expected an integer from 1 to {MAX_PARALLEL}")
    items = read_inputs(input_path)
    out = Path(output_path)
    state = out.with_name(out.name + ".state.jsonl")
    done = {str(r.get("id")) for r in _recover_jsonl(out)}
    pending = [it for it in items if it.id not in done]
    resumed = 0
    stage_names = [s.name for s in stack.manifest.stages]
    for rec in _recover_jsonl(state):
        item = next((it for it in pending if it.id == str(rec.get("id"))), None)
        if item is None or rec.get("stage") not in stage_names or rec.get("stack") != stack.manifest.name:
            continue
        item.values[rec["stage"]] = rec["trace"]["output"]
        item.traces[rec["stage"]] = rec["trace"]
        resumed += 1
    if steps_hint:
        steps_hint(len(pending) * len(stage_names) - resumed, resumed)

    pool = stack.pipeline.pool
    before = pool.counters.snapshot()
    t0 = time.perf_counter()
    results, checkpoints = _Appender(out), _Appender(state)
    completed = 0
    last = len(stage_names) - 1

    def record(item: BatchItem, i: int, trace: StageTrace) -> None:
        nonlocal completed
        name = stage_names[i]
        item.values[name] = trace.output
        item.traces[name] = trace.to_dict()
        if i < last:
            checkpoints.write({"stack": stack.manifest.name, "id": item.id, "stage": name, "trace": item.traces[name]})
        else:
            stages = [item.traces[n] for n in stage_names]
            results.write({"id": item.id, "prompt": item.prompt, "answer": trace.output,
                           "stages": stages, "stack": stack.manifest.name})
            completed += 1
        if on_step:
            on_step(item, trace)

    try:
        with stack.exclusive():
            spare = _spare_bytes(stack)
            for i, name in enumerate(stage_names):
                todo = [item for item in pending if name not in item.traces]
                if todo:
                    values = [{"input": item.prompt, **item.values} for item in todo]
                    stack.pipeline.finish_stage_group(
                        i, values, width=parallel, truncate=truncate, spare_bytes=spare,
                        on_trace=lambda j, trace: record(todo[j], i, trace))  # saved as each prompt finishes
    finally:
        pool.close_parallel()
        results.close()
        checkpoints.close()
    if completed == len(pending) and state.exists():
        state.unlink()
    spent = pool.counters.since(before)
    return BatchReport(
        total=len(items), already_done=len(items) - len(pending), completed=completed, resumed_steps=resumed,
        seconds=time.perf_counter() - t0, load_seconds=spent.load_seconds, loads=spent.loads,
        evictions=spent.evictions, adapter_swaps=spent.adapter_swaps, output=str(out),
    )
