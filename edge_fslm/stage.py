"""One stage: build its prompt, generate, and apply its stop rules.

A stage's output is plain text: stripped, cut at the first stop string, and never more
than ``max_tokens`` tokens. Chat prompts use the model's own chat template, rendered in a sandbox with a time and
size bound (chat_template.py), so a hostile template can neither run code nor hang a run.
"""

from __future__ import annotations

import codecs
import ctypes
import re
import time
from dataclasses import dataclass
from typing import Iterator

from . import llama, lookup
from .errors import GGUFError, ManifestError, PromptError
from .manifest import StageSpec
from .pool import LoadedModel


@dataclass
class Generation:
    """What one stage's generation produced and cost."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stop_reason: str = "length"  # "eos" | "stop" | "length"
    prompt_seconds: float = 0.0  # prompt evaluation up to the first token
    gen_seconds: float = 0.0
    truncated_input_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the stage's prefix cache
    lookup: lookup.LookupStats | None = None  # when prompt-lookup decoding ran


def _formatter(lm: LoadedModel, stage: StageSpec):
    fmt = lm.chat_formatter
    if fmt is None:
        from .chat_template import ChatTemplate

        template = lm.model.info.chat_template
        if not template:
            raise ManifestError(
                f"stage '{stage.name}' uses chat messages but model '{lm.model.id}' ({lm.model.path.name})"
                " has no chat template — use `template = \"...\"` for a raw prompt"
            )
        eos = llama.token_text(lm.llm, lm.llm.token_eos()) if lm.llm.token_eos() >= 0 else ""
        bos = llama.token_text(lm.llm, lm.llm.token_bos()) if lm.llm.token_bos() >= 0 else ""
        try:
            fmt = ChatTemplate(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
        except Exception as exc:  # jinja2 syntax errors in a file we did not write
            raise GGUFError(f"{lm.model.path}: chat template does not parse ({exc}) — use a raw `template` stage") from None
        lm.chat_formatter = fmt
    return fmt


def render_prompt(lm: LoadedModel, stage: StageSpec, values: dict[str, str]) -> str:
    """The stage's full prompt text, with the chat template applied for message stages."""
    if stage.template is not None:
        return stage.template.render(values)
    assert stage.messages is not None
    messages = [{"role": m.role, "content": m.content.render(values)} for m in stage.messages]
    try:
        return _formatter(lm, stage).render(messages)
    except (GGUFError, ManifestError):
        raise
    except Exception as exc:  # the template raised (raise_exception) or misbehaved
        raise GGUFError(f"{lm.model.path}: chat template failed on stage '{stage.name}' ({exc})") from None


def tokenize(lm: LoadedModel, text: str) -> list[int]:
    """Tokenize with special tokens parsed, adding BOS only where the model wants it and the text lacks it."""
    return _tokens(lm, [(text, True)])


def _tokens(lm: LoadedModel, segments: list[tuple[str, bool]]) -> list[int]:
    """Tokenize (text, parse_special) segments in order; BOS goes before the first, once."""
    add_bos = bool(llama.lib().llama_vocab_get_add_bos(lm.vocab))
    tokens: list[int] = []
    for text, special in segments:
        if text:
            tokens += lm.llm.tokenize(text.encode("utf-8"), add_bos=add_bos and not tokens, special=special)
    bos = lm.llm.token_bos()
    if add_bos and len(tokens) > 1 and tokens[0] == bos and tokens[1] == bos:
        tokens = tokens[1:]  # the chat template already wrote BOS
    return tokens


def speaks_special(lm: LoadedModel, text: str) -> bool:
    """Whether ``text`` holds a special token's spelling (``<|im_start|>``, ``<s>``, ...).

    llama.cpp parses only control and unknown tokens differently with special tokens on, so
    one tokenization with them on tells: if none of its tokens is one, special off gives the
    same tokens.
    """
    if not text:
        return False
    special = vocab_facts(lm).special_ids
    return not special.isdisjoint(lm.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK = re.compile(_MARK_OPEN + r"([A-Za-z_][A-Za-z0-9_]*)" + _MARK_CLOSE)


def prompt_tokens(lm: LoadedModel, stage: StageSpec, values: dict[str, str]) -> list[int]:
    """The stage's prompt as tokens, where only the stage's own text can speak special tokens.

    A field value (the user's input, an earlier stage's note) that spells ``<|im_end|>`` or
    ``<|im_start|>system`` must stay text, or a request could close its own turn and write
    a system message. Values that spell no special token are tokenized with the prompt
    as one text, so ordinary prompts get exactly the tokens the adapters were trained on;
    otherwise the prompt is rendered with a marker per field and the template's text and
    the values are tokenized apart, the values with special tokens off.
    """
    if not any(speaks_special(lm, values.get(f, "")) for f in stage.reads):
        return tokenize(lm, render_prompt(lm, stage, values))
    marked = render_prompt(lm, stage, {f: f"{_MARK_OPEN}{f}{_MARK_CLOSE}" for f in stage.reads})
    parts = _MARK.split(marked)  # literal, field, literal, field, ..., literal
    if any(_MARK_OPEN in p or _MARK_CLOSE in p for p in parts[::2]):  # a marker the template cut or changed
        raise GGUFError(f"{lm.model.path}: the chat template alters the text of stage '{stage.name}' —"
                        " use a raw `template` stage for this model")
    segments = [(part, True) if i % 2 == 0 else (values.get(part, ""), False) for i, part in enumerate(parts)]
    return _tokens(lm, segments)


@dataclass(frozen=True)
class VocabFacts:
    """What prompt preparation needs to know about a vocabulary, read in one pass per model."""

    max_token_bytes: int  # the longest piece of any token, in UTF-8 bytes
    special_ids: frozenset[int]  # control and unknown tokens: what only special-token parsing yields


def vocab_facts(lm: LoadedModel) -> VocabFacts:
    """The model's VocabFacts, read on first use and kept on the LoadedModel."""
    if lm.vocab_facts is None:
        lc = llama.lib()
        vocab = lm.vocab
        buf = (ctypes.c_char * 512)()
        n, special = 1, set()
        flags = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_UNKNOWN
        for tok in range(lc.llama_vocab_n_tokens(vocab)):
            n = max(n, abs(lc.llama_token_to_piece(vocab, tok, buf, len(buf), 0, False)))
            if lc.llama_vocab_get_attr(vocab, tok) & flags:
                special.add(tok)
        lm.vocab_facts = VocabFacts(n, frozenset(special))
    return lm.vocab_facts


def max_token_bytes(lm: LoadedModel) -> int:
    """The longest piece (in UTF-8 bytes) of any token in the model's vocabulary."""
    return vocab_facts(lm).max_token_bytes


def _bound_input(lm: LoadedModel, stage: StageSpec, values: dict[str, str], n_ctx: int,
                 truncate: bool) -> tuple[dict[str, str], int]:
    """``values`` with an input no context could hold cut to the bytes that could matter (or refused)."""
    text = values.get("input")
    if text is None or "input" not in stage.reads or len(text) <= n_ctx:  # a token is at least one character
        return values, 0
    limit = n_ctx * max_token_bytes(lm)
    size = utf8_len(text)
    if size <= limit:
        return values, 0
    if not truncate:
        raise PromptError(
            f"stage '{stage.name}': the input is {size} bytes, at least {-(-size // (limit // n_ctx))} tokens,"
            f" over the context of {n_ctx} — shorten the prompt, raise ctx_size, or pass truncate=True"
        )
    head = text[:limit].encode("utf-8")[:limit]  # a character is at least one byte: the first limit hold them
    return {**values, "input": head.decode("utf-8", errors="ignore")}, size - limit


def utf8_len(text: str, chunk: int = 1 << 20) -> int:
    """``len(text.encode("utf-8"))`` without a copy of the whole text: a huge prompt is encoded
    a megabyte at a time, and not at all when it is ASCII, so checking it costs no memory."""
    if text.isascii():
        return len(text)
    return sum(len(text[i:i + chunk].encode("utf-8", errors="surrogatepass")) for i in range(0, len(text), chunk))


def _dropped_by_cut(lm: LoadedModel, cut_bytes: int) -> int:
    """Tokens the byte cut dropped, at least: each token covers at most max_token_bytes bytes."""
    return -(-cut_bytes // max_token_bytes(lm)) if cut_bytes else 0


def prepare(
    lm: LoadedModel, stage: StageSpec, values: dict[str, str], n_ctx: int, *, truncate: bool = False
) -> tuple[list[int], int]:
    """Render and tokenize the prompt; make it fit the context or say why it cannot.

    With ``truncate`` the user's input is cut from the end until prompt + max_tokens fit.
    Returns (prompt tokens, number of input tokens dropped).

    An input too large to fit in any case is cut (or refused) by its byte length before
    it is tokenized: no token is longer than the vocabulary's longest piece, so the first
    ``n_ctx`` × that many bytes hold every token that could be kept, and memory spent on
    tokenizing stays bounded by the context, not by the prompt.
    """
    values, cut_bytes = _bound_input(lm, stage, values, n_ctx, truncate)
    tokens = prompt_tokens(lm, stage, values)
    room = n_ctx - stage.max_tokens
    if len(tokens) <= room:
        return tokens, _dropped_by_cut(lm, cut_bytes)
    over = len(tokens) - room
    if not truncate or "input" not in stage.reads:
        raise PromptError(
            f"stage '{stage.name}': prompt is {len(tokens)} tokens and may generate {stage.max_tokens},"
            f" over the context of {n_ctx} — shorten the prompt, raise ctx_size, or pass truncate=True"
        )
    input_tokens = lm.llm.tokenize(values["input"].encode("utf-8"), add_bos=False, special=False)
    keep = len(input_tokens) - over - 8  # a little slack: re-tokenizing at the cut can differ by a token or two
    if keep < 1:
        raise PromptError(
            f"stage '{stage.name}': the stage's own prompt leaves no room for the input in a context of {n_ctx}"
            " — raise ctx_size"
        )
    cut = lm.llm.detokenize(input_tokens[:keep]).decode("utf-8", errors="ignore")
    tokens = prompt_tokens(lm, stage, {**values, "input": cut})
    if len(tokens) > room:
        raise PromptError(f"stage '{stage.name}': could not truncate the prompt to fit {n_ctx} tokens — raise ctx_size")
    return tokens, len(input_tokens) - keep + _dropped_by_cut(lm, cut_bytes)


class StopScanner:
    """Turns a growing text into safe-to-emit pieces.

    It holds back a tail that may be the start of a stop string, never emits leading
    whitespace, and holds trailing whitespace until more text follows, so the pieces
    always join up to exactly ``output`` (the stripped text before any stop string).
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.emitted = -1  # index into text; -1 until the first non-space character is emitted
        self.stopped = False

    def feed(self, piece: str) -> str:
        self.text += piece
        start = max(0, self.emitted - self.longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._emit(len(self.text))
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._emit(len(self.text) - hold)

    def _emit(self, upto: int) -> str:
        upto = len(self.text[:upto].rstrip())
        if self.emitted < 0:
            lead = len(self.text) - len(self.text.lstrip())
            if upto <= lead:
                return ""
            self.emitted = lead
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out

    def finish(self) -> str:
        """Whatever was held back, once generation has ended."""
        return self._emit(len(self.text))

    @property
    def output(self) -> str:
        return self.text.strip()


class TokenCollector:
    """One generation's token-by-token bookkeeping: end-of-generation, UTF-8 pieces split
    across tokens, stop strings and ``max_tokens``. Shared by the sequential path and the
    parallel one (parallel.py), so both stop and strip identically."""

    def __init__(self, lm: LoadedModel, stage: StageSpec):
        self.lm = lm
        self.max_tokens = stage.max_tokens
        self.scanner = StopScanner(stage.stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.n = 0
        self.stop_reason = "length"
        self.done = False

    def feed(self, tok: int) -> str:
        """Take one sampled token; return the text that is now safe to emit."""
        if llama.lib().llama_vocab_is_eog(self.lm.vocab, tok):
            self.stop_reason, self.done = "eos", True
            return ""
        self.n += 1
        piece = self.decoder.decode(self.lm.llm.detokenize([tok], special=False))
        emit = self.scanner.feed(piece) if piece else ""
        if self.scanner.stopped:
            self.stop_reason, self.done = "stop", True
        elif self.n >= self.max_tokens:
            self.stop_reason, self.done = "length", True
        return emit

    def finish(self) -> str:
        """The held-back rest of the text, once generation has ended."""
        if self.scanner.stopped:
            return ""
        rest = ""
        tail = self.decoder.decode(b"", final=True)
        if tail:
            rest += self.scanner.feed(tail)
        return rest + self.scanner.finish()

    @property
    def output(self) -> str:
        return self.scanner.output


# A sentinel no prompt contains: private-use code points around a name.
_FIELD_SENTINEL = "\ue000edge-fslm-field\ue001"
MIN_PREFIX_TOKENS = 16


@dataclass
class PrefixState:
    """A stage's fixed prompt prefix, evaluated once and saved as llama.cpp sequence state."""

    tokens: list[int]
    state: object  # ctypes uint8 array
    n_bytes: int


def static_prefix(lm: LoadedModel, stage: StageSpec) -> str:
    """The rendered prompt up to its first field: the part every run of this stage shares."""
    text = render_prompt(lm, stage, {f: _FIELD_SENTINEL for f in stage.reads})
    cut = text.find(_FIELD_SENTINEL)
    return text if cut < 0 else text[:cut]


def fresh_prefix_split(lm: LoadedModel, stage: StageSpec, tokens: list[int]) -> int:
    """How many leading tokens of ``tokens`` form the stage's saved prefix (0: none worth saving).

    llama.cpp's logits depend, in the last digits and sometimes beyond, on where a prompt
    is split between decodes, so the parallel path (parallel.py) splits at this same point.
    """
    if not lm.prefix_cache_enabled:
        return 0
    prefix = tokenize(lm, static_prefix(lm, stage))
    n = 0
    for a, b in zip(prefix, tokens):
        if a != b:
            break
        n += 1
    n -= 1  # the last prefix token can merge differently with what follows; leave it to the suffix
    return n if MIN_PREFIX_TOKENS <= n < len(tokens) else 0


def prefix_key(lm: LoadedModel, stage: StageSpec, active: tuple[str, float] | None) -> tuple:
    """The prefix cache's key: the prefix text itself and the adapter it was computed under.

    Stacks that share a pool (the server) may name their stages alike with different
    prompts, so a stage's name alone would let one stack's saved prefix shadow another's.
    """
    return (static_prefix(lm, stage), active)


def prefix_split(lm: LoadedModel, stage: StageSpec, tokens: list[int], active: tuple[str, float] | None) -> int:
    """Where the sequential path splits ``tokens`` under adapter ``active``: the saved prefix's
    length when one is cached for it, otherwise where one would be built."""
    if not lm.prefix_cache_enabled:
        return 0
    entry = lm.prefix_cache.get(prefix_key(lm, stage, active))
    if entry is None:
        return fresh_prefix_split(lm, stage, tokens)
    n = len(entry.tokens)
    return n if n and n < len(tokens) and tokens[:n] == entry.tokens else 0


def _restore_or_build_prefix(lm: LoadedModel, stage: StageSpec, tokens: list[int]) -> int:
    """Leave the KV cache holding this stage's saved prefix (building it on first use).

    Returns how many prompt tokens are already evaluated. The cache is keyed by the active
    adapter too: a prefix computed under one adapter is wrong under another.
    """
    llm = lm.llm
    lm.clear_kv()
    if not lm.prefix_cache_enabled:
        return 0
    key = prefix_key(lm, stage, lm.active)
    entry = lm.prefix_cache.get(key)
    if entry is None:
        n = fresh_prefix_split(lm, stage, tokens)
        if not n:
            lm.prefix_cache[key] = PrefixState(tokens=[], state=None, n_bytes=0)  # not worth it; do not retry
            return 0
        llm.eval(tokens[:n])
        buf, written = llama.save_sequence(lm.ctx)
        if written:
            lm.prefix_cache[key] = PrefixState(tokens=list(tokens[:n]), state=buf, n_bytes=written)
        return n
    n = len(entry.tokens)
    if not n or n >= len(tokens) or tokens[:n] != entry.tokens:
        return 0
    if not llama.restore_sequence(lm.ctx, entry.state, entry.n_bytes):
        lm.clear_kv()
        return 0
    llm.input_ids[:n] = entry.tokens
    llm.n_tokens = n
    return n


def generate(lm: LoadedModel, stage: StageSpec, tokens: list[int], seed: int, out: Generation) -> Iterator[str]:
    """Generate from ``tokens``, starting from the stage's saved prefix when there is one.

    ``Llama.generate`` matches the tokens already in the cache against ``tokens`` and
    evaluates only the rest, so a restored prefix is simply reused. Yields text pieces and
    fills ``out`` as it goes.
    """
    llm = lm.llm
    out.cached_prompt_tokens = _restore_or_build_prefix(lm, stage, tokens)
    llm.set_seed(seed)
    s = stage.sampling
    collector = TokenCollector(lm, stage)
    out.prompt_tokens = len(tokens)
    t0 = time.perf_counter()
    t_first = None
    sampler = None
    if lm.draft_max:
        # the sampler chain Llama.generate builds, seeded the same way: the tokens are identical
        sampler = llama.sampler_chain(llm, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                      min_p=s.min_p, repeat_penalty=s.repeat_penalty)
        out.lookup = lookup.LookupStats()
        gen = lookup.decode(lm, sampler.sampler, tokens, out.cached_prompt_tokens, draft_max=lm.draft_max,
                            lone_from=lm.lone_from, n_batch=llm.n_batch, stats=out.lookup)
    else:
        gen = llm.generate(
            tokens,
            temp=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            repeat_penalty=s.repeat_penalty,
            reset=True,
        )
    try:
        for tok in gen:
            if t_first is None:
                t_first = time.perf_counter()
            emit = collector.feed(tok)
            if emit:
                yield emit
            if collector.done:
                break
    finally:
        gen.close()
        if sampler is not None:
            sampler.close()
    rest = collector.finish()
    if rest:
        yield rest
    t_end = time.perf_counter()
    t_first = t_first or t_end
    out.stop_reason = collector.stop_reason
    out.completion_tokens = collector.n
    out.prompt_seconds = t_first - t0
    out.gen_seconds = t_end - t_first
    out.text = collector.output
