"""One exception family for everything a user can get wrong.

The CLI turns any ``EdgeFSLMError`` into one line on stderr and exit code 2,
so every message here must name the file or field at fault and say what to do.
Anything that is *not* an ``EdgeFSLMError`` is a bug in edge-fslm.
"""

from __future__ import annotations


class EdgeFSLMError(Exception):
    """A user-facing error: bad input, missing file, impossible budget."""

    exit_code = 2


class ManifestError(EdgeFSLMError):
    """A stack manifest or quant profile that does not validate."""


class SourceError(EdgeFSLMError):
    """A model reference that cannot be resolved, or whose sha256 does not match."""


class GGUFError(EdgeFSLMError):
    """A file that is not a GGUF llama.cpp can safely open."""


class BudgetError(EdgeFSLMError):
    """A memory budget that no residency policy can meet."""


class PromptError(EdgeFSLMError):
    """A prompt that cannot be run: empty, not UTF-8, longer than the context."""


class DataError(EdgeFSLMError):
    """A training or evaluation data file that cannot be read, or an output folder made for other inputs."""
