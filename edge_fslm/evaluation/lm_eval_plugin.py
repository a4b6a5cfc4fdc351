"""lm-evaluation-harness model ``edge-fslm``: any lm-eval task on a stack, or on a bare GGUF model.

Install with ``pip install 'edge-fslm[eval]'``. lm-eval 0.4.13 finds models only in its
own registry and has no plugin entry point for them (upstream issue #1457), so import
this module before lm-eval looks the name up. From the shell::

    python -m edge_fslm.evaluation.lm_eval_plugin run --model edge-fslm \\
        --model_args stack=fslm-smollm2,threads=4 --tasks arc_easy

takes every ``lm-eval`` argument (it registers the model, then runs lm-eval's own CLI).
From Python, ``import edge_fslm.evaluation.lm_eval_plugin`` and then
``lm_eval.simple_evaluate(model="edge-fslm", model_args="stack=...", ...)``.

model_args: ``stack`` (name, manifest or folder; default fslm-smollm2), ``single`` (a bare
model instead: path, pkg://... or hf://...), ``threads``, ``ctx_size``, ``max_tokens``
(caps every stage), ``verbose``.

What each request does, in stack mode:

* ``loglikelihood``: the stages before the last write their notes with the request's
  context as ``input``; the final stage's prompt (its chat template, up to the assistant
  turn) is the context, and the continuation is scored after it, as ``edge-fslm eval arc``
  does. The continuation is scored as given, so lm-eval's default target delimiter (a
  space) comes first; set ``target_delimiter: ""`` in a task for chat-style answers.
  Requests with the same context share one notes run and one context evaluation. An
  empty context is scored on the final stage's model after its BOS (or EOS) token.
* ``loglikelihood_rolling``: the final stage's model (with its adapter), no chat
  template, in lm-eval's rolling windows of the context size.
* ``generate_until``: a run of the stack; the final stage also stops at ``until`` and
  after ``max_gen_toks`` tokens. Outputs are stripped, as stage outputs always are.

With ``single`` every request goes to the bare model as raw text, tokenized the way
lm-eval's own causal models do, so results compare with lm-eval's ``hf`` and ``gguf``
backends. Requests run one at a time; ``batch_size`` and ``device`` are ignored.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .evaluate import final_stage_model, load_eval_stack, notes_for, score_in_stack, score_single
from ..pool import LoadedModel
from .scoring import encode, loglikelihood
from ..stage import Generation, generate, prepare


def _prefix_token(lm: LoadedModel) -> int:
    """What an empty context conditions on: BOS, or EOS for models without one (lm-eval's choice)."""
    bos = lm.llm.token_bos()
    return bos if bos >= 0 else lm.llm.token_eos()


@register_model("edge-fslm")
class EdgeFSLMLM(LM):
    """An edge-fslm stack (or, with ``single``, a bare GGUF model) as an lm-eval model."""

    def __init__(
        self,
        stack: str = "fslm-smollm2",
        single: str | None = None,
        threads: int | None = None,
        ctx_size: int | None = None,
        max_tokens: int | None = None,
        verbose: bool = False,
        batch_size: int | str | None = None,  # lm-eval passes these; llama.cpp runs one request at a time
        max_batch_size: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__()
        self.single = single
        self.max_tokens = int(max_tokens) if max_tokens else None
        self.stack = load_eval_stack(
            str(stack), single, chat=False, threads=int(threads) if threads else None,
            ctx_size=int(ctx_size) if ctx_size else None, max_tokens=int(max_tokens) if max_tokens else None,
            verbose=bool(verbose),
        )

    def close(self) -> None:
        self.stack.close()

    # -- scoring ---------------------------------------------------------------------

    def _score(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        if self.single is not None and context:
            return score_single(self.stack, context, continuations)
        if context:
            return score_in_stack(self.stack, context, continuations)[0]
        lm = final_stage_model(self.stack)
        prefix = _prefix_token(lm)
        out = []
        for c in continuations:
            tokens = encode(lm, c)
            ctx, cont = ([prefix], tokens) if not tokens or tokens[0] != prefix else (tokens[:1], tokens[1:])
            out.append(loglikelihood(lm, ctx, [cont], truncate=True)[0])
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        by_context: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_context.setdefault(req.args[0], []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for context, idxs in tqdm(by_context.items(), desc="edge-fslm loglikelihood", disable=disable_tqdm):
            scores = self._score(context, [requests[i].args[1] for i in idxs])
            for i, s in zip(idxs, scores):
                results[i] = s
                self.cache_hook.add_partial("loglikelihood", requests[i].args, s)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        lm = final_stage_model(self.stack)
        n_ctx = self.stack.settings.ctx_size
        out = []
        for req in tqdm(requests, desc="edge-fslm rolling", disable=disable_tqdm):
            tokens = encode(lm, req.args[0])
            total = 0.0
            for window in get_rolling_token_windows(tokens, prefix_token=_prefix_token(lm), max_seq_len=n_ctx,
                                                    context_len=1):
                ctx, cont = make_disjoint_window(window)
                total += loglikelihood(lm, ctx, [cont])[0][0]
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # -- generation ------------------------------------------------------------------

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        st = self.stack
        final = st.manifest.stages[-1]
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(gen_kwargs.get("max_gen_toks") or final.max_tokens)
        if self.max_tokens:
            max_gen = min(max_gen, self.max_tokens)
        sampled = bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature") or 0.0) > 0
        temperature = float(gen_kwargs.get("temperature") or 1.0) if sampled else 0.0
        spec = replace(
            final,
            stop=tuple(dict.fromkeys([*final.stop, *(u for u in until if u)])),
            max_tokens=max(1, min(max_gen, st.settings.ctx_size - 1)),
            sampling=replace(final.sampling, temperature=temperature),
        )
        values = {"input": context} if self.single is not None else notes_for(st, context)
        lm = final_stage_model(st)
        tokens, _ = prepare(lm, spec, values, st.settings.ctx_size, truncate=True)
        gen = Generation()
        for _ in generate(lm, spec, tokens, st.settings.seed + len(st.manifest.stages) - 1, gen):
            pass
        return gen.text

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, desc="edge-fslm generate", disable=disable_tqdm):
            context, gen_kwargs = req.args
            text = self._generate(context, dict(gen_kwargs or {}))
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own CLI, with the ``edge-fslm`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
