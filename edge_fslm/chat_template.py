"""A model's own Jinja chat template, compiled once and rendered within a time and size bound.

The template comes from the model file, so from whoever made it. Jinja's sandbox, set up as
transformers and llama-cpp-python set up theirs, stops it from reaching Python objects, but not
from looping for hours or building a gigabyte string, and a stack may run a model from a
stranger. So here:

* a render that runs past ``RENDER_SECONDS`` is stopped where it is (a trace hook checks the
  clock on every line of the compiled template, in whichever thread renders);
* the operators and filters that make one large value in a single step (``*``, ``**``, ``%``,
  ``+``, ``~``, ``center``, ``indent``, ``format``, and ``str.format`` widths) are checked
  *before* they allocate, and are never constant-folded at compile time, where no bound would
  apply; no value they make, and no rendered prompt, may exceed ``MAX_RENDER_CHARS``.

What is left: other filters and methods (``replace``, ``join`` on a long list, ...) are bounded
only by the clock, and a template may hold many values just under the cap. SECURITY.md says so.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_SECONDS = 2.0
MAX_RENDER_CHARS = 1 << 24  # 16 Mi characters: far beyond any prompt a context can hold
_MAX_POWER = 4096  # larger integer exponents are refused: 7 ** 10 ** 9 takes minutes in one step
_WIDTH = re.compile(r"[%:{][^%{}]*?(\d{5,})")  # a width or precision in a %- or {}-format spec


class TemplateLimitError(RuntimeError):
    """The template went past a bound; render_prompt reports it as a GGUFError naming the file."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _check(size: int, what: str) -> None:
    if size > MAX_RENDER_CHARS:
        raise TemplateLimitError(f"{what} would make a value of {size:,} items (the limit is {MAX_RENDER_CHARS:,})")


def _check_format(spec: object, what: str) -> None:
    if isinstance(spec, str):
        for m in _WIDTH.finditer(spec):
            _check(int(m.group(1)), what)


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` to a join that checks its size first (Jinja's own calls str_join)."""

    @optimizeconst
    def visit_Concat(self, node: Any, frame: Any) -> None:
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _BoundedCodeGenerator

    @staticmethod
    def bounded_join(parts: tuple) -> str:
        texts = [p if isinstance(p, str) else str(p) for p in parts]
        _check(sum(map(len, texts)), "'~'")
        return "".join(texts)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int):
                    _check(_size(seq) * n, "'*'")
        elif operator == "+":
            _check(_size(left) + _size(right), "'+'")
        elif operator == "%":
            _check_format(left, "'%'")
        elif operator == "**" and isinstance(right, int) and isinstance(left, int) and abs(left) > 1:
            if right > _MAX_POWER:
                raise TemplateLimitError(f"'**' with the exponent {right} (the limit is {_MAX_POWER})")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox hands out str.format wrapped
        if getattr(method, "__name__", None) in ("format", "format_map"):
            _check_format(getattr(method, "__self__", None), "str.format")
        return super().call(__context, __obj, *args, **kwargs)


def _bounded_filter(env: jinja2.Environment, name: str, width_arg: int) -> None:
    plain = env.filters[name]

    def bounded(*args: Any, **kwargs: Any) -> Any:
        width = args[width_arg] if len(args) > width_arg else kwargs.get("width", 0)
        if isinstance(width, int):
            _check(width * max(1, str(args[0]).count("\n") + 1), f"the {name} filter")
        return plain(*args, **kwargs)

    env.filters[name] = bounded


class _Generation(jinja2.ext.Extension):
    """HF's ``{% generation %}`` tag, passed through as llama-cpp-python and transformers do."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def environment() -> jinja2.Environment:
    """The sandbox chat templates are parsed and rendered in, set up as transformers sets up its own."""
    env = _BoundedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                              extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    _bounded_filter(env, "center", 1)
    _bounded_filter(env, "indent", 1)
    plain_format = env.filters["format"]

    def bounded_format(value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_format(value, "the format filter")
        return plain_format(value, *args, **kwargs)

    env.filters["format"] = bounded_format
    return env


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ValueError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@dataclass
class ChatTemplate:
    """A model's chat template, compiled in the bounded sandbox, rendered with the variables
    llama-cpp-python's Jinja2ChatFormatter passes (so prompts are the same as before)."""

    template: str
    eos_token: str
    bos_token: str
    add_generation_prompt: bool = True
    _compiled: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._compiled = environment().from_string(self.template)

    def render(self, messages: list[dict[str, str]], seconds: float = RENDER_SECONDS) -> str:
        """The prompt text, or TemplateLimitError once the template passes a bound."""
        deadline = time.monotonic() + seconds

        def tick(frame: Any, event: str, arg: Any) -> Any:
            if time.monotonic() > deadline:
                raise TemplateLimitError(f"rendering took longer than {seconds:g} s")
            return tick

        previous = sys.gettrace()
        sys.settrace(tick)
        try:
            prompt = self._compiled.render(
                messages=messages, eos_token=self.eos_token, bos_token=self.bos_token,
                raise_exception=_raise_exception, add_generation_prompt=self.add_generation_prompt,
                functions=None, function_call=None, tools=None, tool_choice=None, strftime_now=_strftime_now)
        finally:
            sys.settrace(previous)
        _check(len(prompt), "the rendered prompt")
        return prompt
