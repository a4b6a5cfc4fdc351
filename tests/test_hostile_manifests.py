"""Hostile manifests through the real CLI, and proof that no manifest or GGUF can run code.

Each manifest case ends with exit code 2 and one ``error: `` line per problem, naming the
manifest file (or, for a model reference that escapes its stack folder, the reference) and
the problem. The corpus lives in edge_fslm.testing.hostile.manifest_cases().
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import jinja2
import pytest

from edge_fslm.errors import GGUFError, ManifestError
from edge_fslm.manifest import load_manifest, parse_manifest

from edge_fslm.testing.hostile import (
    assert_clean_refusal,
    cli,
    manifest_cases,
    stack_for,
    write_tiny_llama,
)

CASES = {c.id: c for c in manifest_cases()}


@pytest.mark.parametrize("case_id", list(CASES))
def test_cli_refuses_hostile_manifest(case_id, tmp_path):
    case = CASES[case_id]
    target = case.build(tmp_path)
    proc = cli("run", "hello", "--stack", str(target), timeout=60)
    err = assert_clean_refusal(proc, *case.needles, lines=case.lines)
    if target.suffix == ".toml":  # a manifest file: every line names it
        assert all(target.name in line for line in err.splitlines()), err
    assert proc.seconds < 30, f"took {proc.seconds:.1f} s"
    for line in err.splitlines():
        assert line.isprintable(), line  # no raw control characters reach the terminal
        assert len(line) < 1000, line[:200]


def test_dotted_key_bomb_is_refused_fast_and_small():
    """tomllib keeps every prefix of a dotted key: 100k parts would need ~40 GB. Refused before parsing."""
    text = "x" + ".a" * 100_000 + " = 1\n"
    t0 = time.perf_counter()
    with pytest.raises(ManifestError, match="dotted parts"):
        parse_manifest(text)
    assert time.perf_counter() - t0 < 1.0


def test_shape_limits_do_not_touch_real_manifests():
    """Strings (with brackets, dots, quotes, escapes) and comments are skipped by the shape check."""
    from importlib import resources

    text = (resources.files("edge_fslm.stacks") / "fslm-smollm2.toml").read_text()
    tricky = text + '\n# [[[[[[[[[[ ... {{{{{{{{ ' + "." * 500 + "\n"
    tricky = tricky.replace('description = "Restate the task', 'description = "[[[[ ' + "." * 200 + ' \\" Restate the task')
    m = parse_manifest(tricky)
    assert [s.name for s in m.stages] == ["understand", "keywords", "context", "answer"]
    multiline = '[stack]\nname = "x"\ndescription = """a ""quoted"" [[[ ' + "." * 100 + ' """\n' \
                "[models.m]\nsource = 'lit[[[.....'\n[[stages]]\nname = \"a\"\ntemplate = '''{input} ]]] '''\n"
    assert parse_manifest(multiline).stages[0].template.fields == ("input",)


def test_manifest_limit_counts_bytes(tmp_path):
    p = tmp_path / "big.toml"
    p.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(ManifestError, match="limit"):
        load_manifest(p)


# --------------------------------------------------------------------------- no code execution

HOSTILE_TEMPLATES = {
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals": "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "import": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('id').read() }}",
    "format": "{{ '{0.__class__.__mro__}'.format('') }}",
}


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_jinja_formatter_is_sandboxed(name):
    """The chat template renderer (what stage.py renders with) refuses object-graph access."""
    from edge_fslm.chat_template import ChatTemplate

    fmt = ChatTemplate(template=HOSTILE_TEMPLATES[name], eos_token="</s>", bos_token="<s>")
    with pytest.raises(jinja2.exceptions.SecurityError):
        fmt.render([{"role": "user", "content": "hi"}])


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    """A real LoadedModel on the tiny llama, for render_prompt with hostile chat templates."""
    from edge_fslm.gguf_info import validate_model
    from edge_fslm.pool import LoadSettings, ModelPool, ResolvedModel

    folder = tmp_path_factory.mktemp("tiny")
    path = write_tiny_llama(folder / "tiny.gguf")
    pool = ModelPool(LoadSettings(ctx_size=256, threads=1))
    lm = pool.get(ResolvedModel(id="tiny", path=path, info=validate_model(path)))
    yield lm
    pool.close()


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_render_prompt_turns_sandbox_violations_into_gguf_errors(name, tiny_loaded, tmp_path, monkeypatch):
    from edge_fslm.pool import LoadedModel, ResolvedModel
    from edge_fslm.stage import render_prompt

    monkeypatch.chdir(tmp_path)
    info = dataclasses.replace(tiny_loaded.model.info, chat_template=HOSTILE_TEMPLATES[name])
    lm = LoadedModel(model=ResolvedModel(id="evil", path=tiny_loaded.model.path, info=info), llm=tiny_loaded.llm)
    m = parse_manifest('[stack]\nname = "x"\n[models.m]\nsource = "x.gguf"\n[[stages]]\nname = "a"\n'
                       'messages = [{ role = "user", content = "{input}" }]\n')
    with pytest.raises(GGUFError, match="chat template failed on stage 'a'") as info_:
        render_prompt(lm, m.stages[0], {"input": "hi"})
    assert "unsafe" in str(info_.value) or "security" in str(info_.value).lower()
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", ["mro", "globals"])
def test_hostile_chat_template_in_a_gguf_via_cli(name, tmp_path):
    """End to end: a model whose own chat template tries to escape; the run ends in one clean line."""
    model = write_tiny_llama(tmp_path / f"{name}.gguf", chat_template=HOSTILE_TEMPLATES[name])
    m = stack_for(tmp_path, model, chat=True)
    assert_clean_refusal(cli("run", "hello", "--stack", str(m), cwd=tmp_path), model.name, "unsafe")
    assert not (tmp_path / "PWNED").exists()


def test_attr_filter_yields_nothing():
    """``|attr`` does not raise in the sandbox: an unsafe attribute is simply undefined."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template="[{{ ''|attr('__class__') }}][{{ (''|attr('__class__'))|attr('__mro__') }}]",
                              eos_token="</s>", bos_token="<s>")
    assert fmt(messages=[{"role": "user", "content": "hi"}]).prompt == "[][]"


def test_templates_are_substituted_not_formatted():
    """A stage template is plain substitution: braces in the *values* are never interpreted."""
    m = parse_manifest('[stack]\nname = "x"\n[models.m]\nsource = "x.gguf"\n[[stages]]\nname = "a"\n'
                       'template = "A{input}B{{literal}}"\n')
    assert m.stages[0].template.render({"input": "{input.__class__}{0}"}) == "A{input.__class__}{0}B{literal}"


def test_no_eval_pickle_or_imports_in_the_runtime():
    """The modules that read untrusted input never evaluate, unpickle or import by name."""
    import edge_fslm

    root = Path(edge_fslm.__file__).parent
    for name in ("manifest.py", "templates.py", "sources.py", "gguf_info.py", "stage.py", "pipeline.py", "api.py",
                 "pool.py", "cli.py", "memory.py"):
        text = (root / name).read_text()
        for banned in (r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"\bpickle\b", r"__import__\(", r"import_module\(",
                       r"yaml\.load", r"\bmarshal\b", r"shell=True", r"os\.system\(", r"(?<![.\w])compile\("):
            assert not re.search(banned, text), f"{name} matches {banned}"


def test_a_stack_folder_can_run_its_own_model(tmp_path, smollm2_path):
    """The confinement is not a blanket refusal: a stack folder's own files still run."""
    import os

    d = tmp_path / "pulled"
    d.mkdir()
    os.link(smollm2_path, d / "model.gguf") if os.stat(smollm2_path).st_dev == os.stat(tmp_path).st_dev \
        else write_tiny_llama(d / "model.gguf")
    stack_for(d, Path("model.gguf"), name="stack.toml")
    proc = cli("run", "hello", "--stack", str(d))
    assert proc.returncode == 0, proc.err


def test_pull_respects_stack_folder_confinement(tmp_path):
    d = tmp_path / "pulled"
    d.mkdir()
    (d / "stack.toml").write_text('[stack]\nname = "x"\n[models.m]\nsource = "/etc/passwd"\n'
                                  '[[stages]]\nname = "a"\ntemplate = "{input}"\n')
    assert_clean_refusal(cli("pull", str(d)), "absolute paths")
