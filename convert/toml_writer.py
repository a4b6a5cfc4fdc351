"""The few lines of TOML writing a built stack manifest needs.

The standard library reads TOML but does not write it, and the build writes
one small, fixed-shape file, so a dependency is not worth it.  The output is
always re-read with ``tomllib`` and validated as a manifest before it is
written, so a mistake here cannot produce a stack that loads wrongly.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["toml_key", "toml_value", "dumps_manifest"]

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key(key: str) -> str:
    return key if _BARE.match(key) else _string(key)


def _string(s: str) -> str:
    # JSON escapes every control character TOML forbids except DEL, and its escapes are valid TOML.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v: Any) -> str:
    """One value, inline (tables as inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write non-finite float {v!r} to a manifest")
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(str(k))} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _table(lines: list[str], header: str, table: dict[str, Any]) -> None:
    lines.append(header)
    for k, v in table.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v) and k == "messages":
            lines.append(f"{toml_key(k)} = [")
            for x in v:
                lines.append(f"  {toml_value(x)},")
            lines.append("]")
        else:
            lines.append(f"{toml_key(k)} = {toml_value(v)}")
    lines.append("")


def dumps_manifest(doc: dict[str, Any], comment: str = "") -> str:
    """Write a stack manifest dict: [stack], [runtime], [models.ID] tables, then [[stages]]."""
    lines: list[str] = [f"# {line}" if line else "#" for line in comment.splitlines()]
    if lines:
        lines.append("")
    for name in ("stack", "runtime"):
        if name in doc:
            _table(lines, f"[{name}]", doc[name])
    for mid, model in doc.get("models", {}).items():
        _table(lines, f"[models.{toml_key(mid)}]", model)
    for stage in doc.get("stages", []):
        _table(lines, "[[stages]]", stage)
    return "\n".join(lines).rstrip() + "\n"
