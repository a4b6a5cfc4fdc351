"""The lm-evaluation-harness model ``edge-fslm`` (optional extra [eval]): a local ARC task run through
lm-eval agrees with ``evaluate_arc``; rolling log-likelihood and generation match references.

Skipped when lm-eval is not installed. Small on purpose: 5 questions, 4-token stages, one thread.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from edge_fslm.evaluation.lm_eval_plugin import EdgeFSLMLM  # noqa: E402  (registers "edge-fslm")

ARC = Path(__file__).resolve().parent / "data" / "arc_easy_validation_tiny.jsonl"  # 5 ARC-Easy validation rows
STACK = "fslm-smollm2-prompted"

# lm-eval's own arc_easy task, reading a local file; `stack` variant: the question alone as the stack's
# input and the choice text with no leading space, which is exactly what `edge-fslm eval arc` scores
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{text}"
target_delimiter: "{delimiter}"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    if not ARC.is_file():
        pytest.skip(f"{ARC} is not here (the shared evaluation data lives next to the checkout)")
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "arc5.jsonl"
    data.write_text("\n".join(ARC.read_text(encoding="utf-8").splitlines()[:5]) + "\n", encoding="utf-8")
    (folder / "edge_arc.yaml").write_text(
        TASK.format(name="edge_arc", data=data, text="Question: {{question}}\\nAnswer:", delimiter=" "))
    (folder / "edge_arc_stack.yaml").write_text(
        TASK.format(name="edge_arc_stack", data=data, text="{{question}}", delimiter=""))
    return folder


@pytest.fixture(scope="module")
def task_manager(tasks):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks))  # indexing every lm-eval task takes seconds: once per module


def _simple_evaluate(model_args: str, task: str, task_manager) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model="edge-fslm", model_args=model_args, tasks=[task], task_manager=task_manager,
                                   limit=5, bootstrap_iters=0)


def _logliks(out: dict, task: str) -> list[list[float]]:
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[ll for ll, _ in s["filtered_resps"]] for s in samples]


@pytest.mark.slow
def test_lm_eval_arc_matches_evaluate_arc_in_stack_mode(tasks, task_manager):
    from edge_fslm.evaluation.evaluate import evaluate_arc

    out = _simple_evaluate(f"stack={STACK},threads=1,max_tokens=4", "edge_arc_stack", task_manager)
    res = out["results"]["edge_arc_stack"]
    assert 0.0 <= res["acc,none"] <= 1.0 and 0.0 <= res["acc_norm,none"] <= 1.0
    ours = evaluate_arc(STACK, tasks / "arc5.jsonl", threads=1, max_tokens=4)
    assert ours.n == 5
    assert res["acc,none"] == pytest.approx(ours.acc) and res["acc_norm,none"] == pytest.approx(ours.acc_norm)
    assert np.allclose(_logliks(out, "edge_arc_stack"), [r.logliks for r in ours.records], atol=1e-6)


def test_lm_eval_arc_matches_evaluate_arc_in_single_mode(tasks, task_manager, smollm2_path):
    """lm-eval's own ARC prompt on the bare model: the same numbers as `edge-fslm eval arc --single`."""
    from edge_fslm.evaluation.evaluate import evaluate_arc

    out = _simple_evaluate(f"single={smollm2_path},threads=1", "edge_arc", task_manager)
    res = out["results"]["edge_arc"]
    ours = evaluate_arc(STACK, tasks / "arc5.jsonl", single=str(smollm2_path), threads=1)
    assert res["acc,none"] == pytest.approx(ours.acc) and res["acc_norm,none"] == pytest.approx(ours.acc_norm)
    assert np.allclose(_logliks(out, "edge_arc"), [r.logliks for r in ours.records], atol=1e-6)


WINDOW = 32


@pytest.fixture(scope="module")
def single_lm(smollm2_path):
    """The bare model in a 32-token context, so a paragraph needs several rolling windows."""
    lm = EdgeFSLMLM(single=str(smollm2_path), threads=1, ctx_size=WINDOW, max_tokens=8)
    yield lm
    lm.close()


def test_loglikelihood_rolling_scores_every_token_once(single_lm, smollm2_path):
    from llama_cpp import Llama

    from edge_fslm.evaluation.scoring import log_softmax

    text = ("Plants take in carbon dioxide from the air and water from the soil. Using the energy of sunlight,"
            " their leaves turn these into sugar and release oxygen, which animals and people breathe. This is"
            " called photosynthesis, and almost every food chain on Earth starts with it, from the smallest"
            " insects in a meadow to the largest whales in the ocean.")
    (total,) = single_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ref = Llama(str(smollm2_path), n_ctx=64, n_batch=32, n_ubatch=32, logits_all=True, flash_attn=True,
                n_threads=1, n_threads_batch=1, verbose=False)
    try:
        tokens = ref.tokenize(text.encode(), add_bos=False, special=False)
        assert len(tokens) > 2 * WINDOW  # three windows
        # lm-eval's rule: the first window predicts its tokens after the prefix token (BOS); each later
        # window predicts the next WINDOW tokens with the WINDOW tokens before each as context
        expected, done = 0.0, 0
        while done < len(tokens):
            end = min(done + WINDOW, len(tokens))
            inputs = ([ref.token_bos()] + tokens[:end - 1]) if done == 0 else tokens[end - WINDOW - 1:end - 1]
            ref.reset()
            ref.eval(inputs)
            rows = np.array(ref.scores[len(inputs) - (end - done):len(inputs)])
            expected += float(log_softmax(rows)[np.arange(end - done), tokens[done:end]].sum())
            done = end
    finally:
        ref.close()
    assert total == pytest.approx(expected, abs=1e-3)


def test_generate_until_runs_the_stack_and_stops(smollm2_path):
    from edge_fslm import Stack

    prompt = "What is the capital of France?"
    with Stack.load(STACK, threads=1, max_tokens=8) as st:
        answer = st.run(prompt).answer
    lm = EdgeFSLMLM(stack=STACK, threads=1, max_tokens=8)
    try:
        full, cut = lm.generate_until([
            Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 64}), 0),
            Instance("generate_until", {}, (prompt, {"until": [answer.split()[1]], "max_gen_toks": 64}), 1),
        ])
        (short,) = lm.generate_until([Instance("generate_until", {}, (prompt, {"max_gen_toks": 2}), 2)])
    finally:
        lm.close()
    assert full == answer  # max_tokens=8 caps max_gen_toks=64, as it caps every stage
    assert cut == answer[: answer.index(answer.split()[1])].strip()
    assert answer.startswith(short) and len(short) < len(answer)


@pytest.mark.slow
def test_python_m_runs_lm_eval_with_the_model(tasks, smollm2_path, tmp_path):
    """`python -m edge_fslm.evaluation.lm_eval_plugin` is lm-eval's CLI with `--model edge-fslm` available."""
    r = subprocess.run(
        [sys.executable, "-m", "edge_fslm.evaluation.lm_eval_plugin", "run", "--model", "edge-fslm",
         "--model_args", f"single={smollm2_path},threads=1", "--tasks", "edge_arc", "--include_path", str(tasks),
         "--limit", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "edge_arc" in r.stdout and "acc_norm" in r.stdout
