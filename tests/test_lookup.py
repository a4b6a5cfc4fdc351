"""Prompt-lookup decoding (edge_fslm/lookup.py): guesses copied from the prompt, verified in one
decode, with every stage's output identical to one token a decode, on the real model."""

from __future__ import annotations

import pytest

from edge_fslm import Stack
from edge_fslm.gguf_info import read_gguf
from edge_fslm.lookup import EXACT_TYPES, MIN_NGRAM, NgramIndex, inexact_types

# Requests that invite copying (the stage prompts repeat the request and the notes), and ones
# whose stage prompts pass position 256, where flash attention's lone-query kernel changes.
FACT = ("Photosynthesis turns light into chemical energy stored in sugar. Plants, algae and some bacteria"
        " do it, and nearly every food web rests on them. ")
PROMPTS = [
    "Why is the sky blue?",
    "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog.",
    "List the planets of the solar system in order from the Sun.",
    FACT * 6 + "Why do food webs depend on plants?",
]


def test_the_index_drafts_what_followed_the_latest_earlier_tail():
    idx = NgramIndex([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8])
    assert idx.draft(4) == []  # the tail (7, 8) occurred nowhere before
    idx.push(1)
    idx.push(2)
    assert idx.draft(3) == [3, 7, 8]  # (1, 2) last ended before 3 7 8, not 3 4 5
    idx.push(3)
    assert idx.draft(2) == [7, 8]  # the longest tail, (1, 2, 3), picks the latest occurrence
    assert NgramIndex([5, 5]).draft(4) == []  # never the tail itself
    assert NgramIndex([4]).draft(1) == [] and MIN_NGRAM >= 2


def test_only_weights_whose_batched_matmul_is_exact_draft(smollm2_path, gemma_path):
    assert inexact_types(read_gguf(str(smollm2_path))) == []
    assert "Q4_K" in inexact_types(read_gguf(str(gemma_path)))
    assert {"Q4_K", "Q6_K", "Q4_0", "IQ4_NL"}.isdisjoint(EXACT_TYPES)


def _outputs(draft_max: int, **load) -> tuple[list[list[str]], int, int]:
    outs, drafted, accepted = [], 0, 0
    with Stack.load("fslm-smollm2", draft_max=draft_max, measure_rss=False, **load) as st:
        for p in PROMPTS:
            r = st.run(p)
            outs.append([s.output for s in r.stages])
            drafted += sum(s.draft_n for s in r.stages)
            accepted += sum(s.draft_n_accepted for s in r.stages)
    return outs, drafted, accepted


@pytest.mark.parametrize("flash_attn", [True, False])
def test_lookup_decoding_changes_no_output(flash_attn):
    plain, none_drafted, _ = _outputs(0, flash_attn=flash_attn, max_tokens=64)
    fast, drafted, accepted = _outputs(8, flash_attn=flash_attn, max_tokens=64)
    assert none_drafted == 0
    assert drafted > 0 and accepted > 0, "no guess was ever verified: the test checks nothing"
    assert fast == plain


def test_sampled_stages_draw_the_same_tokens():
    """Each position is sampled in order with the stage's own chain: the same random draws."""
    plain, _, _ = _outputs(0, temperature=0.8, seed=7, max_tokens=48)
    fast, drafted, _ = _outputs(6, temperature=0.8, seed=7, max_tokens=48)
    assert drafted > 0 and fast == plain


def test_a_k_quant_model_decodes_one_token_at_a_time(gemma_path, tmp_path):
    from .conftest import write_manifest

    m = write_manifest(tmp_path, f"""
[stack]
name = "gemma-one"
[models.g]
source = "{gemma_path}"
[[stages]]
name = "answer"
model = "g"
template = "Question: {{input}}\\nAnswer:"
max_tokens = 24
""")
    with Stack.load(m, draft_max=8, measure_rss=False) as st:
        r = st.run("Repeat: the quick brown fox jumps over the quick brown fox.")
    assert r.stages[0].draft_n == 0


def test_the_plan_counts_a_row_of_logits_per_guess_and_the_manifest_bounds_it():
    from edge_fslm.errors import ManifestError
    from edge_fslm.plan import prepare_stack

    _, _, _, off = prepare_stack("fslm-smollm2")
    _, _, _, on = prepare_stack("fslm-smollm2", draft_max=8)
    ((_, f_off),), ((_, f_on),) = off.footprints.items(), on.footprints.items()
    assert f_on.compute - f_off.compute == 8 * 49152 * 4
    with pytest.raises(ManifestError, match=r"draft_max: expected an integer from 0 to 64"):
        prepare_stack("fslm-smollm2", draft_max=65)


def test_the_cli_flag_reaches_the_trace():
    import json

    from edge_fslm.testing.hostile import cli

    proc = cli("run", "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog.", "--json",
               "-n", "32", "--draft-max", "4", timeout=300)
    assert proc.returncode == 0, proc.err
    stages = json.loads(proc.stdout)["stages"]
    assert sum(s["draft_n"] for s in stages) > 0
    assert all(0 <= s["draft_n_accepted"] <= s["draft_n"] for s in stages)
