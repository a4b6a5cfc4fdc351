"""The one module that touches llama-cpp-python's low-level API and its ``Llama``'s private parts.

The high-level ``Llama`` class loads, tokenizes and samples well, but it cannot switch LoRA
adapters (llama-cpp-python issue 1302), decode several sequences in one batch, or save one
sequence's KV state. For those the runtime calls llama.cpp's C API through the ctypes
bindings, on the raw handles ``Llama`` keeps (``llm._model.model``, ``llm._ctx.ctx``).
Every such reach lives here, so a bump of the pinned binding is checked in one file, and
the log routing and the backtrace guard are set before anything else loads the library.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from .errors import EdgeFSLMError

if TYPE_CHECKING:  # pragma: no cover
    from llama_cpp import Llama

GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type ids, as llama.cpp's --cache-type-k/-v take them
# With flash attention, llama.cpp 0.3.36's CPU kernel for a lone query switches to a split-KV
# form once it sees 512 KV cells, which a lone sequence does from position 256 on (it pads the
# cells it attends to in steps of 256). A decode of several queries takes the one-pass kernel, so
# from this position on its logits differ from a one-token decode's (parallel.py, lookup.py).
LONE_FROM = 256

_LOG: dict[str, Any] = {"verbose": False, "callback": None}


def lib():
    """The ``llama_cpp`` module, imported once with edge-fslm's log routing: the one way in."""
    # On an abort, ggml forks gdb for a backtrace; an orphaned gdb can hang the caller's pipeline.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    import llama_cpp  # deferred: importing it costs ~0.1 s and `inspect`/`plan` never need it

    if _LOG["callback"] is None:
        # llama-cpp-python's own callback lets some warnings through even with verbose=False;
        # ours prints llama.cpp's log only under -v, so a normal run's stderr stays clean.
        @llama_cpp.llama_log_callback
        def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if _LOG["verbose"]:
                sys.stderr.write(text.decode("utf-8", errors="replace"))
                sys.stderr.flush()

        _LOG["callback"] = _log  # keep a reference: llama.cpp holds a raw pointer to it
        llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    return llama_cpp


class _InertFormatter:
    """Stands in for llama-cpp-python's Jinja2ChatFormatter while ``Llama()`` runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def to_chat_handler(self) -> None:
        return None


_FORMATTER_LOCK = threading.Lock()


@contextmanager
def without_chat_handlers() -> Iterator[None]:
    """``Llama()`` compiles every chat template in the file for ``create_chat_completion``, in a
    Jinja environment that folds constants: ``{{ 'x' * 10**10 }}`` allocates 10 GB at load. The
    runtime never calls that API (stages render with chat_template.py, which is bounded), so
    during the constructor the formatter it builds is an inert one.
    """
    import llama_cpp.llama_chat_format as chat_format

    with _FORMATTER_LOCK:
        real = chat_format.Jinja2ChatFormatter
        chat_format.Jinja2ChatFormatter = _InertFormatter
        try:
            yield
        finally:
            chat_format.Jinja2ChatFormatter = real


def set_verbose(verbose: bool) -> None:
    """Show (or hide) llama.cpp's own log for this process."""
    _LOG["verbose"] = verbose


def system_info() -> str:
    """llama.cpp's build line (SIMD flags, backends), as ``llama-cli`` prints it."""
    return lib().llama_print_system_info().decode().strip()


# --- the raw handles of a loaded ``Llama`` -------------------------------------------------

def model_ptr(llm: "Llama") -> Any:
    """The ``llama_model*`` under ``llm``."""
    return llm._model.model


def context_ptr(llm: "Llama") -> Any:
    """The ``llama_context*`` under ``llm``."""
    return llm._ctx.ctx


def vocab(llm: "Llama") -> Any:
    return lib().llama_model_get_vocab(model_ptr(llm))


def token_text(llm: "Llama", token: int) -> str:
    """A token's text as the vocabulary spells it (for BOS/EOS in chat templates)."""
    return llm._model.token_get_text(token)


def sampler_chain(llm: "Llama", *, temperature: float, top_k: int, top_p: float, min_p: float,
                  repeat_penalty: float) -> Any:
    """The same sampler chain ``Llama.generate`` builds, seeded from ``llm``'s seed, for a
    sequence of a context that ``Llama`` does not own."""
    return llm._init_sampler(temp=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty)


# --- context memory and state ----------------------------------------------------------------

def clear_memory(ctx: Any) -> None:
    """Mark every KV cell of ``ctx`` empty (the data is not zeroed: that buys nothing)."""
    lc = lib()
    mem = lc.llama_get_memory(ctx)
    if mem is not None:
        lc.llama_memory_clear(mem, False)


def save_sequence(ctx: Any, seq: int = 0) -> tuple[Any, int]:
    """Copy sequence ``seq``'s KV state out of ``ctx``: (buffer, bytes written; 0 when it failed)."""
    lc = lib()
    size = lc.llama_state_seq_get_size(ctx, seq)
    buf = (ctypes.c_uint8 * size)()
    return buf, lc.llama_state_seq_get_data(ctx, buf, size, seq)


def restore_sequence(ctx: Any, state: Any, n_bytes: int, seq: int = 0) -> bool:
    """Put a state from :func:`save_sequence` back into sequence ``seq``; False when refused."""
    return bool(lib().llama_state_seq_set_data(ctx, state, n_bytes, seq))


# --- LoRA adapters ---------------------------------------------------------------------------

def load_adapter(llm: "Llama", path: str) -> Any:
    """A ``llama_adapter_lora*`` for ``path`` on ``llm``'s model, or None when llama.cpp refuses it.
    It belongs to the model: llama.cpp frees it with the model."""
    return lib().llama_adapter_lora_init(model_ptr(llm), path.encode()) or None


def free_adapter(handle: Any) -> None:
    """Free one adapter now; no context may have it set. (Otherwise llama.cpp frees it with its model.)"""
    lib().llama_adapter_lora_free(handle)


def set_adapter(ctx: Any, handle: Any, scale: float) -> int:
    """Make ``handle`` at ``scale`` (or no adapter, for None) the whole active set of ``ctx``;
    llama.cpp's return code."""
    lc = lib()
    if handle is None:
        return lc.llama_set_adapters_lora(ctx, None, 0, None)
    arr = (lc.llama_adapter_lora_p_ctypes * 1)(handle)
    scales = (ctypes.c_float * 1)(scale)
    return lc.llama_set_adapters_lora(ctx, arr, 1, scales)


# --- batches ---------------------------------------------------------------------------------

class Batch:
    """A ``llama_batch`` filled token by token and decoded in one call, freed on close.

    ``add`` returns the token's index in the batch, which is where its logits are read
    after the decode (``llama_get_logits_ith``).
    """

    def __init__(self, capacity: int, n_seq: int = 1):
        self.lc = lib()
        self.capacity = capacity
        self.b = self.lc.llama_batch_init(capacity, 0, n_seq)
        self.n = 0

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, token: int, pos: int, seqs: Sequence[int] = (0,), logits: bool = False) -> int:
        b, i = self.b, self.n
        if i >= self.capacity:
            raise EdgeFSLMError(f"internal: a batch of {self.capacity} tokens got one more")
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = len(seqs)
        for k, s in enumerate(seqs):
            b.seq_id[i][k] = s
        b.logits[i] = logits
        self.n += 1
        return i

    def decode(self, ctx: Any, hint: str) -> None:
        """Decode what was added, then empty the batch. ``hint`` ends the error: where and what to do."""
        self.b.n_tokens = self.n
        rc = self.lc.llama_decode(ctx, self.b)
        self.n = 0
        if rc != 0:
            raise EdgeFSLMError(f"llama_decode failed with code {rc} {hint}")

    def decode_from(self, ctx: Any, tokens: Sequence[int], start: int, seq: int, chunk: int, hint: str, *,
                    logits_last: bool = True) -> int:
        """Decode ``tokens[start:]`` into sequence ``seq`` at their own positions, ``chunk`` tokens a call.

        Callers pass the chunk where ``Llama.eval`` splits a prompt, so a prompt's rest gets the
        logits of the plain path. Only the last token asks for logits (``logits_last``); its
        batch index is returned, -1 when nothing was decoded.
        """
        idx = -1
        for first in range(start, len(tokens), chunk):
            for p in range(first, min(first + chunk, len(tokens))):
                idx = self.add(tokens[p], p, (seq,), logits_last and p == len(tokens) - 1)
            self.decode(ctx, hint)
        return idx

    def close(self) -> None:
        if self.b is not None:
            self.lc.llama_batch_free(self.b)
            self.b = None
