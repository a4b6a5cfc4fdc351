"""One worker thread that runs requests in arrival order, several at a time with ``--parallel``.

llama.cpp contexts are not thread-safe, and on a small CPU one generation already uses every
core, so the server runs stacks on one worker thread and the event loop only moves bytes.
Requests wait in a bounded first-come, first-served queue; a full queue is refused at once
(the app answers 429 with ``Retry-After``) rather than piling up latency.

With ``parallel`` > 1 the worker takes the oldest request plus up to ``parallel`` − 1 others
waiting for the same stack with the same final-stage settings, and runs them stage-major:
each stage decodes the whole group in one llama_batch (``Pipeline.finish_stage_group``, the
same path as ``edge-fslm batch --parallel``). A grouped request still streams token by
token: each sequence's new text goes to its own job as soon as it is decoded (``on_piece``),
in the same events a lone run posts, so its client sees every stage's tokens arrive as one
alone would.

The multi-sequence context a group decodes in stays open for the next group, as
llama-server keeps its slots: reopening it (a KV cache for every slot) and evaluating each
stage's shared prefix again cost every group time that grouping was meant to save. It goes
when its model is evicted, when another model's group or the budget needs its room
(``Pipeline.finish_stage_group``), on shutdown, and once the queue has been empty for
``parallel_idle`` seconds, so a server at rest holds only what its plan counts. Its memory
comes from the budget's room beyond the plan (``spare_bytes``) while it is open, as while a
group runs. Under adapter residency "active" it keeps no adapter between groups, so a lone
request's stage still holds the one adapter the plan counts.

Events go back to the asking coroutine through ``loop.call_soon_threadsafe``. A request whose
client went away is flagged; its run stops at the next token (alone), or in a group its
sequence leaves its slot before the next decode step (``generate_group``'s ``dropped``: its KV
stream is cleared and the slot goes to the next prompt of the stage), and it runs no later
stage. The others' tokens stay what they were wherever grouped decoding is exact (the built-in
Q4_1 stacks), and the worker moves on.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import EdgeFSLMError
from ..manifest import StageSpec
from ..pipeline import FinalStageSettings, RunResult, StageTrace
from ..rss import current_rss
from .registry import Registry


# How long an empty queue keeps the last group's multi-sequence context open: long enough for
# a client's next request to reuse it, short enough that a server at rest gives the room back.
PARALLEL_IDLE_SECONDS = 30.0


class QueueFull(EdgeFSLMError):
    """Every queue slot is taken; the client should retry later."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(EdgeFSLMError):
    """The server is draining for exit and takes no new work."""


class Cancelled(Exception):
    """Raised inside a run whose client disconnected, to stop it at the next token."""


@dataclass
class Job:
    """One request on its way through the worker; ``events`` is read by the request's coroutine."""

    stack: str
    prompt: str
    final: FinalStageSettings
    loop: asyncio.AbstractEventLoop
    events: "asyncio.Queue[tuple[str, Any]]" = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None

    def post(self, kind: str, payload: Any = None) -> None:
        """Hand an event to the request's coroutine (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def group_key(self) -> tuple:
        return (self.stack, self.final)


@dataclass
class SchedulerStats:
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    refused: int = 0
    grouped: int = 0  # requests that ran in a group of two or more
    groups: int = 0  # the groups they ran in
    busy_seconds: float = 0.0


class Scheduler:
    """The bounded queue and the worker thread that drains it."""

    def __init__(self, registry: Registry, *, queue_size: int = 64, parallel: int = 1,
                 parallel_idle: float = PARALLEL_IDLE_SECONDS):
        self.registry = registry
        self.queue_size = queue_size
        self.parallel = max(1, parallel)
        self.parallel_idle = parallel_idle
        self.stats = SchedulerStats()
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: list[Job] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="edge-fslm-worker", daemon=True)

    # -- the event-loop side -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down — retry against a running server")
            if len(self._queue) >= self.queue_size:
                self.stats.refused += 1
                raise QueueFull(
                    f"all {self.queue_size} queue slots are taken — retry later, or start the server with a"
                    " larger --queue", retry_after=self.retry_after())
            self._queue.append(job)
            self._cv.notify()

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean request time so far, at least 1."""
        done = self.stats.completed + self.stats.failed
        mean = self.stats.busy_seconds / done if done else 1.0
        return max(1, round(mean))

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    def stop(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the ones queued and running, then end the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # -- the worker side -----------------------------------------------------------

    def _take(self, idle: float | None = None) -> list[Job] | None:
        """The next group; None once stopping, [] when the queue stayed empty for ``idle`` seconds."""
        with self._cv:
            deadline = None if idle is None else time.monotonic() + idle
            while not self._queue:
                if self._stopping:
                    return None
                if deadline is None:
                    self._cv.wait()
                elif not self._cv.wait(max(deadline - time.monotonic(), 0)) and time.monotonic() >= deadline:
                    return []
            first = self._queue.popleft()
            group = [first]
            if self.parallel > 1:
                for job in list(self._queue):
                    if len(group) >= self.parallel:
                        break
                    if job.group_key == first.group_key and not job.cancelled.is_set():
                        self._queue.remove(job)
                        group.append(job)
            self._running = group
            return group

    @property
    def parallel_contexts(self) -> int:
        """Multi-sequence contexts open now (at most one: see the module docstring)."""
        return sum(lm.parallel is not None for lm in self.registry.pool.loaded)

    def _release_parallel(self) -> None:
        with self.registry.pool.run_lock:  # the pool's contexts are used under it
            self.registry.pool.close_parallel()

    def _work(self) -> None:
        while True:
            group = self._take(self.parallel_idle if self.parallel_contexts else None)
            if group is None:
                return
            if not group:  # idle: the kept context gives its room back
                self._release_parallel()
                continue
            live = [j for j in group if not j.cancelled.is_set()]
            for j in group:
                if j.cancelled.is_set():
                    self.stats.cancelled += 1
                    j.post("error", Cancelled())
            t0 = time.perf_counter()
            try:
                if len(live) == 1:
                    self._run_one(live[0])
                elif live:
                    self._run_group(live)
            finally:
                self.stats.busy_seconds += time.perf_counter() - t0
                with self._cv:
                    self._running = []

    @staticmethod
    def _stage_end_payload(trace: StageTrace) -> dict:
        return {**trace.to_dict(), "rss_bytes": current_rss()}

    def _finish(self, job: Job, result: RunResult | None, exc: BaseException | None) -> None:
        if exc is None:
            self.stats.completed += 1
            job.post("done", result)
        elif isinstance(exc, Cancelled):
            self.stats.cancelled += 1
            job.post("error", exc)
        else:
            self.stats.failed += 1
            job.post("error", exc)

    def _run_one(self, job: Job) -> None:
        job.started = time.perf_counter()

        def check() -> None:
            if job.cancelled.is_set():
                raise Cancelled()

        def on_start(stage: StageSpec) -> None:
            check()
            job.post("stage_start", stage.name)

        def on_text(stage: StageSpec, piece: str) -> None:
            check()
            job.post("text", (stage.name, piece))

        def on_end(trace: StageTrace) -> None:
            job.post("stage_end", self._stage_end_payload(trace))

        try:
            stack = self.registry.get(job.stack)
            result = stack.run(job.prompt, on_stage_start=on_start, on_text=on_text, on_stage_end=on_end,
                               final=job.final)
        except (EdgeFSLMError, Cancelled) as exc:
            self._finish(job, None, exc)
        except Exception as exc:  # a bug must not kill the worker: the request gets a 500, the server goes on
            self._finish(job, None, exc)
        else:
            self._finish(job, result, None)

    def _run_group(self, jobs: list[Job]) -> None:
        """Run ``jobs`` (same stack, same final settings) stage-major, ``parallel`` decoded together."""
        from ..pipeline import clean_prompt
        from ..rss import RssSampler

        t0 = time.perf_counter()
        sampler = RssSampler()
        sampler.start()
        for job in jobs:
            job.started = t0
        self.stats.grouped += len(jobs)
        self.stats.groups += 1
        errors: dict[int, BaseException] = {}
        traces: dict[int, list[StageTrace]] = {k: [] for k in range(len(jobs))}
        values: dict[int, dict[str, str]] = {}
        for k, job in enumerate(jobs):
            try:
                values[k] = {"input": clean_prompt(job.prompt)}
            except EdgeFSLMError as exc:
                errors[k] = exc
        try:
            stack = self.registry.get(jobs[0].stack)
            pipeline = stack.pipeline
            with stack.exclusive():
                counters = pipeline.pool.counters.snapshot()
                stages = stack.manifest.stages

                def before(k: int, i: int) -> bool:
                    if k in errors:
                        return False
                    if jobs[k].cancelled.is_set():
                        errors[k] = Cancelled()
                        return False
                    jobs[k].post("stage_start", stages[i].name)
                    return True

                def on_piece(k: int, i: int, text: str) -> None:
                    if not jobs[k].cancelled.is_set():
                        jobs[k].post("text", (stages[i].name, text))

                def on_trace(k: int, i: int, trace: StageTrace) -> None:
                    traces[k].append(trace)
                    jobs[k].post("stage_end", self._stage_end_payload(trace))

                pipeline.run_stage_major(
                    [values.get(k, {}) for k in range(len(jobs))], width=self.parallel, before=before,
                    on_trace=on_trace, on_error=errors.__setitem__, final=jobs[0].final,
                    spare_bytes=self._spare_bytes(), on_piece=on_piece,
                    dropped=lambda k: jobs[k].cancelled.is_set())  # a hang-up frees its slot at the next step
                spent = pipeline.pool.counters.since(counters)
                pipeline.pool.park_parallel()  # kept open for the next group
        except Exception as exc:  # the whole group failed (a load error, say): every member hears why
            sampler.stop()
            self._release_parallel()  # what a failed group leaves in its context is not kept
            for k, job in enumerate(jobs):
                if k not in errors:
                    self._finish(job, None, exc)
            for k, exc_k in errors.items():
                self._finish(jobs[k], None, exc_k)
            return
        seconds = time.perf_counter() - t0
        peak = sampler.stop()
        for k, job in enumerate(jobs):
            if k not in errors and len(traces[k]) < len(stages):  # dropped mid-stage
                errors[k] = Cancelled()
            if k in errors:
                self._finish(job, None, errors[k])
                continue
            result = pipeline.result(values[k]["input"], traces[k], seconds, spent)
            result.extra["parallel_group"] = len(jobs)
            if stack.plan is not None:
                result.predicted_peak_rss_bytes = stack.plan.predicted_peak
            result.peak_rss_bytes = peak
            self._finish(job, result, None)

    def _spare_bytes(self) -> int | None:
        """What the server's budget leaves beyond the plan of every stack it serves (None: no budget)."""
        plan = self.registry.plan
        if self.registry.budget is None:
            return None
        return max(self.registry.budget - plan.predicted_peak, 0)
