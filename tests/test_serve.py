"""edge-fslm serve: a real server process on 127.0.0.1, real OpenAI and HTTP clients, the real model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from edge_fslm.pipeline import FinalStageSettings
from edge_fslm.testing import free_port, start_server

from .serve_helpers import write_quick_stack

openai = pytest.importorskip("openai")

PROMPTS = [
    "Why is the sky blue?",
    "What do plants need to grow?",
    "Name a planet in the solar system.",
    "How does a magnet work?",
    "What is the boiling point of water?",
    "Why do we have seasons?",
    "What is photosynthesis?",
    "How many legs does a spider have?",
]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return write_quick_stack(tmp_path_factory.mktemp("serve-stack"))


@pytest.fixture(scope="module")
def server(quick, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    srv = start_server(["--stack", str(quick), "--stack", "fslm-smollm2-prompted", "--preload"], log)
    yield srv
    assert srv.terminate() == 0, srv.output()


@pytest.fixture(scope="module")
def local_stack(quick):
    from edge_fslm import Stack

    with Stack.load(quick) as st:
        yield st


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(server, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120, **kw)


def test_models_lists_every_stack_and_health_answers(server, client):
    assert sorted(m.id for m in client.models.list().data) == ["fslm-smollm2-prompted", "quick"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["failed_stacks"] == {}
    assert health["loaded_models"] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]  # two stacks, one base, loaded once


def test_chat_equals_stack_run_non_streaming_and_streaming(client, local_stack):
    prompt = PROMPTS[0]
    want = local_stack.run(prompt, final=FinalStageSettings(max_tokens=20))
    r = client.chat.completions.create(model="quick", messages=[{"role": "user", "content": prompt}], max_tokens=20)
    assert r.choices[0].message.content == want.answer
    assert r.choices[0].finish_reason == ("length" if want.stages[-1].stop_reason == "length" else "stop")
    trace = r.model_extra["fslm"]
    assert [s["name"] for s in trace["stages"]] == ["keywords", "answer"]
    assert [s["output"] for s in trace["stages"]] == [s.output for s in want.stages]
    assert r.usage.prompt_tokens == sum(s.prompt_tokens for s in want.stages)
    assert r.usage.completion_tokens == sum(s.completion_tokens for s in want.stages)
    chunks = list(client.chat.completions.create(
        model="quick", messages=[{"role": "user", "content": prompt}], max_tokens=20, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.answer
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert [s["output"] for s in chunks[-1].model_extra["fslm"]["stages"]] == [s.output for s in want.stages]


def test_stream_with_usage_ends_with_usage_and_the_trace(server):
    body = {"model": "quick", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 8,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
    assert [s["name"] for s in last["fslm"]["stages"]] == ["keywords", "answer"]


def test_stage_events_stream_every_stage_in_order(server):
    body = {"model": "quick", "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 8,
            "stream": True, "fslm_stream_stages": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    stage_events = [(e["fslm"]["event"], e["fslm"]["stage"]) for e in events if "event" in e.get("fslm", {})]
    assert stage_events[0] == ("stage_start", "keywords")
    assert stage_events[-1] == ("stage_end", "answer")
    assert stage_events.index(("stage_end", "keywords")) < stage_events.index(("stage_start", "answer"))
    ends = [e["fslm"]["trace"] for e in events if e.get("fslm", {}).get("event") == "stage_end"]
    text = {n: "".join(e["fslm"]["text"] for e in events if e.get("fslm", {}).get("event") == "stage_delta"
                       and e["fslm"]["stage"] == n) for n in ("keywords", "answer")}
    assert all(text[t["name"]] == t["output"] for t in ends)
    assert all(t["rss_bytes"] > 50e6 for t in ends)


def test_completions_endpoint_and_request_settings(client, local_stack):
    r = client.completions.create(model="quick", prompt=PROMPTS[2], max_tokens=6, stop=["\n"])
    want = local_stack.run(PROMPTS[2], final=FinalStageSettings(max_tokens=6, stop=("\n",)))
    assert r.choices[0].text == want.answer and r.object == "text_completion"
    # sampling with a seed is reproducible
    a, b = (client.chat.completions.create(model="quick", messages=[{"role": "user", "content": PROMPTS[3]}],
                                           max_tokens=12, temperature=1.0, seed=7).choices[0].message.content
            for _ in range(2))
    assert a == b


def test_a_conversation_becomes_one_transcript_input():
    from edge_fslm.serve.wire import conversation_input

    assert conversation_input([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) == \
        "System: Be brief.\nUser: Hi"
    assert conversation_input([{"role": "user", "content": "Hi"}]) == "Hi"
    assert conversation_input([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == "a\nb"
    assert conversation_input([
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}]) == "User: What is 2+2?\nAssistant: 4\nUser: And 3+3?"


BAD = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b'{"model": "quick", "messages": [{"role": "user", "content": "\xff"}]}', 400, "invalid_json"),
    (b'{"model": "quick", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "missing_required_parameter"),
    (b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}', 404, "model_not_found"),
    (b'{"model": "quick", "messages": "hi"}', 400, "invalid_type"),
    (b'{"model": "quick", "messages": []}', 400, "invalid_type"),
    (b'{"model": "quick", "messages": [{"role": "user", "content": 5}]}', 400, "invalid_type"),
    (b'{"model": "quick", "messages": [{"role": "tool", "content": "x"}]}', 400, "invalid_value"),
    (b'{"model": "quick", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}', 400, "invalid_type"),
    (b'{"model": "quick", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "invalid_value"),
    (b'{"model": "quick", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}', 400, "invalid_value"),
    (b'{"model": "quick", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}', 400, "invalid_type"),
    (b'{"model": "quick", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "invalid_type"),
    (b'{"model": "quick", "messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "invalid_value"),
    (b'{"model": "quick", "messages": [{"role": "assistant", "content": "hi"}]}', 400, "invalid_value"),
    (b'{"model": "quick", "messages": [' + b",".join([b'{"role": "user", "content": "x"}'] * 300) + b"]}", 400,
     "invalid_value"),
    (json.dumps({"model": "quick", "messages": [{"role": "user", "content": "word " * 2000}]}).encode(), 400,
     "context_length_exceeded"),
]


@pytest.mark.parametrize("raw,status,code", BAD, ids=[f"{c}-{i}" for i, (_, _, c) in enumerate(BAD)])
def test_malformed_requests_get_openai_errors(server, raw, status, code):
    for stream in (False, True):
        body = raw
        if stream and b'"stream"' in raw:
            continue
        if stream and raw.startswith(b'{"model"'):
            body = raw[:-1] + b', "stream": true}'
        r = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and err["type"]
        assert "Traceback" not in r.text


def test_oversized_body_and_unknown_routes(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"x" * (2 << 20), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert httpx.get(f"{server.url}/v2/nothing").json()["error"]["code"] == "not_found"
    assert httpx.delete(f"{server.url}/v1/models").status_code == 405


def test_concurrent_clients_get_the_sequential_answers(server, client):
    def ask(prompt: str) -> str:
        r = client.chat.completions.create(model="quick", messages=[{"role": "user", "content": prompt}], max_tokens=16)
        return r.choices[0].message.content

    sequential = {p: ask(p) for p in PROMPTS}
    jobs = [(c, PROMPTS[(c + k) % len(PROMPTS)]) for c in range(8) for k in range(5)]  # 8 clients × 5 requests

    def one_client(c: int) -> list[tuple[str, str]]:
        return [(p, ask(p)) for cc, p in jobs if cc == c]

    with ThreadPoolExecutor(8) as pool:
        got = [pair for part in pool.map(one_client, range(8)) for pair in part]
    assert len(got) == 40
    assert all(answer == sequential[p] for p, answer in got)


def test_a_client_killed_mid_stream_leaves_the_server_serving(server):
    before = httpx.get(f"{server.url}/health").json()["requests"]["cancelled"]
    script = f"""
import httpx, sys
body = {{"model": "quick", "messages": [{{"role": "user", "content": "Write a very long story."}}],
        "max_tokens": 400, "stream": True}}
with httpx.stream("POST", "{server.url}/v1/chat/completions", json=body, timeout=120) as r:
    for i, line in enumerate(r.iter_lines()):
        if line.startswith("data: ") and i > 4:
            print("streaming", flush=True)
            sys.stdin.read()  # wait here until killed
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "streaming"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health").json()["requests"]["cancelled"] == before:
        assert time.monotonic() < deadline, "the killed client's generation was not stopped"
        time.sleep(0.2)
    assert httpx.get(f"{server.url}/health").json()["queue"]["running"] == 0
    r = chat(server, {"model": "quick", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200


def test_parallel_decoding_groups_requests_and_answers_exactly(quick, tmp_path):
    """With --parallel the worker decodes waiting requests together, and batched greedy decoding
    is exact (issue 16): 8 clients × 5 requests get the answers of one-at-a-time decoding."""
    srv = start_server(["--stack", str(quick), "--parallel", "4", "--preload"], tmp_path / "server.log")
    try:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(prompt: str) -> str:
            return c.chat.completions.create(model="quick", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=16).choices[0].message.content

        sequential = {p: ask(p) for p in PROMPTS}
        jobs = [PROMPTS[(i + k) % len(PROMPTS)] for i in range(8) for k in range(5)]  # 8 clients × 5
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, jobs))
        health = httpx.get(f"{srv.url}/health").json()
        assert health["requests"]["grouped"] >= 2, health
        differ = [p for p, a in zip(jobs, together) if a != sequential[p]]
        assert not differ, f"{len(differ)}/{len(jobs)} grouped answers differ from one at a time: {differ[:3]}"
    finally:
        assert srv.terminate() == 0, srv.output()


def test_parallel_groups_reuse_one_context_and_its_prefixes(quick, tmp_path):
    """Consecutive groups decode in one multi-sequence context, opened once, and evaluate each
    stage's shared prefix once (issue 15); an idle queue gives the context back."""
    srv = start_server(["--stack", str(quick), "--parallel", "4", "--parallel-idle", "5", "--preload"],
                       tmp_path / "server.log")
    try:
        def ask(prompt: str) -> int:
            return chat(srv, {"model": "quick", "messages": [{"role": "user", "content": prompt}],
                              "max_tokens": 8}).status_code

        with ThreadPoolExecutor(8) as pool:  # 8 clients × 3 requests: groups follow one another
            assert set(pool.map(ask, [PROMPTS[i % len(PROMPTS)] for i in range(24)])) == {200}
        par = httpx.get(f"{srv.url}/health").json()["parallel"]
        stages = 2
        assert par["groups"] >= 2, par
        assert par["context_opens"] == 1 and par["contexts_open"] == 1, par
        assert par["prefix_evals"] == stages and par["prefix_reuses"] == stages * (par["groups"] - 1), par
        deadline = time.monotonic() + 30
        while httpx.get(f"{srv.url}/health").json()["parallel"]["contexts_open"]:
            assert time.monotonic() < deadline, "the idle server kept its parallel context"
            time.sleep(0.5)
    finally:
        assert srv.terminate() == 0, srv.output()


def test_grouped_streams_arrive_token_by_token_and_equal_sequential_answers(quick, tmp_path):
    """A streaming request decoded in a --parallel group gets each stage's text as its tokens are
    decoded, not once the stage ends for the group, and the streamed text is the sequential answer.
    A member whose client hangs up mid-stage leaves the group at the next step; the others go on."""
    srv = start_server(["--stack", str(quick), "--parallel", "4", "--preload"], tmp_path / "server.log")
    try:
        prompts = [PROMPTS[i] for i in (0, 1, 3)]  # answers of several tokens
        leaver = PROMPTS[5]  # a long answer: time to hang up before its stage ends
        ask = {"model": "quick", "max_tokens": 24}
        sequential = {}
        for p in prompts:  # one at a time: each runs alone, as a lone request
            r = chat(srv, {**ask, "messages": [{"role": "user", "content": p}]}).json()
            assert "parallel_group" not in r["fslm"]
            sequential[p] = r
        assert all(r["fslm"]["stages"][-1]["completion_tokens"] > 2 for r in sequential.values())

        def event(e: dict, kind: str, stage: str | None = None) -> bool:
            f = e.get("fslm", {})
            return f.get("event") == kind and stage in (None, f["stage"])

        def content(out: list) -> bool:  # the final stage's first token: its sequence is in a slot
            return bool(out[-1].get("choices") and out[-1]["choices"][0]["delta"].get("content"))

        def stream(body: dict, out: list, hang_up=lambda out: False) -> None:
            with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        out.append(json.loads(line[6:]))
                        if hang_up(out):
                            return

        # a long lone request keeps the worker busy until all four have queued, so they form one group
        blocker, release = [], threading.Event()
        long = {"model": "quick", "messages": [{"role": "user", "content": "Write a very long story."}],
                "max_tokens": 400, "stream": True}
        events: dict[str, list[dict]] = {p: [] for p in [*prompts, leaver]}
        with ThreadPoolExecutor(5) as pool:
            held = pool.submit(stream, long, blocker, lambda out: release.is_set())
            while not blocker:
                time.sleep(0.02)
            streams = [pool.submit(stream, {**ask, "messages": [{"role": "user", "content": p}], "stream": True,
                                            "fslm_stream_stages": True}, events[p],
                                   content if p == leaver else (lambda out: False))
                       for p in events]
            while httpx.get(f"{srv.url}/health").json()["queue"]["waiting"] < len(events):
                assert not held.done(), "the blocker ended before the group queued"
                time.sleep(0.02)
            release.set()
            held.result()
            for f in streams:
                f.result()
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{srv.url}/health").json())["queue"]["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert health["requests"]["grouped"] == len(events) and health["parallel"]["groups"] == 1, health
        assert health["requests"]["cancelled"] == 2, health  # the blocker, and the leaver
        assert health["parallel"]["dropped"] == 1, health  # the leaver's sequence left mid-stage
        for p in prompts:
            got, want = events[p], sequential[p]
            assert got[-1]["fslm"]["parallel_group"] == len(events)  # the trace on the last event
            assert [s["output"] for s in got[-1]["fslm"]["stages"]] == [s["output"] for s in want["fslm"]["stages"]]
            streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in got if e["choices"])
            assert streamed == want["choices"][0]["message"]["content"]
            # the answer's content comes in several chunks, all before its stage_end event
            start = next(i for i, e in enumerate(got) if event(e, "stage_start", "answer"))
            end = next(i for i, e in enumerate(got) if event(e, "stage_end", "answer"))
            content = [e["choices"][0]["delta"].get("content") for e in got[start:end] if e["choices"]]
            assert len([c for c in content if c]) > 1, (p, content)
            assert "".join(c for c in content if c) == streamed
            # every stage's text streams in pieces between its own stage_start and stage_end
            for stage in want["fslm"]["stages"]:
                name = stage["name"]
                i0 = next(i for i, e in enumerate(got) if event(e, "stage_start", name))
                i1 = next(i for i, e in enumerate(got) if event(e, "stage_end", name))
                deltas = [i for i, e in enumerate(got) if event(e, "stage_delta", name)]
                assert all(i0 < i < i1 for i in deltas)
                assert "".join(got[i]["fslm"]["text"] for i in deltas) == stage["output"]
                assert len(deltas) > 1 or stage["completion_tokens"] <= 2, (name, deltas)
    finally:
        assert srv.terminate() == 0, srv.output()


def test_a_full_queue_answers_429_with_retry_after(quick, tmp_path):
    srv = start_server(["--stack", str(quick), "--queue", "1", "--preload"], tmp_path / "server.log")
    try:
        long = {"model": "quick", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 200}
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(chat, srv, long)
            while httpx.get(f"{srv.url}/health").json()["queue"]["running"] == 0:
                time.sleep(0.05)
            second = pool.submit(chat, srv, long)
            while httpx.get(f"{srv.url}/health").json()["queue"]["waiting"] == 0:
                time.sleep(0.05)
            third = chat(srv, long)
            assert third.status_code == 429, third.text
            assert int(third.headers["retry-after"]) >= 1
            assert third.json()["error"]["type"] == "rate_limit_error"
            assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        assert srv.terminate() == 0, srv.output()


def test_api_key_is_required_when_set(quick, tmp_path):
    srv = start_server(["--stack", str(quick)], tmp_path / "server.log", env={"EDGE_FSLM_API_KEY": "s3cret"})
    try:
        body = {"model": "quick", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert chat(srv, body).status_code == 401
        wrong = chat(srv, body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
        ok = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="quick", messages=body["messages"], max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{srv.url}/health").status_code == 200  # liveness needs no key
    finally:
        assert srv.terminate() == 0, srv.output()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_fslm.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120)


def test_an_exposed_host_without_a_key_refuses_to_start():
    r = run_cli("--host", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 2
    assert r.stderr.startswith("error: --host 0.0.0.0") and "--api-key" in r.stderr and "Traceback" not in r.stderr


def test_a_budget_too_small_for_a_stack_is_a_clear_error(quick):
    r = run_cli("--stack", str(quick), "--budget", "60MB", "--port", str(free_port()))
    assert r.returncode == 2
    assert "error: stack quick needs at least" in r.stderr and "budget is" in r.stderr
    assert "Traceback" not in r.stderr


def test_sigterm_drains_the_requests_in_flight(quick, tmp_path):
    srv = start_server(["--stack", str(quick), "--preload"], tmp_path / "server.log")
    body = {"model": "quick", "messages": [{"role": "user", "content": "Write a story."}], "max_tokens": 60,
            "stream": True}
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)

    t = threading.Thread(target=stream)
    t.start()
    while not any(line.startswith("data: ") for line in lines):
        time.sleep(0.02)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0, srv.output()
    t.join(10)
    assert lines[-1] == "data: [DONE]" or lines[-2:] == ["data: [DONE]", ""]
    final = json.loads(next(line for line in reversed(lines) if line.startswith("data: {"))[6:])
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/health", timeout=2)


def test_a_request_that_arrives_while_the_server_stops_gets_503_and_retry_after(quick):
    """The window between the worker being told to stop and uvicorn closing the socket.

    uvicorn refuses new connections once a shutdown starts, so this one state is reached
    in-process: the real app and scheduler, driven by Starlette's ASGI test client.
    """
    from starlette.testclient import TestClient

    from edge_fslm.serve.app import create_app
    from edge_fslm.serve.registry import Registry

    app = create_app(Registry.open([quick]))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        app.state.server.scheduler.stop(5)
        r = client.post("/v1/chat/completions", json={"model": "quick", "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
    assert r.json()["error"]["code"] == "shutting_down" and "shutting down" in r.json()["error"]["message"]
