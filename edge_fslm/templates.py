"""The stage prompt template language: ``{input}`` and ``{stage_name}``, nothing more.

Manifests come from strangers, so templates are *not* ``str.format``: that would let
``{input.__class__.__mro__}`` walk the object graph. A template is parsed once into
literal text and plain field names; ``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class TemplateSyntaxError(ValueError):
    """Raised with a message the manifest loader turns into a ManifestError."""


@dataclass(frozen=True)
class Template:
    """A parsed template: alternating literal text and field names."""

    source: str
    parts: tuple[tuple[str, str | None], ...]  # (literal, field or None)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for _, f in self.parts if f is not None)

    def render(self, values: dict[str, str]) -> str:
        out: list[str] = []
        for literal, field in self.parts:
            out.append(literal)
            if field is not None:
                out.append(values[field])
        return "".join(out)


def _short(text: str, limit: int = 80) -> str:
    """A piece of a template as it may appear in a one-line message."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_template(source: str) -> Template:
    """Parse ``source``; refuse attribute/index access, conversions and format specs."""
    try:
        parsed = list(string.Formatter().parse(source))
    except ValueError as exc:  # unbalanced braces
        raise TemplateSyntaxError(f"{exc} — write a literal brace as {{{{ or }}}}") from None
    parts: list[tuple[str, str | None]] = []
    for literal, field, spec, conversion in parsed:
        if field is None:
            parts.append((literal, None))
            continue
        shown = _short("{" + field + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}")
        if field == "":
            raise TemplateSyntaxError(f"empty field {shown} — name a field, e.g. {{input}}")
        if any(c in field for c in ".[]"):
            raise TemplateSyntaxError(
                f"field {shown} uses attribute or index access, which templates do not allow"
                " — use a plain {input} or {stage_name}"
            )
        if conversion or spec:
            raise TemplateSyntaxError(f"field {shown} has a conversion or format spec — use a plain {{{_short(field)}}}")
        if not FIELD_NAME.match(field):
            raise TemplateSyntaxError(f"field {shown} is not a valid name — use letters, digits, '_' or '-'")
        parts.append((literal, field))
    return Template(source=source, parts=tuple(parts))
