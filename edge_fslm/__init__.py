"""edge-fslm: run stacks of small fine-tuned language models on-device.

    from edge_fslm import Stack
    with Stack.load("fslm-smollm2") as stack:
        print(stack.run("Why is the sky blue?").answer)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    BudgetError,
    EdgeFSLMError,
    GGUFError,
    ManifestError,
    PromptError,
    SourceError,
)

__all__ = [
    "Stack",
    "RunResult",
    "StageTrace",
    "FinalStageSettings",
    "EdgeFSLMError",
    "ManifestError",
    "SourceError",
    "GGUFError",
    "BudgetError",
    "PromptError",
    "__version__",
]


def __getattr__(name: str):
    # Lazy so that `import edge_fslm` (and `edge-fslm inspect`) never pays for llama_cpp.
    if name == "Stack":
        from .api import Stack

        return Stack
    if name in ("RunResult", "StageTrace", "FinalStageSettings"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
