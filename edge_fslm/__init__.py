"""edge-fslm: run stacks of small fine-tuned language models on-device.

    from edge_fslm import Stack
    with Stack.load("fslm-smollm2") as stack:
        print(stack.run("Why is the sky blue?").answer)
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os

# setup.cfg maps the top-level folders convert/ and quant_profiles/ into this package when it
# is installed. In a source checkout (setup.cfg beside this folder) make the same two names
# resolve, so `python -m pytest` and `python -m edge_fslm.cli` work from the checkout too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.cfg")) and _os.path.isdir(_os.path.join(_root, "convert")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821

from .errors import (  # noqa: E402
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
    if name in ("RunResult", "StageTrace"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
