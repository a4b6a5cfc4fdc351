"""``edge-fslm eval arc|instruct``: the click shell over :mod:`edge_fslm.evaluation.evaluate`.

Errors are ``EdgeFSLMError``s, which the main group prints as one ``error: ...`` line
(exit 2). The progress bar goes to stderr, so stdout holds only the table or the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..manifest import ADAPTER_RESIDENCIES
from ..progress import ProgressBar


def _options(f):
    opts = [
        click.option("--stack", "-s", "stack", default="fslm-smollm2", show_default=True,
                     help="Built-in stack name, manifest file, or stack folder."),
        click.option("--data", "-d", "data", required=True, type=click.Path(dir_okay=False),
                     help="The evaluation data file."),
        click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N rows."),
        click.option("--single", "single", metavar="MODEL",
                     help="Evaluate a bare model instead (path, pkg://... or hf://...), as a one-stage stack."),
        click.option("--threads", "-t", type=int, help="CPU threads (default: physical cores)."),
        click.option("--ctx-size", "-c", type=int, help="Context size in tokens (overrides the manifest)."),
        click.option("--max-tokens", "-n", type=int, help="Cap every stage's generated tokens."),
        click.option("--adapter-residency", type=click.Choice(["auto", *ADAPTER_RESIDENCIES]),
                     help="LoRA adapters kept loaded: all, or only the active one (less memory; see `run --help`)."),
        click.option("-o", "--output", "output", type=click.Path(dir_okay=False),
                     help="Write the full report (summary and every row) as JSON."),
        click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of a table."),
        click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log."),
        click.option("--ray", "ray_address", metavar="ADDRESS",
                     help="Evaluate on a Ray cluster: auto, HOST:PORT, ray://host:10001, or local ([ray] extra). "
                          "-t is per actor; the stack must resolve on every node."),
        click.option("--ray-actors", type=click.IntRange(1, 100000),
                     help="Actors (one stack each) for --ray (default: the cluster's CPUs / threads)."),
        click.option("--ray-shard-size", type=click.IntRange(1, 100000), default=16, show_default=True,
                     help="Rows per shard for --ray: the unit that is retried."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _ray(address: str | None, actors: int | None, shard_size: int):
    from .evaluate import RayEval

    return RayEval(address=address, actors=actors, shard_size=shard_size) if address else None


def _emit(report, output: str | None, as_json: bool) -> None:
    data = report.to_dict()
    if output:
        Path(output).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        click.echo(f"report: {output}", err=True)
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False))
    else:
        click.echo(report.format_text())


@click.group("eval")
def eval_group() -> None:
    """Evaluate a stack (or a bare model): ARC multiple choice, Alpaca instructions."""


@eval_group.command("arc")
@_options
def arc(stack, data, limit, single, threads, ctx_size, max_tokens, adapter_residency, output, as_json, verbose,
        ray_address, ray_actors, ray_shard_size):
    """ARC accuracy (acc, acc_norm) by the log-likelihood of each choice.

    The stack's earlier stages write notes on the question; the final stage scores each
    choice as the continuation of its prompt. --single scores a bare model with
    lm-evaluation-harness's ARC prompt instead.
    """
    from .evaluate import evaluate_arc

    with ProgressBar("arc") as progress:
        report = evaluate_arc(stack, data, limit=limit, single=single, threads=threads, ctx_size=ctx_size,
                              max_tokens=max_tokens, adapter_residency=adapter_residency, progress=progress,
                              verbose=verbose,
                              ray=_ray(ray_address, ray_actors, ray_shard_size))
    _emit(report, output, as_json)


@eval_group.command("instruct")
@_options
@click.option("--split", type=click.Choice(["heldout", "train", "all"]), default="heldout", show_default=True,
              help="Which Alpaca rows: the held-out last 500, the rest, or all.")
def instruct(stack, data, limit, single, threads, ctx_size, max_tokens, adapter_residency, output, as_json, verbose,
             ray_address, ray_actors, ray_shard_size, split):
    """Answer Alpaca instructions and score them: exact match, ROUGE-1, ROUGE-L, Levenshtein similarity."""
    from .evaluate import evaluate_instruct

    with ProgressBar("instruct") as progress:
        report = evaluate_instruct(stack, data, split=split, limit=limit, single=single, threads=threads,
                                   ctx_size=ctx_size, max_tokens=max_tokens, adapter_residency=adapter_residency,
                                   progress=progress, verbose=verbose,
                                   ray=_ray(ray_address, ray_actors, ray_shard_size))
    _emit(report, output, as_json)
