"""CLI commands for making a fine-tuned stack: ``distill``, ``finetune`` and ``train-recipe``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..progress import ProgressBar


def _log(line: str) -> None:
    click.echo(line, err=True)


@click.command()
@click.option("--stack", "-s", default="fslm-smollm2-prompted", show_default=True,
              help="The stack whose stage prompts the teacher runs.")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Alpaca .json or ARC .jsonl file (repeatable).")
@click.option("--teacher", required=True, help="Teacher GGUF: a path, pkg://..., chunks://... or a cached hf://... file.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for distill.jsonl and one <stage>.jsonl per stage.")
@click.option("--limit", type=int, help="Use only the first N rows of each data file.")
@click.option("--split", type=click.Choice(["train", "heldout", "all"]), default="train", show_default=True,
              help="Alpaca rows to use: train leaves the last 500 out for evaluation.")
@click.option("--threads", "-t", type=int, help="CPU threads for the teacher.")
@click.option("--parallel", "-np", "parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Requests decoded together through each stage (faster on CPU; notes can differ slightly).")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Distill on a Ray cluster: auto, HOST:PORT, ray://host:10001, or local ([ray] extra). "
                   "-t is per actor; the teacher file must exist at the same path on every node.")
@click.option("--ray-actors", type=click.IntRange(1, 100000),
              help="Actors (one teacher each) for --ray (default: the cluster's CPUs / threads).")
@click.option("--ray-shard-size", type=click.IntRange(1, 100000), default=16, show_default=True,
              help="Requests per shard for --ray: the unit that is retried and saved.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def distill(stack, data, teacher, out_dir, limit, split, threads, parallel, ray_address, ray_actors, ray_shard_size,
            as_json):
    """Write per-stage training data: teacher notes for the intermediate stages, gold answers for the last.

    Resumable: re-run the same command after a stop and it continues without losing or repeating rows.
    """
    from .distill import RayOptions, distill as run_distill

    ray = RayOptions(address=ray_address, actors=ray_actors, shard_size=ray_shard_size) if ray_address else None

    with ProgressBar("distilling") as bar:
        report = run_distill(stack, [(p, limit) for p in data], teacher, out_dir, split=split, threads=threads,
                             parallel=parallel, progress=None if as_json else bar, ray=ray)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(f"{report.rows_total} rows ({report.rows_written} new) in {report.seconds:.0f} s → {report.out_dir}")
    for name, path in report.stage_files.items():
        empty = report.empty_notes.get(name, 0)
        click.echo(f"  {path}" + (f"  ({empty} empty targets, skipped in training)" if empty else ""))


@click.command()
@click.option("--stack", "-s", default="fslm-smollm2", show_default=True,
              help="The stack whose stage prompts the adapters are trained under.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Folder written by `edge-fslm distill`.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for <stage>.gguf adapters, checkpoints and loss logs.")
@click.option("--stage", "stages", multiple=True, help="Train only this stage (repeatable).")
@click.option("--steps", type=int, help="Optimizer steps per stage.")
@click.option("--rank", "-r", type=int, help="LoRA rank.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--batch-size", type=int, help="Packed rows per step.")
@click.option("--seq-len", type=int, help="Tokens per packed row.")
@click.option("--seed", type=int, help="Seed for LoRA init, dropout and data order.")
@click.option("--threads", "-t", type=int, help="torch CPU threads.")
@click.option("--base-hf", type=click.Path(file_okay=False, exists=True),
              help="HF checkpoint of the base (default: dequantize the stack's GGUF once, cached).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-stage results as JSON.")
def finetune(stack, data_dir, out_dir, stages, steps, rank, lr, batch_size, seq_len, seed, threads, base_hf, as_json):
    """Train one LoRA adapter per stage and export each to a llama.cpp LoRA GGUF (needs the [train] extra).

    Resumable: checkpoints every few steps; a finished stage is skipped on a re-run.
    """
    from .finetune import TrainConfig, finetune as run_finetune

    config = TrainConfig().with_overrides(steps=steps, rank=rank, lr=lr, batch_size=batch_size, seq_len=seq_len,
                                          seed=seed, threads=threads)
    results = run_finetune(stack, data_dir, out_dir, config=config, stages=list(stages) or None,
                           base_hf=base_hf, log=None if as_json else _log)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    click.echo(f"{'stage':<12} {'examples':>8} {'steps':>5} {'tokens':>8} {'seconds':>8}  loss")
    for r in results:
        click.echo(f"{r.stage:<12} {r.examples:>8} {r.steps:>5} {r.tokens:>8} {r.seconds:>8.0f}  "
                   f"{r.first_loss:.3f} → {r.last_loss:.3f}   {r.adapter}")


@click.command("train-recipe")
@click.argument("recipe", default="fslm-smollm2")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Folder holding the recipe's data files (e.g. ../shared/data).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the data, checkpoints, adapters and a runnable stack.toml.")
@click.option("--threads", "-t", type=int, help="CPU threads.")
def train_recipe(recipe, data_dir, out_dir, threads):
    """Reproduce a stack's adapters from its recipe (a built-in stack name or a .recipe.toml file).

    Distills, fine-tunes every stage and writes OUT/stack.toml; resumable at every step.
    """
    from .recipe import run_recipe

    with ProgressBar("distilling") as bar:
        report = run_recipe(recipe, data_dir, out_dir, threads=threads, progress=bar, log=_log)
    click.echo(f"done in {report.seconds:.0f} s — run it with: edge-fslm run --stack {Path(out_dir) / 'stack.toml'} \"...\"")
