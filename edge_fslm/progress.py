"""The one progress bar every long CLI command draws: batch runs, Ray runs, assembling,
distilling, evaluating and converting.

The API reports progress as ``(done, total)`` callbacks (converters add a ``what``), and
each command turns them into this bar. It draws on stderr, so stdout stays clean for
``--json`` and pipes, and only when stderr is a terminal, so logs and CI output hold the
command's own lines, not bar frames. It is created at the first call, so a resumed job's
bar starts where the job does.
"""

from __future__ import annotations

import sys
from typing import Any

import click


class ProgressBar:
    """A click progress bar with ETA fed by ``(done, total[, what])`` calls."""

    def __init__(self, label: str = "", *, show_pos: bool = True, show_item: bool = False):
        self.label = label
        self.show_pos = show_pos  # off for byte counts, which the percentage says better
        self.show_item = show_item
        self.enabled = sys.stderr.isatty()
        self._bar: Any = None
        self._offset = 0
        self._finished = False

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, done: int, total: int, what: str | None = None) -> None:
        if not self.enabled or (self._finished and done >= total):
            return
        if self._bar is None:
            self._offset = done  # a resumed job: the bar and its ETA count what is left
            resuming = done and done < total and self.show_pos
            label = self.label + (f" (resuming at {done}/{total})" if resuming else "")
            self._bar = click.progressbar(length=max(total - done, 1), label=label, file=sys.stderr, show_eta=True,
                                          show_pos=self.show_pos,
                                          item_show_func=(lambda s: s) if self.show_item else None)
            self._bar.__enter__()
        elif total - self._offset != self._bar.length and total > self._offset:
            self._bar.length = total - self._offset  # a converter learns its total as it goes
        self._bar.update(max(0, done - self._offset - self._bar.pos), what)
        if total and done >= total:  # finished: end the line now, before the command's next output
            self.close()
            self._finished = True

    def step(self, n: int = 1, what: str | None = None) -> None:
        """Advance by ``n`` (for callers that count steps, not totals)."""
        if self._bar is not None:
            self._bar.update(n, what)

    def start(self, total: int, done: int = 0) -> None:
        """Draw the bar now, before the first step is done."""
        self(done, total)

    def restart(self, label: str) -> None:
        """Close this bar; the next call draws a new one under ``label`` (a multi-step command)."""
        self.close()
        self.label = label
        self._finished = False

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
