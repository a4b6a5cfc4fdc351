"""Evaluation: metrics by hand, log-likelihoods against a brute-force llama.cpp reference, ARC and
instruction reports on the real SmolLM2 stack, and the `edge-fslm eval` commands.

Kept small (a few questions, 8-token stages, one thread): CI runs this on 2 shared cores.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_fslm import gguf_info
from edge_fslm.evaluation import scoring
from edge_fslm.cli import main
from edge_fslm.errors import PromptError
from edge_fslm.evaluation.metrics import (
    exact_match,
    lcs_length,
    levenshtein,
    levenshtein_similarity,
    normalize,
    rouge1,
    rouge_l,
    rouge_tokens,
    text_scores,
)
from edge_fslm.pool import LoadSettings, ModelPool, ResolvedModel
from edge_fslm.evaluation.scoring import encode, log_softmax, loglikelihood

DATA = Path(__file__).resolve().parent / "data"  # slices of ../shared/data (see data/README.md)
ARC = DATA / "arc_easy_validation_tiny.jsonl"
ALPACA = DATA / "alpaca_heldout_tiny.json"
STACK = "fslm-smollm2-prompted"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is not here (the shared evaluation data lives next to the checkout)")
    return path


@pytest.fixture(scope="module")
def arc3(tmp_path_factory) -> Path:
    """The first 3 ARC-Easy validation questions."""
    lines = _need(ARC).read_text(encoding="utf-8").splitlines()[:3]
    p = tmp_path_factory.mktemp("arc") / "arc3.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


# --------------------------------------------------------------------------- metrics, by hand


def test_exact_match_normalises_case_space_and_punctuation():
    assert normalize("  The  Cat,\tsat! ") == "the cat sat"
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("It's Paris", "its paris") == 1.0
    assert exact_match("Paris is", "Paris") == 0.0
    assert exact_match("", "") == 1.0


def test_rouge_tokenizer_is_rouge_scores_default():
    assert rouge_tokens("Hello, World-2!") == ["hello", "world", "2"]
    assert rouge_tokens("café au lait") == ["caf", "au", "lait"]  # non [a-z0-9] becomes a space
    assert rouge_tokens("running runs") == ["running", "runs"]  # no stemming


def test_rouge1_by_hand():
    # overlap {the, cat} = 2; precision 2/3, recall 2/4; F1 = 2·(2/3)(1/2) / (2/3 + 1/2) = 4/7
    assert rouge1("the cat sat", "The cat ate fish.") == pytest.approx(4 / 7)
    # clipped counts: "the" once in the reference; precision 1/3, recall 1/2 -> F1 2/5
    assert rouge1("the the the", "the cat") == pytest.approx(2 / 5)
    assert rouge1("", "the cat") == 0.0
    assert rouge1("dog", "cat") == 0.0


def test_rouge_l_by_hand():
    # LCS of a b c d / a c b d is 3 (a b d): precision = recall = 3/4
    assert rouge_l("a b c d", "a c b d") == pytest.approx(0.75)
    # reversed order: LCS 1 -> 1/4
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)
    # LCS 2 (the cat) of 2 predicted and 4 reference tokens: p = 1, r = 1/2 -> F1 2/3
    assert rouge_l("the cat", "the black cat sat") == pytest.approx(2 / 3)
    assert lcs_length([], ["a"]) == 0


def test_levenshtein_by_hand():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("naïve", "naive") == 1
    assert levenshtein_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert levenshtein_similarity("", "") == 1.0
    assert levenshtein_similarity("abc", "") == 0.0
    assert text_scores("Paris.", "paris") == {"exact_match": 1.0, "rouge1": 1.0, "rougeL": 1.0,
                                              "levenshtein": pytest.approx(1 - 2 / 6)}


def _lcs_dp(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            t[i][j] = t[i - 1][j - 1] + 1 if x == y else max(t[i - 1][j], t[i][j - 1])
    return t[-1][-1]


def _lev_dp(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[:], i
        for j, y in enumerate(b, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (x != y))
    return row[-1]


def test_fast_lcs_and_levenshtein_agree_with_textbook_dp():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == _lcs_dp(a, b)
        assert levenshtein("".join(a), "".join(b)) == _lev_dp(a, b)


def test_rouge_agrees_with_google_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    rng = random.Random(1)
    words = "The cat, sat on a mat; dog RAN fast x1 über-cool 42".split()
    for _ in range(100):
        pred = " ".join(rng.choices(words, k=rng.randint(0, 12)))
        ref = " ".join(rng.choices(words, k=rng.randint(0, 12)))
        s = scorer.score(ref, pred)
        assert rouge1(pred, ref) == pytest.approx(s["rouge1"].fmeasure, abs=1e-12)
        assert rouge_l(pred, ref) == pytest.approx(s["rougeL"].fmeasure, abs=1e-12)


# --------------------------------------------------------------------------- scoring against brute force


@pytest.fixture(scope="module")
def small_lm(smollm2_path):
    """SmolLM2 in a 128-token context with 16-token batches, so contexts decode in several chunks."""
    pool = ModelPool(LoadSettings(ctx_size=128, batch_size=16, threads=1))
    lm = pool.get(ResolvedModel("smollm2", smollm2_path, gguf_info.validate_model(smollm2_path)))
    yield lm
    pool.close()


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """A plain Llama keeping every position's logits: context + continuation in one ``eval``.

    Its batches are 16 tokens, like ``small_lm``'s: llama.cpp's CPU flash-attention kernel
    rounds differently for batches of more than about 32 tokens (up to 0.2 nats per token on
    this Q4_1 model), so a reference in 256-token batches would measure that, not scoring.
    When the context is the previous call's, its cached tokens are kept (llama-cpp-python's
    own prefix reuse) and only the continuation is evaluated.
    """
    from llama_cpp import Llama

    llm = Llama(str(smollm2_path), n_ctx=128, n_batch=16, n_ubatch=16, logits_all=True, flash_attn=True,
                n_threads=1, n_threads_batch=1, verbose=False)
    last: list[list[int]] = [[]]

    def score(context: list[int], cont: list[int]) -> tuple[float, bool, np.ndarray]:
        if context != last[0]:
            llm.reset()
            llm.eval(context)
            last[0] = list(context)
        llm.n_tokens = len(context)
        llm.eval(cont)
        rows = np.array(llm.scores[len(context) - 1 : len(context) + len(cont) - 1])
        lp = float(log_softmax(rows)[np.arange(len(cont)), cont].sum())
        return lp, bool((rows.argmax(-1) == cont).all()), rows

    yield score
    llm.close()


def test_loglikelihood_matches_brute_force(small_lm, reference, monkeypatch):
    monkeypatch.setattr(scoring, "LOGIT_CHUNK", 4)  # continuations decode in several chunks
    context = encode(small_lm, "Question: Plants take in which gas from the air to make their food?\nAnswer:", bos=True)
    assert len(context) > 16  # several context batches
    long_text = " carbon dioxide, which they turn into sugar with water and light"
    conts = [encode(small_lm, t) for t in [" carbon dioxide", " oxygen", " N", long_text]]
    assert len(conts[2]) == 1 and len(conts[3]) > 2 * scoring.LOGIT_CHUNK  # one-token and 3-chunk continuations
    ours = loglikelihood(small_lm, context, conts)
    for (ll, greedy), cont in zip(ours, conts):
        ref_ll, ref_greedy, _ = reference(context, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-3)
        assert greedy == ref_greedy
    # the same continuation alone gives the same score: the shared context's KV was reused correctly
    assert loglikelihood(small_lm, context, [conts[1]])[0][0] == pytest.approx(ours[1][0], abs=1e-9)


def test_greedy_continuation_is_flagged_greedy(small_lm, reference):
    context = encode(small_lm, "The capital of France is", bos=True)
    greedy: list[int] = []
    for _ in range(3):  # the reference's own argmax continuation, one token at a time
        _, _, rows = reference(context, greedy + [0])
        greedy.append(int(rows[-1].argmax()))
    (ll, is_greedy), (_, not_greedy) = loglikelihood(small_lm, context, [greedy, greedy[:-1] + [greedy[-1] + 1]])
    assert is_greedy and not not_greedy
    assert ll == pytest.approx(reference(context, greedy)[0], abs=1e-3)


def test_loglikelihood_leaves_the_kv_cache_empty(small_lm):
    import llama_cpp

    loglikelihood(small_lm, encode(small_lm, "Hello there"), [encode(small_lm, " friend")])
    mem = llama_cpp.llama_get_memory(small_lm.ctx)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == -1
    assert small_lm.llm.n_tokens == 0


def test_loglikelihood_context_limit(small_lm):
    context = encode(small_lm, " ".join(["word"] * 150))
    assert len(context) > 128
    cont = encode(small_lm, " end of it")
    with pytest.raises(PromptError, match="over the context size of 128 — raise ctx_size"):
        loglikelihood(small_lm, context, [cont])
    # truncating keeps the rightmost tokens that fit, as lm-evaluation-harness does
    kept = context[len(context) + len(cont) - 1 - 128 :]
    assert loglikelihood(small_lm, context, [cont], truncate=True) == loglikelihood(small_lm, kept, [cont])
    with pytest.raises(PromptError, match="at least one context token"):
        loglikelihood(small_lm, [], [cont])
    assert loglikelihood(small_lm, context[:5], [[]]) == [(0.0, True)]


# --------------------------------------------------------------------------- ARC


def test_evaluate_arc_stack_mode(arc3, smollm2_path):
    """Notes come from the stack's own stages; the final prompt's choice scores match brute force."""
    from llama_cpp import Llama

    from edge_fslm import Stack
    from edge_fslm.train.data import load_arc
    from edge_fslm.evaluation.evaluate import evaluate_arc, final_prompt

    done = []
    report = evaluate_arc(STACK, arc3, limit=2, threads=1, max_tokens=6, progress=lambda d, n: done.append((d, n)))
    questions = load_arc(arc3)
    assert done == [(1, 2), (2, 2)]
    assert report.n == 2 and report.mode == "stack" and report.stack == STACK
    for r, q in zip(report.records, questions):
        assert r.gold == q.answer and len(r.logliks) == len(q.choices)
        assert all(ll < 0 for ll in r.logliks)
        assert r.predicted == int(np.argmax(r.logliks))
        assert r.predicted_norm == int(np.argmax([ll / len(c) for ll, c in zip(r.logliks, q.choices)]))
        assert list(r.notes) == ["understand", "keywords", "context"]
    assert report.acc == np.mean([r.predicted == r.gold for r in report.records])
    assert report.acc_norm == np.mean([r.predicted_norm == r.gold for r in report.records])
    assert report.peak_rss_bytes > 50_000_000 and report.mean_seconds > 0
    json.dumps(report.to_dict())

    # the notes are what a normal run of the stack writes, and the choices' scores follow from them
    q, rec = questions[0], report.records[0]
    with Stack.load(STACK, threads=1, max_tokens=6) as st:
        run = st.run(q.question)
        assert rec.notes == {s.name: s.output for s in run.stages[:-1]}
        lm, context = final_prompt(st, {"input": q.question, **rec.notes})
        conts = [encode(lm, c) for c in q.choices]
    # every position's logits from llama-cpp-python's own eval: the prompt in one batch, as the runtime
    # evaluates prompts, then the choice (see `reference` on why batch sizes matter)
    ref = Llama(str(smollm2_path), n_ctx=2048, logits_all=True, flash_attn=True, n_threads=1, n_threads_batch=1,
                verbose=False)
    try:
        ref.eval(context)
        for ll, cont in zip(rec.logliks, conts):
            ref.n_tokens = len(context)  # keep the prompt's cached tokens, evaluate the choice after them
            ref.eval(cont)
            rows = np.array(ref.scores[len(context) - 1 : len(context) + len(cont) - 1])
            assert ll == pytest.approx(log_softmax(rows)[np.arange(len(cont)), cont].sum(), abs=1e-3)
    finally:
        ref.close()


def test_evaluate_arc_single_mode_uses_lm_eval_prompt(arc3, smollm2_path, reference):
    from edge_fslm.train.data import load_arc
    from edge_fslm.evaluation.evaluate import evaluate_arc

    report = evaluate_arc(STACK, arc3, single=str(smollm2_path), threads=1, limit=2)
    assert report.n == 2 and report.mode == "single" and report.records[0].notes == {}
    q = load_arc(arc3)[0]
    from llama_cpp import Llama

    tok = Llama(str(smollm2_path), vocab_only=True, verbose=False)
    context_text = f"Question: {q.question}\nAnswer:"
    context = tok.tokenize(context_text.encode(), add_bos=True, special=False)  # BOS as the model wants it
    for ll, choice in zip(report.records[0].logliks, q.choices):
        whole = tok.tokenize(f"{context_text} {choice}".encode(), add_bos=True, special=False)
        assert whole[: len(context)] == context
        assert ll == pytest.approx(reference(context, whole[len(context):])[0], abs=1e-3)


def test_evaluate_arc_limit_and_errors(arc3, tmp_path):
    from edge_fslm.errors import DataError, SourceError
    from edge_fslm.evaluation.evaluate import evaluate_arc

    with pytest.raises(DataError, match="limit=0: give a positive number"):
        evaluate_arc(STACK, arc3, limit=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match="line 1: not an ARC row"):
        evaluate_arc(STACK, bad)
    with pytest.raises(SourceError, match="does not exist"):
        evaluate_arc(STACK, arc3, single=str(tmp_path / "missing.gguf"))


# --------------------------------------------------------------------------- instructions


def test_evaluate_instruct_stack_and_single(smollm2_path):
    from llama_cpp import Llama

    from edge_fslm import Stack
    from edge_fslm.train.data import load_alpaca
    from edge_fslm.evaluation.evaluate import evaluate_instruct

    data = _need(ALPACA)
    rows = load_alpaca(data, "all")[:2]
    report = evaluate_instruct(STACK, data, split="all", limit=1, threads=1, max_tokens=8)
    assert report.n == 1 and report.split == "all" and report.mode == "stack"
    with Stack.load(STACK, threads=1, max_tokens=8) as st:
        assert report.records[0].answer == st.run(rows[0].input).answer

    # single mode: one greedy chat turn on the bare model, as llama-cpp-python's own chat completion
    single = evaluate_instruct(STACK, data, split="all", limit=2, threads=1, max_tokens=8, single=str(smollm2_path))
    assert single.mode == "single" and [r.id for r in single.records] == [e.id for e in rows]
    # the runtime's own llama.cpp settings: flash attention off rounds differently and can flip a near-tie
    llm = Llama(str(smollm2_path), n_ctx=2048, n_threads=1, n_threads_batch=1, flash_attn=True, verbose=False)
    try:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": rows[0].input}], max_tokens=8,
                                         temperature=0.0, repeat_penalty=1.1)
    finally:
        llm.close()
    assert single.records[0].answer == out["choices"][0]["message"]["content"].strip()
    for r, e in zip(report.records + single.records, rows[:1] + rows):
        assert r.reference == e.output and r.answer
        assert text_scores(r.answer, r.reference) == {k: getattr(r, k) for k in
                                                      ("exact_match", "rouge1", "rougeL", "levenshtein")}
    for key in ("exact_match", "rouge1", "rougeL", "levenshtein", "seconds"):
        assert getattr(single, "mean_seconds" if key == "seconds" else key) == pytest.approx(
            np.mean([getattr(r, key) for r in single.records]))


# --------------------------------------------------------------------------- the commands


def test_eval_arc_command(arc3, smollm2_path, tmp_path):
    out = tmp_path / "arc.json"
    r = CliRunner().invoke(main, ["eval", "arc", "--data", str(arc3), "--single", str(smollm2_path), "--limit", "2",
                                  "-t", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "acc_norm" in r.output and "2 questions" in r.output
    saved = json.loads(out.read_text())
    assert saved["n"] == 2 and len(saved["records"]) == 2 and 0 <= saved["acc"] <= 1
    r = CliRunner().invoke(main, ["eval", "arc", "--data", str(arc3), "--single", str(smollm2_path), "--limit", "1",
                                  "-t", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["records"][0]["logliks"] == saved["records"][0]["logliks"]


def test_eval_commands_fail_in_one_line(tmp_path):
    r = CliRunner().invoke(main, ["eval", "arc", "--data", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [f"error: {tmp_path / 'none.jsonl'}: no such data file"]
    arc = tmp_path / "arc.json"
    arc.write_text("{}")
    r = CliRunner().invoke(main, ["eval", "instruct", "--data", str(arc), "--split", "all"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
    assert "Traceback" not in r.output
