"""Distillation: per-stage training data from a teacher model.

The teacher (any local GGUF) runs the source stack's own stage prompts on each request,
so the intermediate stages' targets are the teacher's notes; the final stage's target is
the dataset's gold answer, conditioned on those notes. Every finished request is one
fsynced line in ``distill.jsonl`` (jsonl.py's rules), so a killed run resumes where it
stopped without losing or repeating a row; the per-stage files are rewritten from it at the end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from .data import Example, load_examples
from .. import sources
from ..errors import DataError
from ..jsonl import folder_lock, read_records
from ..manifest import Manifest, ModelSpec, load_stack

ROWS_FILE = "distill.jsonl"
ROW_KEYS = ("id", "input", "notes", "output")  # one distilled request
STAGE_ROW_KEYS = ("id", "values", "output")  # one row of a <stage>.jsonl
META_FILE = "distill.meta.json"

Progress = Callable[[int, int], None]  # (rows done, rows total)


@dataclass
class DistillReport:
    """What one distill call did."""

    out_dir: Path
    rows_total: int
    rows_done_before: int
    rows_written: int
    seconds: float
    stage_files: dict[str, Path] = field(default_factory=dict)
    empty_notes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["out_dir"] = str(self.out_dir)
        d["stage_files"] = {k: str(v) for k, v in self.stage_files.items()}
        return d


def teacher_manifest(manifest: Manifest, teacher: str | Path) -> Manifest:
    """The source stack with every stage run by the teacher and no adapters."""
    spec = ModelSpec(id="teacher", source=str(Path(teacher).expanduser().resolve()))
    stages = tuple(replace(s, model="teacher", adapter=None) for s in manifest.stages)
    return replace(manifest, models={"teacher": spec}, stages=stages, name=f"{manifest.name}+teacher")


def _check_meta(out_dir: Path, meta: dict) -> None:
    """A resumed run must use the same stack, teacher and data files, or its rows would mix.

    The limits may change: rows are keyed by id, so a run with higher limits keeps every
    row an earlier one wrote and adds the rest.
    """
    p = out_dir / META_FILE
    if p.is_file():
        old = json.loads(p.read_text(encoding="utf-8"))
        files = lambda m: sorted(name for name, _ in m.get("data", []))  # noqa: E731
        for key, get in (("stack", None), ("teacher_sha256", None), ("stages", None), ("split", None), ("data", files)):
            a, b = (get(old), get(meta)) if get else (old.get(key), meta.get(key))
            if a != b:
                raise DataError(f"{out_dir}: was distilled with a different {key} ({a!r}) — "
                                "pass a new -o folder, or delete this one to start over")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def write_stage_files(out_dir: Path, stage_names: list[str], rows: Iterable[dict]) -> tuple[dict[str, Path], dict[str, int]]:
    """One JSONL per stage: the values its prompt may read (input and earlier notes) and its target."""
    rows = list(rows)
    files: dict[str, Path] = {}
    empty: dict[str, int] = {}
    last = len(stage_names) - 1
    for i, name in enumerate(stage_names):
        path = out_dir / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        empty[name] = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                values = {"input": r["input"], **{n: r["notes"][n] for n in stage_names[:i]}}
                target = r["output"] if i == last else r["notes"][name]
                if not target.strip():
                    empty[name] += 1
                f.write(json.dumps({"id": r["id"], "values": values, "output": target}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        files[name] = path
    return files, empty


def distill_rows(teacher, examples: list[Example], parallel: int) -> list[dict]:
    """One chunk of requests through the teacher's note stages, stage-major, decoded together:
    one distilled row each. The local run and the Ray workers both call this."""
    stage_names = [s.name for s in teacher.manifest.stages]
    values = [{"input": ex.input} for ex in examples]
    for i in range(len(stage_names) - 1):
        traces = teacher.pipeline.finish_stage_group(i, values, width=parallel, truncate=True)
        for v, t in zip(values, traces):
            v[stage_names[i]] = t.output
    return [{"id": ex.id, "input": ex.input, "notes": {k: x for k, x in v.items() if k != "input"},
             "output": ex.output} for ex, v in zip(examples, values)]


@dataclass(frozen=True)
class RayOptions:
    """Where and how ``distill`` fans out over a Ray cluster (``--ray``)."""

    address: str = "auto"
    actors: int | None = None
    shard_size: int = 16


def distill(
    stack: str | Path | Manifest,
    data: list[tuple[str | Path, int | None]],
    teacher: str | Path,
    out_dir: str | Path,
    *,
    split: str = "train",
    threads: int | None = None,
    ctx_size: int | None = None,
    parallel: int = 1,
    progress: Progress | None = None,
    ray: RayOptions | None = None,
) -> DistillReport:
    """Write ``out_dir/<stage>.jsonl`` for every stage of ``stack``, resuming a partial run.

    ``data`` lists (file, limit) pairs: Alpaca .json files (their ``split``) and ARC .jsonl
    files (the correct choice as the gold answer); ``limit`` keeps each file's first rows.
    With ``parallel`` > 1 that many requests go through each stage together (batched
    decoding: more rows an hour on CPU; notes can differ slightly from one-at-a-time runs).
    With ``ray``, shards of the requests run on a Ray cluster's actors (each loads the
    teacher once) and the driver appends each returned shard here, with the same resume rules.
    """
    if not isinstance(parallel, int) or isinstance(parallel, bool) or not 1 <= parallel <= 64:
        raise DataError(f"parallel={parallel}: expected an integer from 1 to 64")
    t0 = time.perf_counter()
    manifest = stack if isinstance(stack, Manifest) else load_stack(stack)
    teacher_path = sources.resolve(str(teacher), confine=False)  # a path, pkg:// or a cached hf:// file
    examples: list[Example] = []
    for path, limit in data:
        rows = load_examples(path, split)
        examples.extend(rows[:limit] if limit else rows)
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise DataError("the same data file is given twice — pass each file once")
    out = Path(out_dir).expanduser()
    stage_names = [s.name for s in manifest.stages]
    meta = {
        "stack": manifest.name,
        "stages": stage_names,
        "teacher": teacher_path.name,
        "teacher_sha256": sources.sha256_file(teacher_path),
        "data": [[Path(p).name, limit] for p, limit in data],
        "split": split,
    }
    if ray is not None:
        from ..ray import check_address

        check_address(ray.address)  # a malformed address fails before any file is touched
    with folder_lock(out, "distill"):
        return _distill_locked(manifest, examples, ids, teacher_path, out, meta, threads, ctx_size, parallel,
                               progress, t0, ray)


def _distill_locked(manifest, examples, ids, teacher_path, out, meta, threads, ctx_size, parallel, progress,
                    t0, ray) -> DistillReport:
    from ..api import Stack  # llama.cpp is only needed once there is work to do

    stage_names = [s.name for s in manifest.stages]
    _check_meta(out, meta)
    rows_path = out / ROWS_FILE
    done_rows = read_records(rows_path, ROW_KEYS, "distill rows")
    done = {r["id"] for r in done_rows} & set(ids)  # rows of a wider earlier run are kept but not counted
    todo = [e for e in examples if e.id not in done]
    report = DistillReport(out_dir=out, rows_total=len(examples), rows_done_before=len(done), rows_written=0, seconds=0.0)
    if progress:
        progress(len(done), len(examples))
    if todo:
        with open(rows_path, "a", encoding="utf-8") as f:

            def write(rows: list[dict]) -> None:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done_rows.append(row)
                f.flush()
                os.fsync(f.fileno())  # a row on disk is a row a killed run keeps
                report.rows_written += len(rows)
                if progress:
                    progress(len(done) + report.rows_written, len(examples))

            teacher_stack = teacher_manifest(manifest, teacher_path)
            if ray is not None:
                from ..ray import distill_on_ray

                distill_on_ray(teacher_stack, todo, ray, threads=threads, ctx_size=ctx_size, parallel=parallel,
                               on_rows=write)
            else:
                with Stack.load(teacher_stack, threads=threads, ctx_size=ctx_size, measure_rss=False) as st:
                    for start in range(0, len(todo), parallel):
                        write(distill_rows(st, todo[start:start + parallel], parallel))
    order = {i: k for k, i in enumerate(ids)}
    unique = {r["id"]: r for r in reversed(done_rows) if r["id"] in order}  # the first copy of each id wins
    kept = sorted(unique.values(), key=lambda r: order[r["id"]])
    report.stage_files, report.empty_notes = write_stage_files(out, stage_names, kept)
    report.seconds = time.perf_counter() - t0
    return report
