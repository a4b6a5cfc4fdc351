"""How sizes are shown to people: one formatter, so every command prints megabytes the same way."""

from __future__ import annotations


def fmt_bytes(n: int | float | None, digits: int = 0) -> str:
    """Decimal megabytes (as `ls -h --si` and llama.cpp's logs count them); '-' for unknown."""
    return "-" if n is None else f"{n / 1e6:.{digits}f} MB"
