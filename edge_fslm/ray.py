"""Stacks on a Ray cluster: a predictor class for Ray Data, and sharded batch runs that resume.

Ray Data's convention for batch inference is ``ds.map_batches(PredictorClass, concurrency=N)``:
the class loads the model once per actor and maps a batch of rows to a batch of results.
:class:`StackPredictor` is that class for a stack; each batch runs stage-major through
:func:`batch.run_items`, the same engine as ``edge-fslm run --input``.

:func:`run_batch_on_ray` is ``run --input … --ray ADDRESS``: the same exactly-once promise as a
local batch run, across machines.

* The input is cut into fixed shards by position, so every run cuts it the same way.
* Actors (one stack each, restarted by Ray if their process dies; the shard is retried)
  return a shard's result records to the driver, which writes each shard as its own file,
  atomically (temporary file, fsync, rename): a shard file exists whole or not at all.
* When every shard is there, the driver appends them to ``OUTPUT`` in input order, one
  shard in memory at a time, skipping ids already in ``OUTPUT``, then deletes the shards.

A killed driver, run again, skips the shards on disk and ids already in ``OUTPUT``. Workers
need no shared disk: each resolves the stack's sources itself (with their sha256 checks), so
the models must be reachable from every node — a shared path, the ``pkg://`` packages installed
in the workers' environment, or a pre-filled Hugging Face cache.
"""

from __future__ import annotations

import contextlib

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .batch import BatchItem, check_paths, read_inputs, run_items
from .errors import EdgeFSLMError
from .jsonl import Appender, read_records, regular_file

SHARD_SIZE = 16
_RESULT_KEYS = ("id", "prompt", "answer", "stages")


def _require_ray():
    try:
        import ray
    except ImportError:
        raise EdgeFSLMError("running on a Ray cluster needs Ray — pip install 'edge-fslm[ray]'") from None
    return ray


class StackPredictor:
    """For ``ds.map_batches(StackPredictor, fn_constructor_kwargs={...}, concurrency=N)``.

    Rows need a ``prompt`` column and may have an ``id``. The output adds ``answer``, ``stages``
    (the ``run --json`` trace of every stage, as a JSON string, so any writer can store it) and
    ``error`` (why a prompt could not run, else None).
    """

    def __init__(self, stack: str = "fslm-smollm2", *, threads: int = 1, parallel: int = 1, truncate: bool = False,
                 ctx_size: int | None = None, budget: str | None = None, offline: bool | None = None):
        from .api import Stack

        self.stack = Stack.load(stack, threads=threads, ctx_size=ctx_size, budget=budget, offline=offline,
                                measure_rss=False)
        self.parallel = parallel
        self.truncate = truncate

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        prompts = [str(p) for p in batch["prompt"]]
        ids = [str(i) for i in batch["id"]] if "id" in batch else [str(k) for k in range(len(prompts))]
        items = [BatchItem(id=i, prompt=p, line=k + 1) for k, (i, p) in enumerate(zip(ids, prompts))]
        results: dict[str, dict] = {}
        _, failed = run_items(self.stack, items, truncate=self.truncate, parallel=self.parallel, where="batch",
                              on_result=lambda r: results.__setitem__(r["id"], r))
        return {
            **{k: list(v) for k, v in batch.items()},
            "id": ids,
            "answer": [results[i]["answer"] if i in results else None for i in ids],
            "stages": [json.dumps(results[i]["stages"], ensure_ascii=False) if i in results else None for i in ids],
            "error": [failed.get(i) for i in ids],
        }


class _ShardWorker:
    """One actor: a stack loaded once, running whole shards. Load errors are returned, not raised,
    so that Ray does not restart an actor that can never start (a stack this node cannot resolve)."""

    def __init__(self, stack: str, options: dict):
        from .api import Stack

        self.error: str | None = None
        try:
            self.stack = Stack.load(stack, measure_rss=False, preload=False, **options)
        except EdgeFSLMError as exc:
            self.error = str(exc)

    def run(self, shard: int, rows: list[tuple[str, str, int]], where: str, truncate: bool, parallel: int) -> dict:
        import socket
        import time

        if self.error:
            return {"shard": shard, "fatal": f"on node {socket.gethostname()}: {self.error}"}
        t0 = time.perf_counter()
        items = [BatchItem(id=i, prompt=p, line=line) for i, p, line in rows]
        results: list[dict] = []
        _, failed = run_items(self.stack, items, truncate=truncate, parallel=parallel, where=where,
                              on_result=results.append)
        order = {i: k for k, (i, _, _) in enumerate(rows)}
        results.sort(key=lambda r: order[r["id"]])  # input order, whatever order the group finished in
        return {"shard": shard, "results": results, "failed": failed, "seconds": time.perf_counter() - t0}


def _on_actors(ray, worker, args: tuple, shard_ids: list[int], call, *, threads: int, actors: int | None,
               what: str, on_reply: Callable[[dict], None]) -> int:
    """Run ``call(actor, shard)`` for every shard id on restartable actors of ``worker(*args)``
    (one per ``threads`` CPUs of the cluster unless ``actors`` is given); ``on_reply`` gets each
    reply as it arrives. A reply saying the worker could not load ``what`` stops the run, and
    the actors are killed however it ends. Returns how many actors ran."""
    from ray.util import ActorPool

    n = min(actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // max(threads, 1)), len(shard_ids))
    remote = ray.remote(num_cpus=threads, max_restarts=-1, max_task_retries=-1)(worker)
    pool = [remote.remote(*args) for _ in range(n)]
    try:
        for reply in ActorPool(pool).map_unordered(call, shard_ids):
            if "fatal" in reply:
                raise EdgeFSLMError(f"a Ray worker could not load {what} {reply['fatal']}")
            on_reply(reply)
    finally:
        for a in pool:
            ray.kill(a)
    return n


class _DistillWorker:
    """One actor of ``distill --ray``: the teacher loaded once, distilling whole shards."""

    def __init__(self, teacher_stack, options: dict):
        from .api import Stack

        self.error: str | None = None
        try:
            self.stack = Stack.load(teacher_stack, measure_rss=False, preload=False, **options)
        except EdgeFSLMError as exc:
            self.error = str(exc)

    def run(self, shard: int, examples: list[tuple[str, str, str]], parallel: int) -> dict:
        import socket

        from .train.data import Example
        from .train.distill import distill_rows

        if self.error:
            return {"shard": shard, "fatal": f"on node {socket.gethostname()}: {self.error}"}
        chunk = [Example(id=i, input=x, output=y) for i, x, y in examples]
        rows = [r for k in range(0, len(chunk), parallel) for r in distill_rows(self.stack, chunk[k:k + parallel], parallel)]
        return {"shard": shard, "rows": rows}


def distill_on_ray(teacher_stack, examples: list, options, *, threads: int | None, ctx_size: int | None,
                   parallel: int, on_rows: Callable[[list[dict]], None]) -> int:
    """``distill --ray``: shards of ``examples`` on the cluster's actors; ``on_rows`` gets each
    shard's rows as it returns (the caller appends them to distill.jsonl). Returns the actors used.

    No shard files are needed: distilled rows are keyed by id, so a shard a killed driver
    had not saved is simply redone on the next run, and a row written twice is kept once.
    """
    ray = connect(options.address)
    threads = threads or 1
    shards = [examples[k:k + options.shard_size] for k in range(0, len(examples), options.shard_size)]
    return _on_actors(ray, _DistillWorker, (teacher_stack, {"threads": threads, "ctx_size": ctx_size}),
                      list(range(len(shards))),
                      lambda a, k: a.run.remote(k, [(e.id, e.input, e.output) for e in shards[k]], parallel),
                      threads=threads, actors=options.actors, what="the teacher",
                      on_reply=lambda reply: on_rows(reply["rows"]))


class _EvalWorker:
    """One actor of ``eval ... --ray``: the evaluated stack loaded once, scoring whole shards."""

    def __init__(self, kind: str, stack, single: str | None, options: dict):
        import time

        from .evaluation.evaluate import load_for

        self.kind, self.single, self.error = kind, single is not None, None
        t0 = time.perf_counter()
        try:
            self.stack = load_for(kind, stack, single, **options)  # as eval loads it locally
        except EdgeFSLMError as exc:
            self.error = str(exc)
        self.load_seconds = time.perf_counter() - t0

    def run(self, shard: int, items: list) -> dict:
        import socket

        import psutil

        from .evaluation.evaluate import record_for
        from .rss import kernel_peak

        if self.error:
            return {"shard": shard, "fatal": f"on node {socket.gethostname()}: {self.error}"}
        records = [record_for(self.kind, self.stack, item, self.single) for item in items]
        peak = kernel_peak() or psutil.Process().memory_info().rss  # this actor process's peak RSS
        return {"shard": shard, "records": records, "load_seconds": self.load_seconds, "peak_rss_bytes": peak}


def evaluate_on_ray(kind: str, stack, single: str | None, items: list, options, *, threads: int | None,
                    ctx_size: int | None, max_tokens: int | None, adapter_residency: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> tuple[list, float, int]:
    """``eval arc|instruct --ray``: shards of ``items`` scored by the cluster's actors.

    Returns the records in input order, the slowest actor's load time and the largest actor's
    peak RSS. An evaluation writes its report at the end, so a killed driver starts over.
    """
    ray = connect(options.address)  # checks the address's form first
    threads = threads or 1
    shards = [items[k:k + options.shard_size] for k in range(0, len(items), options.shard_size)]
    by_shard: dict[int, list] = {}
    totals = {"load_seconds": 0.0, "peak_rss_bytes": 0, "done": 0}

    def take(reply: dict) -> None:
        by_shard[reply["shard"]] = reply["records"]
        for key in ("load_seconds", "peak_rss_bytes"):
            totals[key] = max(totals[key], reply[key])
        totals["done"] += len(reply["records"])
        if progress:
            progress(totals["done"], len(items))

    options_for_load = {"threads": threads, "ctx_size": ctx_size, "max_tokens": max_tokens,
                        "adapter_residency": adapter_residency}
    _on_actors(ray, _EvalWorker, (kind, stack, single, options_for_load),
               list(range(len(shards))), lambda a, k: a.run.remote(k, shards[k]), threads=threads,
               actors=options.actors, what="the stack", on_reply=take)
    return [r for k in range(len(shards)) for r in by_shard[k]], totals["load_seconds"], totals["peak_rss_bytes"]


@dataclass
class RayReport:
    total: int
    already_done: int
    completed: int
    shards: int
    shards_resumed: int
    actors: int
    seconds: float
    output: str
    failed: list[str] = field(default_factory=list)
    connect_seconds: float = 0.0  # ray.init: what every run pays before an actor starts
    busy_seconds: float = 0.0  # the actors' time inside shards (the first one's model load included), summed


def _write_atomic(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_address(address: str) -> None:
    """Refuse a malformed ``--ray`` address before any file is touched."""
    _host_port(address)


def _host_port(address: str) -> tuple[str, int] | None:
    """``--ray``'s HOST:PORT (None for auto and local); checked before any file is touched."""
    if address in ("auto", "local"):
        return None
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise EdgeFSLMError(f"ray address={address}: expected auto, local, HOST:PORT or ray://HOST:PORT")
    return host.strip("[]"), int(port)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on: ray.init would retry it for minutes."""
    import socket

    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as exc:
        raise EdgeFSLMError(f"ray address={address}: cannot connect to a Ray cluster ({exc.strerror or exc}) — start"
                            " one with `ray start --head`, or use the address local") from None


def connect(address: str):
    """``ray.init`` for ``--ray ADDRESS`` ('local' starts a private cluster in this process)."""
    ray = _require_ray()
    if ray.is_initialized():
        return ray
    _check_reachable(address)
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgeFSLMError(f"ray address={address}: cannot connect to a Ray cluster ({why}) — start one with"
                            " `ray start --head`, or use the address local") from None
    return ray


def run_batch_on_ray(
    stack: str,
    input_path: str | Path,
    output_path: str | Path,
    *,
    address: str = "auto",
    actors: int | None = None,
    threads: int = 1,
    parallel: int = 1,
    truncate: bool = False,
    shard_size: int = SHARD_SIZE,
    options: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RayReport:
    """``run --input INPUT --output OUTPUT --ray ADDRESS``: shards across the cluster, merged in order."""
    import time

    _host_port(address)
    items = read_inputs(input_path)
    out = Path(output_path)
    check_paths(Path(input_path), out)
    regular_file(out, "batch results")
    shards_dir = out.with_name(out.name + ".shards")
    fresh = not out.exists() and not shards_dir.exists()
    results = Appender(out)  # the lock: one driver per output
    ok = False
    try:
        done = {str(r.get("id")) for r in read_records(out, _RESULT_KEYS, "batch results")}
        t0 = time.perf_counter()
        shards = [items[k:k + shard_size] for k in range(0, len(items), shard_size)]
        shards_dir.mkdir(exist_ok=True)
        on_disk: dict[int, set[str]] = {}  # shard -> the ids its file holds (a prompt that failed is not there)
        for k in range(len(shards)):
            path = shards_dir / f"shard-{k:06d}.jsonl"
            if path.is_file():
                on_disk[k] = {str(r["id"]) for r in read_records(path, _RESULT_KEYS, "Ray shard")}
        todo = [k for k, sh in enumerate(shards) if any(it.id not in done and it.id not in on_disk.get(k, ()) for it in sh)]
        n_done_prompts = sum(len(shards[k]) for k in range(len(shards)) if k not in todo)
        if progress:
            progress(n_done_prompts, len(items))
        failed: dict[str, str] = {}
        n_actors = 0
        connect_s = busy_s = 0.0
        if todo:
            t_connect = time.perf_counter()
            ray = connect(address)
            connect_s = time.perf_counter() - t_connect
            where = str(input_path)

            def take(reply: dict) -> None:
                nonlocal n_done_prompts, busy_s
                failed.update(reply["failed"])
                busy_s += reply["seconds"]
                _write_atomic(shards_dir / f"shard-{reply['shard']:06d}.jsonl", reply["results"])
                n_done_prompts += len(shards[reply["shard"]])
                if progress:
                    progress(n_done_prompts, len(items))

            n_actors = _on_actors(
                ray, _ShardWorker, (stack, {**(options or {}), "threads": threads}), todo,
                lambda a, k: a.run.remote(k, [(it.id, it.prompt, it.line) for it in shards[k]], where, truncate,
                                          parallel),
                threads=threads, actors=actors, what=f"stack {stack}", on_reply=take)
        completed = 0
        for k in range(len(shards)):  # merge in input order, one shard in memory at a time
            path = shards_dir / f"shard-{k:06d}.jsonl"
            if not path.is_file():
                continue
            for rec in read_records(path, _RESULT_KEYS, "Ray shard"):
                if rec["id"] not in done:
                    results.write(rec)
                    done.add(rec["id"])
                    completed += 1
        if not failed:
            for path in shards_dir.glob("shard-*.jsonl"):
                path.unlink()
            shards_dir.rmdir()
        ok = True
        return RayReport(total=len(items), already_done=len(items) - completed - len(failed), completed=completed,
                         shards=len(shards), shards_resumed=len(on_disk), actors=n_actors,
                         seconds=time.perf_counter() - t0, output=str(out), failed=list(failed.values()),
                         connect_seconds=connect_s, busy_seconds=busy_s)
    finally:
        if not ok and fresh:  # a run that failed before any result (no cluster, say) leaves nothing behind;
            _remove_if_empty(out, shards_dir)  # still under the lock, so no other driver holds the file
        results.close()


def _remove_if_empty(out: Path, shards_dir: Path) -> None:
    with contextlib.suppress(OSError):
        if shards_dir.is_dir() and not any(shards_dir.iterdir()):
            shards_dir.rmdir()
    with contextlib.suppress(OSError):
        if out.is_file() and out.stat().st_size == 0 and not shards_dir.exists():
            out.unlink()
