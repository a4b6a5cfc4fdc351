"""Self-tests of the hostile-input helpers (edge_fslm.testing.hostile)."""

from __future__ import annotations

from edge_fslm.testing.hostile import cli, real_header, sparse_copy, stack_for, write_tiny_llama


def test_tiny_llama_runs_end_to_end(tmp_path):
    """The tiny model is a real, loadable llama: the hostile-metadata cases vary only the metadata."""
    model = write_tiny_llama(tmp_path / "tiny.gguf")
    assert model.stat().st_size < 200_000
    m = stack_for(tmp_path, model, template="{input}")
    proc = cli("run", "hello there", "--stack", str(m), "--json")
    assert proc.returncode == 0, proc.err
    assert b'"completion_tokens": 4' in proc.stdout


def test_sparse_copies_cost_only_the_header(tmp_path):
    head, size, lay = real_header()
    p = sparse_copy(tmp_path / "s.gguf", head, size)
    assert p.stat().st_size == size
    assert p.stat().st_blocks * 512 < 4 << 20  # the data section is a hole
    assert lay.n_tensors == 272 and "tokenizer.ggml.tokens" in lay.kv
