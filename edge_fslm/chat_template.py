"""A model's own Jinja chat template, compiled once and rendered within a time and size bound.

The template comes from the model file, so from whoever made it. Jinja's sandbox, set up as
transformers and llama-cpp-python set up theirs, stops it from reaching Python objects, but not
from looping for hours or building a gigabyte string, and a stack may run a model from a
stranger. So here:

* a render that runs past ``RENDER_SECONDS`` is stopped where it is (a trace hook checks the
  clock on every line of the compiled template, in whichever thread renders);
* the operators, filters and methods that make one large value in a single step are checked
  *before* they allocate, and are never constant-folded at compile time, where no bound would
  apply: ``*``, ``**``, ``%``, ``+`` and ``~``; the filters ``center``, ``indent``, ``format``,
  ``replace``, ``join``, ``batch`` and ``tojson``; the str methods ``center``, ``ljust``,
  ``rjust``, ``zfill``, ``expandtabs``, ``replace``, ``join``, ``translate``, ``format`` and
  ``format_map`` (literal and ``*`` or nested widths too), and ``dict.fromkeys``. A list counts
  by what it would print as, so a million references to one long string is as large as it looks.
  No value they make, no printed value, and no rendered prompt may exceed ``MAX_RENDER_CHARS``.

What is left: filters that loop in Python (``slice`` with a fill value, ``wordwrap``, ...) are
bounded by the clock, which also bounds how much they can make, and a template may hold many
values just under the cap. SECURITY.md says so.
"""

from __future__ import annotations

import functools
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
_DYNAMIC_WIDTH = re.compile(r"%[-#0 +]*(?:\*|\d*\.\*)|\{[^{}]*:[^{}]*\{")  # '%*s', '%.*s', '{:{}}'
_MAX_INDENT = 64  # tojson's indent: json repeats it on every line, at every depth


class TemplateLimitError(RuntimeError):
    """The template went past a bound; render_prompt reports it as a GGUFError naming the file."""


def _size(value: Any, memo: dict[int, int] | None = None) -> int:
    """About how many characters ``value`` prints as: strings by length, numbers by digits,
    containers by their items, where an item held many times counts each time, as it prints."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):
        return value.bit_length() * 30103 // 100000 + 2  # decimal digits, and a sign
    if not isinstance(value, (list, tuple, dict)):
        return 24
    memo = {} if memo is None else memo
    if id(value) not in memo:
        memo[id(value)] = 0  # the immutable sandbox cannot make a cycle; if one came in, it counts once
        items = [x for kv in value.items() for x in kv] if isinstance(value, dict) else value
        memo[id(value)] = 2 + sum(_size(x, memo) + 2 for x in items)
    return memo[id(value)]


def _check(size: int, what: str) -> None:
    if size > MAX_RENDER_CHARS:
        raise TemplateLimitError(f"{what} would make a value of {size:,} characters (the limit is {MAX_RENDER_CHARS:,})")


def _check_format(spec: object, what: str, values: Any = ()) -> None:
    """Widths in a %- or {}-format: literal ones, and ``*`` or nested ones taken from ``values``."""
    if isinstance(spec, bytes):
        spec = spec.decode("latin-1")
    if not isinstance(spec, str):
        return
    for m in _WIDTH.finditer(spec):
        _check(int(m.group(1)), what)
    if _DYNAMIC_WIDTH.search(spec):
        if isinstance(values, dict):
            values = list(values.values())
        elif not isinstance(values, (tuple, list)):
            values = (values,)  # '%*s' % x: one value
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool):
                _check(abs(v), what)


def _replaced_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    kind = type(s) if isinstance(s, (str, bytes)) else None
    if kind is None or not all(isinstance(x, kind) for x in (old, new)) or not isinstance(count, int):
        return 0  # the method itself refuses these
    n = s.count(old) if old else len(s) + 1
    return len(s) + (min(n, count) if count >= 0 else n) * max(len(new) - len(old), 0)


def _joined_size(sep: Any, items: list) -> int:
    return sum(_size(x) for x in items) + _size(sep) * max(len(items) - 1, 0)


def _first(args: tuple, kwargs: dict, name: str, default: Any = None) -> Any:
    return args[0] if args else kwargs.get(name, default)


def _checked_str_call(owner: str | bytes, name: str, args: tuple, kwargs: dict) -> tuple:
    """Check what the str (or bytes) method ``name`` would make, before it runs; returns the
    arguments to call it with (``join`` reads its iterable once, here)."""
    what = f"str.{name}"
    if name in ("center", "ljust", "rjust", "zfill"):
        width = _first(args, kwargs, "width")
        if isinstance(width, int):
            _check(width, what)
    elif name == "expandtabs":
        tabsize = _first(args, kwargs, "tabsize", 8)
        if isinstance(tabsize, int):
            _check(len(owner) + owner.count(b"\t" if isinstance(owner, bytes) else "\t") * max(tabsize, 0), what)
    elif name == "replace":
        _check(_replaced_size(owner, *args[:3], **{k: v for k, v in kwargs.items() if k == "count"}), what)
    elif name == "join" and args:
        items = list(args[0])
        _check(_joined_size(owner, items), what)
        return (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((_size(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        _check(len(owner) * max(longest, 1), what)
    elif name == "format":
        _check_format(owner, what, (*args, *kwargs.values()))
    elif name == "format_map":
        _check_format(owner, what, args[0] if args else {})
    return args


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
        _check(sum(_size(p) for p in parts), "'~'")  # before str(), which prints a list in one step
        return "".join(p if isinstance(p, str) else str(p) for p in parts)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    _check(max(_size(seq), len(seq)) * n, "'*'")
        elif operator == "+":
            _check(_size(left) + _size(right), "'+'")
        elif operator == "%":
            _check_format(left, "'%'", right)
            _check(_size(left) + _size(right), "'%'")
        elif operator == "**" and isinstance(right, int) and isinstance(left, int) and abs(left) > 1:
            if right > _MAX_POWER:
                raise TemplateLimitError(f"'**' with the exponent {right} (the limit is {_MAX_POWER})")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox hands out str.format wrapped
        owner, name = getattr(method, "__self__", None), getattr(method, "__name__", None)
        if isinstance(owner, (str, bytes)) and name:
            args = _checked_str_call(owner, name, args, kwargs)
        elif isinstance(owner, (dict, type)) and name == "fromkeys" and args:
            keys = list(args[0])
            _check(len(keys) * (_size(args[1] if len(args) > 1 else kwargs.get("value")) + 4), "dict.fromkeys")
            args = (keys, *args[1:])
        return super().call(__context, __obj, *args, **kwargs)


def _bounded_filter(env: jinja2.Environment, name: str, width_arg: int) -> None:
    plain = env.filters[name]

    def bounded(*args: Any, **kwargs: Any) -> Any:
        width = args[width_arg] if len(args) > width_arg else kwargs.get("width", 0)
        if isinstance(width, int):
            _check(_size(args[0]), f"the {name} filter")
            _check(width * max(1, str(args[0]).count("\n") + 1), f"the {name} filter")
        return plain(*args, **kwargs)

    env.filters[name] = bounded


def _bound_growing_filters(env: jinja2.Environment) -> None:
    """replace, join and batch: checked before Jinja's own filter runs, which it then does unchanged."""
    plain_replace, plain_join, plain_batch = env.filters["replace"], env.filters["join"], env.filters["batch"]

    @functools.wraps(plain_replace)  # keeps Jinja's pass_eval_context mark
    def replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> Any:
        _check(_size(s), "the replace filter")
        _check(_replaced_size(str(s), str(old), str(new), -1 if count is None else count), "the replace filter")
        return plain_replace(eval_ctx, s, old, new, count)

    @functools.wraps(plain_join)
    def join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> Any:
        if attribute is not None:
            value = map(jinja2.filters.make_attrgetter(eval_ctx.environment, attribute), value)
        items = list(value)
        _check(_joined_size(d, items), "the join filter")
        return plain_join(eval_ctx, items, d)

    @functools.wraps(plain_batch)
    def batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
        if isinstance(linecount, int) and fill_with is not None:
            _check(linecount * (_size(fill_with) + 2), "the batch filter")
        return plain_batch(value, linecount, fill_with)

    env.filters.update(replace=replace, join=join, batch=batch)


def _finalize(value: Any) -> Any:
    """Every ``{{ value }}`` passes here before it is printed, which turns a list into text in one step."""
    if not isinstance(value, str):
        _check(_size(value), "printing a value")
    return value


class _Generation(jinja2.ext.Extension):
    """HF's ``{% generation %}`` tag, passed through as llama-cpp-python and transformers do."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def environment() -> jinja2.Environment:
    """The sandbox chat templates are parsed and rendered in, set up as transformers sets up its own."""
    env = _BoundedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                              extensions=[_Generation, jinja2.ext.loopcontrols], finalize=_finalize)
    env.filters["tojson"] = _tojson
    _bounded_filter(env, "center", 1)
    _bounded_filter(env, "indent", 1)
    _bound_growing_filters(env)
    plain_format = env.filters["format"]

    def bounded_format(value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_format(value, "the format filter", kwargs or args)
        _check(_size(value) + _size(kwargs or args), "the format filter")
        return plain_format(value, *args, **kwargs)

    env.filters["format"] = bounded_format
    return env


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    width = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    if width > _MAX_INDENT:
        raise TemplateLimitError(f"tojson with an indent of {width} (the limit is {_MAX_INDENT})")
    _check(_size(x) * (6 if ensure_ascii else 1) * (1 + width), "the tojson filter")
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
