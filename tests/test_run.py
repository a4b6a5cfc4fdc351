"""The runtime on the real model: the default stack, user stacks, streaming, limits, threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_fslm import Stack
from edge_fslm.errors import ManifestError, PromptError, SourceError
from edge_fslm.stage import StopScanner

from .conftest import write_manifest

PROMPTS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Which gas do plants take in from the air to make food?",
]


def test_default_stack_runs_every_stage(default_stack):
    for prompt in PROMPTS:
        r = default_stack.run(prompt)
        assert [s.name for s in r.stages] == ["understand", "keywords", "context", "answer"]
        for s in r.stages:
            assert s.output.strip(), f"stage {s.name} wrote nothing for {prompt!r}"
            assert s.output == s.output.strip()
            assert s.prompt_tokens > 0 and 0 < s.completion_tokens <= default_stack.manifest.stage(s.name).max_tokens
            assert s.seconds > 0
        assert r.answer == r.stages[-1].output
        assert r.peak_rss_bytes > 50_000_000  # the model's weights are resident
        assert r.total_seconds >= sum(s.seconds for s in r.stages) * 0.99


def test_france_answer_says_paris(default_stack):
    r = default_stack.run("What is the capital of France?")
    assert "Paris" in r.answer


def test_stages_hand_text_forward(default_stack):
    r = default_stack.run("Which gas do plants take in from the air to make food?")
    kw = r.stages[1].output
    assert "\n" not in kw  # the keywords stage stops at the end of its line
    assert "," in kw or len(kw.split()) <= 6


def test_greedy_runs_are_reproducible(default_stack):
    a = default_stack.run(PROMPTS[1]).to_dict()
    b = default_stack.run(PROMPTS[1]).to_dict()
    assert [s["output"] for s in a["stages"]] == [s["output"] for s in b["stages"]]


def test_stream_yields_the_answer(default_stack):
    streaming = default_stack.stream("Give three tips for staying healthy.")
    pieces = list(streaming)
    assert len(pieces) >= 2
    assert "".join(pieces) == streaming.result.answer
    assert streaming.result.stages[-1].name == "answer"


def test_trace_json_shape(default_stack):
    d = default_stack.run("Name a primary color.").to_dict()
    assert set(d) >= {"answer", "stages", "total_seconds", "peak_rss_bytes"}
    for s in d["stages"]:
        assert set(s) >= {"name", "output", "prompt_tokens", "completion_tokens", "seconds"}


def test_empty_and_control_prompts(default_stack):
    for bad in ["", "   \n\t "]:
        with pytest.raises(PromptError, match="prompt is empty"):
            default_stack.run(bad)
    r = default_stack.run("What is \x00the capital\x07 of France?\x1b")
    assert r.stages[0].output


def test_prompt_longer_than_context(smollm2_path, tmp_path):
    m = write_manifest(tmp_path, f"""
[stack]
name = "small-ctx"
[runtime]
ctx_size = 128
[models.m]
source = "{smollm2_path}"
[[stages]]
name = "answer"
max_tokens = 8
template = "Q: {{input}}\\nA:"
""")
    long_prompt = "Tell me about the sea. " * 100
    with Stack.load(m) as stack:
        with pytest.raises(PromptError, match=r"stage 'answer': prompt is \d+ tokens .* over the context of 128"):
            stack.run(long_prompt)
        r = stack.run(long_prompt, truncate=True)
        assert r.stages[0].truncated_input_tokens > 0
        assert r.stages[0].prompt_tokens + 8 <= 128


def test_a_users_two_stage_manifest(smollm2_path, tmp_path):
    """What the README teaches: a raw-template stage feeding a chat stage, model by relative path."""
    folder = tmp_path / "mystack"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(smollm2_path)
    m = write_manifest(folder, """
[stack]
name = "translate-then-answer"
[models.smol]
source = "model.gguf"
[[stages]]
name = "topic"
max_tokens = 12
stop = ["\\n"]
template = "<|im_start|>user\\nIn three words, what is this about? {input}<|im_end|>\\n<|im_start|>assistant\\n"
[[stages]]
name = "reply"
max_tokens = 40
messages = [
  { role = "user", content = "Topic: {topic}\\nQuestion: {input}" },
]
""", name="two.toml")
    with Stack.load(m, preload=False) as stack:
        r = stack.run("Why do cats purr?")
    assert [s.name for s in r.stages] == ["topic", "reply"]
    assert all(s.output for s in r.stages)
    assert r.loads == 1  # both stages share the one base model
    assert r.stages[0].load_seconds > 0 and r.stages[1].load_seconds == 0


def test_untrusted_stack_folder_cannot_escape(smollm2_path, tmp_path):
    folder = tmp_path / "pulled"
    write_manifest(folder, f"""
[stack]
name = "evil"
[models.m]
source = "../../../../{smollm2_path}"
[[stages]]
name = "a"
template = "{{input}}"
""")
    with pytest.raises(SourceError, match="escapes"):
        Stack.load(folder)
    write_manifest(folder, f"""
[stack]
name = "evil"
[models.m]
source = "{smollm2_path}"
[[stages]]
name = "a"
template = "{{input}}"
""")
    with pytest.raises(SourceError):
        Stack.load(folder)  # absolute paths are for the user's own manifest files only


def test_wrong_sha256_is_refused(smollm2_path, tmp_path):
    m = write_manifest(tmp_path, f"""
[stack]
name = "pinned"
[models.m]
source = "{smollm2_path}"
sha256 = "{'0' * 64}"
[[stages]]
name = "a"
template = "{{input}}"
""")
    with pytest.raises(SourceError, match="sha256 mismatch") as info:
        Stack.load(m)
    assert "0" * 64 in str(info.value)


def test_messages_need_a_chat_template(tmp_path, smollm2_path):
    gguf = pytest.importorskip("gguf")
    # a copy of the model without its chat template is still a valid model
    import numpy as np  # noqa: F401

    reader = gguf.GGUFReader(str(smollm2_path))
    assert "tokenizer.chat_template" in reader.fields  # sanity: the real model has one
    m = write_manifest(tmp_path, f"""
[stack]
name = "raw"
[models.m]
source = "{smollm2_path}"
[[stages]]
name = "a"
max_tokens = 4
template = "Hello"
""")
    with Stack.load(m) as stack:
        assert stack.run("x").stages[0].completion_tokens >= 1


def test_overrides_apply(default_stack):
    with Stack.load("fslm-smollm2", max_tokens=3, ctx_size=1024) as stack:
        r = stack.run("Why is the sky blue?")
        assert all(s.completion_tokens <= 3 for s in r.stages)
        assert stack.settings.ctx_size == 1024
    with pytest.raises(ManifestError):
        Stack.load("fslm-smollm2", ctx_size=-3)


def test_threads_share_one_stack_without_crosstalk(default_stack):
    prompts = ["What is the capital of France?", "Name a primary color.", "How many legs does a spider have?"]
    expected = {p: default_stack.run(p).to_dict() for p in prompts}
    got: list[tuple[str, dict]] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(2):
                p = prompts[(i + j) % len(prompts)]
                got.append((p, default_stack.run(p).to_dict()))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(got) == 8
    for p, d in got:
        assert [s["output"] for s in d["stages"]] == [s["output"] for s in expected[p]["stages"]]


def test_closed_stack_refuses(smollm2_path):
    stack = Stack.load("fslm-smollm2", preload=False)
    stack.close()
    with pytest.raises(RuntimeError, match="closed"):
        stack.run("hi")


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.text(alphabet="ab \nXY", max_size=4), max_size=12),
    stops=st.lists(st.text(alphabet="ab \nXY", min_size=1, max_size=3), max_size=3),
)
def test_stop_scanner_pieces_join_to_the_output(chunks, stops):
    sc = StopScanner(tuple(stops))
    out = ""
    for c in chunks:
        out += sc.feed(c)
        if sc.stopped:
            break
    if not sc.stopped:
        out += sc.finish()
    text = "".join(chunks)
    cut = min([i for i in (text.find(s) for s in stops) if i >= 0], default=len(text))
    assert out == sc.output == text[:cut].strip()


def test_abandoned_stream_does_not_block_the_next_run_or_close(smollm2_path):
    """Breaking out of stream() used to leave the run lock held: run() and close() then hung."""
    import threading

    from edge_fslm import Stack

    outcome = {}

    def body():
        st = Stack.load("fslm-smollm2", max_tokens=4, measure_rss=False)
        streaming = st.stream("Say hi")  # still referenced, as the CLI's is when a write fails
        for _ in streaming:
            break
        outcome["answer"] = st.run("Say hi").answer
        st.close()
        outcome["closed"] = True

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "run() or close() hung after an abandoned stream"
    assert outcome.get("closed") and outcome["answer"]


def test_stacks_on_one_pool_keep_their_own_prefixes(smollm2_path, tmp_path):
    """Two stacks on one pool (as the server runs them) whose stages share a name but not a
    prompt: each keeps its own saved prefix, and neither changes the other's answers."""
    def stack(name: str, system: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.gguf").symlink_to(smollm2_path)
        return write_manifest(folder, f"""
[stack]
name = "{name}"
[models.smol]
source = "model.gguf"
[[stages]]
name = "reply"
max_tokens = 8
messages = [
  {{ role = "system", content = "{system}" }},
  {{ role = "user", content = "{{input}}" }},
]
""")
    a = stack("formal", "You are a formal assistant. Answer in one complete, polite sentence, and never use slang.")
    b = stack("pirate", "You are a cheerful pirate. Answer in one short sentence, and always say arr at the end.")
    with Stack.load(b, preload=False) as alone:
        b_alone = [alone.run(p).answer for p in PROMPTS[:2]]
    with Stack.load(a, preload=False) as sa, Stack.load(b, pool=sa.pipeline.pool, preload=False) as sb:
        for p in PROMPTS[:2]:
            ra, rb = sa.run(p), sb.run(p)
        assert ra.stages[0].cached_prompt_tokens > 16  # each stack's second run starts from its saved prefix
        assert rb.stages[0].cached_prompt_tokens > 16
        assert [sb.run(p).answer for p in PROMPTS[:2]] == b_alone
