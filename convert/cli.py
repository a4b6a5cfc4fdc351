"""Click commands for conversion: thin shells over the Python API in this package.

Registered on the main ``edge-fslm`` group by ``edge_fslm/cli.py``; the group turns
every ``EdgeFSLMError`` into one ``error: ...`` line and exit code 2.  Progress
bars go to stderr and only when it is a terminal, so piped output stays clean.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..progress import ProgressBar
from ..units import fmt_bytes

__all__ = ["convert", "convert_lora", "quantize", "build", "profiles"]


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.command()
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--outtype", "-t", type=click.Choice(["f16", "bf16", "f32", "q8_0"]), default="f16", show_default=True,
              help="Type of the 2-D weights (norms and biases stay f32).")
@click.option("--pre-tokenizer", default=None,
              help="Force llama.cpp's pre-tokenizer name (gpt-2, smollm, llama-bpe, ...) of a byte-level BPE "
                   "tokenizer instead of detecting it.")
@click.option("--outfile", "-o", "outfile", type=click.Path(path_type=Path),
              help="The GGUF to write (llama.cpp's converter flag); the same as giving OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def convert(hf_dir: Path, out: Path | None, outtype: str, pre_tokenizer: str | None, outfile: Path | None,
            as_json: bool) -> None:
    """Convert the Hugging Face checkpoint folder HF_DIR to a GGUF file OUT (or -o/--outfile).

    OUT defaults to HF_DIR's name plus .OUTTYPE.gguf in the current folder.
    Supported: LlamaForCausalLM (SmolLM2, TinyLlama, Llama) and GPTNeoXForCausalLM (Pythia), with byte-level
    BPE or SentencePiece tokenizers (SentencePiece needs the sentencepiece package).
    """
    from .hf_to_gguf import convert_hf

    if out is not None and outfile is not None and out != outfile:
        raise click.UsageError(f"two outputs given ({out} and --outfile {outfile}) — give one")
    out = out or outfile or Path(f"{hf_dir.resolve().name}.{outtype}.gguf")
    with ProgressBar(f"converting to {outtype}", show_pos=False) as bar:
        rep = convert_hf(hf_dir, out, outtype, pre_tokenizer=pre_tokenizer, progress=bar)
    if as_json:
        _echo_json(rep.to_dict())
        return
    types = ", ".join(f"{k} {v}" for k, v in rep.tensor_types.items())
    tok = "SentencePiece tokenizer" if rep.tokenizer_model == "llama" else f"tokenizer pre {rep.tokenizer_pre}"
    click.echo(f"{rep.path}: {rep.gguf_architecture}, {rep.n_tensors} tensors ({types}), "
               f"{fmt_bytes(rep.file_size, 1)}, {tok}, {rep.seconds:.1f} s")
    for w in rep.warnings:
        click.echo(f"warning: {w}", err=True)


@click.command("convert-lora")
@click.argument("peft_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--base", "base_dir", required=True, type=click.Path(path_type=Path),
              help="The base model's Hugging Face checkpoint folder.")
@click.option("--outtype", "-t", type=click.Choice(["f16", "f32"]), default="f16", show_default=True)
@click.option("--base-gguf", type=click.Path(path_type=Path), default=None,
              help="Also check the adapter against this converted base GGUF.")
@click.option("--merge", is_flag=True,
              help="Write a full model with the adapter merged in (needs torch, transformers, peft).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def convert_lora(peft_dir: Path, out: Path, base_dir: Path, outtype: str, base_gguf: Path | None, merge: bool,
                 as_json: bool) -> None:
    """Convert the PEFT LoRA folder PEFT_DIR to a llama.cpp LoRA GGUF file OUT."""
    from .lora_to_gguf import convert_lora as run

    with ProgressBar("merging and converting" if merge else "converting adapter", show_pos=False) as bar:
        rep = run(peft_dir, base_dir, out, outtype, merge=merge, base_gguf=base_gguf, progress=bar)
    if as_json:
        _echo_json(rep.to_dict())
        return
    if merge:
        click.echo(f"{rep.path}: merged model, {rep.n_tensors} tensors, {fmt_bytes(rep.file_size, 1)}, {rep.seconds:.1f} s")
    else:
        click.echo(f"{rep.path}: LoRA rank {'/'.join(map(str, rep.ranks))}, alpha {rep.alpha:g}, "  # type: ignore[union-attr]
                   f"{rep.n_modules} layers ({', '.join(rep.modules)}), {fmt_bytes(rep.file_size, 1)}")  # type: ignore[union-attr]
    for w in rep.warnings:
        click.echo(f"warning: {w}", err=True)


@click.command()
@click.argument("in_path", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("qtype", default="Q4_K_M")
@click.option("--threads", "-t", type=click.IntRange(min=0), default=0, show_default=True,
              help="Quantizer threads (0 = all hardware threads).")
@click.option("--allow-requantize", is_flag=True, help="Accept an already quantized input (quality drops twice).")
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def quantize(in_path: Path, out: Path, qtype: str, threads: int, allow_requantize: bool, verbose: bool,
             as_json: bool) -> None:
    """Quantize the F16/F32 GGUF IN_PATH to QTYPE (default Q4_K_M), writing OUT.

    Types: F32 F16 BF16 Q8_0 Q6_K Q5_K_M Q5_K_S Q5_1 Q5_0 Q4_K_M Q4_K_S Q4_1 Q4_0
    IQ4_NL IQ4_XS Q3_K_L Q3_K_M Q3_K_S Q2_K.
    """
    from .quantize import normalize_qtype
    from .quantize import quantize as run

    name = normalize_qtype(qtype)
    with ProgressBar(f"quantizing to {name}", show_pos=False) as bar:
        rep = run(in_path, out, name, threads=threads, progress=bar, allow_requantize=allow_requantize,
                  verbose=verbose)
    if as_json:
        _echo_json(rep.to_dict())
        return
    types = ", ".join(f"{k} {fmt_bytes(v, 1)}" for k, v in rep.bytes_by_type.items())
    click.echo(f"{rep.path}: {rep.qtype}, {fmt_bytes(rep.file_size, 1)} ({100 * rep.ratio:.0f} % of the input), "
               f"{rep.seconds:.1f} s — {types}")
    if rep.fallbacks:
        kinds: dict[str, int] = {}
        for t in rep.fallbacks.values():
            kinds[t] = kinds.get(t, 0) + 1
        click.echo(f"note: {len(rep.fallbacks)} tensors have rows that do not fit {rep.qtype} blocks and were stored "
                   f"as {', '.join(f'{k} ({v})' for k, v in kinds.items())}", err=True)


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--profile", "-p", "profile", required=True,
              help="Built-in profile name (see `edge-fslm profiles`) or a profile .toml file.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to build the stack into.")
@click.option("--force", is_flag=True, help="Rebuild every artifact even if it is up to date.")
@click.option("--threads", "-t", type=click.IntRange(min=0), default=0, help="Quantizer threads (0 = all).")
@click.option("--json", "as_json", is_flag=True, help="Print the build report as JSON.")
def build(source: Path, profile: str, out_dir: Path, force: bool, threads: int, as_json: bool) -> None:
    """Build a runnable stack folder from the source manifest SOURCE for a device profile.

    SOURCE names Hugging Face checkpoint folders as models and PEFT folders as
    stage adapters. Run the result with `edge-fslm run --stack OUT`.
    """
    from .build import build_stack

    with ProgressBar(show_pos=False) as bar:

        def log(line: str) -> None:
            bar.restart(line.split(": ", 1)[-1])
            if not as_json:
                click.echo(line, err=True)

        rep = build_stack(source, profile, out_dir, progress=bar, log=log, force=force, threads=threads)
    if as_json:
        _echo_json(rep.to_dict())
        return
    for w in rep.warnings:
        click.echo(f"warning: {w}", err=True)
    total = sum(a.size for a in rep.artifacts)
    click.echo(f"{rep.stack_file}: {rep.built} built, {rep.skipped} up to date, {fmt_bytes(total, 1)} in "
               f"{len(rep.artifacts)} files, profile {rep.profile}, {rep.seconds:.1f} s")
    click.echo(f"run it: edge-fslm run --stack {rep.out_dir} \"...\"")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def profiles(as_json: bool) -> None:
    """List the built-in device profiles and what each is for."""
    from .device_profile import list_profiles

    rows = list_profiles()
    if as_json:
        _echo_json([p.to_dict() for p in rows])
        return
    for p in rows:
        rt = p.runtime()
        over = "".join(f", {k} {v}" for k, v in p.stage_quants.items())
        click.echo(click.style(p.name, bold=True) + f"  {p.description}")
        click.echo(f"  weights {p.quant}{over} · adapters {p.adapter_type} · ctx {rt['ctx_size']} · "
                   f"threads {rt['threads'] or 'auto'} · batch {rt['batch_size']} · kv {rt['kv_cache_type']} · "
                   f"gpu layers {rt['gpu_layers']} · budget {rt.get('budget', 'none')} · policy {rt['policy']}")
